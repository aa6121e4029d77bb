"""--train-flops-budget lays the LR schedule over the budget: every method ends fully decayed."""

import json
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, run_torchrun, tiny_model_args

METHODS = {
    "vanilla": [],
    "3ml": ["--method", "3ml"],
    "3ml-cross": ["--method", "3ml", "--3ml-decoder", "cross"],
    "token-drop": ["--method", "token-drop"],
    "sctd": ["--method", "sctd", "--sctd-interval", "3"],
    "random-ltd": ["--method", "random-ltd", "--ltd-start", "16", "--ltd-steps", "4", "--ltd-granularity", "16"],
}
LR, MIN_LR = 1e-3, 1e-5


def vanilla_iteration_flops():
    from megatron_effmlm.model.flops import Shape
    from megatron_effmlm.plans.flops import step_flops

    return 8 * step_flops("vanilla", Shape(4, 64, 64, 256, 4096, 0.15))


@pytest.fixture(scope="module")
def budget_runs(tmp_path_factory, demo_data_prefix, demo_tokenizer_dir, test_cache_dir):
    tmp = tmp_path_factory.mktemp("budget")
    budget = 6 * vanilla_iteration_flops()
    common = tiny_model_args(demo_data_prefix, demo_tokenizer_dir, test_cache_dir + "/dc", **{
        "--num-layers": 4, "--train-iters": 100, "--lr": LR, "--min-lr": MIN_LR, "--lr-warmup-fraction": 0.2,
        "--lr-decay-style": "cosine", "--train-flops-budget": f"{budget:.6e}"})
    scenarios = {m: {"train": True, "args": flags + ["--summary-json", str(tmp / f"{m}.json")]}
                 for m, flags in METHODS.items()}
    # stopped early by --exit-interval: the run says so, not that --train-iters stopped it
    scenarios["exit-early"] = {"train": True, "args": ["--exit-interval", "2", "--summary-json", str(tmp / "exit.json")]}
    spec, out = tmp / "spec.json", tmp / "out.json"
    spec.write_text(json.dumps({"common": common, "scenarios": scenarios}))
    r = run_torchrun(1, ["tests/dist_worker.py", str(spec), str(out)], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    # the progress lines of each run, in order: a run ends with its "finished at" line
    lrs, current = [], []
    for line in r.stdout.splitlines():
        m = re.search(r"\| lr ([0-9.e+-]+) \|", line)
        if m and line.startswith("iter"):
            current.append(float(m.group(1)))
        if line.startswith("finished at iteration"):
            lrs.append(current)
            current = []
    results = json.loads(out.read_text())
    runs = {m: (results[m]["summary"], lr) for m, lr in zip(METHODS, lrs)}
    runs["exit-early"] = (results["exit-early"]["summary"], lrs[len(METHODS)], r.stdout)
    return runs, budget


@pytest.mark.parametrize("method", list(METHODS))
def test_last_step_lr_is_min_lr(budget_runs, method):
    runs, budget = budget_runs
    s, lrs = runs[method]
    assert s["method"] == method.split("-cross")[0]
    assert s["budget_reached"] and s["train_flops"] >= budget
    assert s["iterations"] == len(lrs) >= 3  # the budget, not --train-iters 100, ended the run
    assert lrs[-1] == pytest.approx(MIN_LR, rel=1e-6) and s["final_lr"] == pytest.approx(MIN_LR, rel=1e-9)
    assert max(lrs[:-1]) > 10 * MIN_LR  # it decayed to the minimum, it did not sit there
    assert s["tokens_seen"] == s["iterations"] * 8 * 64 or s["tokens_seen"] <= s["iterations"] * 8 * 64
    assert s["tokens_seen"] > 0 and s["train_seconds"] > 0


def test_a_run_stopped_before_its_budget_says_what_stopped_it(budget_runs):
    runs, budget = budget_runs
    s, lrs, stdout = runs["exit-early"]
    assert s["iterations"] == len(lrs) == 2 and not s["budget_reached"] and s["final_lr"] > 10 * MIN_LR
    warnings = [line for line in stdout.splitlines() if line.startswith("warning: stopped")]
    assert warnings == [f"warning: stopped at iteration 2 (by --exit-interval 2) before --train-flops-budget "
                        f"{budget:.3e}: the schedule is not fully decayed"]


@pytest.mark.parametrize("method", list(METHODS))
def test_schedule_warms_up_then_decays(budget_runs, method):
    """One warm-up (20% of the budget) then one decay, whatever the method's step cost."""
    lrs = budget_runs[0][method][1]
    peak = lrs.index(max(lrs))
    assert lrs[:peak + 1] == sorted(lrs[:peak + 1]) and lrs[peak:] == sorted(lrs[peak:], reverse=True)
    assert peak < len(lrs) - 1 and lrs[0] < LR


def test_budget_errors(tmp_path, demo_data_prefix, demo_tokenizer_dir, test_cache_dir):
    base = {"--train-flops-budget": f"{5.5 * vanilla_iteration_flops():.6e}", "--num-layers": 4}
    cases = {
        "too_few_iters": tiny_model_args(demo_data_prefix, demo_tokenizer_dir, test_cache_dir + "/dc",
                                         **base, **{"--train-iters": 3}),
        "decay_iters": tiny_model_args(demo_data_prefix, demo_tokenizer_dir, test_cache_dir + "/dc",
                                       **base, **{"--lr-decay-iters": 50}),
    }
    r = subprocess.run([sys.executable, "tests/cli_error_runner.py", "-", "-"], input=json.dumps(cases),
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    code, err = res["too_few_iters"]
    assert code == 2 and [l for l in err.splitlines() if l.startswith("error:")] == [
        f"error: --train-iters 3 stops before --train-flops-budget {5.5 * vanilla_iteration_flops():.3e} (the FLOP "
        f"model needs about 6 iterations of --method vanilla); raise --train-iters, it only caps the run"]
    code, err = res["decay_iters"]
    assert code == 2 and "error: --lr-decay-iters does not apply with --train-flops-budget" in err
