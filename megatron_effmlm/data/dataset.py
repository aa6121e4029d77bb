"""MLM pre-training datasets on megatron-core's dataset machinery.

- ``PackedMLMDataset``: RoBERTa FULL-SENTENCES packing over a sentence-level IndexedDataset:
  whole sentences, contiguous, crossing document boundaries with an extra separator, each
  sample ``[CLS] s1 s2 ... [SEP]`` padded to ``sequence_length``. A sentence longer than a
  sample is cut into sample-sized pieces (no text is dropped).
- ``BERTSentenceOrderDataset``: megatron-core's ``BERTMaskedWordPieceDataset`` (two segments
  and the sentence-order label) for ``binary_head=True``, with the same sample conventions.
- the masking is data/masking.py's, the index checks data/indexed.py's.
- ``build_train_valid_test_datasets``: Megatron's ``--data-path``/``--split`` blend through
  ``BlendedMegatronDatasetBuilder``.

Samples are dicts of numpy arrays with megatron-core's BERT keys: ``text``, ``labels`` (-1 where
nothing is predicted), ``loss_mask``, ``padding_mask`` (1 on real tokens), ``types``,
``is_random``, ``truncated``; a blend adds ``dataset_id``.
"""

import contextlib
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy
import torch

from megatron.core.datasets.bert_dataset import (
    BERTMaskedWordPieceDataset,
    BERTMaskedWordPieceDatasetConfig,
)
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.megatron_dataset import MegatronDataset
from megatron.core.datasets.utils import Split

from megatron_effmlm.atomic import atomic_path, write_text
from megatron_effmlm.data.errors import DataError
from megatron_effmlm.data.indexed import check_data_tokenizer, check_indexed_dataset, check_token_ids, open_indexed_dataset
from megatron_effmlm.data.masking import MaskingSpec, mask_tokens, sample_rng

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Config


@dataclass
class MLMDatasetConfig(BlendedMegatronDatasetConfig):
    """megatron-core's dataset config plus the MLM masking options."""

    masking_probability: float = 0.15
    """Fraction of the non-special tokens of a sample to predict."""

    mask_80_10_10: bool = True
    """Predicted tokens become [MASK] / a random token / stay, with the two probabilities below;
    False: all become [MASK]."""

    mask_replace_prob: float = 0.8
    mask_random_prob: float = 0.1

    whole_word_masking: bool = False
    """Choose whole words (all their pieces) using the tokenizer's word_start_mask()."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tokenizer is None:
            raise DataError("MLMDatasetConfig needs a tokenizer")
        if not 0.0 < self.masking_probability < 1.0:
            raise DataError(f"masking probability must be in (0, 1), got {self.masking_probability}")
        if self.mask_replace_prob < 0 or self.mask_random_prob < 0 or (
            self.mask_replace_prob + self.mask_random_prob > 1.0 + 1e-9
        ):
            raise DataError(
                f"mask replace/random probabilities must be >= 0 and sum to <= 1, got "
                f"{self.mask_replace_prob} and {self.mask_random_prob}"
            )
        if self.sequence_length < 3:
            raise DataError(f"sequence length must be >= 3 ([CLS] x [SEP]), got {self.sequence_length}")


# --------------------------------------------------------------------------------------------
# Packing


def build_packed_sample_index(
    document_indices: numpy.ndarray, sequence_lengths: numpy.ndarray, documents: numpy.ndarray,
    capacity: int,
) -> numpy.ndarray:
    """FULL-SENTENCES packing of the sentences of ``documents`` (contiguous ids, in order).

    Each sample holds up to ``capacity`` tokens: whole sentences, plus one separator before the
    first sentence of each document that does not open the sample. A sentence longer than
    ``capacity`` is cut into pieces of ``capacity`` tokens. Returns int64 [samples, 4]:
    (first sequence, offset into it, last sequence, end offset in it), all contiguous tokens.
    """
    empty = numpy.zeros((0, 4), dtype=numpy.int64)
    if documents.size == 0:
        return empty
    first_doc, last_doc = int(documents[0]), int(documents[-1])
    seq_begin, seq_end = int(document_indices[first_doc]), int(document_indices[last_doc + 1])
    lens = numpy.asarray(sequence_lengths[seq_begin:seq_end], dtype=numpy.int64)
    seq_ids = numpy.arange(seq_begin, seq_end, dtype=numpy.int64)
    doc_of = numpy.searchsorted(document_indices, seq_ids, side="right") - 1
    keep = lens > 0  # empty sequences carry no tokens
    lens, seq_ids, doc_of = lens[keep], seq_ids[keep], doc_of[keep]
    if lens.size == 0:
        return empty
    doc_start = numpy.ones(lens.size, dtype=bool)
    doc_start[1:] = doc_of[1:] != doc_of[:-1]

    # Pieces: sentences, long ones cut into capacity-sized chunks.
    n_chunks = -(-lens // capacity)
    piece_seq = numpy.repeat(seq_ids, n_chunks)
    chunk_start = numpy.repeat(numpy.cumsum(n_chunks) - n_chunks, n_chunks)
    chunk = numpy.arange(piece_seq.size, dtype=numpy.int64) - chunk_start
    piece_off = chunk * capacity
    piece_len = numpy.minimum(capacity, numpy.repeat(lens, n_chunks) - piece_off)
    piece_sep = numpy.repeat(doc_start, n_chunks) & (chunk == 0)

    # Greedy fill, one searchsorted per sample: pieces i..e-1 fit when
    # cum[e] - cum[i] - sep[i] <= capacity (the opening piece needs no separator).
    cum = numpy.zeros(piece_seq.size + 1, dtype=numpy.int64)
    numpy.cumsum(piece_len + piece_sep, out=cum[1:])
    starts = []
    i, n = 0, piece_seq.size
    while i < n:
        starts.append(i)
        e = int(numpy.searchsorted(cum, cum[i] + piece_sep[i] + capacity, side="right")) - 1
        i = max(e, i + 1)
    starts = numpy.asarray(starts, dtype=numpy.int64)
    ends = numpy.append(starts[1:], n) - 1  # last piece of each sample
    index = numpy.empty((starts.size, 4), dtype=numpy.int64)
    index[:, 0] = piece_seq[starts]
    index[:, 1] = piece_off[starts]
    index[:, 2] = piece_seq[ends]
    index[:, 3] = piece_off[ends] + piece_len[ends]
    return index


def _save_npy(path: str, array: numpy.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp:  # readers on other ranks never see half a file
        numpy.save(tmp, array, allow_pickle=False)


class PackedMLMDataset(MegatronDataset):
    """RoBERTa FULL-SENTENCES samples with MLM masking over a sentence-level IndexedDataset."""

    def __init__(
        self, indexed_dataset: IndexedDataset, dataset_path: Optional[str], indexed_indices: numpy.ndarray,
        num_samples: Optional[int], index_split: Split, config: MLMDatasetConfig,
    ) -> None:
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
        tok = config.tokenizer
        self.masking = MaskingSpec.from_tokenizer(
            tok, config.masking_probability, config.mask_80_10_10, config.mask_replace_prob,
            config.mask_random_prob, config.whole_word_masking,
        )
        self.capacity = config.sequence_length - 2  # [CLS] ... [SEP]
        self.sample_index, self.shuffle_index = self._build_indices()

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: IndexedDataset) -> int:
        return low_level_dataset.document_indices.shape[0] - 1

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: MLMDatasetConfig) -> IndexedDataset:
        return open_indexed_dataset(dataset_path, mmap=config.mmap_bin_files)

    def __len__(self) -> int:
        return int(self.shuffle_index.shape[0])

    @property
    def samples_per_epoch(self) -> int:
        return int(self.sample_index.shape[0])

    def _cache_dir(self) -> str:
        if self.config.path_to_cache:
            return self.config.path_to_cache
        return os.path.join(self.dataset.path_prefix, "cache", f"{type(self).__name__}_indices")

    def _build_indices(self) -> Tuple[numpy.ndarray, numpy.ndarray]:
        cache = self._cache_dir()
        stem = f"{self.unique_description_hash}-{type(self).__name__}"
        name = lambda suffix: os.path.join(cache, f"{stem}-{suffix}")
        paths = {k: name(f"{k}.npy") for k in ("sample_index", "shuffle_index")}
        description = name("description.txt")
        if all(os.path.isfile(p) for p in paths.values()):
            return (numpy.load(paths["sample_index"], mmap_mode="r"),
                    numpy.load(paths["shuffle_index"], mmap_mode="r"))

        start = time.time()
        sample_index = build_packed_sample_index(
            self.dataset.document_indices, self.dataset.sequence_lengths, self.indices, self.capacity
        )
        per_epoch = sample_index.shape[0]
        wanted = per_epoch if self.num_samples is None else int(self.num_samples)
        if wanted > 0 and per_epoch == 0:
            raise DataError(
                f"{self.dataset_path}: the {self.index_split.name} split ({self.indices.size} documents "
                f"for split {self.config.split!r}) has no tokens, but {wanted} samples were requested"
            )
        # As GPTDataset: repeat epochs until num_samples, each epoch in its own order.
        rng = numpy.random.RandomState(self.config.random_seed % 2**32)
        epochs = -(-wanted // per_epoch) if per_epoch else 0
        shuffle_index = numpy.concatenate(
            [rng.permutation(per_epoch) for _ in range(epochs)] or [numpy.zeros(0, dtype=numpy.int64)]
        )[:wanted].astype(numpy.int64)
        logger.info(
            "%s %s: %d samples per epoch, %d epochs for %d samples, index built in %.2f s",
            type(self).__name__, self.index_split.name, per_epoch, epochs, wanted, time.time() - start,
        )
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            os.makedirs(cache, exist_ok=True)
            write_text(description, self.unique_description)
            _save_npy(paths["sample_index"], sample_index)
            _save_npy(paths["shuffle_index"], shuffle_index)
        return sample_index, shuffle_index

    def packed_tokens(self, k: int) -> Tuple[numpy.ndarray, bool]:
        """Unmasked tokens of the k-th sample of an epoch in packing order (no padding), and
        whether it holds part of a cut sentence."""
        first, off, last, end = (int(x) for x in self.sample_index[k])
        seqs = self.dataset[first:last + 1]
        truncated = off > 0 or end < len(seqs[-1])
        seqs[-1] = seqs[-1][:end]
        seqs[0] = seqs[0][off:]
        # Separators before each document that starts inside the sample (one per position).
        docs = self.dataset.document_indices
        lo, hi = numpy.searchsorted(docs, [first, last], side="right")
        bounds = docs[lo:hi]  # document starts s with first < s <= last
        lengths = numpy.fromiter((s.size for s in seqs), dtype=numpy.int64, count=len(seqs))
        sep_at = numpy.unique(numpy.concatenate([[0], numpy.cumsum(lengths)])[bounds - first])
        body = numpy.concatenate(seqs).astype(numpy.int64)
        body = numpy.insert(body, sep_at, self.config.tokenizer.sep)
        tok = self.config.tokenizer
        return numpy.concatenate([[tok.cls], body, [tok.sep]]).astype(numpy.int64), truncated

    def __getitem__(self, idx: int) -> Dict[str, numpy.ndarray]:
        if idx < 0 or idx >= len(self):
            raise IndexError(f"sample {idx} out of range for {len(self)} samples")
        tokens, truncated = self.packed_tokens(int(self.shuffle_index[idx]))
        rng = sample_rng(self.config.random_seed, self.index_split.value, idx)
        masked = mask_tokens(tokens, rng, self.masking)
        return _pad_sample(
            masked.input_ids, masked.labels, masked.loss_mask, numpy.zeros_like(tokens),
            self.config.sequence_length, self.config.tokenizer.pad, 0, int(truncated),
        )


def _pad_sample(text, labels, loss_mask, types, length, pad_id, is_random, truncated) -> Dict:
    n = text.shape[0]
    assert n <= length, f"sample of {n} tokens exceeds sequence length {length}"
    out_text = numpy.full(length, pad_id, dtype=numpy.int64)
    out_text[:n] = text
    out_labels = numpy.full(length, -1, dtype=numpy.int64)
    out_labels[:n] = labels
    out_loss = numpy.zeros(length, dtype=numpy.int64)
    out_loss[:n] = loss_mask
    out_types = numpy.zeros(length, dtype=numpy.int64)
    out_types[:n] = types
    padding_mask = numpy.zeros(length, dtype=numpy.int64)
    padding_mask[:n] = 1
    return {
        "text": out_text, "types": out_types, "labels": out_labels, "is_random": int(is_random),
        "padding_mask": padding_mask, "loss_mask": out_loss, "truncated": int(truncated),
    }


# --------------------------------------------------------------------------------------------
# BERT two-segment samples (binary head): megatron-core's own dataset


@dataclass
class BinaryHeadMLMConfig(BERTMaskedWordPieceDatasetConfig):
    """megatron-core's BERT config plus our replacement probabilities."""

    mask_80_10_10: bool = True
    mask_replace_prob: float = 0.8
    mask_random_prob: float = 0.1


class BERTSentenceOrderDataset(BERTMaskedWordPieceDataset):
    """megatron-core's BERT dataset with this package's conventions: our masking replacement
    rule (random tokens from the non-special vocabulary, optional 100% [MASK]), pad id on
    padding positions and a 0/1 padding mask (megatron-core writes 0 and the pad id there)."""

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config) -> IndexedDataset:
        return open_indexed_dataset(dataset_path, mmap=config.mmap_bin_files)

    def _get_token_mask(self, numpy_random_state: numpy.random.RandomState) -> Optional[int]:
        # megatron-core asks one position at a time; the rule is MaskingSpec.replace's
        if not hasattr(self, "_spec"):
            cfg = self.config
            self._spec = MaskingSpec.from_tokenizer(cfg.tokenizer, cfg.masking_probability, cfg.mask_80_10_10,
                                                    cfg.mask_replace_prob, cfg.mask_random_prob)
        token = numpy.full(1, -1, dtype=numpy.int64)
        self._spec.replace(token, numpy.zeros(1, dtype=numpy.int64), numpy_random_state)
        return None if token[0] < 0 else int(token[0])

    def _build_sample_index(self, sequence_length: int, min_sentences_per_sample: int) -> numpy.ndarray:
        # megatron-core indexes self.indices[-1] and fails on a split with no documents (a tiny
        # corpus's test split that training never reads): such a split has no samples.
        if len(self.indices) == 0:
            return numpy.zeros((0, 3), dtype=numpy.int32)
        # ... and its sampler loops forever when no document has enough sentences for a pair.
        docs = self.dataset.document_indices
        sentences = docs[self.indices + 1] - docs[self.indices]
        if self.num_samples and not (sentences >= min_sentences_per_sample).any():
            raise DataError(
                f"--data-path {self.dataset_path}: no {self.index_split.name} sample: --bert-binary-head pairs "
                f"{min_sentences_per_sample} sentences of one document, and no document here has "
                f"{min_sentences_per_sample} (one-sentence documents; preprocess with --split-sentences, "
                "or train without --bert-binary-head)")
        return super()._build_sample_index(sequence_length, min_sentences_per_sample)

    def _create_masked_lm_predictions(self, token_ids, target_sequence_length, numpy_random_state):
        self._num_tokens = len(token_ids)  # the unpadded length, for __getitem__ below
        return super()._create_masked_lm_predictions(token_ids, target_sequence_length, numpy_random_state)

    def __getitem__(self, idx: int) -> Dict[str, numpy.ndarray]:
        sample = super().__getitem__(idx)
        n = self._num_tokens
        loss_mask = sample["loss_mask"]
        return _pad_sample(
            sample["text"][:n], numpy.where(loss_mask[:n] == 1, sample["labels"][:n], -1), loss_mask[:n],
            sample["types"][:n], self.config.sequence_length, self.config.tokenizer.pad,
            sample["is_random"], sample["truncated"],
        )


# --------------------------------------------------------------------------------------------
# Building train/valid/test


def parse_data_path(data_path: Sequence[str]) -> Tuple[List[str], Optional[List[float]]]:
    """Megatron's --data-path: ``["a"]``, ``["a", "b"]`` or ``["0.7", "a", "0.3", "b"]``."""
    if isinstance(data_path, str):
        data_path = data_path.split()
    items = [str(x).strip() for x in data_path]
    if not items or any(not x for x in items):
        raise DataError(f"--data-path: expected prefixes or 'weight prefix' pairs, got {list(data_path)}")

    def number(x):
        try:
            return float(x)
        except ValueError:
            return None

    numeric = [number(x) is not None for x in items]
    if not any(numeric):
        return items, None
    if len(items) % 2 == 1:
        raise DataError(
            f"--data-path: odd number of entries ({len(items)}) in a weighted blend; expected "
            f"'weight prefix' pairs, got {items}"
        )
    weights, prefixes = items[0::2], items[1::2]
    for w in weights:
        value = number(w)
        if value is None:
            raise DataError(
                f"--data-path: blend weight '{w}' is not a number (entries must be 'weight prefix' pairs)"
            )
        if not math.isfinite(value) or value <= 0:
            raise DataError(f"--data-path: blend weight '{w}' must be a positive number")
    for p in prefixes:
        if number(p) is not None:
            raise DataError(
                f"--data-path: '{p}' is where a dataset prefix should be "
                f"(entries must be 'weight prefix' pairs)"
            )
    return prefixes, [float(w) for w in weights]


@contextlib.contextmanager
def _process_group_for_megatron():
    """megatron-core's BlendedDataset cache and BERT dataset call torch.distributed.get_rank();
    without a process group they fail, so a one-process gloo group stands in while building."""
    if torch.distributed.is_initialized():
        yield
        return
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def check_split(split: str) -> None:
    """Megatron's --split: up to three non-negative weights, e.g. "949,50,1" or "98/2/0"."""
    parts = [p.strip() for p in re.split(r"[,/]", str(split))]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise DataError(
            f"--split {split!r}: expected up to three comma-separated numbers, e.g. 949,50,1"
        ) from None
    if len(values) > 3 or any(v < 0 or not math.isfinite(v) for v in values) or sum(values) <= 0:
        raise DataError(f"--split {split!r}: expected up to three non-negative numbers with a positive sum")


def build_train_valid_test_datasets(
    data_path: Sequence[str],
    *,
    tokenizer,
    seq_length: int,
    split: str = "949,50,1",
    seed: int = 1234,
    train_samples: Optional[int] = None,
    valid_samples: Optional[int] = None,
    test_samples: Optional[int] = None,
    masking_probability: float = 0.15,
    mask_80_10_10: bool = True,
    mask_replace_prob: float = 0.8,
    mask_random_prob: float = 0.1,
    whole_word_masking: bool = False,
    binary_head: bool = False,
    cache_dir: Optional[str] = None,
    mid_level_dataset_surplus: float = 0.005,
    mmap_bin_files: bool = True,
    short_sequence_probability: float = 0.1,
):
    """(train, valid, test) datasets from a Megatron blend; a split may be None (zero weight in
    ``split``). Sizes None mean one epoch (only allowed without blend weights)."""
    prefixes, weights = parse_data_path(data_path)
    check_split(split)
    for prefix in prefixes:
        check_indexed_dataset(prefix)
        check_token_ids(prefix, tokenizer)
        check_data_tokenizer(prefix, tokenizer)
    sizes = [train_samples, valid_samples, test_samples]
    if weights is not None and any(s is None for s in sizes):
        raise DataError(
            "--data-path with blend weights needs the number of samples of every split "
            f"(train/valid/test samples), got {sizes}"
        )
    common = dict(random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights), split=split,
                  path_to_cache=cache_dir, tokenizer=tokenizer, mid_level_dataset_surplus=mid_level_dataset_surplus,
                  mmap_bin_files=mmap_bin_files, masking_probability=masking_probability,
                  mask_80_10_10=mask_80_10_10, mask_replace_prob=mask_replace_prob, mask_random_prob=mask_random_prob)
    if binary_head and whole_word_masking and tokenizer.kind != "wordpiece":
        raise DataError(
            "whole-word masking with the binary head needs a wordpiece tokenizer (megatron-core's "
            f"BERT dataset finds words by '##'), got {tokenizer.kind}"
        )
    try:
        if binary_head:  # megatron-core's BERT samples (two segments, sentence order)
            cls = BERTSentenceOrderDataset
            config = BinaryHeadMLMConfig(
                **common, short_sequence_probability=short_sequence_probability, masking_max_ngram=1, masking_do_full_word=whole_word_masking, masking_do_permutation=False,
                masking_use_longer_ngrams=False, masking_use_geometric_distribution=False, classification_head=True)
        else:
            cls = PackedMLMDataset
            config = MLMDatasetConfig(**common, whole_word_masking=whole_word_masking)
    except (AssertionError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"bad dataset configuration (--split {split!r}?): {err}") from None
    with _process_group_for_megatron():
        builder = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config)
        train, valid, test = builder.build()
    return train, valid, test
