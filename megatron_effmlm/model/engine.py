"""The token plan and the engine that executes it.

A `TokenPlan` says, before chosen layers, which positions become live (an index tensor per
row, padded), whether the full state is snapshotted into the stash first (token dropping's
pre-drop states, random-LTD's up-to-date states), and whether new vectors enter there (3ML's
[MASK] injection). Positions that are not live keep their stashed state, so a later change of
the live set (a restore) brings them back. The layers themselves are megatron-core's unchanged
`TransformerLayer`s: the engine gathers the live tokens, runs the layer, and scatters back
only when the plan changes. No state is shared between layers behind the plan's back.

Shapes: h is [n, b, H] (n live tokens, sequence first as in megatron-core); the full state is
[T + 1, b, H], where row T is a bin that padded slots of ragged live sets write to.

Pipeline parallelism: every stage builds the same plan from the batch, so a stage knows the
runner's state at its first layer without being told. Between stages travels the *carry*
(`export_carry` / `import_carry`): the live tokens, the stash rows that a later step will
read (token dropping's dropped tokens, random-LTD's passed-over tokens, 3ML's mask vectors),
the encoder output for 3ML-cross's decoder, and captured first-token states: nothing else,
and no padding back to the full length. 3ML's mask vectors never travel: the stage holding the
injection step builds them from its own (tied) copies of e_mask and the position table.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from torch import Tensor

from megatron_effmlm.model.plan import LiveSet, TokenPlan


def gather_live(full: Tensor, live: LiveSet) -> Tensor:
    """full [T+1, b, H] -> [n, b, H]."""
    H = full.shape[-1]
    return full.gather(0, live.idx.t().unsqueeze(-1).expand(-1, -1, H))


def scatter_live(base: Tensor, h: Tensor, live: LiveSet) -> Tensor:
    """Out-of-place: base [T+1, b, H] with h [n, b, H] written at the live positions."""
    H = h.shape[-1]
    return base.scatter(0, live.idx.t().unsqueeze(-1).expand(-1, -1, H), h)


def to_full(h: Tensor, live: LiveSet, base: Optional[Tensor], seq_len: int) -> Tensor:
    if base is None:
        base = h.new_zeros(seq_len + 1, h.shape[1], h.shape[2])
    if live.identity:
        return torch.cat([h, base[seq_len:]], 0)
    return scatter_live(base, h, live)


def gather_ids(x: Tensor, live: LiveSet) -> Tensor:
    """x [b, T] -> [b, n] at the live positions (padded slots read position 0)."""
    if live.identity:
        return x
    return x.gather(1, live.idx.clamp(max=x.shape[1] - 1))


class PlanRunner:
    """Executes a plan over a sequence of layers; holds the step's transient state only."""

    def __init__(self, plan: TokenPlan, real: Tensor, rotary: Optional[Tensor] = None, sp: int = 1,
                 align: int = 1, packed: bool = False):
        # Sequence parallelism: h holds n / sp tokens per TP rank; every live set is padded so
        # n divides, and plan steps work on the gathered sequence. FP8 GEMMs need n to be a
        # multiple of 16 (`align`): the padded slots are invalid (masked keys, never predicted,
        # written to the bin row), so they change no loss and no importance update.
        self.sp = sp
        multiple = math.lcm(sp, align)
        if multiple > 1:
            T = plan.seq_len
            plan.input_live = plan.input_live.padded(multiple, T)
            for step in plan.steps.values():
                if step.live is not None:
                    step.live = step.live.padded(multiple, T)
        self.plan = plan
        self.real = real.bool()  # [b, T] padding mask
        self.live = plan.input_live
        self.stash: Optional[Tensor] = None  # [T+1, b, H]
        # 3ML's mask vectors, set by the stage holding the injection step, which reads them
        self.injected: Optional[Tensor] = None  # [T+1, b, H]
        self.rotary_full = rotary  # [T+1, 1, 1, d] or None
        self.captured: Dict[int, Tensor] = {}
        self.context: Optional[Tensor] = None  # 3ML-cross: the encoder output, [n_enc, b, H]
        self.context_mask: Optional[Tensor] = None
        self.context_valid: Optional[Tensor] = None  # [b, n_enc]
        # packed: attention gets segment bounds instead of a padding mask (model/packed_attention.py)
        self.packed = packed
        self._packings: Dict[tuple, tuple] = {}  # per (query, key) live set: bounds are made once

    def attention_mask(self) -> Tensor:
        """[b, 1, 1, n] True = blocked; with packed attention the live set's segment bounds."""
        if self.packed:
            return self._packing(self.live.valid)
        return (~self.live.valid)[:, None, None, :]

    def cross_attention_mask(self) -> Tensor:
        """The decoder's mask over the encoder output (keys): [b, 1, 1, n_enc] or, packed, bounds."""
        if self.packed:
            return self._packing(self.live.valid, self.context_valid)
        return self.context_mask

    def _packing(self, q_valid: Tensor, kv_valid: Optional[Tensor] = None) -> Tensor:
        from megatron_effmlm.model.packed_attention import live_packing

        key = (id(q_valid), id(kv_valid))  # the entry holds both tensors, so their ids stay theirs
        if key not in self._packings:
            self._packings[key] = (q_valid, kv_valid, live_packing(q_valid, kv_valid))
        return self._packings[key][2]

    def rotary(self) -> Optional[Tensor]:
        if self.rotary_full is None:
            return None
        if self.live.identity:
            return self.rotary_full[: self.plan.seq_len]
        return self.rotary_full[:, 0, 0, :][self.live.idx.t()].unsqueeze(2)  # [n, b, 1, d]

    def _gather(self, h: Tensor) -> Tensor:
        """[n/sp, b, H] -> [n, b, H]; backward splits (every TP rank computes the same after it)."""
        if self.sp == 1:
            return h
        from megatron.core import tensor_parallel

        return tensor_parallel.gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=False)

    def _scatter(self, h: Tensor) -> Tensor:
        if self.sp == 1:
            return h
        from megatron.core import tensor_parallel

        return tensor_parallel.scatter_to_sequence_parallel_region(h)

    def before_layer(self, layer_idx: int, h: Tensor) -> Tensor:
        step = self.plan.steps.get(layer_idx)
        if step is None:
            return h
        T = self.plan.seq_len
        base = self.injected if step.inject else self.stash
        if step.inject and self.plan.decoder_context:
            self.context, self.context_valid = h, self.live.valid  # sharded, as cross-attention wants
            self.context_mask = (~self.live.valid)[:, None, None, :]
        h = self._gather(h)
        full = to_full(h, self.live, base, T)
        if step.snapshot:
            self.stash = full
        if step.live is not None:
            self.live = step.live
            h = full[:T] if step.live.identity else gather_live(full, step.live)
        return self._scatter(h)

    def after_layer(self, layer_idx: int, h: Tensor) -> None:
        if layer_idx in self.plan.capture_first_token_after:
            self.captured[layer_idx] = self.state_at(self._gather(h), 0)

    def state_at(self, h: Tensor, position: int) -> Tensor:
        """[b, H] states of one position (which must be live)."""
        if self.live.identity:
            return h[position]
        slot = (self.live.idx == position).float().argmax(1)  # [b]
        return h[slot, torch.arange(h.shape[1], device=h.device)]

    # ----- pipeline parallelism -----
    def _carry_parts(self, layer_idx: int):
        """(name, live set or row count) of what crosses the stage boundary before layer_idx."""
        parts = [("h", self.plan.live_before(layer_idx))]
        stash = self.plan.stash_rows_needed(layer_idx, self.real)
        if stash is not None:
            parts.append(("stash", stash))
        inject = self.plan.inject_layer()
        if self.plan.decoder_context and inject is not None and inject < layer_idx:
            parts.append(("context", self.plan.live_before(inject)))
        for l in self.plan.capture_first_token_after:
            if l < layer_idx:
                parts.append((f"captured{l}", 1))
        return parts

    def carry_rows(self, layer_idx: int) -> int:
        """Rows this stage receives (per TP rank under sequence parallelism)."""
        rows = sum(p if isinstance(p, int) else p.n for _, p in self._carry_parts(layer_idx))
        return (rows + (-rows % self.sp)) // self.sp

    def export_carry(self, h: Tensor, layer_idx: int) -> Tensor:
        """[rows, b, H]: what the next stage (starting at layer_idx) needs."""
        out = []
        for name, part in self._carry_parts(layer_idx):
            if name == "h":
                out.append(self._gather(h))
            elif name == "stash":
                # the stashed values, also of positions that are live now (token dropping's
                # pre-drop states of tokens that layer c just updated)
                out.append(gather_live(self.stash, part))
            elif name == "context":
                out.append(self._gather(self.context))
            else:
                out.append(self.captured[int(name[8:])].unsqueeze(0))
        carry = torch.cat(out, 0)
        if self.sp > 1:  # pad the rows so the carry splits over the TP ranks
            carry = torch.cat([carry, carry.new_zeros(-carry.shape[0] % self.sp, *carry.shape[1:])], 0)
        return self._scatter(carry)

    def import_carry(self, carry: Tensor, layer_idx: int) -> Tensor:
        """Restore the runner's state from the carry; returns the live hidden states."""
        T, h, start = self.plan.seq_len, None, 0
        carry = self._gather(carry)
        for name, part in self._carry_parts(layer_idx):
            n = part if isinstance(part, int) else part.n
            rows = carry[start:start + n]
            start += n
            if name == "h":
                h, self.live = self._scatter(rows), part
            elif name == "stash":
                self.stash = scatter_live(rows.new_zeros(T + 1, rows.shape[1], rows.shape[2]), rows, part)
            elif name == "context":
                self.context, self.context_valid = self._scatter(rows), part.valid
                self.context_mask = (~part.valid)[:, None, None, :]
            else:
                self.captured[int(name[8:])] = rows[0]
        assert start <= carry.shape[0] < start + self.sp, f"carry of {carry.shape[0]} rows, plan expects {start}"
        return h

    def predicted_states(self, h: Tensor, flat_idx: Tensor) -> Tensor:
        """[m, H] final states at the predicted positions (flat indices over [b, T])."""
        T = self.plan.seq_len
        rows, pos = flat_idx // T, flat_idx % T
        if not self.live.identity:
            h = to_full(h, self.live, None, T)
        return h[pos, rows]
