"""One held-out MLM evaluation for every method, independent of its training objective.

Fixed held-out sequences (whole documents of a held-out JSONL, cut into [CLS] chunk [SEP]
rows of the evaluation length), a fixed mask pattern (15% of each row's tokens, every one
replaced by [MASK], chosen by a seeded generator per row: the same positions for every
model), and each model scored by its own inference path: the policy of its method in
evaluation mode (the full encoder for vanilla, token dropping, ScTD and random-LTD; 3ML's
encoder on the unmasked tokens plus its decoder with the mask vectors injected). The score is
the mean cross-entropy per predicted token; the unigram baseline (token frequencies of the
training data) is computed on the same positions.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import List, Optional

import numpy
import torch

from megatron_effmlm.data.errors import DataError


@dataclass
class HeldoutSet:
    ids: numpy.ndarray  # [N, T] int64, right-padded with the pad id
    padding_mask: numpy.ndarray  # [N, T] bool, real tokens
    masked: numpy.ndarray  # [N, T] bool, the predicted positions
    sources: List[str]  # per row: the source of its document ("" if the JSONL has none)
    seq_length: int
    seed: int
    mask_prob: float

    def digest(self) -> str:
        """sha1 of the rows and the mask pattern: equal digests, equal evaluations."""
        h = hashlib.sha1()
        for a in (self.ids, self.padding_mask, self.masked):
            h.update(numpy.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    @property
    def num_predicted(self) -> int:
        return int(self.masked.sum())


def build_heldout(jsonl: str, tokenizer, seq_length: int, num_sequences: int, mask_prob: float = 0.15,
                  seed: int = 1234, min_tokens: int = 16) -> HeldoutSet:
    """The evaluation rows of a held-out JSONL ({"text", optional "source"} a line).

    Each document is cut into consecutive chunks of seq_length - 2 tokens (the last one kept
    if it has min_tokens); `num_sequences` of them are drawn with `seed` (all of them if fewer),
    kept in file order. Masks: round(mask_prob * n) of a row's n tokens (at least one), never
    [CLS]/[SEP], drawn by a generator seeded with (seed, row)."""
    if seq_length < min_tokens + 2:
        raise DataError(f"--seq-length {seq_length} is too short for evaluation rows of {min_tokens} tokens")
    if not 0.0 < mask_prob < 1.0:
        raise DataError(f"--mask-prob {mask_prob} is not between 0 and 1")
    if not os.path.isfile(jsonl):
        raise DataError(f"held-out data not found: {jsonl}")
    chunks, sources = [], []
    width = seq_length - 2
    with open(jsonl, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                text = r["text"]
                if not isinstance(text, str):
                    raise TypeError("text is not a string")
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataError(f"{jsonl}:{lineno}: not a JSON line with a 'text' string ({err})") from None
            ids = tokenizer.tokenize(text)
            for start in range(0, len(ids), width):
                piece = ids[start:start + width]
                if len(piece) >= min_tokens:
                    chunks.append(piece)
                    sources.append(str(r.get("source", "")))
    if not chunks:
        raise DataError(f"{jsonl}: no document of at least {min_tokens} tokens")
    rng = numpy.random.default_rng(seed)
    if num_sequences < len(chunks):
        keep = numpy.sort(rng.choice(len(chunks), size=num_sequences, replace=False))
    else:
        keep = numpy.arange(len(chunks))
    N = len(keep)
    ids = numpy.full((N, seq_length), tokenizer.pad, dtype=numpy.int64)
    pad = numpy.zeros((N, seq_length), dtype=bool)
    masked = numpy.zeros((N, seq_length), dtype=bool)
    for row, c in enumerate(keep):
        piece = chunks[c]
        n = len(piece)
        ids[row, :n + 2] = [tokenizer.cls, *piece, tokenizer.sep]
        pad[row, :n + 2] = True
        k = max(1, int(round(mask_prob * n)))
        pick = numpy.random.default_rng([seed, row]).choice(n, size=k, replace=False)
        masked[row, 1 + pick] = True
    return HeldoutSet(ids, pad, masked, [sources[c] for c in keep], seq_length, seed, mask_prob)


# --------------------------------------------------------------------------------------------
# The unigram baseline


def unigram_counts(data_prefix: str, vocab_size: int) -> numpy.ndarray:
    """Token counts of a preprocessed training set (<prefix>.bin/.idx), [vocab_size] int64."""
    for ext in (".bin", ".idx"):
        if not os.path.isfile(data_prefix + ext):
            raise DataError(f"--unigram-data {data_prefix}: no {data_prefix}{ext} (a prefix written by "
                            f"tools/preprocess_data.py)")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(data_prefix)
    tokens = numpy.memmap(data_prefix + ".bin", dtype=ds.index.dtype, mode="r")
    counts = numpy.bincount(tokens, minlength=vocab_size).astype(numpy.int64)
    if len(counts) > vocab_size:
        raise DataError(f"--unigram-data {data_prefix} holds token ids up to {len(counts) - 1}, beyond the "
                        f"tokenizer's {vocab_size}: another tokenizer wrote it")
    return counts


def unigram_losses(counts: numpy.ndarray, labels: numpy.ndarray, excluded_ids) -> numpy.ndarray:
    """-log p(label) under the add-one smoothed unigram of the tokens that can be a label
    (`excluded_ids`: [CLS], [SEP], [PAD], [MASK]; [UNK] stays: text has it and it is masked)."""
    c = counts.astype(numpy.float64) + 1.0
    c[list(excluded_ids)] = 0.0
    return -numpy.log(c[labels] / c.sum())


def non_label_ids(tokenizer) -> List[int]:
    """Token ids never at a masked position: the structural specials."""
    return [tokenizer.cls, tokenizer.sep, tokenizer.pad, tokenizer.mask]


# --------------------------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def score(model, policy, heldout: HeldoutSet, mask_id: int, batch_size: int = 16) -> numpy.ndarray:
    """Cross-entropy of every predicted position (row-major), the model run by its method's
    policy in evaluation mode on rows whose predicted positions all read [MASK]."""
    was_training, policy.training = policy.training, False
    model.eval()
    losses = []
    device = next(model.parameters()).device
    try:
        for start in range(0, len(heldout.ids), batch_size):
            ids = torch.from_numpy(heldout.ids[start:start + batch_size]).to(device)
            masked = torch.from_numpy(heldout.masked[start:start + batch_size]).to(device)
            pad = torch.from_numpy(heldout.padding_mask[start:start + batch_size]).to(device)
            batch = {"text": ids.masked_fill(masked, mask_id), "labels": ids,
                     "loss_mask": masked.long(), "padding_mask": pad.long()}
            out = model(**policy.model_inputs(batch, 0))
            if not torch.equal(out.labels, ids[masked]):  # the head scored other positions
                raise RuntimeError("the model's predicted positions are not the held-out mask pattern")
            losses.append(out.lm_losses.float().cpu())
    finally:
        policy.training = was_training
    return torch.cat(losses).numpy().astype(numpy.float64)


def summarize(losses: numpy.ndarray, heldout: HeldoutSet, unigram: Optional[numpy.ndarray]) -> dict:
    """Mean loss, its unigram gap, and per source."""
    row_of = numpy.nonzero(heldout.masked)[0]  # row-major, as `score` returns them
    out = {"loss": float(losses.mean()), "predicted_tokens": int(losses.size), "sequences": len(heldout.ids),
           "seq_length": heldout.seq_length, "mask_prob": heldout.mask_prob, "seed": heldout.seed,
           "mask_sha1": heldout.digest()}
    if unigram is not None:
        out["unigram_loss"] = float(unigram.mean())
        out["gap_to_unigram"] = out["unigram_loss"] - out["loss"]
    per = {}
    for src in sorted(set(heldout.sources)):
        sel = numpy.isin(row_of, [i for i, s in enumerate(heldout.sources) if s == src])
        per[src or "all"] = {"loss": float(losses[sel].mean()), "predicted_tokens": int(sel.sum())}
        if unigram is not None:
            per[src or "all"]["unigram_loss"] = float(unigram[sel].mean())
    out["per_source"] = per
    return out


def load_for_eval(checkpoint: str, tokenizer):
    """(model, policy, run_info) of a checkpoint (a --save folder or one iter_*), on one process,
    with 3ML's decoder kept."""
    from megatron_effmlm.hf.export import find_checkpoint, load_model
    from megatron_effmlm.plans import get_policy

    path, common = find_checkpoint(checkpoint)
    info = common["run_info"]
    saved = info.get("tokenizer", {})
    if saved.get("sha1") and saved["sha1"] != tokenizer.unique_identifiers["tokenizer_sha1"]:
        raise DataError(f"--checkpoint {checkpoint} was trained with another tokenizer ({saved.get('dir')}) "
                        f"than --tokenizer-dir {tokenizer.path}")
    model = load_model(path, common, keep_decoder=True)
    policy = get_policy(info["method"], tokenizer=tokenizer, binary_head=False,
                        num_layers=info["model"]["num_layers"], **info.get("method_options", {}))
    policy.training = False
    return model, policy, dict(info, checkpoint=path, iteration=int(common.get("iteration", 0)))


def evaluate_checkpoint(checkpoint: str, heldout: HeldoutSet, tokenizer, unigram_counts_=None,
                        batch_size: int = 16) -> dict:
    model, policy, info = load_for_eval(checkpoint, tokenizer)
    if heldout.seq_length > info["model"]["max_position_embeddings"]:
        raise DataError(f"--seq-length {heldout.seq_length} exceeds the position table of {checkpoint} "
                        f"({info['model']['max_position_embeddings']})")
    losses = score(model, policy, heldout, tokenizer.mask, batch_size)
    uni = None
    if unigram_counts_ is not None:
        uni = unigram_losses(unigram_counts_, heldout.ids[heldout.masked], non_label_ids(tokenizer))
    r = summarize(losses, heldout, uni)
    r.update(checkpoint=info["checkpoint"], iteration=info["iteration"], method=info["method"],
             method_options=info.get("method_options", {}))
    if not math.isfinite(r["loss"]):
        raise RuntimeError(f"{checkpoint}: non-finite held-out loss")
    return r
