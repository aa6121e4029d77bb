"""Stop at step k, resume with --load: the loss sequence equals the uninterrupted run's
(DP=2, dropout on, so RNG states, data position, optimizer and LR schedule all matter)."""

import glob
import json
import os

import pytest

from conftest import needs_cpu_bf16, run_torchrun, tiny_model_args


def _losses(png):
    hist = json.load(open(os.path.splitext(png)[0] + ".json"))
    return {int(i): loss for i, loss in hist["train"]}


@pytest.mark.parametrize("method", [
    [],  # vanilla
    ["--method", "token-drop"],  # the importance table must come back from the checkpoint
    ["--method", "random-ltd", "--ltd-start", "16", "--ltd-steps", "5"],  # schedule position
    ["--method", "3ml"],  # e_mask and the decoder
    pytest.param(["--bf16"], marks=needs_cpu_bf16),
], ids=["vanilla", "token-drop", "random-ltd", "3ml", "vanilla-bf16"])  # bf16: the fp32 main parameters come back too
def test_resume_equals_uninterrupted(tmp_path, demo_data_prefix, demo_tokenizer_dir, test_cache_dir, method):
    dc = os.path.join(test_cache_dir, "dc")
    common = tiny_model_args(demo_data_prefix, demo_tokenizer_dir, dc, **{
        "--train-iters": 6, "--hidden-dropout": 0.1, "--attention-dropout": 0.1, "--lr-warmup-iters": 2,
        "--num-layers": 4}) + method

    full = str(tmp_path / "full.png")
    r = run_torchrun(2, ["pretrain_effmlm.py", *common, "--loss-curve", full,
                         "--tensorboard-dir", str(tmp_path / "tb")])
    assert r.returncode == 0, r.stderr[-4000:]
    assert os.path.getsize(full) > 1000
    assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    assert "ETA" in r.stdout and "tok/s" in r.stdout

    ck = str(tmp_path / "ck")
    part1 = str(tmp_path / "part1.png")
    r = run_torchrun(2, ["pretrain_effmlm.py", *common, "--save", ck, "--save-interval", "3",
                         "--exit-interval", "3", "--loss-curve", part1])
    assert r.returncode == 0, r.stderr[-4000:]
    assert open(os.path.join(ck, "latest_checkpointed_iteration.txt")).read().strip() == "3"
    assert not glob.glob(os.path.join(ck, "*.tmp"))

    part2 = str(tmp_path / "part2.png")
    r = run_torchrun(2, ["pretrain_effmlm.py", *common, "--load", ck, "--loss-curve", part2])
    assert r.returncode == 0, r.stderr[-4000:]

    a, b1, b2 = _losses(full), _losses(part1), _losses(part2)
    assert sorted(b1) == [1, 2, 3] and sorted(b2) == [4, 5, 6]
    assert [a[i] for i in range(1, 7)] == [b1[i] for i in (1, 2, 3)] + [b2[i] for i in (4, 5, 6)]
