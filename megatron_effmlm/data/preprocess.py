"""JSONL -> megatron-core IndexedDataset (.bin/.idx), as Megatron-LM's tools/preprocess_data.py.

Each JSON line is a document. With ``split_sentences`` each sentence becomes one sequence of the
indexed dataset and the document boundaries are kept (``IndexedDatasetBuilder.add_document``);
without it each document is one sequence. Workers tokenize lines in parallel (``Pool.imap``,
order kept), the parent writes. Output: ``{prefix}_{key}_{sentence|document}.bin/.idx``.

Sentences: nltk's pretrained Punkt (punkt_tab) when installed; otherwise (no downloads here) a
Punkt model is trained on the input with nltk's ``PunktTrainer`` and its parameters are cached
as JSON next to the output.
"""

import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy

from megatron_effmlm.atomic import write_json
from megatron_effmlm.data.errors import DataError
from megatron_effmlm.data.jsonl import check_input_files, parse_json_line

PUNKT_FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# Sentence splitting


def _punkt_params_to_json(params) -> dict:
    return {
        "abbrev_types": sorted(params.abbrev_types),
        "collocations": sorted([list(c) for c in params.collocations]),
        "sent_starters": sorted(params.sent_starters),
        "ortho_context": dict(sorted(params.ortho_context.items())),
    }


def _punkt_params_from_json(data: dict):
    from nltk.tokenize.punkt import PunktParameters

    params = PunktParameters()
    params.abbrev_types = set(data["abbrev_types"])
    params.collocations = {tuple(c) for c in data["collocations"]}
    params.sent_starters = set(data["sent_starters"])
    for word, flags in data["ortho_context"].items():
        params.ortho_context[word] = int(flags)
    return params


def _pretrained_punkt_available(lang: str) -> bool:
    import nltk

    try:
        nltk.data.find(f"tokenizers/punkt_tab/{lang}/")
        return True
    except LookupError:
        return False


def _source_signature(paths: Sequence[str], keys: Sequence[str], max_chars: int) -> dict:
    return {
        "inputs": [
            {"path": os.path.abspath(p), "size": os.path.getsize(p), "mtime": int(os.path.getmtime(p))}
            for p in paths
        ],
        "json_keys": list(keys),
        "max_chars": max_chars,
    }


def train_punkt(
    paths: Sequence[str], keys: Sequence[str], cache_path: str, max_chars: int = 5_000_000
) -> str:
    """Train Punkt on (the first ``max_chars`` characters of) the inputs; cache as JSON.

    Returns the cache path. A cache written for the same inputs (path, size, mtime) is reused.
    """
    from nltk.tokenize.punkt import PunktTrainer

    signature = _source_signature(paths, keys, max_chars)
    if os.path.isfile(cache_path):
        try:
            with open(cache_path, encoding="utf-8") as f:
                cached = json.load(f)
            if cached.get("format_version") == PUNKT_FORMAT_VERSION and cached.get("source") == signature:
                print(f"sentence splitter: reusing the Punkt model trained on the input: {cache_path}",
                      file=sys.stderr)
                return cache_path
        except (OSError, json.JSONDecodeError):
            pass  # rebuilt below
    chunks, total = [], 0
    for path in paths:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if total >= max_chars:
                    break
                if not raw.strip():
                    continue
                for value in parse_json_line(raw.decode("utf-8", "replace"), keys, path, lineno):
                    chunks.append(value)
                    total += len(value)
    text = "\n\n".join(chunks)[:max_chars]
    print(
        f"sentence splitter: nltk's pretrained Punkt data (punkt_tab) is not installed; training a "
        f"Punkt model on {len(text):,} characters of the input (PunktTrainer), cached in {cache_path}",
        file=sys.stderr,
    )
    start = time.time()
    trainer = PunktTrainer()
    trainer.train(text, finalize=True)
    data = {
        "format_version": PUNKT_FORMAT_VERSION,
        "source": signature,
        "params": _punkt_params_to_json(trainer.get_params()),
    }
    os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
    write_json(cache_path, data, indent=None)
    print(f"sentence splitter: Punkt trained in {time.time() - start:.1f} s", file=sys.stderr)
    return cache_path


class SentenceSplitter:
    """Punkt sentence splitting; paragraph breaks (newlines) always end a sentence.

    ``keep_newlines`` keeps the newline at the end of each paragraph's last sentence (as
    Megatron-LM's --keep-newlines keeps them in the text); otherwise newlines are dropped.
    """

    def __init__(self, punkt_params_path: Optional[str] = None, lang: str = "english",
                 keep_newlines: bool = False) -> None:
        from nltk.tokenize.punkt import PunktSentenceTokenizer

        if punkt_params_path is None:
            from nltk.tokenize import PunktTokenizer

            self._punkt = PunktTokenizer(lang)
        else:
            try:
                with open(punkt_params_path, encoding="utf-8") as f:
                    params = _punkt_params_from_json(json.load(f)["params"])
            except (OSError, KeyError, TypeError, json.JSONDecodeError) as err:
                raise DataError(f"{punkt_params_path}: not a Punkt parameter file ({err!r})") from None
            self._punkt = PunktSentenceTokenizer(params)
        self.keep_newlines = keep_newlines

    def split(self, text: str) -> List[str]:
        sentences = []
        paragraphs = text.split("\n")
        for i, paragraph in enumerate(paragraphs):
            parts = [s for s in self._punkt.tokenize(paragraph) if s.strip()]
            if parts and self.keep_newlines and i < len(paragraphs) - 1:
                parts[-1] += "\n"  # the newline that followed this paragraph
            sentences.extend(parts)
        return sentences


def make_sentence_splitter(
    paths: Sequence[str], keys: Sequence[str], output_prefix: str, lang: str = "english",
    keep_newlines: bool = False, punkt_cache: Optional[str] = None, punkt_train_chars: int = 5_000_000,
) -> Tuple[SentenceSplitter, Optional[str]]:
    """The splitter to use and the Punkt params path workers load (None: nltk's pretrained)."""
    if punkt_cache is None and _pretrained_punkt_available(lang):
        print(f"sentence splitter: nltk pretrained Punkt ({lang})", file=sys.stderr)
        return SentenceSplitter(None, lang, keep_newlines), None
    cache = punkt_cache or f"{output_prefix}_punkt.json"
    if not (punkt_cache and os.path.isfile(punkt_cache)):
        train_punkt(paths, keys, cache, punkt_train_chars)
    return SentenceSplitter(cache, lang, keep_newlines), cache


# --------------------------------------------------------------------------------------------
# Encoding (runs in the worker processes)


@dataclass
class EncodeSpec:
    tokenizer_dir: str
    json_keys: List[str]
    split_sentences: bool = False
    keep_newlines: bool = False
    append_eod: bool = False
    punkt_params_path: Optional[str] = None
    lang: str = "english"


class Encoder:
    """Turns one JSONL line into, per key, (token ids of the document, sequence lengths)."""

    def __init__(self, spec: EncodeSpec) -> None:
        from megatron_effmlm.data.tokenizer import EffMLMTokenizer

        self.spec = spec
        self.tokenizer = EffMLMTokenizer.from_dir(spec.tokenizer_dir)
        self.splitter = (
            SentenceSplitter(spec.punkt_params_path, spec.lang, spec.keep_newlines)
            if spec.split_sentences else None
        )

    def sequences(self, text: str) -> List[str]:
        if self.splitter is not None:
            return self.splitter.split(text)
        return [text] if text.strip() else []

    def encode(self, path: str, lineno: int, raw: bytes):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{path}:{lineno}: not UTF-8 ({err.reason} at byte {err.start})") from None
        values = parse_json_line(line, self.spec.json_keys, path, lineno)
        out = {}
        for key, text in zip(self.spec.json_keys, values):
            seqs = [ids for ids in self.tokenizer.tokenize_batch(self.sequences(text)) if ids]
            if seqs and self.spec.append_eod:
                seqs[-1].append(self.tokenizer.eod)
            lengths = [len(s) for s in seqs]
            flat = numpy.fromiter((t for s in seqs for t in s), dtype=numpy.int32, count=sum(lengths))
            out[key] = (flat, lengths)
        return out, len(raw)


_WORKER_ENCODER: Optional[Encoder] = None


def _worker_init(spec: EncodeSpec) -> None:
    global _WORKER_ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    _WORKER_ENCODER = Encoder(spec)


def _worker_encode(item):
    return _WORKER_ENCODER.encode(*item)


# --------------------------------------------------------------------------------------------
# Driver


@dataclass
class PreprocessStats:
    documents: int = 0
    empty_documents: Dict[str, int] = field(default_factory=dict)
    sequences: Dict[str, int] = field(default_factory=dict)
    tokens: Dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    seconds: float = 0.0
    outputs: Dict[str, str] = field(default_factory=dict)


def output_prefix_for(output_prefix: str, key: str, split_sentences: bool) -> str:
    level = "sentence" if split_sentences else "document"
    return f"{output_prefix}_{key}_{level}"


def _read_lines(path: str) -> Iterator[Tuple[str, int, bytes]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                yield path, lineno, raw


def _encode_file(
    path: str, output_prefix: str, spec: EncodeSpec, workers: int, log_interval: int,
    stats: PreprocessStats, dtype, whole: bool = True,
) -> Dict[str, str]:
    """Encode one JSONL file into ``{output_prefix}_{key}_{level}``; returns key -> prefix.
    `whole`: the file is the whole input (not one partition), so it must yield sequences."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefixes = {k: output_prefix_for(output_prefix, k, spec.split_sentences) for k in spec.json_keys}
    tmp = {k: f"{p}.tmp{os.getpid()}" for k, p in prefixes.items()}
    builders = {k: IndexedDatasetBuilder(f"{t}.bin", dtype=dtype) for k, t in tmp.items()}
    pool = None
    try:
        if workers > 1:
            pool = multiprocessing.Pool(workers, initializer=_worker_init, initargs=(spec,))
            results = pool.imap(_worker_encode, _read_lines(path), chunksize=16)
        else:
            encoder = Encoder(spec)
            results = (encoder.encode(*item) for item in _read_lines(path))
        start = time.time()
        for docs, (encoded, nbytes) in enumerate(results, 1):
            stats.documents += 1
            stats.bytes += nbytes
            for key, (flat, lengths) in encoded.items():
                if not lengths:
                    stats.empty_documents[key] = stats.empty_documents.get(key, 0) + 1
                    continue
                builders[key].add_document(flat, lengths)
                stats.sequences[key] = stats.sequences.get(key, 0) + len(lengths)
                stats.tokens[key] = stats.tokens.get(key, 0) + int(flat.size)
            if log_interval and docs % log_interval == 0:
                elapsed = max(time.time() - start, 1e-9)
                print(f"processed {docs} documents ({docs / elapsed:.1f} docs/s, "
                      f"{stats.bytes / elapsed / 2**20:.2f} MB/s)", file=sys.stderr)
        if whole:
            _require_sequences(path, spec.json_keys, stats)
        for key, builder in builders.items():
            builder.finalize(f"{tmp[key]}.idx")
        for key, prefix in prefixes.items():
            os.replace(f"{tmp[key]}.bin", f"{prefix}.bin")
            os.replace(f"{tmp[key]}.idx", f"{prefix}.idx")
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        for builder in builders.values():
            builder.data_file.close()
        for t in tmp.values():
            for ext in (".bin", ".idx"):
                if os.path.exists(t + ext):
                    os.remove(t + ext)
    return prefixes


def _require_sequences(path, keys, stats):
    """Nothing is written for an input whose documents are all empty (for some key)."""
    for key in keys:
        if not stats.sequences.get(key, 0):
            raise DataError(
                f"--input {path}: no text under json key '{key}' in any of its {stats.documents} documents "
                f"({stats.empty_documents.get(key, 0)} empty): nothing to write")


def _split_into_partitions(path: str, parts: int, out_base: str) -> List[str]:
    """Contiguous blocks of lines (order kept, so merging reproduces the unpartitioned output)."""
    with open(path, "rb") as f:
        n_lines = sum(1 for _ in f)
    per_part = -(-n_lines // parts)
    paths = []
    with open(path, "rb") as f:
        for i in range(parts):
            part_path = f"{out_base}_partition{i}.jsonl"
            with open(part_path, "wb") as out:
                for _ in range(per_part):
                    line = f.readline()
                    if not line:
                        break
                    out.write(line)
            paths.append(part_path)
    return paths


def preprocess(
    input_path: str,
    output_prefix: str,
    tokenizer_dir: str,
    json_keys: Sequence[str] = ("text",),
    split_sentences: bool = False,
    keep_newlines: bool = False,
    append_eod: bool = False,
    workers: int = 1,
    partitions: int = 1,
    log_interval: int = 1000,
    lang: str = "english",
    punkt_cache: Optional[str] = None,
    punkt_train_chars: int = 5_000_000,
) -> PreprocessStats:
    """Tokenize a JSONL file into ``{output_prefix}_{key}_{sentence|document}.bin/.idx``."""
    from megatron_effmlm.data.tokenizer import EffMLMTokenizer

    check_input_files([input_path])
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    if partitions < 1:
        raise DataError(f"--partitions must be >= 1, got {partitions}")
    if not json_keys:
        raise DataError("--json-keys: at least one key is needed")
    tokenizer = EffMLMTokenizer.from_dir(tokenizer_dir)  # fails early on a bad directory
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, get_idx_path
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)

    punkt_params = None
    if split_sentences:
        _, punkt_params = make_sentence_splitter(
            [input_path], json_keys, output_prefix, lang, keep_newlines, punkt_cache, punkt_train_chars
        )
    spec = EncodeSpec(
        tokenizer_dir=tokenizer_dir, json_keys=list(json_keys), split_sentences=split_sentences,
        keep_newlines=keep_newlines, append_eod=append_eod, punkt_params_path=punkt_params, lang=lang,
    )
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    stats = PreprocessStats()
    start = time.time()
    if partitions == 1:
        prefixes = _encode_file(input_path, output_prefix, spec, workers, log_interval, stats, dtype)
    else:
        part_base = f"{output_prefix}.tmp{os.getpid()}"
        part_inputs = _split_into_partitions(input_path, partitions, part_base)
        part_prefixes = []
        try:
            for i, part_input in enumerate(part_inputs):
                part_prefixes.append(_encode_file(
                    part_input, f"{part_base}_partition{i}", spec, workers, log_interval, stats, dtype, whole=False
                ))
            if stats.documents:
                _require_sequences(input_path, json_keys, stats)
            prefixes = {k: output_prefix_for(output_prefix, k, split_sentences) for k in json_keys}
            for key, prefix in prefixes.items():
                builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
                for part in part_prefixes:
                    builder.add_index(part[key])
                builder.finalize(get_idx_path(prefix))
        finally:
            for part in part_prefixes:
                for p in part.values():
                    for ext in (".bin", ".idx"):
                        if os.path.exists(p + ext):
                            os.remove(p + ext)
            for p in part_inputs:
                os.remove(p)
    stats.seconds = time.time() - start
    stats.outputs = prefixes
    if stats.documents == 0:
        raise DataError(f"--input: no documents in {input_path}")
    from megatron_effmlm.data.indexed import write_tokenizer_record

    for prefix in prefixes.values():  # training compares it with --tokenizer-dir
        write_tokenizer_record(prefix, tokenizer)
    elapsed = max(stats.seconds, 1e-9)
    for key, prefix in prefixes.items():
        print(
            f"done: {key}: {stats.documents} documents ({stats.empty_documents.get(key, 0)} empty, "
            f"skipped), {stats.sequences.get(key, 0)} sequences, {stats.tokens.get(key, 0)} tokens "
            f"-> {prefix}.bin/.idx in {stats.seconds:.1f} s ({stats.documents / elapsed:.1f} docs/s, "
            f"{stats.bytes / elapsed / 2**20:.2f} MB/s)",
            file=sys.stderr,
        )
    return stats
