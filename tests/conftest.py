"""Shared fixtures: the real demo corpus and what is built from it, cached across runs.

Artifacts live under <repo>/data/test_cache (git-ignored) and are reused when present:
delete that directory to rebuild them. Each is built in a temporary place and renamed, so an
interrupted run never leaves a half-built artifact behind. The suite runs in parallel workers
(pytest-xdist, scripts/test.sh): the first worker builds the shared artifacts under a file
lock before any test starts, the others wait and reuse them.
"""

import contextlib
import fcntl
import os
import shutil
import sys

import pytest

# The suite tests the CPU path (gloo, several processes per machine) also on a GPU machine;
# tests/test_gpu.py runs on the GPU when EFFMLM_TEST_GPU=1 (see README).
GPU_TESTS = os.environ.get("EFFMLM_TEST_GPU") == "1"
if not GPU_TESTS:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
# Parallel workers (pytest-xdist) share the cores: one thread per process, in the worker and in
# what it starts. OpenMP's spinning threads on an oversubscribed core made some tests 4x slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from megatron_effmlm.compat.cpu import cpu_bf16_error  # noqa: E402  (after the path and CUDA_VISIBLE_DEVICES)

# The command line refuses --bf16 on a CPU without bf16 instructions (AVX2-only EPYCs among these machines).
needs_cpu_bf16 = pytest.mark.skipif(cpu_bf16_error() is not None, reason="this CPU has no bf16 instructions")

TEST_CACHE = os.path.join(REPO_ROOT, "data", "test_cache")
DEMO_TOKENIZER_VOCAB = 4096


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO_ROOT


@pytest.fixture(scope="session")
def test_cache_dir() -> str:
    os.makedirs(TEST_CACHE, exist_ok=True)
    return TEST_CACHE


@contextlib.contextmanager
def cache_lock():
    """Held while a shared artifact is built, so that parallel workers never build one twice."""
    os.makedirs(TEST_CACHE, exist_ok=True)
    with open(os.path.join(TEST_CACHE, ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# The files that take longest (whole-file worker seconds, longest first): the xdist workers
# take files in collection order (scripts/test.sh: --no-loadscope-reorder), and starting with
# the long ones keeps both workers busy to the end instead of leaving one long file for last.
LONGEST_FILES = ["test_layouts.py", "test_hf.py", "test_benchmarks.py", "test_resume.py", "test_slurm.py",
                 "test_bf16_cpu.py", "test_faults.py", "test_reshard.py", "test_fp8_torchao.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session", autouse=True)
def _shared_artifacts(request):
    """The demo corpus, tokenizer, Punkt parameters and token files exist before any test runs:
    tools and benchmarks the tests start reuse them from the cache rather than racing to build."""
    with cache_lock():
        request.getfixturevalue("demo_data_prefix")


@pytest.fixture(scope="session")
def demo_jsonl(test_cache_dir) -> str:
    """The demo Wikipedia corpus as JSONL (106 articles)."""
    from megatron_effmlm.data.demo_corpus import get_demo_corpus

    return get_demo_corpus(test_cache_dir)


@pytest.fixture(scope="session")
def demo_tokenizer_dir(test_cache_dir, demo_jsonl) -> str:
    """A lowercased BERT-style WordPiece tokenizer, vocab 4096, trained on the demo corpus."""
    from megatron_effmlm.data.jsonl import iter_jsonl
    from megatron_effmlm.data.tokenizer import META_FILE, train_tokenizer

    path = os.path.join(test_cache_dir, f"tokenizer_wordpiece_{DEMO_TOKENIZER_VOCAB}")
    if not os.path.isfile(os.path.join(path, META_FILE)):
        tmp = f"{path}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        texts = (values[0] for _, _, values in iter_jsonl([demo_jsonl], ["text"]))
        train_tokenizer(texts, "wordpiece", DEMO_TOKENIZER_VOCAB, tmp, lowercase=True)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    return path


@pytest.fixture(scope="session")
def demo_tokenizer(demo_tokenizer_dir):
    from megatron_effmlm.data.tokenizer import EffMLMTokenizer

    return EffMLMTokenizer.from_dir(demo_tokenizer_dir)


@pytest.fixture(scope="session")
def demo_punkt_params(test_cache_dir, demo_jsonl) -> str:
    """Punkt parameters trained on the demo corpus (nltk's pretrained data is not installed)."""
    from megatron_effmlm.data.preprocess import train_punkt

    return train_punkt([demo_jsonl], ["text"], os.path.join(test_cache_dir, "demo_punkt.json"))


@pytest.fixture(scope="session")
def demo_data_prefix(test_cache_dir, demo_jsonl, demo_tokenizer_dir, demo_punkt_params) -> str:
    """The demo corpus preprocessed with --split-sentences: prefix of the .bin/.idx pair."""
    from megatron_effmlm.data.preprocess import output_prefix_for, preprocess

    base = os.path.join(test_cache_dir, "demo_wp")
    prefix = output_prefix_for(base, "text", split_sentences=True)
    if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
        preprocess(demo_jsonl, base, demo_tokenizer_dir, split_sentences=True, workers=2,
                   log_interval=0, punkt_cache=demo_punkt_params)  # writes atomically
    return prefix


# ----- training-side helpers -----

PYTHON = sys.executable


def tiny_model_args(data_prefix, tokenizer_dir, cache_dir, **over):
    """Flags of a tiny model on the demo data; dropout off unless asked (exact comparisons)."""
    args = {
        "--data-path": data_prefix, "--tokenizer-dir": tokenizer_dir, "--num-layers": "2",
        "--hidden-size": "64", "--num-attention-heads": "4", "--seq-length": "64",
        "--micro-batch-size": "2", "--global-batch-size": "8", "--train-iters": "4", "--lr": "1e-3",
        "--data-cache-path": cache_dir, "--hidden-dropout": "0", "--attention-dropout": "0",
        "--log-interval": "1",
    }
    args.update({k: str(v) for k, v in over.items()})
    out = []
    for k, v in args.items():
        out.append(k)
        if v != "":
            out.append(v)
    return out


def run_torchrun(nproc, script_args, timeout=600, cwd=REPO_ROOT, env=None):
    """torchrun with gloo on CPU; returns the CompletedProcess (output captured). The timeout
    only guards against a hang: the suite's parallel workers share two cores."""
    import subprocess

    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(_free_port()), *script_args]
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    e.update(env or {})
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=e)


def run_scenarios(tmp_path, nproc, scenarios, name):
    """Run tests/dist_worker.py's scenarios on `nproc` torchrun processes; return their results."""
    import json

    spec_path, out_path = tmp_path / f"{name}.json", tmp_path / f"{name}_out.json"
    spec_path.write_text(json.dumps({"scenarios": scenarios}))
    r = run_torchrun(nproc, ["tests/dist_worker.py", str(spec_path), str(out_path)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return json.loads(out_path.read_text())


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mcore_single():
    """megatron-core initialised in this process: world size 1, TP=PP=1, gloo."""
    from megatron_effmlm.parallel.init import initialize_distributed

    initialize_distributed(1, 1, None, seed=1234)
    yield


@pytest.fixture(scope="session")
def demo_batch(mcore_single, demo_data_prefix, demo_tokenizer, test_cache_dir):
    """A real micro-batch of 4 rows (T = 64) whose row 1 is padded from position 40."""
    from megatron_effmlm.data.batches import make_data_iterator
    from megatron_effmlm.data.dataset import build_train_valid_test_datasets

    train, _, _ = build_train_valid_test_datasets(
        [demo_data_prefix], tokenizer=demo_tokenizer, seq_length=64, split="98,2,0", seed=7,
        train_samples=16, valid_samples=4, test_samples=None, cache_dir=test_cache_dir + "/dc",
    )
    batch = next(make_data_iterator(train, 0, 4))
    batch["padding_mask"][1, 40:] = 0  # rows of different lengths
    batch["loss_mask"][1, 40:] = 0
    return batch


