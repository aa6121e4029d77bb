"""Atomic file writes for every tool, benchmark and trainer in the package.

A reader (another rank, a plot script, a rerun after a crash) sees the old file or the whole
new one, never a part: the content goes to `<path>.tmp.<pid>` beside the target and is renamed
over it (`os.replace`, atomic within one file system). If writing fails, the temporary file is
removed and the target is left as it was. Standard library only: the lowest layer imports it.
"""

from __future__ import annotations

import contextlib
import json
import os


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "", fsync: bool = False):
    """Yield a temporary path beside `path`; rename it over `path` when the block succeeds.

    `suffix` ends the temporary name (numpy.save adds ".npy" to a name without it). `fsync`
    flushes the file to disk before the rename (checkpoint markers: a crash right after must
    not leave an empty file behind the new name)."""
    tmp = f"{path}.tmp.{os.getpid()}{suffix}"
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)  # ours: never the target
        raise


def write_text(path: str, text: str, fsync: bool = False) -> None:
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_json(path: str, obj, indent: int | None = 1) -> None:
    write_text(path, json.dumps(obj, indent=indent))


def save_figure(fig, path: str, dpi: int = 110) -> str:
    """Save a matplotlib figure as PNG at `path` atomically and close it; returns `path`."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return path
