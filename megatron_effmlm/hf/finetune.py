"""Fine-tune an exported model with transformers on a GLUE-format classification task.

A task folder holds train.tsv and dev.tsv as GLUE distributes them (CoLA without a header,
the others with one; MNLI's dev file is dev_matched.tsv). Each seed trains a fresh
`AutoModelForSequenceClassification` (AdamW, linear warm-up and decay) and reports dev
accuracy, plus F1 (MRPC, QQP) and Matthews correlation (CoLA) as GLUE does.
"""

from __future__ import annotations

import csv
import math
import os
import random
import statistics
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from megatron_effmlm.data.errors import DataError


@dataclass(frozen=True)
class TaskSpec:
    text: tuple  # column names (or indices without a header) of sentence 1 [and 2]
    label: object
    header: bool = True
    metrics: tuple = ("accuracy",)
    dev_file: str = "dev.tsv"
    positive: str = "1"  # the class F1 is computed for


TASKS = {
    "cola": TaskSpec(text=(3,), label=1, header=False, metrics=("mcc", "accuracy")),
    "sst2": TaskSpec(text=("sentence",), label="label"),
    "mrpc": TaskSpec(text=("#1 String", "#2 String"), label="Quality", metrics=("accuracy", "f1")),
    "qqp": TaskSpec(text=("question1", "question2"), label="is_duplicate", metrics=("accuracy", "f1")),
    "mnli": TaskSpec(text=("sentence1", "sentence2"), label="gold_label", dev_file="dev_matched.tsv"),
    "qnli": TaskSpec(text=("question", "sentence"), label="label"),
    "rte": TaskSpec(text=("sentence1", "sentence2"), label="label"),
    "wnli": TaskSpec(text=("sentence1", "sentence2"), label="label"),
}
ALIASES = {"sst-2": "sst2", "rotten_tomatoes": "sst2", "rotten-tomatoes": "sst2", "mnli-m": "mnli"}


def resolve_task(task: str, data_dir: str) -> str:
    name = task
    if task == "auto":  # GLUE's folder names: CoLA, SST-2, MRPC, QQP, MNLI, QNLI, RTE, WNLI
        name = os.path.basename(os.path.normpath(data_dir)).lower()
        name = ALIASES.get(name, name)
        if name not in TASKS:
            name = "sst2" if _header(os.path.join(data_dir, "train.tsv"))[:1] == ["sentence"] else None
        if name is None:
            raise DataError(f"--task auto: cannot tell the task of {data_dir}; pass --task one of {', '.join(TASKS)}")
    name = ALIASES.get(name, name)
    if name == "stsb":
        raise DataError("--task stsb is a regression task; tools/finetune.py fine-tunes classification tasks")
    if name not in TASKS:
        raise DataError(f"--task {task!r}: choose one of auto, {', '.join(TASKS)}")
    return name


def _header(path: str) -> List[str]:
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file (a GLUE task folder holds train.tsv and dev.tsv)")
    with open(path, encoding="utf-8-sig") as f:
        return f.readline().rstrip("\n").split("\t")


def read_tsv(path: str, spec: TaskSpec):
    """([(text_a, text_b or None)], [label]) of a GLUE TSV; malformed rows are skipped and counted."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file (a GLUE task folder holds train.tsv and {spec.dev_file})")
    texts, labels, skipped = [], [], 0
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        cols = None
        if spec.header:
            head = next(reader, [])
            missing = [c for c in (*spec.text, spec.label) if c not in head]
            if missing:
                raise DataError(f"{path}: header {head} has no column {missing[0]!r}")
            cols = [head.index(c) for c in (*spec.text, spec.label)]
        else:
            cols = [*spec.text, spec.label]
        for row in reader:
            if len(row) <= max(cols):
                skipped += 1
                continue
            vals = [row[c] for c in cols]
            texts.append((vals[0], vals[1] if len(spec.text) > 1 else None))
            labels.append(vals[-1])
    if not texts:
        raise DataError(f"{path}: no examples")
    return texts, labels, skipped


def metrics(pred: Sequence[int], gold: Sequence[int], names: Sequence[str], positive: Optional[int]) -> Dict[str, float]:
    out = {"accuracy": sum(p == g for p, g in zip(pred, gold)) / len(gold)}
    if positive is not None:
        tp = sum(p == positive and g == positive for p, g in zip(pred, gold))
        fp = sum(p == positive and g != positive for p, g in zip(pred, gold))
        fn = sum(p != positive and g == positive for p, g in zip(pred, gold))
        tn = len(gold) - tp - fp - fn
        if "f1" in names:
            out["f1"] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        if "mcc" in names:
            den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
            out["mcc"] = (tp * tn - fp * fn) / den if den else 0.0
    return out


def _log(msg: str):
    print(msg, flush=True)


def _warn(msg: str):
    import sys

    print(f"warning: {msg}", file=sys.stderr, flush=True)


def default_lr(hidden_size: int) -> float:
    """The learning rate when --lr is not given. BERT-base and larger: 5e-5 (the BERT paper's
    range); the small models of this project (hidden < 768) learn nothing at that rate within a
    few epochs (the loss stays at ln 2 on SST-2): 2e-4, the demo's measured setting."""
    return 5e-5 if hidden_size >= 768 else 2e-4


def flat_loss(losses: Sequence[float], labels: Sequence[int]) -> Optional[str]:
    """Why the training loss did not move, or None. It did not when the mean of the last tenth
    of the steps stays above 0.95 x the entropy of the training labels: the loss of a model
    that learned the class frequencies and nothing else (ln(num_labels) for balanced classes)."""
    if not losses:
        return None
    k = max(1, len(losses) // 10)
    first, last = statistics.mean(losses[:k]), statistics.mean(losses[-k:])
    counts = [labels.count(c) for c in set(labels)]
    prior = -sum(c / len(labels) * math.log(c / len(labels)) for c in counts)
    if last < 0.95 * prior:
        return None
    return (f"the training loss did not move: {first:.4f} over the first and {last:.4f} over the last {k} "
            f"step(s), not below 0.95 x {prior:.4f}, the entropy of the training labels (ln({len(counts)}) = "
            f"{math.log(len(counts)):.4f} for balanced classes): the model learned at most the class "
            "frequencies (try a larger --lr or more --epochs)")


def finetune(model_dir: str, data_dir: str, task: str = "auto", seeds: Sequence[int] = (1, 2, 3), epochs: float = 3,
             lr: Optional[float] = None, batch_size: int = 32, max_length: int = 128, warmup: float = 0.1,
             weight_decay: float = 0.01, max_train_examples: Optional[int] = None, log_interval: int = 50) -> dict:
    import torch
    import transformers

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise DataError(f"--model-dir {model_dir}: no config.json (export a checkpoint with tools/export_hf.py)")
    name = resolve_task(task, data_dir)
    spec = TASKS[name]
    train_x, train_y, skip_t = read_tsv(os.path.join(data_dir, "train.tsv"), spec)
    dev_x, dev_y, skip_d = read_tsv(os.path.join(data_dir, spec.dev_file), spec)
    if max_train_examples:
        train_x, train_y = train_x[:max_train_examples], train_y[:max_train_examples]
    label_names = sorted(set(train_y))
    unknown = sorted(set(dev_y) - set(label_names))
    if unknown:
        raise DataError(f"{data_dir}/{spec.dev_file}: labels {unknown} never occur in train.tsv")
    index = {n: i for i, n in enumerate(label_names)}
    ty, dy = [index[y] for y in train_y], [index[y] for y in dev_y]
    positive = index.get(spec.positive) if {"f1", "mcc"} & set(spec.metrics) else None
    majority = max(range(len(label_names)), key=ty.count)
    baseline = metrics([majority] * len(dy), dy, spec.metrics, positive)

    transformers.logging.set_verbosity_error()  # its load report lists the new classifier head: expected
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here
        raise DataError(f"--model-dir {model_dir}: no usable tokenizer ({type(e).__name__})") from None
    max_length = min(max_length, tokenizer.model_max_length)

    def encode(xs):
        a = [x[0] for x in xs]
        b = [x[1] for x in xs] if xs[0][1] is not None else None
        return tokenizer(a, b, truncation=True, max_length=max_length, padding=True, return_tensors="pt")

    _log(f"task {name} ({data_dir}): {len(train_x)} train / {len(dev_x)} dev examples"
         f"{f', {skip_t + skip_d} malformed rows skipped' if skip_t + skip_d else ''}; labels {label_names}; "
         f"majority-class dev {_fmt(baseline)}")
    if lr is None:
        lr = default_lr(transformers.AutoConfig.from_pretrained(model_dir).hidden_size)
        _log(f"learning rate {lr:g} (the default for this model's hidden size; --lr sets another)")
    per_seed, warnings = [], []
    for seed in seeds:
        transformers.set_seed(seed)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=len(label_names))
        steps_per_epoch = math.ceil(len(train_x) / batch_size)
        total = max(1, int(steps_per_epoch * epochs))
        decay = ["bias", "LayerNorm.weight", "layer_norm.weight", "ln.weight"]
        groups = [
            {"params": [p for n, p in model.named_parameters() if not any(d in n for d in decay)],
             "weight_decay": weight_decay},
            {"params": [p for n, p in model.named_parameters() if any(d in n for d in decay)], "weight_decay": 0.0},
        ]
        opt = torch.optim.AdamW(groups, lr=lr)
        sched = transformers.get_linear_schedule_with_warmup(opt, int(warmup * total), total)
        rng = random.Random(seed)
        order, step, t0, run_loss, losses = [], 0, time.time(), 0.0, []
        model.train()
        while step < total:
            if not order:
                order = list(range(len(train_x)))
                rng.shuffle(order)
            idx, order = order[:batch_size], order[batch_size:]
            batch = encode([train_x[i] for i in idx])
            out = model(**batch, labels=torch.tensor([ty[i] for i in idx]))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            run_loss += out.loss.item()
            losses.append(out.loss.item())
            if step % log_interval == 0 or step == total:
                n = log_interval if step % log_interval == 0 else step % log_interval
                _log(f"seed {seed} | step {step:5d}/{total} | epoch {step / steps_per_epoch:.2f} | "
                     f"loss {run_loss / n:.4f} | {time.time() - t0:.0f}s")
                run_loss = 0.0
        pred = predict(model, encode, dev_x, batch_size)
        m = metrics(pred, dy, spec.metrics, positive)
        per_seed.append({"seed": seed, **m})
        _log(f"seed {seed} | dev {_fmt(m)}")
        seed_warnings = [flat_loss(losses, ty)]
        if len(label_names) > 1 and len(set(pred)) == 1:
            seed_warnings.append(f"every dev prediction is {label_names[pred[0]]!r}: one class, whatever the input")
        for w in filter(None, seed_warnings):
            warnings.append(f"seed {seed}: {w}")
            _warn(warnings[-1])
    summary = {k: {"mean": statistics.mean(r[k] for r in per_seed),
                   "std": statistics.pstdev(r[k] for r in per_seed)} for k in per_seed[0] if k != "seed"}
    _log("dev over seeds " + ", ".join(f"{k} {v['mean']:.4f} ± {v['std']:.4f}" for k, v in summary.items())
         + f" | majority class {_fmt(baseline)}")
    return {"task": name, "labels": label_names, "train_examples": len(train_x), "dev_examples": len(dev_x),
            "per_seed": per_seed, "summary": summary, "majority_baseline": baseline, "lr": lr, "warnings": warnings}


def predict(model, encode, xs, batch_size: int) -> List[int]:
    import torch

    model.eval()
    pred = []
    with torch.no_grad():
        for i in range(0, len(xs), batch_size):
            pred += model(**encode(xs[i: i + batch_size])).logits.argmax(-1).tolist()
    return pred


def _fmt(m: Dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in m.items())
