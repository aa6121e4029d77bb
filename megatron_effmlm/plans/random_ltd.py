"""Random layer-wise token dropping (DeepSpeed random-LTD, Yao et al. 2022).

Every middle layer (all but the first and the last) runs on its own uniformly sampled subset
of each row's real tokens, in position order; the other tokens pass that layer unchanged. The
kept length grows linearly from `ltd_start` to the full length over `ltd_steps` steps, in
multiples of `ltd_granularity`. Each row's draws are a counter-based hash of (seed, step,
layer, the row's tokens, position): a resumed run draws the same subsets, and so does any
parallel layout, however rows are split into micro-batches and data-parallel ranks. The step
count is the only state.
"""

import torch

from megatron_effmlm.config import ConfigError, non_negative, positive
from megatron_effmlm.model.plan import LiveSet, PlanStep, TokenPlan
from megatron_effmlm.plans.base import Flag, Policy, real_positions, register, static_width


def ltd_length(step: int, seq_len: int, start: int, steps: int, granularity: int) -> int:
    """Kept tokens per middle layer at `step`: start + linear growth, floored to the granularity."""
    if step >= steps:
        return seq_len
    grown = start + (seq_len - start) * step / steps
    return int(min(seq_len, max(start, grown // granularity * granularity)))


_M = (1 << 61) - 1


def _mix(x):
    """A splitmix-style integer mixer on int64 tensors, reduced to [0, 2**61). Products wrap
    around in int64, identically on every device, so the draws are reproducible."""
    x = (x ^ (x >> 31)) % _M
    x = (x * 0x5DEECE66D + 11) % _M
    x = (x ^ (x >> 29)) % _M
    return (x * 0x2545F491 + 0x9E3779B9) % _M


def uniform_hash(text, seed: int, step: int, layer: int):
    """[b, T] floats in [0, 1): a counter-based draw per (seed, step, layer, row tokens,
    position). Vectorised, and the same for a row wherever it sits in a batch."""
    b, T = text.shape
    pos = torch.arange(1, T + 1, device=text.device)
    row_key = _mix((text.long() * pos).sum(1) % _M)  # [b]
    key = _mix((row_key * 1_000_003 + seed * 7_919 + step * 104_729 + layer * 1_299_709) % _M)
    x = _mix((key[:, None] * 65_537 + pos[None, :]) % _M)  # [b, T]
    return (x >> 8).double() / float(1 << 53)


@register("random-ltd")
class RandomLTDPolicy(Policy):
    flags = (
        # its range depends on --seq-length: check_options
        Flag("--ltd-start", "ltd_start", 64, "random-ltd: kept tokens per middle layer at step 0", type=int),
        Flag("--ltd-steps", "ltd_steps", 1000, "random-ltd: steps to grow to the full length", type=int,
             check=non_negative),
        Flag("--ltd-granularity", "ltd_granularity", 16, "random-ltd: the kept length's grid", type=int,
             check=positive),
    )

    @classmethod
    def check_options(cls, options, seq_length):
        if not 1 <= options["ltd_start"] <= seq_length:
            return f"--ltd-start {options['ltd_start']} must be in [1, --seq-length {seq_length}]"
        return None

    @classmethod
    def layer_costs(cls, shape, ltd_start: int = 64, ltd_len: int = None, **options):
        """The first and last layers on all tokens, the middle ones on ltd_len; by default the
        mean of the growth from ltd_start to T (one number for the whole run: pipeline
        balancing and the schedule's estimates; the budget itself counts what ran)."""
        T, L = shape.seq_len, shape.num_layers
        k = min(T, (ltd_start + T) // 2) if ltd_len is None else ltd_len
        return [shape.layer(T)] + [shape.layer(k)] * (L - 2) + [shape.layer(T)] * min(1, L - 1), shape.head()

    def __init__(self, ltd_start: int = 64, ltd_steps: int = 1000, ltd_granularity: int = 16, **kw):
        super().__init__(**kw)
        if self.num_layers < 3:
            raise ConfigError(f"--method random-ltd needs --num-layers >= 3, got {self.num_layers}")
        self.start, self.steps, self.granularity = ltd_start, ltd_steps, ltd_granularity

    def sample(self, text, padding_mask, keep: int, step: int, layer: int) -> LiveSet:
        pad = padding_mask.bool()
        T = pad.shape[1]
        scores = uniform_hash(text, self.seed, step, layer).masked_fill(~pad, -1.0)
        top = scores.topk(min(keep, T), dim=1).indices
        mask = torch.zeros_like(pad).scatter_(1, top, True) & pad
        return LiveSet.from_mask(mask, n=static_width(min(keep, T)))  # no row keeps more

    def plan(self, batch, step):
        if not self.training:
            return None
        T = batch["text"].shape[1]
        keep = ltd_length(step, T, self.start, self.steps, self.granularity)
        if keep >= T:
            return None
        text, pad = batch["text"], batch["padding_mask"]
        steps = {l: PlanStep(live=self.sample(text, pad, keep, step, l), snapshot=True)
                 for l in range(1, self.num_layers - 1)}
        steps[self.num_layers - 1] = PlanStep(live=real_positions(batch), snapshot=True)
        return TokenPlan(seq_len=T, input_live=real_positions(batch), steps=steps)
