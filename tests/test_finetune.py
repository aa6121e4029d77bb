"""tools/finetune.py says when fine-tuning learned nothing: a training loss that stays at
ln(num_labels), and dev predictions that are all one class."""

import json
import math
import re

import pytest

from megatron_effmlm.hf.finetune import default_lr, finetune, flat_loss


@pytest.fixture(scope="module")
def digit_task(tmp_path_factory, demo_jsonl, demo_tokenizer):
    """A tiny BERT (random weights, the demo tokenizer) and an SST-2-format task made of the demo
    corpus's sentences: label 1 when the sentence holds a digit (learnable from the tokens),
    balanced."""
    import transformers

    tmp = tmp_path_factory.mktemp("ft")
    model_dir = str(tmp / "model")
    transformers.set_seed(0)
    cfg = transformers.BertConfig(vocab_size=demo_tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=128, max_position_embeddings=64)
    transformers.BertForMaskedLM(cfg).save_pretrained(model_dir)
    demo_tokenizer.hf_tokenizer(model_max_length=64).save_pretrained(model_dir)
    sentences = []
    for line in open(demo_jsonl):
        sentences += [s.strip() for s in re.split(r"(?<=\.) ", json.loads(line)["text"]) if 20 < len(s) < 200]
    rows = [(s.replace("\t", " ").replace("\n", " "), int(bool(re.search(r"\d", s)))) for s in sentences]
    rows = [r for pair in zip([r for r in rows if r[1]], [r for r in rows if not r[1]]) for r in pair]
    task = tmp / "SST-2"
    task.mkdir()
    for name, part in (("train.tsv", rows[:600]), ("dev.tsv", rows[600:800])):
        (task / name).write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in part))
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only contend with each other
    yield model_dir, str(task)
    torch.set_num_threads(threads)


def test_a_loss_that_does_not_move_is_reported(digit_task, capsys):
    model_dir, task = digit_task
    r = finetune(model_dir, task, seeds=(1,), epochs=1, lr=0.0, max_length=48, batch_size=16, log_interval=100)
    err = capsys.readouterr().err
    assert len(r["warnings"]) >= 1 and r["warnings"][0].startswith(
        "seed 1: the training loss did not move: ") and r["warnings"][0].endswith(
        f"not below 0.95 x {math.log(2):.4f}, the entropy of the training labels (ln(2) = {math.log(2):.4f} for "
        "balanced classes): the model learned at most the class frequencies (try a larger --lr or more --epochs)")
    assert [l for l in err.splitlines() if l.startswith("warning: ")] == [f"warning: {w}" for w in r["warnings"]]


def test_a_model_that_learns_gets_no_warning(digit_task, capsys):
    model_dir, task = digit_task
    # from random weights (a pre-trained model learns at the default 2e-4: the README's demo)
    r = finetune(model_dir, task, seeds=(1,), epochs=5, lr=2e-3, max_length=48, batch_size=16, log_interval=100)
    assert r["warnings"] == [] and "warning: " not in capsys.readouterr().err
    # 0.645 with one WordPiece tokenizer trained on the demo corpus, above 0.70 with another (the trainer's
    # merge order is not deterministic across runs): the margin is the learning, not a ceiling
    assert r["summary"]["accuracy"]["mean"] > r["majority_baseline"]["accuracy"] + 0.08


def test_default_lr_follows_the_model_size():
    assert default_lr(64) == default_lr(512) == 2e-4 and default_lr(768) == default_lr(1024) == 5e-5


def test_flat_loss_band():
    balanced, skewed = [0, 1] * 10, [0] * 18 + [1] * 2  # entropies ln 2 = 0.693 and 0.325
    assert flat_loss([0.70, 0.69, 0.70, 0.69], balanced).startswith(
        "the training loss did not move: 0.7000 over the first and 0.6900 over the last 1 step(s)")
    assert flat_loss([0.70, 0.60, 0.50, 0.40], balanced) is None
    assert flat_loss([0.70, 0.60, 0.50, 0.40], skewed) is not None  # no better than the class frequencies
    assert flat_loss([1.10] * 20, [0, 1, 2] * 5) is not None and flat_loss([1.10] * 10 + [0.9] * 10, [0, 1, 2]) is None
