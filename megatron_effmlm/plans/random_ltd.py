"""Random layer-wise token dropping (DeepSpeed random-LTD, Yao et al. 2022).

Every middle layer (all but the first and the last) runs on its own uniformly sampled subset
of each row's real tokens, in position order; the other tokens pass that layer unchanged. The
kept length grows linearly from `ltd_start` to the full length over `ltd_steps` steps, in
multiples of `ltd_granularity`. Sampling is a function of (seed, step, micro-batch), so a
resumed run draws the same subsets; the step count is the only state.
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
        self._micro = 0
        self._last_step = -1

    def sample(self, padding_mask, keep: int, generator) -> LiveSet:
        pad = padding_mask.bool()
        scores = torch.rand(pad.shape, generator=generator).masked_fill(~pad.cpu(), -1.0)
        top = scores.topk(min(keep, pad.shape[1]), dim=1).indices.to(pad.device)
        mask = torch.zeros_like(pad).scatter_(1, top, True) & pad
        return LiveSet.from_mask(mask)

    def plan(self, batch, step):
        if not self.training:
            return None
        if step != self._last_step:
            self._last_step, self._micro = step, 0
        T = batch["text"].shape[1]
        keep = ltd_length(step, T, self.start, self.steps, self.granularity)
        if keep >= T:
            return None
        g = torch.Generator().manual_seed(hash((self.seed, step, self._micro)) % (2**63))
        self._micro += 1
        steps = {l: PlanStep(live=self.sample(batch["padding_mask"], keep, g), snapshot=True)
                 for l in range(1, self.num_layers - 1)}
        steps[self.num_layers - 1] = PlanStep(live=real_positions(batch), snapshot=True)
        return TokenPlan(seq_len=T, input_live=real_positions(batch), steps=steps)
