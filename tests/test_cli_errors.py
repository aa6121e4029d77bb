"""Bad input to the trainer: one clear error naming the file, flag or value, exit code 2."""

import json
import os
import re
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
    shutil.copy(demo_data_prefix + ".idx", str(tmp / "nobin.idx"))
    shutil.copy(demo_data_prefix + ".bin", str(tmp / "noidx.bin"))
    # documents of one sentence each, for --bert-binary-head (which pairs two sentences)
    from megatron_effmlm.data.preprocess import preprocess

    one = tmp / "one.jsonl"
    one.write_text("".join(json.dumps({"text": f"Sentence number {i} is alone in its document."}) + "\n"
                           for i in range(60)))
    preprocess(str(one), str(tmp / "one"), demo_tokenizer_dir, split_sentences=True, workers=1, log_interval=0,
               punkt_cache=os.path.join(test_cache_dir, "demo_punkt.json"))
    # a tokenizer of another, smaller vocabulary than the one the demo data was made with
    from megatron_effmlm.data.tokenizer import train_tokenizer

    train_tokenizer((json.loads(l)["text"] for l in one.read_text().splitlines()), "wordpiece", 200,
                    str(tmp / "small_tok"), lowercase=True)
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
        "missing_bin": args(**{"--data-path": str(tmp / "nobin")}),
        "missing_idx": args(**{"--data-path": str(tmp / "noidx")}),
        "blend_weight": args(**{"--data-path": f"0 {demo_data_prefix} 1 {demo_data_prefix}"}),
        "tp3": args(**{"--tensor-model-parallel-size": 3}),
        "tokenizer_mismatch": args(**{"--tokenizer-dir": str(tmp / "small_tok"), "--save": str(tmp / "never")}),
        "one_sentence_docs": args(**{"--data-path": str(tmp / "one_text_sentence"), "--bert-binary-head": ""}),
        "signal_without_save": args(**{"--exit-signal-handler": ""}),
        "max_skipped": args(**{"--max-skipped-iterations": -1}),
        "make_checkpoint": args(**{"--train-iters": 1, "--save": str(tmp / "ck64")}),  # not an error
        "load_other_width": args(**{"--hidden-size": 32, "--load": str(tmp / "ck64"), "--train-iters": 2}),
        "load_other_depth": args(**{"--num-layers": 4, "--load": str(tmp / "ck64"), "--train-iters": 2}),
        "load_other_method": args(**{"--method": "3ml", "--load": str(tmp / "ck64"), "--train-iters": 2}),
        # the LR schedule on resume: 3 steps saved, then 6 asked for
        "sched_make": args(**{"--train-iters": 3, "--save": str(tmp / "sched")}),  # not an error
        "sched_longer": args(**{"--train-iters": 6, "--load": str(tmp / "sched")}),
        "sched_other_gbs": args(**{"--train-iters": 3, "--global-batch-size": 16, "--load": str(tmp / "sched")}),
        "sched_keep": args(**{"--train-iters": 5, "--load": str(tmp / "sched"),
                              "--use-checkpoint-opt_param-scheduler": ""}),
        "sched_override": args(**{"--train-iters": 6, "--load": str(tmp / "sched"),
                                  "--override-opt_param-scheduler": ""}),
        "sched_both": args(**{"--override-opt_param-scheduler": "", "--use-checkpoint-opt_param-scheduler": ""}),
    }
    for case in cases.values():  # a blend is several values of --data-path
        i = case.index("--data-path")
        case[i + 1:i + 2] = case[i + 1].split()
    spec, out = tmp / "cases.json", tmp / "out.json"
    spec.write_text(json.dumps(cases))
    r = subprocess.run([sys.executable, "tests/cli_error_runner.py", str(spec), str(out), "--with-stdout"], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text()), tmp


def _err(errors, case):
    results, _ = errors
    code, text = results[case][:2]
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
        "error: --num-layers-per-virtual-pipeline-stage 1 needs --pipeline-model-parallel-size > 1, "
        "an even layer split, and must divide the layers of a stage")


def test_missing_bin_or_idx(errors):
    tmp = errors[1]
    assert _err(errors, "missing_bin") == (
        f"error: --data-path: no indexed dataset at prefix {tmp / 'nobin'}: {tmp / 'nobin'}.bin does not exist "
        "(give the prefix without .bin/.idx)")
    assert _err(errors, "missing_idx") == (
        f"error: --data-path: no indexed dataset at prefix {tmp / 'noidx'}: {tmp / 'noidx'}.idx does not exist "
        "(give the prefix without .bin/.idx)")


def test_bad_blend_weight(errors):
    assert _err(errors, "blend_weight") == "error: --data-path: blend weight '0' must be a positive number"


def test_impossible_parallel_layout(errors):
    assert _err(errors, "tp3") == (
        "error: world size 1 is not divisible by --tensor-model-parallel-size 3 x --pipeline-model-parallel-size 1")


def test_tokenizer_does_not_match_the_data(errors, demo_data_prefix):
    tmp = errors[1]
    msg = _err(errors, "tokenizer_mismatch")
    assert msg.startswith(f"error: {demo_data_prefix}.bin holds token id ")
    from megatron_effmlm.data.tokenizer import EffMLMTokenizer

    small = EffMLMTokenizer.from_dir(str(tmp / "small_tok")).vocab_size
    assert msg.endswith(f"outside the vocabulary of the tokenizer in {tmp / 'small_tok'} ({small} tokens): "
                        "the data was made with another tokenizer (--tokenizer-dir)")
    assert not os.path.exists(tmp / "never")  # nothing half-written


def test_one_sentence_documents_with_the_binary_head(errors):
    assert _err(errors, "one_sentence_docs") == (
        f"error: --data-path {errors[1] / 'one_text_sentence'}: no train sample: --bert-binary-head pairs 2 "
        "sentences of one document, and no document here has 2 (one-sentence documents; preprocess with "
        "--split-sentences, or train without --bert-binary-head)")


def test_preemption_flags_need_a_checkpoint(errors):
    assert _err(errors, "signal_without_save") == (
        "error: --exit-signal-handler needs --save: the checkpoint a restarted job resumes from")
    assert _err(errors, "max_skipped") == "error: --max-skipped-iterations must be >= 0, got -1"


def test_load_a_checkpoint_of_another_model(errors):
    results, tmp = errors
    assert results["make_checkpoint"][0] == 0, results["make_checkpoint"][1][-2000:]
    ck = tmp / "ck64" / "iter_0000001"
    assert _err(errors, "load_other_width") == (
        f"error: checkpoint {ck} is of another model size: embedding.word_embeddings.weight has shape "
        "[4096, 64] there and [4096, 32] here")
    assert _err(errors, "load_other_depth") == (
        f"error: checkpoint {ck} is of another model size: encoder.layers.self_attention.linear_qkv."
        "layer_norm_weight has shape [2, 64] there and [4, 64] here")
    assert _err(errors, "load_other_method").startswith(f"error: checkpoint {ck} is of another model: it has no ")


def _lr_after(stdout, iteration):
    """The LR the progress line of `iteration` reports (the schedule's value after that step)."""
    found = re.findall(rf"^iter +{iteration}/\d+ \|.* \| lr ([-+.e0-9]+) \|", stdout, re.M)
    assert len(found) == 1, stdout
    return float(found[0])


def test_resume_with_another_lr_schedule(errors):
    """Megatron-LM's default: a schedule that differs from the checkpoint's is an error naming both
    flags; --use-checkpoint-opt_param-scheduler keeps the checkpoint's (and says when it trains at
    LR 0), --override-opt_param-scheduler follows the command line's from the checkpoint's position."""
    results, tmp = errors
    assert results["sched_make"][0] == 0, results["sched_make"][1][-2000:]
    flags = ("Give --override-opt_param-scheduler to follow the command line's schedule from the checkpoint's "
             "position, or --use-checkpoint-opt_param-scheduler to keep the checkpoint's")
    samples = "samples: --lr-decay-iters (default --train-iters) x --global-batch-size"
    assert _err(errors, "sched_longer") == (
        f"error: --load {tmp / 'sched'}: the checkpoint's LR schedule differs from the command line's: "
        f"lr_decay_steps 24 there and 48 here ({samples}). {flags}")
    assert _err(errors, "sched_other_gbs") == (
        f"error: --load {tmp / 'sched'}: the checkpoint's LR schedule differs from the command line's: "
        f"lr_decay_steps 24 there and 48 here ({samples}). {flags}")
    assert _err(errors, "sched_both") == (
        "error: --override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler are exclusive")

    code, err, out = results["sched_keep"]
    assert code == 0, err[-2000:]
    warnings = [l for l in err.splitlines() if l.startswith("warning: ")]
    assert warnings == [
        "warning: iteration 4 trains at learning rate 0 (the LR schedule ended at sample 24 (--lr-decay-iters or "
        "--train-iters x --global-batch-size), this run is at sample 24, and --min-lr is 0): its update changes "
        "no weight (said once per run)"], err
    assert _lr_after(out, 4) == 0.0 and _lr_after(out, 5) == 0.0

    code, err, out = results["sched_override"]
    assert code == 0, err[-2000:]
    assert "warning: " not in err
    # linear decay over 6 x 8 samples from --lr 1e-3, continued from sample 24
    for it in (4, 5, 6):
        assert _lr_after(out, it) == pytest.approx(1e-3 * (1 - it * 8 / 48), abs=1e-6)
