"""Checkpoints do not depend on the layout's vocabulary padding: a model whose vocabulary is not a
multiple of 128 x TP (8,000; BERT's 30,522) saved at TP=1 (padded to 8,064 / 30,592 rows) loads
at TP=2 (8,192 / 30,720 rows) with every saved row exact, the optimizer's state too."""

import json
import os
import subprocess

import pytest
import torch

from conftest import PYTHON, REPO_ROOT, run_scenarios, tiny_model_args

VOCABS = (8000, 30522)


def _tensors(ck_dir):
    """Every tensor of a torch_dist checkpoint, read back by torch DCP (our own files)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = ck_dir + ".pt"
    dcp_to_torch_save(ck_dir, out)
    sd = torch.load(out, weights_only=False)
    return {k: v for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point()}


@pytest.fixture(scope="module")
def resharded(tmp_path_factory, demo_data_prefix, demo_tokenizer_dir, test_cache_dir):
    """Per vocabulary: 1 step at TP=1 saved; loaded at TP=2 and saved again as it is; 1 step at TP=2."""
    tmp = tmp_path_factory.mktemp("reshard")
    base = {v: tiny_model_args(demo_data_prefix, demo_tokenizer_dir, os.path.join(test_cache_dir, "dc"),
                               **{"--vocab-size": v}) for v in VOCABS}
    run_scenarios(tmp, 1, {f"tp1_{v}": {"args": base[v], "steps": 1, "save_final": str(tmp / f"tp1_{v}")}
                           for v in VOCABS}, "tp1")
    scen = {}
    for v in VOCABS:
        tp2 = base[v] + ["--load", str(tmp / f"tp1_{v}"), "--tensor-model-parallel-size", "2"]
        scen[f"resave_{v}"] = {"args": tp2, "steps": 0, "save_final": str(tmp / f"tp2_{v}")}
        scen[f"train_{v}"] = {"args": tp2, "steps": 1}
    return tmp, base, run_scenarios(tmp, 2, scen, "tp2")


@pytest.mark.parametrize("vocab", VOCABS)
def test_tp1_checkpoint_loads_at_tp2_whatever_the_vocabulary_padding(resharded, vocab):
    tmp, _, got = resharded
    assert [s["iteration"] for s in got[f"train_{vocab}"]["steps"]] == [2]
    assert 0 < got[f"train_{vocab}"]["steps"][0]["loss"] < 20
    from megatron_effmlm.config import pad_vocab_size

    rows1, rows2 = pad_vocab_size(vocab, 128, 1), pad_vocab_size(vocab, 128, 2)
    assert rows1 != rows2
    saved = _tensors(str(tmp / f"tp1_{vocab}" / "iter_0000001"))
    resaved = _tensors(str(tmp / f"tp2_{vocab}" / "iter_0000001"))
    assert sorted(saved) == sorted(resaved)
    padded = sorted(k for k, v in saved.items() if v.shape[0] == rows1)
    assert "embedding.word_embeddings.weight" in padded and "output_layer.bias" in padded
    assert any(k.startswith("optimizer.") for k in padded)  # Adam's moments of those rows too
    for k, v in saved.items():
        if k in padded:
            assert resaved[k].shape[0] == rows2, k
            assert torch.equal(resaved[k][:rows1], v), k  # every saved row, the TP=1 padding included
            assert not resaved[k][rows1:].any(), k  # rows TP=2 adds start at zero
        else:
            assert torch.equal(resaved[k], v), k


def test_another_vocabulary_is_still_refused(resharded):
    tmp, base, _ = resharded
    ck = str(tmp / "tp1_8000")
    r = subprocess.run([PYTHON, "tests/cli_error_runner.py", "-", "-"], input=json.dumps(
        {"other": base[8000][:-2] + ["--vocab-size", "8100", "--load", ck]}), cwd=REPO_ROOT,
        capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    code, err = json.loads(r.stdout.splitlines()[-1])["other"]
    assert code == 2, err[-3000:]
    assert [l for l in err.splitlines() if l.startswith("error: ")] == [
        f"error: checkpoint {ck}/iter_0000001 is of another vocabulary size: 8000 tokens there, 8100 here "
        "(--vocab-size, or the tokenizer in --tokenizer-dir)"]


def test_train_iters_0_writes_initial_weights_that_every_layout_starts_from(tmp_path, demo_data_prefix,
                                                                           demo_tokenizer_dir, test_cache_dir):
    """`--train-iters 0 --save INIT` writes the initial weights (iteration 0, weights only); one
    process, TP=2 and PP=2 started from it train the same steps (README: "every layout equals one
    process")."""
    args = tiny_model_args(demo_data_prefix, demo_tokenizer_dir, os.path.join(test_cache_dir, "dc"))
    init = str(tmp_path / "init")
    r = subprocess.run([PYTHON, "pretrain_effmlm.py", *args, "--train-iters", "0", "--save", init,
                        "--save-interval", "5"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"saved checkpoint {init}/iter_0000000" in r.stdout
    assert open(os.path.join(init, "latest_checkpointed_iteration.txt")).read().strip() == "0"
    start = args + ["--load", init]
    one = run_scenarios(tmp_path, 1, {"one": {"args": start, "steps": 2}}, "one")["one"]
    got = run_scenarios(tmp_path, 2, {
        "tp2": {"args": start + ["--tensor-model-parallel-size", "2"], "steps": 2},
        "pp2": {"args": start + ["--pipeline-model-parallel-size", "2"], "steps": 2}}, "layouts")
    for name, r in got.items():
        assert [s["iteration"] for s in r["steps"]] == [1, 2], name
        for a, b in zip(r["steps"], one["steps"]):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), name
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=5e-5), name
