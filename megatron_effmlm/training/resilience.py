"""Stopping cleanly: signals, time limits, non-finite steps, and the exit codes they give.

Exit codes of `pretrain_effmlm.py` (the Slurm launchers act on them):

    0   finished (--train-iters, --exit-interval or --train-flops-budget reached)
    1   crashed (an exception; a peer rank died, a timeout of a collective)
    2   bad input: one `error:` line naming the file, flag or value
    3   too many non-finite steps in a row (--max-skipped-iterations); the last good state is saved
    75  stopped early on purpose and saved: a signal (--exit-signal-handler) or
        --exit-duration-in-mins; run the same command again (with --load) to continue.
        75 is EX_TEMPFAIL of sysexits.h, "try again later"; the sbatch launchers requeue on it.
"""

from __future__ import annotations

import math
import signal
import time

import torch
import torch.distributed as dist

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_NON_FINITE = 3
EXIT_SAVED_RESUMABLE = 75

# SIGTERM: what Slurm sends at a time limit or preemption (and torchrun forwards);
# SIGUSR1: what `#SBATCH --signal=B:USR1@<s>` sends ahead of the limit (the launchers forward it).
EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class NonFiniteError(RuntimeError):
    """Training stopped after --max-skipped-iterations non-finite steps in a row."""


class StopRequests:
    """Signals and the wall-clock limit, agreed on by every rank before anyone stops.

    A signal handler only records the signal; at the end of each step every rank all-reduces
    (MAX) [signal received, time over], so all ranks stop after the same step, save one
    checkpoint together and exit with EXIT_SAVED_RESUMABLE. A signal may reach only some ranks
    (Slurm delivers USR1 to the tasks of a step; torchrun forwards it to its workers).
    """

    def __init__(self, use_signals: bool, duration_mins=None, start_time=None):
        self.received = None
        self.enabled = bool(use_signals or duration_mins)
        self.deadline = None
        if duration_mins:
            self.deadline = (start_time or time.time()) + 60.0 * float(duration_mins)
        self._previous = {}
        if use_signals:
            for s in EXIT_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def restore(self):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def check(self):
        """None, or why every rank stops now ('SIGUSR1', 'SIGTERM', 'time limit'). Collective."""
        if not self.enabled:
            return None
        over = self.deadline is not None and time.time() >= self.deadline
        code = {None: 0, "SIGTERM": 1, "SIGUSR1": 2}.get(self.received, 1)
        from megatron_effmlm.parallel.init import comm_device

        flags = torch.tensor([code, int(over)], dtype=torch.int32, device=comm_device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0]:
            return {1: "SIGTERM", 2: "SIGUSR1"}[int(flags[0])]
        if flags[1]:
            return "time limit"
        return None


def local_grads_finite(model_chunks) -> bool:
    """Whether this rank's gradients (megatron-core DDP's main_grad buffers) are all finite."""
    sums = []
    for chunk in model_chunks:
        for p in chunk.parameters():
            g = getattr(p, "main_grad", None)
            if g is None:
                g = p.grad
            if g is not None:
                sums.append(g.detach().double().sum())
    # one device synchronisation for all parameters (not one each: it would stall a GPU step)
    return not sums or bool(torch.isfinite(torch.stack(sums).sum()))


def all_finite(loss: float, model_chunks, check_grads: bool = True) -> bool:
    """True on every rank iff the step's loss and (with check_grads) every rank's gradients are
    finite. fp16 passes check_grads=False: its gradients are loss-scaled, and an overflow there
    is the loss scaler's to handle (megatron-core's optimizer skips the step, lowers the scale)."""
    ok = math.isfinite(loss) and (not check_grads or local_grads_finite(model_chunks))
    from megatron_effmlm.parallel.init import comm_device

    flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=comm_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return not bool(flag.item())
