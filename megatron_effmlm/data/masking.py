"""MLM masking: which tokens a sample predicts and what its input shows there.

`mask_tokens` predicts round(r * n) of a row's n non-special tokens (half up, at least one),
whole words with `whole_word_masking`; `MaskingSpec.replace` is the one replacement rule
(80% [MASK], 10% a random non-special token, 10% unchanged, or all [MASK]), used by the
packed dataset and, one position at a time, by megatron-core's binary-head dataset. Every
draw comes from `sample_rng(seed, split, index)`, so any access order sees the same masks.
"""

import math
from collections import namedtuple
from dataclasses import dataclass
from typing import Optional

import numpy


@dataclass
class MaskingSpec:
    """What masking needs from the tokenizer and the config, as lookup arrays."""

    mask_id: int
    is_special: numpy.ndarray  # [vocab] bool
    random_pool: numpy.ndarray  # ids a "random token" is drawn from: the non-special vocabulary
    masking_probability: float = 0.15
    mask_80_10_10: bool = True
    replace_prob: float = 0.8
    random_prob: float = 0.1
    word_start: Optional[numpy.ndarray] = None  # [vocab] bool; set for whole-word masking

    @classmethod
    def from_tokenizer(cls, tokenizer, masking_probability=0.15, mask_80_10_10=True,
                       replace_prob=0.8, random_prob=0.1, whole_word_masking=False) -> "MaskingSpec":
        is_special = numpy.zeros(tokenizer.vocab_size, dtype=bool)
        is_special[list(tokenizer.special_ids)] = True
        return cls(
            mask_id=tokenizer.mask,
            is_special=is_special,
            random_pool=numpy.flatnonzero(~is_special),
            masking_probability=masking_probability,
            mask_80_10_10=mask_80_10_10,
            replace_prob=replace_prob,
            random_prob=random_prob,
            word_start=tokenizer.word_start_mask() if whole_word_masking else None,
        )

    def replace(self, input_ids: numpy.ndarray, positions: numpy.ndarray, rng: numpy.random.RandomState) -> None:
        """The replacement rule, in place at `positions`: [MASK] with probability replace_prob,
        a random non-special token with random_prob, else unchanged (all [MASK] without 80/10/10)."""
        if not self.mask_80_10_10:
            input_ids[positions] = self.mask_id
            return
        u = rng.random_sample(positions.size)
        to_mask = u < self.replace_prob
        to_random = (~to_mask) & (u < self.replace_prob + self.random_prob)
        input_ids[positions[to_mask]] = self.mask_id
        input_ids[positions[to_random]] = self.random_pool[
            rng.randint(0, self.random_pool.size, size=int(to_random.sum()))
        ]


MaskedTokens = namedtuple("MaskedTokens", ["input_ids", "labels", "loss_mask", "positions"])


def masking_budget(num_candidates: int, masking_probability: float) -> int:
    """round(r * n), half up, at least 1 when there is anything to mask."""
    if num_candidates <= 0:
        return 0
    return int(min(num_candidates, max(1, math.floor(masking_probability * num_candidates + 0.5))))


def _choose_whole_words(tokens, candidates, budget, word_start, rng) -> numpy.ndarray:
    # A word starts at a word-start token or right after a non-candidate (special) position.
    starts = word_start[tokens[candidates]]
    starts[0] = True
    starts[1:] |= numpy.diff(candidates) != 1
    word_of = numpy.cumsum(starts) - 1
    lengths = numpy.bincount(word_of)
    order = rng.permutation(lengths.size)
    taken = numpy.cumsum(lengths[order]) <= budget
    n_prefix = int(numpy.argmin(taken)) if not taken.all() else taken.size
    chosen = list(order[:n_prefix])
    room = budget - int(lengths[order[:n_prefix]].sum())
    for w in order[n_prefix:]:  # fill what is left with words that still fit
        if room == 0:
            break
        if lengths[w] <= room:
            chosen.append(w)
            room -= int(lengths[w])
    if not chosen:  # every word is longer than the budget: still predict one word
        chosen = [order[0]]
    return candidates[numpy.isin(word_of, chosen)]


def mask_tokens(tokens, rng: numpy.random.RandomState, spec: MaskingSpec) -> MaskedTokens:
    """Mask ``round(r * n)`` of the ``n`` non-special tokens (at least 1).

    Returns the input ids after masking, labels (original id at predicted positions, -1
    elsewhere), the loss mask (1 at predicted positions) and the sorted predicted positions.
    """
    tokens = numpy.asarray(tokens, dtype=numpy.int64)
    candidates = numpy.flatnonzero(~spec.is_special[tokens])
    budget = masking_budget(candidates.size, spec.masking_probability)
    if budget == 0:
        positions = candidates[:0]
    elif spec.word_start is not None:
        positions = _choose_whole_words(tokens, candidates, budget, spec.word_start, rng)
    else:
        positions = numpy.sort(rng.choice(candidates, size=budget, replace=False))
    input_ids = tokens.copy()
    spec.replace(input_ids, positions, rng)
    labels = numpy.full(tokens.shape, -1, dtype=numpy.int64)
    labels[positions] = tokens[positions]
    loss_mask = numpy.zeros(tokens.shape, dtype=numpy.int64)
    loss_mask[positions] = 1
    return MaskedTokens(input_ids, labels, loss_mask, positions)


def sample_rng(seed: int, split: int, idx: int) -> numpy.random.RandomState:
    """The RNG of one sample: a function of (seed, split, index) only, so any access order
    (and a resumed run) sees the same masks."""
    return numpy.random.RandomState(numpy.random.MT19937(numpy.random.SeedSequence([seed, split, int(idx)])))
