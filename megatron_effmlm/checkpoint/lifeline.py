"""Child processes that die with their parent (imports nothing heavy: a spawned child
unpickles `die_with_parent` as its initializer before it can serve)."""

import ctypes
import os
import signal
import sys


def die_with_parent(parent_pid: int):
    """In a child process: be killed when `parent_pid` dies (Linux prctl PR_SET_PDEATHSIG), so a
    checkpoint writer never outlives a trainer killed with SIGKILL."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # it died before prctl
        os._exit(1)


# What Slurm (to every process of a step) and torchrun (killpg of each worker's group, at its
# shutdown) send to ask the job to stop; the trainer answers by saving.
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP")


def serve_for_parent(parent_pid: int):
    """Initializer of a helper server the trainer's save needs (dist_checkpointing's results queue):
    it ignores the stop signals, which reach it too, since the save they ask for needs it (killed by
    one, the save failed with EOFError), and dies with the trainer."""
    for name in STOP_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    die_with_parent(parent_pid)
