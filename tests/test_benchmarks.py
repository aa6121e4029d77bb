"""The benchmark scripts run in their quick modes on CPU and write what they promise."""

import json
import os
import subprocess
import sys


def _run(repo_root, args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, *args], cwd=repo_root, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _cached(test_cache_dir):
    """The test suite's corpus and tokenizer (no second download, no second tokenizer)."""
    return ["--data-dir", test_cache_dir, "--tokenizer-vocab", "4096"]


def test_gpu_benchmark_quick_mode_runs_on_cpu(repo_root, tmp_path, demo_tokenizer_dir, test_cache_dir):
    _run(repo_root, ["bench/gpu_throughput.py", "--quick", "--results-dir", str(tmp_path), "--tag", "quick",
                     *_cached(test_cache_dir)])
    res = json.load(open(tmp_path / "gpu_throughput_quick.json"))
    rows = {x["method"]: x for x in res["rows"]}
    assert set(rows) == {"vanilla", "3ml", "megatron-bert"}
    assert rows["megatron-bert"]["time_ratio"] == 1.0
    for x in rows.values():
        assert x["tokens_per_s"] > 0 and x["model_tflops"] > 0 and x["loss"] == x["loss"]
    assert (tmp_path / "gpu_throughput_quick.png").stat().st_size > 0


def test_preprocess_benchmark_quick_mode(repo_root, tmp_path, demo_tokenizer_dir, test_cache_dir):
    """1 and 2 workers, with and without sentence splitting: identical outputs, positive rates."""
    r = _run(repo_root, ["bench/preprocess.py", "--quick", "--results-dir", str(tmp_path), "--tag", "quick",
                         *_cached(test_cache_dir)])
    res = json.load(open(tmp_path / "preprocess_quick.json"))
    assert [(x["split_sentences"], x["workers"]) for x in res["rows"]] == [(True, 1), (True, 2), (False, 1), (False, 2)]
    for x in res["rows"]:
        assert x["identical_output"] and x["documents"] == 106 and x["mb_per_s"] > 0 and x["tokens"] > 0
    assert "outputs identical across worker counts: yes" in r.stdout
    assert (tmp_path / "preprocess_quick.png").stat().st_size > 0
