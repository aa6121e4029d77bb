"""Token dropping (Hou et al., ACL 2022).

Layers 0 .. c-1 see all tokens; layer c (c = L/2 - 1, the 6th of 12) gives its outputs to the
kept tokens only (it runs on all tokens, which yields exactly the kept queries' outputs over
all keys and values); layers c+1 .. L-2 see the kept tokens; before the last layer the dropped
tokens come back with their states from before layer c. Kept: the top `keep_ratio` of each
row's real tokens by the importance table `I[token id]`, in position order.

The table: I[v] = 10.0 initially; [CLS]/[SEP]/[MASK]/[UNK] pinned to +1e4 (always kept) and
padding to -1e4 (always dropped), re-pinned after every update. After each step, for each
token id that was a label: I[y] <- beta * I[y] + (1 - beta) * mean loss of its predictions in
the step (summed over micro-batches and data-parallel ranks, so every rank keeps the same table).
"""

import numpy
import torch
import torch.distributed as dist

from megatron_effmlm.config import ConfigError, in_range
from megatron_effmlm.model.plan import LiveSet, PlanStep, TokenPlan
from megatron_effmlm.plans.base import Flag, Policy, real_positions, register, static_width

KEEP_RATIO = Flag("--td-keep-ratio", "td_keep_ratio", 0.5, "token dropping's methods: kept fraction of the middle layers",
                  type=float, check=in_range(0, 1, low_open=True))
BETA = Flag("--td-beta", "td_beta", 0.995, "token dropping's methods: importance EMA (0.995; sctd 0.95)",
            type=float, check=in_range(0, 1))

PIN = 1e4


def select_kept(scores, padding_mask, keep_ratio: float) -> LiveSet:
    """Top round(keep_ratio * n_real) positions of each row by score (ties: lower position
    first), never padding, returned in position order."""
    b, T = scores.shape
    pad = padding_mask.bool()
    scores = scores.masked_fill(~pad, float("-inf"))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # [b, T]
    k = (pad.sum(1).float() * keep_ratio).round().clamp(min=1).long()  # [b]
    keep = torch.zeros_like(pad)
    keep.scatter_(1, order, torch.arange(T, device=scores.device).expand(b, T) < k[:, None])
    return LiveSet.from_mask(keep & pad, n=static_width(kept_bound(T, keep_ratio)))


def kept_bound(seq_len: int, keep_ratio: float) -> int:
    """The largest k select_kept can give a row of `seq_len` positions, from Python numbers (no
    host read of the batch): the same float32 product and round-half-even as above, at n = T
    (both are monotonic in n)."""
    return min(seq_len, max(1, int(numpy.rint(numpy.float32(seq_len) * numpy.float32(keep_ratio)))))


@register("token-drop")
class TokenDropPolicy(Policy):
    flags = (KEEP_RATIO, BETA)

    @classmethod
    def layer_costs(cls, shape, td_keep_ratio: float = 0.5, **options):
        T, L = shape.seq_len, shape.num_layers
        k, c = round(td_keep_ratio * T), L // 2 - 1  # layers 0..c and the last run on all tokens
        return [shape.layer(T) if (l <= c or l == L - 1) else shape.layer(k) for l in range(L)], shape.head()

    def __init__(self, td_keep_ratio: float = 0.5, td_beta: float = 0.995, **kw):
        super().__init__(**kw)
        if self.num_layers < 4:
            raise ConfigError(f"--method {self.name} needs --num-layers >= 4, got {self.num_layers}")
        self.keep_ratio, self.beta = td_keep_ratio, td_beta
        tok = self.tokenizer
        self.importance = torch.full((tok.vocab_size,), 10.0, dtype=torch.float64)
        self.pinned_high = sorted({tok.cls, tok.sep, tok.mask, tok.unk})
        self._pin()
        self._reset_stats()

    def _pin(self):
        self.importance[self.pinned_high] = PIN
        self.importance[self.tokenizer.pad] = -PIN

    def _reset_stats(self):
        self._loss_sum = torch.zeros_like(self.importance)
        self._count = torch.zeros_like(self.importance)

    @property
    def drop_layer(self) -> int:
        return self.num_layers // 2 - 1

    def _table_on(self, device):
        """The table on the batches' device, copied again only when it changed (after a step):
        not a host-to-device copy per micro-batch (a blocking one syncs a GPU)."""
        src, version = self.importance, self.importance._version
        c = getattr(self, "_table", None)
        if c is None or c[0] is not src or c[1] != version or c[2] != device:
            self._table = (src, version, device, src.to(device))
        return self._table[3]

    def kept(self, batch) -> LiveSet:
        scores = self._table_on(batch["text"].device)[batch["text"]]
        return select_kept(scores, batch["padding_mask"], self.keep_ratio)

    def drop_plan(self, batch) -> TokenPlan:
        c, L = self.drop_layer, self.num_layers
        return TokenPlan(
            seq_len=batch["text"].shape[1],
            input_live=real_positions(batch),
            steps={
                c: PlanStep(snapshot=True),  # the states dropped tokens come back with
                c + 1: PlanStep(live=self.kept(batch)),
                L - 1: PlanStep(live=real_positions(batch)),
            },
        )

    def plan(self, batch, step):
        return self.drop_plan(batch) if self.training else None

    def record(self, out):
        """Accumulate the per-label losses of this micro-batch (one TP rank counts)."""
        from megatron.core import parallel_state as ps

        if not self.training or ps.get_tensor_model_parallel_rank() != 0:
            return
        labels = out.labels
        if self._loss_sum.device != labels.device:  # accumulate where the loss is (no sync)
            self._loss_sum, self._count = self._loss_sum.to(labels.device), self._count.to(labels.device)
        self._loss_sum.index_add_(0, labels, out.lm_losses.detach().double())
        self._count.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))

    def loss(self, out):
        self.record(out)
        return super().loss(out)

    def after_step(self, step):
        from megatron_effmlm.parallel.init import comm_device

        stats = torch.stack([self._loss_sum, self._count])
        if dist.is_initialized():
            stats = stats.to(comm_device())
            dist.all_reduce(stats)  # only last-stage, TP-rank-0 ranks contributed
        stats = stats.cpu()
        seen = stats[1] > 0
        mean = stats[0][seen] / stats[1][seen]
        self.importance[seen] = self.beta * self.importance[seen] + (1 - self.beta) * mean
        self._pin()
        self._reset_stats()

    def discard_step(self):
        self._reset_stats()  # a non-finite step's losses must not reach the importance table

    def state_dict(self):
        return {"importance": self.importance.clone()}

    def load_state_dict(self, state):
        if "importance" in state:
            self.importance = state["importance"].to(torch.float64).clone()
