"""The indexed (`.bin`/`.idx`) datasets that tools/preprocess_data.py writes: checked once,
with an error naming the file, before megatron-core opens them; and the record of the
tokenizer that wrote them (`<prefix>.tokenizer.json`), checked against the run's.
"""

import json
import os
import struct

import numpy

from megatron.core.datasets.indexed_dataset import DType, IndexedDataset

from megatron_effmlm.atomic import write_json
from megatron_effmlm.data.errors import DataError


_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER_BYTES = 9 + 8 + 1 + 8 + 8


def check_indexed_dataset(prefix: str, flag: str = "--data-path") -> None:
    """Fail with a clear message on a missing, truncated or corrupt ``prefix.bin/.idx``."""
    idx_path, bin_path = f"{prefix}.idx", f"{prefix}.bin"
    missing = [p for p in (bin_path, idx_path) if not os.path.isfile(p)]
    if missing:
        raise DataError(
            f"{flag}: no indexed dataset at prefix {prefix}: {' and '.join(missing)} "
            f"{'does' if len(missing) == 1 else 'do'} not exist (give the prefix without .bin/.idx)"
        )
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        header = f.read(_IDX_HEADER_BYTES)
    if len(header) < _IDX_HEADER_BYTES or header[:9] != _IDX_MAGIC:
        raise DataError(f"{idx_path}: corrupt or truncated index file (bad header, {size} bytes)")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", header[9:])
    if version != 1:
        raise DataError(f"{idx_path}: unsupported index version {version}")
    try:
        itemsize = DType.size(DType.dtype_from_code(code))
    except (KeyError, ValueError):
        raise DataError(f"{idx_path}: corrupt index file (unknown dtype code {code})") from None
    expected = _IDX_HEADER_BYTES + n_seq * (4 + 8) + n_doc * 8
    if size < expected:
        raise DataError(
            f"{idx_path}: truncated index file: {size} bytes, but its header promises "
            f"{n_seq} sequences and {n_doc - 1} documents ({expected} bytes)"
        )
    lengths = numpy.fromfile(idx_path, dtype=numpy.int32, count=n_seq, offset=_IDX_HEADER_BYTES)
    pointers = numpy.fromfile(idx_path, dtype=numpy.int64, count=n_seq, offset=_IDX_HEADER_BYTES + 4 * n_seq)
    docs = numpy.fromfile(idx_path, dtype=numpy.int64, count=n_doc, offset=_IDX_HEADER_BYTES + 12 * n_seq)
    if n_doc < 1 or docs[0] != 0 or docs[-1] != n_seq or numpy.any(numpy.diff(docs) < 0):
        raise DataError(f"{idx_path}: corrupt index file (document indices do not cover the sequences)")
    if (lengths < 0).any():
        raise DataError(f"{idx_path}: corrupt index file (negative sequence length)")
    # Sequences lie back to back: each size entry must equal the gap between its pointers.
    ends = pointers.astype(numpy.int64) + lengths.astype(numpy.int64) * itemsize
    bad = numpy.flatnonzero(pointers[1:] != ends[:-1]) + 1 if n_seq else numpy.array([], dtype=numpy.int64)
    if n_seq and pointers[0] != 0:
        bad = numpy.concatenate([[0], bad])
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{idx_path}: corrupt index file (the size or offset entry of sequence {i} does not match "
                        f"its neighbours: {bad.size} such entries)")
    need = int(ends[-1]) if n_seq else 0
    have = os.path.getsize(bin_path)
    if have < need:
        raise DataError(f"{bin_path}: truncated data file: {have} bytes, its index needs {need}")
    if have != need:  # an .idx of one dataset beside the .bin of another
        raise DataError(f"{bin_path}: {have} bytes, but {idx_path} describes {need}: the two files are of "
                        "different datasets (preprocess again, or pair each .idx with its own .bin)")


def check_token_ids(prefix: str, tokenizer, max_tokens: int = 1 << 24) -> None:
    """The data must have been made with this tokenizer: its first `max_tokens` token ids
    (a bounded read, whatever the corpus size) must lie inside the tokenizer's vocabulary."""
    vocab = getattr(tokenizer, "vocab_size", None)
    if not vocab:
        return
    with open(f"{prefix}.idx", "rb") as f:
        code = struct.unpack("<QBQQ", f.read(_IDX_HEADER_BYTES)[9:])[1]
    dtype = DType.dtype_from_code(code)
    count = min(os.path.getsize(f"{prefix}.bin") // numpy.dtype(dtype).itemsize, max_tokens)
    if count == 0:
        return
    ids = numpy.memmap(f"{prefix}.bin", dtype=dtype, mode="r", shape=(count,))
    top = int(ids.max())
    if top >= vocab:
        where = getattr(tokenizer, "path", None) or "the tokenizer"
        raise DataError(
            f"{prefix}.bin holds token id {top}, outside the vocabulary of the tokenizer in {where} "
            f"({vocab} tokens): the data was made with another tokenizer (--tokenizer-dir)")


# Beside prefix.bin/.idx: which tokenizer made them (tools/preprocess_data.py writes it).
TOKENIZER_SIDECAR = ".tokenizer.json"


def tokenizer_record(tokenizer) -> dict:
    return {"tokenizer_sha1": tokenizer.unique_identifiers["tokenizer_sha1"], "vocab_size": tokenizer.vocab_size,
            "tokenizer_dir": os.path.abspath(tokenizer.path)}


def write_tokenizer_record(prefix: str, tokenizer) -> None:
    write_json(prefix + TOKENIZER_SIDECAR, tokenizer_record(tokenizer))


def check_data_tokenizer(prefix: str, tokenizer) -> None:
    """Data that records its tokenizer (newer preprocessing) must have been made with this one,
    even when the vocabulary sizes agree; data without the record is not checked."""
    path = prefix + TOKENIZER_SIDECAR
    ids = getattr(tokenizer, "unique_identifiers", None)
    if not ids or not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            made = json.load(f)
        sha1 = made["tokenizer_sha1"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: unreadable tokenizer record ({e}); delete it to skip the check") from None
    if sha1 != ids["tokenizer_sha1"]:
        raise DataError(
            f"{prefix}.bin was made with the tokenizer in {made.get('tokenizer_dir')} (sha1 {sha1[:12]}), not the "
            f"one in {tokenizer.path} (sha1 {ids['tokenizer_sha1'][:12]}): the same token ids mean other "
            "tokens (--tokenizer-dir)")


def open_indexed_dataset(prefix: str, mmap: bool = True) -> IndexedDataset:
    check_indexed_dataset(prefix)
    try:
        return IndexedDataset(prefix, mmap=mmap)
    except (AssertionError, ValueError, OSError, struct.error) as err:
        raise DataError(f"{prefix}.idx: cannot open indexed dataset: {err!r}") from None
