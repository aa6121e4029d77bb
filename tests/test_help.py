"""Every entry point's --help exits 0 and shows the defaults (megatron_effmlm/cli.py)."""

import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

CASES = [  # script, a flag, the default its help line must show
    ("pretrain_effmlm.py", "--num-layers", "4"),
    ("pretrain_effmlm.py", "--sctd-kl-weight", "0.05"),
    ("pretrain_effmlm.py", "--num-layers-per-virtual-pipeline-stage", None),  # says PP >= 2
    ("tools/export_hf.py", "--target", "the checkpoint's --model-arch"),
    ("tools/finetune.py", "--epochs", "3"),
    ("tools/import_hf.py", "--max-tensor-model-parallel-size", "8"),
    ("tools/preprocess_data.py", "--json-keys", "['text']"),
    ("tools/rotten_tomatoes_to_glue.py", "--output-dir", "data/rotten_tomatoes"),
    ("tools/train_tokenizer.py", "--json-keys", "['text']"),
    ("tools/wikidump_to_jsonl.py", "--log-interval", "10.0"),
    ("bench/gpu_throughput.py", "--shapes", "bert-base,bert-large"),
    ("bench/pipeline_balance.py", "--hidden-size", "768"),
    ("bench/preprocess.py", "--tokenizer-vocab", "8192"),
    ("bench/profile_step.py", "--steps", "3"),
    ("bench/profile_step.py", "--methods", "vanilla,3ml,token-drop,sctd,random-ltd,megatron-bert"),
    ("pretrain_effmlm.py", "--fp8-margin", "0"),
    ("bench/step_time.py", "--mode", "all"),
    ("bench/step_time.py", "--precisions", "fp32"),
    ("bench/method_quality.py", "--config", "cpu"),
    ("tools/build_corpus.py", "--output-dir", "data/corpus"),
    ("tools/build_tasks.py", "--output-dir", "data/tasks"),
    ("tools/eval_mlm.py", "--num-sequences", "512"),
    ("bench/context_probe.py", "--train-iters", "800"),
    ("tools/plot_loss_curves.py", "--title", "MLM loss"),
]


def test_every_entry_point_is_listed():
    listed = {c[0] for c in CASES}
    scripts = {"pretrain_effmlm.py"} | {f"{d}/{f}" for d in ("tools", "bench")
                                        for f in os.listdir(os.path.join(REPO_ROOT, d)) if f.endswith(".py")
                                        and "__main__" in open(os.path.join(REPO_ROOT, d, f)).read()}
    assert "bench/benchlib.py" not in scripts  # the scripts' shared module, not an entry point
    assert listed == scripts


@pytest.fixture(scope="module")
def helps():
    """Each script's --help, run side by side (most of the time is imports)."""
    env = dict(os.environ, COLUMNS="200", PYTHONPATH=REPO_ROOT)
    procs = {s: subprocess.Popen([sys.executable, s, "--help"], cwd=REPO_ROOT, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for s in {c[0] for c in CASES}}
    out = {}
    for script, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        out[script] = (proc.returncode, stdout, stderr)
    return out


@pytest.mark.parametrize("script, flag, default", CASES, ids=[f"{c[0]}{c[1]}" for c in CASES])
def test_help_shows_defaults(helps, script, flag, default):
    code, stdout, stderr = helps[script]
    assert code == 0, stderr[-2000:]
    assert f"default: {default}" in _option_help(stdout, flag) if default else (
        "(needs PP >= 2)" in _option_help(stdout, flag))


def _option_help(text: str, flag: str) -> str:
    """The lines of one option in argparse's help: its own and the indented ones after it."""
    lines = text.splitlines()
    start = [i for i, l in enumerate(lines) if l.startswith("  ") and l.lstrip().startswith(flag + " ")]
    assert len(start) == 1, text
    block = [lines[start[0]]]
    for l in lines[start[0] + 1:]:
        if not l.startswith("   ") or l.lstrip().startswith("-"):
            break
        block.append(l)
    return " ".join(" ".join(block).split())


@pytest.mark.parametrize("quiet", [False, True])
def test_dependency_noise_is_filtered(quiet):
    """megatron_effmlm.cli.quiet_dependencies (every entry point calls it) silences megatron-core's
    GPU-package warnings and transformers' progress bars; without it they show (so this can fail)."""
    code = ("from megatron_effmlm.cli import quiet_dependencies; quiet_dependencies(); " if quiet else "") + (
        "import megatron.core.optimizer, transformers; "
        "print('bars', transformers.utils.logging.is_progress_bar_enabled())")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "HF_HUB_DISABLE_PROGRESS_BARS")}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(env, PYTHONPATH=REPO_ROOT))
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("Transformer Engine and Apex are not installed" in r.stderr) is not quiet, r.stderr[-2000:]
    assert r.stdout.strip() == f"bars {not quiet}"
