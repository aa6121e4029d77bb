"""ScTD: semantic-consistent token dropping (Zhong et al., ACL 2023).

Token dropping on every training step; every `sctd_interval`-th step also runs the full model
on the same batch, and the step's loss is
    (0.5 sum MLM_drop + 0.5 sum MLM_full + w KL_(L-1) + w KL_L) / N,
with w = `sctd_kl_weight` (0.05), N the global batch's predicted tokens, the MLM terms summed
over predicted tokens and KL = KL(p_full || p_drop), p = softmax over the hidden dimension of
the first token's state at the output of layer L-1 and layer L, summed over the rows
(F.kl_div(log p_drop, p_full, reduction="sum"), nothing detached: gradients reach both
passes). As in the published code, the MLM sums and the KL sum share the one normaliser N;
every term is a sum over rows, so the loss does not depend on how the global batch is split
into micro-batches or data-parallel ranks. `sctd_code_compat` reproduces the published
code, which takes both MLM terms from the dropped pass. The importance table learns from the
dropped pass's losses.
"""

import torch
import torch.nn.functional as F

from megatron_effmlm.config import non_negative, positive
from megatron_effmlm.model.plan import TokenPlan
from megatron_effmlm.plans.base import Flag, real_positions, register
from megatron_effmlm.plans.token_drop import TokenDropPolicy


def consistency_kl(drop_state, full_state):
    """KL(softmax(full) || softmax(drop)) over the hidden dimension, summed over the batch."""
    return F.kl_div(F.log_softmax(drop_state.float(), -1), F.softmax(full_state.float(), -1), reduction="sum")


@register("sctd")
class ScTDPolicy(TokenDropPolicy):
    flags = TokenDropPolicy.flags + (
        Flag("--sctd-interval", "sctd_interval", 10, "sctd: a consistency step every N steps", type=int, check=positive),
        Flag("--sctd-code-compat", "sctd_code_compat", False, "sctd: both MLM terms from the dropped pass",
             action="store_true"),
        Flag("--sctd-kl-weight", "sctd_kl_weight", 0.05,
             "sctd: weight of each layer's consistency KL (summed over rows), which shares the MLM sums' "
             "normaliser, the predicted tokens", type=float, check=non_negative),
    )
    defaults = {"td_beta": 0.95}  # the ScTD code's value
    report_keys = TokenDropPolicy.report_keys + ("full lm loss", "consistency kl")

    def __init__(self, sctd_interval: int = 10, sctd_code_compat: bool = False, sctd_kl_weight: float = 0.05, **kw):
        kw.setdefault("td_beta", 0.95)  # the ScTD code's value
        super().__init__(**kw)
        self.interval, self.code_compat, self.kl_weight = sctd_interval, sctd_code_compat, sctd_kl_weight

    @property
    def captured_layers(self):
        return (self.num_layers - 2, self.num_layers - 1)

    def is_consistency_step(self, step: int) -> bool:
        return self.training and step % self.interval == 0

    def plan(self, batch, step):
        if not self.training:
            return None
        p = self.drop_plan(batch)
        if self.is_consistency_step(step):
            p.capture_first_token_after = self.captured_layers
        return p

    def consistency_plan(self, batch, step):
        if not self.is_consistency_step(step):
            return None
        # the full model: every position live at every layer (no kept set to compute)
        return TokenPlan(seq_len=batch["text"].shape[1], input_live=real_positions(batch),
                         capture_first_token_after=self.captured_layers)

    def loss(self, out):
        if out.consistency is None:
            return super().loss(out)
        self.record(out)
        full = out.consistency
        n = torch.full((), out.lm_losses.numel(), dtype=torch.int, device=out.lm_losses.device)
        drop_sum = out.lm_losses.sum()
        full_sum = drop_sum if self.code_compat else full.lm_losses.sum()
        kls = [consistency_kl(out.captured[l], full.captured[l]) for l in self.captured_layers]
        # Sums only: the schedule divides the whole by the global predicted-token count, as the
        # published code's one normaliser (a KL scaled per micro-batch would depend on the split).
        total = 0.5 * drop_sum + 0.5 * full_sum + self.kl_weight * sum(kls)
        rows = torch.full((), out.captured[self.captured_layers[0]].shape[0], dtype=torch.float, device=n.device)
        report = {
            "lm loss": torch.stack([drop_sum.detach(), n.float()]),
            "full lm loss": torch.stack([full.lm_losses.sum().detach(), n.float()]),
            "consistency kl": torch.stack([sum(kls).detach(), rows]),  # per row, both layers
        }
        return total, n, report
