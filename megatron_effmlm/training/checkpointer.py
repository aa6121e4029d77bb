"""Checkpoints during training: when they are due, and a save that fails for want of space
says so and leaves the previous checkpoint in place (checkpoint/dist_ckpt.py writes them)."""

from __future__ import annotations

import os
from typing import Optional

from megatron_effmlm.checkpoint import dist_ckpt


def every(interval: int, iteration: int) -> bool:
    """An iteration-multiple schedule (--eval-interval, --save-interval, --exit-interval); 0: never."""
    return bool(interval) and iteration % interval == 0


class Checkpointer:
    """--save and --save-interval: decides when a checkpoint is written, and writes it."""

    def __init__(self, train):
        self.train = train  # a TrainConfig: read at each call (--save may be set after the build)

    @property
    def dir(self) -> Optional[str]:
        return self.train.save

    @property
    def interval(self) -> int:
        return self.train.save_interval

    def due(self, iteration: int) -> bool:
        return bool(self.dir) and every(self.interval, iteration)

    def due_at_end(self, iteration: int, train_iters: int) -> bool:
        """At the end of training, unless this iteration was just saved; --train-iters 0 saves
        the initial weights (iteration 0: weights only) whatever --save-interval."""
        return bool(self.dir) and (not self.due(iteration) or train_iters == 0)

    def save(self, iteration: int, model, optimizer, scheduler, common: dict, log: bool = True) -> str:
        try:
            path = dist_ckpt.save_checkpoint(self.dir, iteration, model, optimizer, scheduler, common)
        except (Exception, dist_ckpt.CheckpointException) as e:
            final = dist_ckpt.checkpoint_dir(self.dir, iteration)
            # Adam: weights and two moments (a lower bound of what the save writes here)
            needed = 3 * sum(p.numel() * p.element_size() for m in model for p in m.parameters())
            if not _disk_full(e, self.dir, final + ".tmp", needed):
                raise
            # The half-written iter_*.tmp would hold the space a later save needs; the
            # previous checkpoint and the tracker naming it are untouched.
            if log:
                import shutil

                shutil.rmtree(final + ".tmp", ignore_errors=True)
            prev = dist_ckpt.find_candidates(self.dir)
            kept = f"the previous checkpoint {prev[0]} is kept" if prev else "no earlier checkpoint exists"
            raise dist_ckpt.CheckpointError(
                f"--save {self.dir}: no space left on device while saving {final}; {kept}") from None
        if log:
            print(f"saved checkpoint {path}", flush=True)
        return path


def _disk_full(e: BaseException, root: str, tmp: str, needed: int) -> bool:
    """Did a save fail for want of space? ENOSPC anywhere in the failure (torch DCP reports its
    writers' errors as text), or -- torch's zip writer turns a short write into "unexpected
    pos" -- less room on the filesystem before the save than the state it had to write."""
    import errno

    cause = e
    while cause is not None:
        if getattr(cause, "errno", None) == errno.ENOSPC or "No space left on device" in str(cause):
            return True
        cause = cause.__cause__ or cause.__context__
    try:
        st = os.statvfs(root)
        written = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp)) if os.path.isdir(tmp) else 0
    except OSError:
        return False
    return st.f_bavail * st.f_frsize + written < needed
