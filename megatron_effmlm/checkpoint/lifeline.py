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
