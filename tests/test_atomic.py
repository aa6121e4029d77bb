"""megatron_effmlm.atomic: the one way tools, benchmarks and the trainer write a file."""

import json
import os

import pytest

from megatron_effmlm import atomic


def test_writes_replace_the_file_whole_and_leave_nothing_beside_it(tmp_path):
    p = tmp_path / "r.json"
    p.write_text("old")
    atomic.write_json(str(p), {"a": [1, 2]})
    assert json.loads(p.read_text()) == {"a": [1, 2]}
    atomic.write_text(str(p), "é\n", fsync=True)
    assert p.read_text(encoding="utf-8") == "é\n"
    atomic.write_bytes(str(p), b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    assert os.listdir(tmp_path) == ["r.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    p = tmp_path / "r.json"
    p.write_text("old")
    with pytest.raises(TypeError):
        atomic.write_json(str(p), {"not json": object()})  # fails before anything is written
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(str(p)) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("stopped mid-write")
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["r.json"]


def test_numpy_save_through_atomic_path(tmp_path):
    import numpy

    p = tmp_path / "a.npy"
    with atomic.atomic_path(str(p), suffix=".npy") as tmp:  # numpy.save keeps a name ending in .npy
        numpy.save(tmp, numpy.arange(5), allow_pickle=False)
    assert numpy.load(str(p), allow_pickle=False).tolist() == [0, 1, 2, 3, 4]
    assert os.listdir(tmp_path) == ["a.npy"]


def test_save_figure_writes_a_png_and_closes_the_figure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    p = str(tmp_path / "f.png")
    assert atomic.save_figure(fig, p) == p
    assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number) and os.listdir(tmp_path) == ["f.png"]
