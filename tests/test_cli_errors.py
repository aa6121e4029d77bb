"""Bad input to the trainer: one clear error naming the file, flag or value, exit code 2."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, tiny_model_args


@pytest.fixture(scope="module")
def errors(tmp_path_factory, demo_data_prefix, demo_tokenizer_dir, test_cache_dir):
    tmp = tmp_path_factory.mktemp("cli")
    dc = os.path.join(test_cache_dir, "dc")
    corrupt = str(tmp / "corrupt")
    shutil.copy(demo_data_prefix + ".bin", corrupt + ".bin")
    idx = open(demo_data_prefix + ".idx", "rb").read()
    open(corrupt + ".idx", "wb").write(idx[: len(idx) // 2])
    args = lambda **kw: tiny_model_args(demo_data_prefix, demo_tokenizer_dir, dc, **kw)
    cases = {
        "missing_data": args(**{"--data-path": str(tmp / "nope")}),
        "corrupt_idx": args(**{"--data-path": corrupt}),
        "small_vocab": args(**{"--vocab-size": 100}),
        "gbs": args(**{"--global-batch-size": 7}),
        "missing_tokenizer": args(**{"--tokenizer-dir": str(tmp / "no_tok")}),
        "seq_over_positions": args(**{"--seq-length": 128, "--max-position-embeddings": 64}),
        "unknown_method": args(**{"--method": "nonsense"}),
        "bad_load": args(**{"--load": str(tmp / "no_ckpt")}),
        "vpp_pp1": args(**{"--num-layers-per-virtual-pipeline-stage": 1}),
    }
    spec, out = tmp / "cases.json", tmp / "out.json"
    spec.write_text(json.dumps(cases))
    r = subprocess.run([sys.executable, "tests/cli_error_runner.py", str(spec), str(out)], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text()), tmp


def _err(errors, case):
    results, _ = errors
    code, text = results[case]
    assert code == 2, (case, text)
    lines = [l for l in text.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1, text
    return lines[0]


def test_missing_data_path(errors):
    assert str(errors[1] / "nope") in _err(errors, "missing_data")


def test_corrupt_idx(errors):
    msg = _err(errors, "corrupt_idx")
    assert str(errors[1] / "corrupt") + ".idx" in msg


def test_vocab_smaller_than_tokenizer(errors):
    msg = _err(errors, "small_vocab")
    assert "--vocab-size 100 is smaller than the vocabulary of the tokenizer" in msg and "4096" in msg


def test_global_batch_not_divisible(errors):
    assert _err(errors, "gbs") == (
        "error: --global-batch-size 7 is not divisible by --micro-batch-size 2 x data-parallel size 1")


def test_missing_tokenizer(errors):
    assert str(errors[1] / "no_tok") in _err(errors, "missing_tokenizer")


def test_seq_length_above_position_table(errors):
    assert _err(errors, "seq_over_positions") == (
        "error: --seq-length 128 exceeds --max-position-embeddings 64 (the position table)")


def test_unknown_method(errors):
    assert "--method 'nonsense' is not known" in _err(errors, "unknown_method")


def test_load_path_missing(errors):
    assert _err(errors, "bad_load") == f"error: --load {errors[1] / 'no_ckpt'}: no such directory"


def test_virtual_stages_need_a_deeper_pipeline(errors):
    assert _err(errors, "vpp_pp1") == (
        "error: --num-layers-per-virtual-pipeline-stage 1 needs --pipeline-model-parallel-size > 2, "
        "an even layer split, and must divide the layers of a stage")
