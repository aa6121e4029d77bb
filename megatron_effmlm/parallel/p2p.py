"""Pipeline messages of any size, on every megatron-core schedule (interleaved included).

3ML and token dropping change the number of live tokens between stages, so each message
between stages has its own row count (megatron-core's `variable_seq_lengths`). megatron-core
sends each message's shape first, in a separate blocking exchange. Under the interleaved
schedule that deadlocks (Megatron-LM issue 5100; seen here at PP=4): a rank waits for its
shape send to the previous stage to be received, while that stage waits for this rank to
receive a tensor it already sent.

`LiveTokenP2PCommunicator` is megatron-core's communicator with one change: shapes travel on
a separate gloo group (host memory: no GPU synchronisation, nothing queued on the NCCL
stream ahead of the tensors), and a shape send is not waited for until the tensors of the
same call are. A shape then behaves as a header of its tensor, so the schedule's order of
sends and receives is the only order that matters, as with fixed shapes. Tags keep the two
directions apart when the previous and next stage are the same rank (PP=2).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

TO_NEXT_TAG, TO_PREV_TAG = 7001, 7002

_SHAPE_GROUP: Optional[dist.ProcessGroup] = None


def build_shape_group(timeout=None) -> None:
    """Collective over the world: one gloo group per pipeline group (PP > 1); `timeout` as
    every other group's (new_group's default is not the world group's)."""
    global _SHAPE_GROUP
    _SHAPE_GROUP = None
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return
    mine = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    groups = sorted({tuple(r) for r in everyone})
    for ranks in groups:  # every rank creates every group, in the same order
        g = dist.new_group(list(ranks), backend="gloo", timeout=timeout)
        if dist.get_rank() in ranks:
            _SHAPE_GROUP = g


def destroy_shape_group() -> Optional[dist.ProcessGroup]:
    """Forget the shape group; returns it (or None) so that the caller can shut it down."""
    global _SHAPE_GROUP
    g, _SHAPE_GROUP = _SHAPE_GROUP, None
    return g


class LiveTokenP2PCommunicator(P2PCommunicator):
    """megatron-core's P2PCommunicator; shapes exchanged as headers (see the module doc)."""

    def __init__(self, pp_group: dist.ProcessGroup, config, shape_group: dist.ProcessGroup):
        # Both hooks must still exist in megatron-core, or its own exchange would run unseen.
        for hook in ("_communicate_shapes", "_communicate"):
            if not callable(getattr(P2PCommunicator, hook, None)):
                import megatron.core

                raise RuntimeError(f"megatron-core {megatron.core.__version__}: P2PCommunicator.{hook} is gone; "
                                   "megatron_effmlm/parallel/p2p.py needs updating for this release")
        super().__init__(pp_group, config)
        self.shape_group = shape_group
        self._shape_sends = []  # in flight until this call's tensors are

    def _communicate_shapes(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next):
        for t, peer, tag in ((tensor_send_next, self.next_rank, TO_NEXT_TAG),
                             (tensor_send_prev, self.prev_rank, TO_PREV_TAG)):
            if t is not None:
                shape = torch.tensor(t.shape, dtype=torch.int64)
                self._shape_sends.append((dist.isend(shape, peer, group=self.shape_group, tag=tag), shape))
        recvs = []
        for wanted, peer, tag in ((recv_prev, self.prev_rank, TO_NEXT_TAG), (recv_next, self.next_rank, TO_PREV_TAG)):
            buf = torch.zeros(3, dtype=torch.int64)
            recvs.append((dist.irecv(buf, peer, group=self.shape_group, tag=tag) if wanted else None, buf))
        shapes = []
        for work, buf in recvs:
            if work is not None:
                work.wait()
            shapes.append(buf.tolist())
        return shapes[0], shapes[1]

    def _communicate(self, *, wait_on_reqs: bool = True, **kwargs):
        out = super()._communicate(wait_on_reqs=wait_on_reqs, **kwargs)
        if wait_on_reqs:  # with overlapped p2p, the next waiting call drains them
            for work, _ in self._shape_sends:
                work.wait()
            self._shape_sends = []
        return out


def schedule_kwargs(config) -> dict:
    """`p2p_communicator` and `pg_collection` for megatron-core's forward_backward_func (PP > 1):
    the process groups megatron-core would use by default, with our communicator."""
    if ps.get_pipeline_model_parallel_world_size() == 1 or not config.variable_seq_lengths:
        return {}
    if _SHAPE_GROUP is None:
        raise RuntimeError("pipeline shape group missing: call megatron_effmlm.parallel.init.initialize_distributed")
    from megatron.core.process_groups_config import ProcessGroupCollection

    pgs = ProcessGroupCollection()
    pgs.tp = ps.get_tensor_model_parallel_group()
    pgs.cp = ps.get_context_parallel_group()
    pgs.embd = ps.get_embedding_group(check_initialized=False)
    pgs.pos_embd = ps.get_position_embedding_group(check_initialized=False)
    pgs.pp = ps.get_pipeline_model_parallel_group()
    pgs.dp_cp = ps.get_data_parallel_group(with_context_parallel=True, partial_data_parallel=False)
    return {"p2p_communicator": LiveTokenP2PCommunicator(pgs.pp, config, _SHAPE_GROUP), "pg_collection": pgs}
