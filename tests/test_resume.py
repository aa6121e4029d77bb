"""Resume with --load from step k's checkpoint: the losses equal the uninterrupted run's
(DP=2, dropout on, so RNG states, data position, optimizer and LR schedule all matter)."""

import glob
import json
import os
import shutil

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

    # The uninterrupted run also saves at step 3 (which must not disturb it).
    full, ck = str(tmp_path / "full.png"), str(tmp_path / "ck")
    r = run_torchrun(2, ["pretrain_effmlm.py", *common, "--loss-curve", full, "--save", ck, "--save-interval", "3",
                         "--tensorboard-dir", str(tmp_path / "tb")])
    assert r.returncode == 0, r.stderr[-4000:]
    assert os.path.getsize(full) > 1000
    assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    assert "ETA" in r.stdout and "tok/s" in r.stdout
    assert open(os.path.join(ck, "latest_checkpointed_iteration.txt")).read().strip() == "6"

    # Resume from step 3's checkpoint alone; stop (after saving) at step 5.
    ck3 = tmp_path / "ck3"
    shutil.copytree(os.path.join(ck, "iter_0000003"), ck3 / "iter_0000003")
    (ck3 / "latest_checkpointed_iteration.txt").write_text("3\n")
    part2 = str(tmp_path / "part2.png")
    r = run_torchrun(2, ["pretrain_effmlm.py", *common, "--load", str(ck3), "--save", str(ck3), "--save-interval",
                         "100", "--exit-interval", "5", "--loss-curve", part2])
    assert r.returncode == 0, r.stderr[-4000:]
    assert (ck3 / "latest_checkpointed_iteration.txt").read_text().strip() == "5"
    assert not glob.glob(str(ck3 / "*.tmp"))

    a, b2 = _losses(full), _losses(part2)
    assert sorted(a) == [1, 2, 3, 4, 5, 6] and sorted(b2) == [4, 5]
    assert [a[i] for i in (4, 5)] == [b2[i] for i in (4, 5)]
