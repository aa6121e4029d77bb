"""What a method (plans/) and the model agree on, and nothing heavier: the token plan a
policy builds for each micro-batch (`TokenPlan`: which positions are live before chosen
layers, `LiveSet`, `PlanStep`) and the output the model hands back to the policy's loss
(`MLMOutput`). model/engine.py executes plans; the policies never import it.

Shapes: a LiveSet's idx and valid are [b, n] (n live slots per row; padded slots hold T).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import Tensor


@dataclass
class LiveSet:
    """Live positions of each row: idx [b, n] (padded slots hold T), valid [b, n] bool."""

    idx: Tensor
    valid: Tensor
    identity: bool = False  # idx == arange(T) in every row: gathers and scatters are skipped

    @staticmethod
    def all_positions(padding_mask: Tensor) -> "LiveSet":
        b, T = padding_mask.shape
        idx = torch.arange(T, device=padding_mask.device).expand(b, T)
        return LiveSet(idx, padding_mask.bool(), identity=True)

    @staticmethod
    def from_mask(mask: Tensor, n: Optional[int] = None) -> "LiveSet":
        """Positions where mask [b, T] is True, in position order, padded to n slots.

        n: a bound on every row's count known without reading the mask (from the batch shape and
        the method's ratios, in Python ints), so no host sync; it must not be below any row's
        count (unchecked: checking would read the mask). None: the rows' maximum, read on the
        host (a sync on a GPU), where no such bound exists (3ML's unmasked tokens)."""
        b, T = mask.shape
        count = mask.sum(1)
        if n is None:
            n = int(count.max())
        n = max(n, 1)
        # stable sort puts the selected positions first, in position order
        key = (~mask).to(torch.int8)
        order = torch.sort(key, dim=1, stable=True).indices[:, :n]
        valid = torch.arange(n, device=mask.device)[None, :] < count[:, None]
        idx = torch.where(valid, order, torch.full_like(order, T))
        return LiveSet(idx, valid)

    @property
    def n(self) -> int:
        return self.idx.shape[1]

    def padded(self, multiple: int, seq_len: int) -> "LiveSet":
        """With invalid slots appended so n is a multiple (sequence parallelism splits n)."""
        extra = -self.n % multiple
        if extra == 0:
            return self
        b = self.idx.shape[0]
        idx = torch.cat([self.idx, self.idx.new_full((b, extra), seq_len)], 1)
        return LiveSet(idx, torch.cat([self.valid, self.valid.new_zeros(b, extra)], 1))


@dataclass
class PlanStep:
    """What happens before one layer (global layer index)."""

    live: Optional[LiveSet] = None  # the new live set; None keeps the current one
    snapshot: bool = False  # stash := full state, before the live set changes
    inject: bool = False  # 3ML: the injection point (non-live positions read the mask vectors, not the stash)


@dataclass
class TokenPlan:
    seq_len: int
    input_live: LiveSet  # positions embedded at the first layer
    steps: Dict[int, PlanStep] = field(default_factory=dict)
    capture_first_token_after: tuple = ()  # layers whose position-0 output the policy needs
    decoder_context: bool = False  # 3ML-cross: decoder layers cross-attend to the encoder output

    def live_before(self, layer_idx: int) -> LiveSet:
        """The live set the layer `layer_idx` receives from the layer before it."""
        live = self.input_live
        for l in sorted(self.steps):
            if l < layer_idx and self.steps[l].live is not None:
                live = self.steps[l].live
        return live

    def stash_rows_needed(self, layer_idx: int, real: Tensor) -> Optional[LiveSet]:
        """Positions of the stash, as it is before layer `layer_idx`, that a later step will
        read (directly, or through a snapshot that copies them into the next stash); None when
        there are none. Walked backwards: a live change reads its new, not-yet-live positions
        from the stash (the injection step reads mask vectors instead: they are built on its
        own stage); a snapshot takes the live positions from the hidden states, so only the
        others must come from the stash before it."""
        later = sorted(k for k in self.steps if k >= layer_idx)
        reads = torch.zeros_like(real)  # read from the stash as it is after the step being walked
        for l in reversed(later):
            step, before = self.steps[l], _mask_of(self.live_before(l), real)
            if step.live is not None and not step.inject:
                reads = reads | (_mask_of(step.live, real) & ~before)
            if step.snapshot:
                reads = reads & ~before
        return LiveSet.from_mask(reads) if bool(reads.any()) else None

    def inject_layer(self) -> Optional[int]:
        return next((l for l in sorted(self.steps) if self.steps[l].inject), None)


def _mask_of(live: LiveSet, real: Tensor) -> Tensor:
    """[b, T] bool: the positions of a live set (its valid slots)."""
    if live.identity:
        return real.clone()
    b, T = real.shape
    m = torch.zeros(b, T + 1, dtype=torch.bool, device=real.device)
    m.scatter_(1, live.idx, live.valid)
    return m[:, :T]


@dataclasses.dataclass
class MLMOutput:
    """What the last stage hands to the loss function."""

    lm_losses: Tensor  # [m] cross-entropy of each predicted position
    labels: Optional[Tensor] = None  # [m] their target ids
    binary_loss: Optional[Tensor] = None  # [b] sentence-order loss, with --bert-binary-head
    captured: Dict[int, Tensor] = dataclasses.field(default_factory=dict)  # layer -> [b, h] first-token states
    consistency: Optional["MLMOutput"] = None  # the second (full) pass of a consistency step (ScTD)
    logits: Optional[Tensor] = None  # [m, V / tp] with return_logits (export's check)
    hidden: Optional[Tensor] = None  # [m, h] the head's input rows, with return_logits
