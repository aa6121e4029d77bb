"""bf16 on the CPU (processors with avx512_bf16 / amx_bf16): megatron-core's mixed precision
(bf16 model, fp32 main parameters and gradient reduction) against fp32 for every method, in the
model and in the trainer; TP=2 and PP=2 in bf16 against one bf16 process; the clear error on a
processor without bf16 instructions. (Stop-and-resume in bf16: tests/test_resume.py.)"""

import os

import pytest
import torch

from conftest import needs_cpu_bf16, run_scenarios, tiny_model_args
from precision_helpers import METHODS, batch_for, compare, loss_and_grads, tiny_model

pytestmark = needs_cpu_bf16


@pytest.mark.parametrize("method", METHODS)
def test_bf16_model_matches_fp32(mcore_single, demo_batch, demo_tokenizer, method):
    tok = demo_tokenizer
    ref = tiny_model(tok.vocab_size, method=method)
    half = tiny_model(tok.vocab_size, "bf16", method=method)
    half.load_state_dict(ref.state_dict())
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    batch = batch_for(demo_batch, tok, method)
    compare(loss_and_grads(ref, method, tok, batch), loss_and_grads(half, method, tok, batch),
            loss_rtol=2e-2, min_cos=0.98)


TRAINER_METHODS = {
    "vanilla": [],
    "3ml": ["--method", "3ml"],
    "3ml-cross": ["--method", "3ml", "--3ml-decoder", "cross"],
    "token-drop": ["--method", "token-drop"],
    "sctd": ["--method", "sctd", "--sctd-interval", "2"],
    "random-ltd": ["--method", "random-ltd", "--ltd-start", "16", "--ltd-steps", "8"],
}
STEPS = 16


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory, demo_data_prefix, demo_tokenizer_dir, test_cache_dir):
    """Every method for STEPS steps in fp32 and in bf16 (same seed, so the same initial weights
    before bf16 rounds them), one process."""
    tmp = tmp_path_factory.mktemp("bf16")
    base = tiny_model_args(demo_data_prefix, demo_tokenizer_dir, os.path.join(test_cache_dir, "dc"), **{
        "--num-layers": 4, "--train-iters": STEPS, "--lr": "3e-3", "--lr-warmup-iters": 2})
    scen = {}
    for name, extra in TRAINER_METHODS.items():
        scen[f"{name}-fp32"] = {"args": base + extra, "steps": STEPS}
        scen[f"{name}-bf16"] = {"args": base + extra + ["--bf16"], "steps": STEPS}
    return run_scenarios(tmp, 1, scen, "bf16")


@pytest.mark.parametrize("method", list(TRAINER_METHODS))
def test_bf16_trainer_tracks_fp32(trainer_runs, method):
    fp32 = [s["loss"] for s in trainer_runs[f"{method}-fp32"]["steps"]]
    bf16 = [s["loss"] for s in trainer_runs[f"{method}-bf16"]["steps"]]
    assert len(bf16) == STEPS
    for a, b in zip(fp32, bf16):
        assert b == pytest.approx(a, rel=2e-2), (fp32, bf16)
    assert sum(bf16[-3:]) / 3 < bf16[0] - 0.4, (fp32, bf16)  # it learns (fp32: about 8.3 -> 7.7)


LAYOUTS = {
    "tp2": ["--tensor-model-parallel-size", "2"],
    "tp2sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "dp2_distopt": ["--use-distributed-optimizer"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
}


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory, demo_data_prefix, demo_tokenizer_dir, test_cache_dir):
    """Every method in bf16 on one process (saving its initial weights) and on every layout
    from them: two launches for all methods, not two per method."""
    tmp = tmp_path_factory.mktemp("bf16_layouts")
    base = tiny_model_args(demo_data_prefix, demo_tokenizer_dir, os.path.join(test_cache_dir, "dc"), **{
        "--num-layers": 4}) + ["--bf16"]
    refs, scen = {}, {}
    for m, margs in TRAINER_METHODS.items():
        init = str(tmp / f"init_{m}")
        refs[m] = {"args": base + margs, "steps": 3, "save_init": init}
        scen.update({f"{m}/{k}": {"args": base + margs + v + ["--load", init], "steps": 3} for k, v in LAYOUTS.items()})
    return run_scenarios(tmp, 1, refs, "refs"), run_scenarios(tmp, 2, scen, "layouts")


@pytest.mark.parametrize("method", list(TRAINER_METHODS))
def test_bf16_layouts_equal_one_process(layout_runs, method):
    """TP=2, TP=2 + SP, DP=2 with the distributed optimizer and PP=2 in bf16 start from one bf16
    checkpoint and follow the one-process bf16 run (not bit-equal: TP splits the bf16 GEMMs'
    reductions and DP the gradient sums, so rounding differs). PP=2 also checks that a
    weights-only load refreshes the fp32 main parameters (its second stage's initial weights
    differ from the checkpoint's)."""
    refs, got = layout_runs
    ref = refs[method]
    assert len(ref["steps"]) == 3
    for layout in LAYOUTS:
        steps = got[f"{method}/{layout}"]["steps"]
        assert len(steps) == 3, layout
        for a, b in zip(steps, ref["steps"]):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-2), (layout, a, b)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=5e-2), (layout, a, b)
            assert a["lr"] == b["lr"]


def test_bf16_refused_without_cpu_instructions(monkeypatch):
    """A processor without avx512_bf16 / amx_bf16: --bf16 is one clear error naming the flags."""
    from megatron_effmlm.arguments import parse_args
    from megatron_effmlm.compat import cpu
    from megatron_effmlm.config import ConfigError

    flags = cpu.cpu_flags()
    assert "avx512f" in flags  # the real flags line was read
    monkeypatch.setattr(cpu, "cpu_flags", lambda: flags - {"avx512_bf16", "amx_bf16"})
    with pytest.raises(ConfigError) as e:
        parse_args(["--bf16", "--data-path", "x", "--tokenizer-dir", "y"])
    assert str(e.value) == ("--bf16 without CUDA needs a processor with bf16 instructions (avx512_bf16 or amx_bf16 "
                            "in /proc/cpuinfo's flags); this one has neither, so CPU runs train in fp32")
    monkeypatch.setattr(cpu, "cpu_flags", lambda: flags)
    assert parse_args(["--bf16", "--data-path", "x", "--tokenizer-dir", "y"]).precision.bf16
