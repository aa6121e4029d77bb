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
def errors(tmp_path_factory, demo_data_prefix, demo_tokenizer_dir, test_cache_dir, demo_jsonl):
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
    # a tokenizer of the same vocabulary size as the demo data's, but cased: other token ids
    from megatron_effmlm.data.jsonl import iter_jsonl

    train_tokenizer((v[0] for _, _, v in iter_jsonl([demo_jsonl], ["text"])), "wordpiece", 4096,
                    str(tmp / "cased_tok"), lowercase=False)
    # the .idx of the small dataset beside the .bin of the demo's; an .idx with one size entry off by one
    shutil.copy(str(tmp / "one_text_sentence.idx"), str(tmp / "mixed.idx"))
    shutil.copy(demo_data_prefix + ".bin", str(tmp / "mixed.bin"))
    shutil.copy(demo_data_prefix + ".bin", str(tmp / "badsize.bin"))
    bad = bytearray(idx)
    at = 34 + 4 * 5  # header, then the int32 sizes: sequence 5's
    bad[at:at + 4] = (int.from_bytes(bad[at:at + 4], "little") + 1).to_bytes(4, "little")
    open(tmp / "badsize.idx", "wb").write(bytes(bad))
    # the demo data without a tokenizer record (as data preprocessed before it existed)
    shutil.copy(demo_data_prefix + ".bin", str(tmp / "norecord.bin"))
    shutil.copy(demo_data_prefix + ".idx", str(tmp / "norecord.idx"))
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
        "load_other_tokenizer": args(**{"--tokenizer-dir": str(tmp / "cased_tok"), "--load": str(tmp / "ck64"),
                                        "--data-path": str(tmp / "norecord"), "--train-iters": 2}),
        "data_other_tokenizer": args(**{"--tokenizer-dir": str(tmp / "cased_tok"),
                                        "--data-path": str(tmp / "one_text_sentence")}),
        "idx_of_another_bin": args(**{"--data-path": str(tmp / "mixed")}),
        "corrupt_size_entry": args(**{"--data-path": str(tmp / "badsize")}),
        "lr_nan": args(**{"--lr": "nan"}),
        "decoder_without_3ml": args(**{"--decoder-layers": 2, "--method": "token-drop"}),
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
    return json.loads(out.read_text()), tmp, (demo_data_prefix, demo_tokenizer_dir, dc)


def _demo(errors):
    return errors[2]


def _err(errors, case):
    results, _ = errors[:2]
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
    results, tmp = errors[:2]
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
    results, tmp = errors[:2]
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


# ----- values no run can use: checked while parsing, before torch.distributed or any data -----

def _config_error(argv, world_size=1):
    """The ConfigError message the command line gets (pretrain_effmlm.main prints it as the one
    `error:` line and returns 2: test_parse_errors_end_to_end)."""
    from megatron_effmlm.arguments import build_parser, config_from_args
    from megatron_effmlm.config import check_layout
    from megatron_effmlm.config import ConfigError

    with pytest.raises(ConfigError) as e:
        check_layout(config_from_args(build_parser().parse_args(["--data-path", "d", "--tokenizer-dir", "t", *argv])),
                     world_size)
    return str(e.value)


@pytest.mark.parametrize("argv, message", [
    (["--method", "token-drop", "--td-keep-ratio", "0"], "--td-keep-ratio must be in (0, 1], got 0.0"),
    (["--method", "sctd", "--td-keep-ratio", "1.2"], "--td-keep-ratio must be in (0, 1], got 1.2"),
    (["--method", "token-drop", "--td-beta", "2"], "--td-beta must be in [0, 1], got 2.0"),
    (["--method", "random-ltd", "--seq-length", "64", "--ltd-start", "65"],
     "--ltd-start 65 must be in [1, --seq-length 64]"),
    (["--method", "random-ltd", "--ltd-start", "0"], "--ltd-start 0 must be in [1, --seq-length 128]"),
    (["--train-flops-budget=-1e12"], "--train-flops-budget must be > 0, got -1000000000000.0"),
    (["--decoder-layers", "2"], "--decoder-layers is for --method 3ml or 3ml-td, not --method vanilla"),
    (["--method", "sctd", "--3ml-decoder", "cross"], "--3ml-decoder is for --method 3ml or 3ml-td, not --method sctd"),
    (["--method", "3ml", "--td-keep-ratio", "0.5"], "--td-keep-ratio is for --method 3ml-td, sctd or token-drop, "
                                                    "not --method 3ml"),
    (["--method", "3ml", "--decoder-layers", "0"], "--decoder-layers must be >= 1 for --method 3ml, got 0"),
    (["--method", "3ml", "--decoder-layers", "-2"], "--decoder-layers must be >= 1 for --method 3ml, got -2"),
    (["--num-layers", "0"], "--num-layers must be > 0, got 0"),
    (["--num-layers", "-1"], "--num-layers must be > 0, got -1"),
    (["--hidden-size", "-64"], "--hidden-size must be > 0, got -64"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be > 0, got 0"),
    (["--ffn-hidden-size", "0"], "--ffn-hidden-size must be > 0, got 0"),
    (["--log-interval", "0"], "--log-interval must be > 0, got 0"),
    (["--method", "sctd", "--sctd-interval", "0"], "--sctd-interval must be > 0, got 0"),
    (["--method", "random-ltd", "--ltd-granularity", "-16"], "--ltd-granularity must be > 0, got -16"),
    (["--global-batch-size", "-8"], "--global-batch-size must be > 0, got -8"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--lr", "-0.0001"], "--lr must be >= 0, got -0.0001"),
    (["--min-lr", "1e-3", "--lr", "1e-4"], "--min-lr 0.001 exceeds --lr 0.0001"),
    (["--lr-warmup-iters", "100", "--train-iters", "100"], "--lr-warmup-iters 100 must be below --train-iters 100"),
    (["--lr-warmup-iters", "50", "--lr-decay-iters", "20"], "--lr-warmup-iters 50 must be below --lr-decay-iters 20"),
    (["--hidden-dropout", "1"], "--hidden-dropout must be in [0, 1), got 1.0"),
    (["--attention-dropout", "-0.1"], "--attention-dropout must be in [0, 1), got -0.1"),
    (["--sctd-kl-weight", "-1"], "--sctd-kl-weight must be >= 0, got -1.0"),
    (["--train-iters", "-1"], "--train-iters must be >= 0, got -1"),
    (["--lr-warmup-fraction", "1"], "--lr-warmup-fraction must be in [0, 1), got 1.0"),
    (["--train-iters", "0"], "--train-iters 0 writes the initial weights as a checkpoint: it needs --save"),
])
def test_bad_values(argv, message):
    assert _config_error(argv) == message


def test_tensor_parallel_must_divide_the_heads():
    assert _config_error(["--tensor-model-parallel-size", "3", "--num-attention-heads", "4", "--hidden-size", "96",
                          "--ffn-hidden-size", "192"], world_size=3) == (
        "--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 3")
    assert _config_error(["--tensor-model-parallel-size", "2", "--ffn-hidden-size", "99"], world_size=2) == (
        "--ffn-hidden-size 99 is not divisible by --tensor-model-parallel-size 2")


@pytest.fixture
def readonly_dir(tmp_path):
    """A directory nobody can write in: a read-only tmpfs as root (root ignores permission bits),
    mode 0555 otherwise."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(d)],
                          capture_output=True).returncode:
            pytest.skip("running as root without the right to mount a read-only tmpfs")
        yield d
        subprocess.run(["umount", str(d)], check=True)
    else:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)


def test_unwritable_outputs_fail_before_training(tmp_path, readonly_dir):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert _config_error(["--save", str(afile)]) == f"--save {afile}: exists and is not a directory"
    assert _config_error(["--save", str(afile / "ck")]) == f"--save {afile / 'ck'}: {afile} is not a directory"
    assert _config_error(["--save", str(readonly_dir / "ck")]) == (
        f"--save {readonly_dir / 'ck'}: cannot write in {readonly_dir} (Read-only file system)"
        if os.geteuid() == 0 else f"--save {readonly_dir / 'ck'}: cannot write in {readonly_dir} (Permission denied)")
    assert _config_error(["--tensorboard-dir", str(readonly_dir)]).startswith(
        f"--tensorboard-dir {readonly_dir}: cannot write in {readonly_dir} (")
    assert _config_error(["--loss-curve", str(readonly_dir / "loss.png")]).startswith(
        f"--loss-curve {readonly_dir / 'loss.png'}: cannot write in {readonly_dir} (")
    assert _config_error(["--loss-curve", str(tmp_path)]) == f"--loss-curve {tmp_path}: is a directory (give a file name)"
    assert _config_error(["--loss-curve", str(tmp_path / "loss.json")]) == (
        f"--loss-curve {tmp_path / 'loss.json'}: give a .png file name (the curve's data is written beside it as .json)")
    assert afile.read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["afile", "ro"]  # no probe file left behind


def test_one_line_from_the_command_line(errors):
    """The parse-time checks reach the user as one `error:` line and exit code 2."""
    assert _err(errors, "lr_nan") == "error: --lr must be a finite number, got nan"
    assert _err(errors, "decoder_without_3ml") == (
        "error: --decoder-layers is for --method 3ml or 3ml-td, not --method token-drop")


def test_index_of_another_dataset(errors):
    tmp = errors[1]
    msg = _err(errors, "idx_of_another_bin")
    assert msg.startswith(f"error: {tmp / 'mixed'}.bin: ") and msg.endswith(
        f"but {tmp / 'mixed'}.idx describes {os.path.getsize(tmp / 'one_text_sentence.bin')}: the two files are of "
        "different datasets (preprocess again, or pair each .idx with its own .bin)")
    assert _err(errors, "corrupt_size_entry") == (
        f"error: {tmp / 'badsize'}.idx: corrupt index file (the size or offset entry of sequence 6 does not match "
        "its neighbours: 1 such entries)")


def test_another_tokenizer_of_the_same_vocabulary_size(errors, demo_tokenizer):
    from megatron_effmlm.data.tokenizer import EffMLMTokenizer

    tmp = errors[1]
    cased = EffMLMTokenizer.from_dir(str(tmp / "cased_tok"))
    assert cased.vocab_size == demo_tokenizer.vocab_size
    mine, theirs = demo_tokenizer.unique_identifiers["tokenizer_sha1"], cased.unique_identifiers["tokenizer_sha1"]
    assert _err(errors, "data_other_tokenizer") == (
        f"error: {tmp / 'one_text_sentence'}.bin was made with the tokenizer in {demo_tokenizer.path} (sha1 "
        f"{mine[:12]}), not the one in {tmp / 'cased_tok'} (sha1 {theirs[:12]}): the same token ids mean other "
        "tokens (--tokenizer-dir)")
    assert _err(errors, "load_other_tokenizer") == (
        f"error: --load {tmp / 'ck64'}: the checkpoint was trained with the tokenizer in {demo_tokenizer.path} "
        f"(sha1 {mine[:12]}), not the one in {tmp / 'cased_tok'} (sha1 {theirs[:12]}): the same token ids mean "
        "other tokens (--tokenizer-dir)")


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(errors, tmp_path):
    """A tmpfs with room for one checkpoint of the tiny model: the second save fails with "no
    space left on device", its partial directory is removed, the first stays the latest."""
    results, tmp = errors[:2]
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (RLIMIT_FSIZE gives EFBIG, not a full disk)")
    one = sum(os.path.getsize(os.path.join(tmp / "ck64" / "iter_0000001", f))
              for f in os.listdir(tmp / "ck64" / "iter_0000001"))
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(one * 1.5) // 4096 * 4096}", "tmpfs", str(mnt)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        ck = mnt / "ck"
        argv = tiny_model_args(*_demo(errors), **{"--train-iters": 2, "--save": str(ck), "--save-interval": 1})
        r = subprocess.run([sys.executable, "tests/cli_error_runner.py", "-", "-"], input=json.dumps({"full": argv}),
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        code, err = json.loads(r.stdout.splitlines()[-1])["full"]
        assert code == 2, err[-3000:]
        lines = [l for l in err.splitlines() if l.startswith("error: ")]
        assert lines == [f"error: --save {ck}: no space left on device while saving {ck / 'iter_0000002'}; "
                         f"the previous checkpoint {ck / 'iter_0000001'} is kept"], err[-3000:]
        assert sorted(os.listdir(ck)) == ["iter_0000001", "latest_checkpointed_iteration.txt"]
        assert (ck / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
        assert os.path.isfile(ck / "iter_0000001" / ".metadata")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_train_iters_0_accepts_a_warm_up():
    """--train-iters 0 takes no step (it writes the initial weights): the configs' warm-up flags
    must not make it an error."""
    from megatron_effmlm.arguments import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(
        ["--data-path", "d", "--tokenizer-dir", "t", "--train-iters", "0", "--lr-warmup-iters", "100", "--save", "s"]))
    assert cfg.train.train_iters == 0 and cfg.optim.lr_warmup_iters == 100


def test_bad_flag_under_torchrun_is_one_error_line(demo_data_prefix, demo_tokenizer_dir, test_cache_dir):
    """Two ranks, one bad value: one `error:` line (rank 0's), exit code 2 from both."""
    from conftest import run_torchrun, tiny_model_args

    args = tiny_model_args(demo_data_prefix, demo_tokenizer_dir, test_cache_dir + "/dc", **{
        "--method": "token-drop", "--td-keep-ratio": "1.5"})
    r = run_torchrun(2, ["pretrain_effmlm.py", *args], timeout=180)
    errors = [l for l in (r.stdout + r.stderr).splitlines() if l.startswith("error:")]
    assert r.returncode != 0 and errors == ["error: --td-keep-ratio must be in (0, 1], got 1.5"], r.stderr[-2000:]


def test_a_missing_folder_is_reported_before_megatron_core_is_imported(tmp_path):
    """A mistyped folder costs no megatron-core or transformers import (about 10 s on 2 cores):
    each entry point's one error line, exit code 2, and neither library in sys.modules."""
    nope = str(tmp_path / "nope")
    cases = {
        "pretrain_effmlm.py": (["--data-path", nope, "--tokenizer-dir", nope],
                               f"error: tokenizer directory not found: {nope} (write one with tools/train_tokenizer.py)"),
        "tools/export_hf.py": (["--checkpoint", nope, "--output-dir", str(tmp_path / "o")],
                               f"error: --checkpoint {nope}: no such directory"),
        "tools/import_hf.py": (["--hf-dir", nope, "--output", str(tmp_path / "o")],
                               f"error: --hf-dir {nope}: no such directory"),
        "tools/eval_mlm.py": (["--checkpoint", nope, "--data", nope, "--tokenizer-dir", nope],
                              f"error: --checkpoint {nope}: no such directory"),
    }
    for script, (argv, expected) in cases.items():
        code = ("import runpy, sys\n"
                f"sys.argv = [{script!r}] + {argv!r}\n"
                "try:\n"
                f"    runpy.run_path({script!r}, run_name='__main__')\n"
                "except SystemExit as e:\n"
                "    print('exit', e.code, [m for m in ('megatron.core', 'transformers') if m in sys.modules])\n")
        r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert r.stdout.strip().splitlines()[-1] == "exit 2 []", (script, r.stdout, r.stderr[-2000:])
        assert [l for l in r.stderr.splitlines() if l.startswith("error:")] == [expected], (script, r.stderr[-2000:])
