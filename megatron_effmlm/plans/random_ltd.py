"""Random layer-wise token dropping (DeepSpeed random-LTD, Yao et al. 2022).

Every middle layer (all but the first and the last) runs on its own uniformly sampled subset
of each row's real tokens, in position order; the other tokens pass that layer unchanged. The
kept length grows linearly from `ltd_start` to the full length over `ltd_steps` steps, in
multiples of `ltd_granularity`. Each row's draws are a function of (seed, step, layer, the
row's tokens): a resumed run draws the same subsets, and so does any parallel layout, however
rows are split into micro-batches and data-parallel ranks. The step count is the only state.
"""

import torch

from megatron_effmlm.config import ConfigError
from megatron_effmlm.model.engine import LiveSet, PlanStep, TokenPlan
from megatron_effmlm.plans.base import Policy, real_positions, register


def ltd_length(step: int, seq_len: int, start: int, steps: int, granularity: int) -> int:
    """Kept tokens per middle layer at `step`: start + linear growth, floored to the granularity."""
    if step >= steps:
        return seq_len
    grown = start + (seq_len - start) * step / steps
    return int(min(seq_len, max(start, grown // granularity * granularity)))


@register("random-ltd")
class RandomLTDPolicy(Policy):
    def __init__(self, ltd_start: int = 64, ltd_steps: int = 1000, ltd_granularity: int = 16, **kw):
        super().__init__(**kw)
        if self.num_layers < 3:
            raise ConfigError(f"--method random-ltd needs --num-layers >= 3, got {self.num_layers}")
        self.start, self.steps, self.granularity = ltd_start, ltd_steps, ltd_granularity

    def sample(self, text, padding_mask, keep: int, step: int, layer: int) -> LiveSet:
        pad = padding_mask.bool()
        b, T = pad.shape
        weights = torch.arange(1, T + 1, dtype=torch.int64)
        scores = torch.empty(b, T)
        for r in range(b):  # one generator per row: the draw must not depend on the row's neighbours
            row_key = int((text[r].cpu().long() * weights).sum())
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + step * 7_919 + layer * 104_729 + row_key) % 2**62)
            scores[r] = torch.rand(T, generator=g)
        scores = scores.masked_fill(~pad.cpu(), -1.0)
        top = scores.topk(min(keep, T), dim=1).indices.to(pad.device)
        mask = torch.zeros_like(pad).scatter_(1, top, True) & pad
        return LiveSet.from_mask(mask)

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
