"""Downstream classification tasks built offline from the corpus's held-out documents.

- ``register``: which source a paragraph comes from (State of the Union address, kernel
  documentation, Victorian psalm commentary, Wikipedia): register and topic.
- ``era``: whether a State of the Union paragraph was delivered before 1900 or from 1900 on
  (the speech's year is in its id): style and vocabulary drift over time.

Paragraphs come only from held-out documents (never pre-trained on); train and dev take
paragraphs of different documents (a quarter of each class's documents, chosen by a hash of
the id, go to dev), so a speech's topic cannot leak from train to dev. Classes are balanced
by seeded sampling. Written as GLUE SST-2-format TSV (``sentence<TAB>label``) for
tools/finetune.py (--task sst2; any label strings).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from typing import Callable, Dict, List, Optional, Tuple

from megatron_effmlm.data.corpus import read_corpus
from megatron_effmlm.data.errors import DataError

TASK_NAMES = ("register", "era")


def _paragraphs(text: str, min_chars: int, max_chars: int) -> List[str]:
    out = []
    for p in text.split("\n\n"):
        p = " ".join(p.split())
        if min_chars <= len(p) <= max_chars and len(p.split()) >= 10:
            out.append(p)
    return out


def _doc_hash(doc_id: str) -> str:
    return hashlib.sha256(doc_id.encode("utf-8")).hexdigest()


def sotu_year(doc_id: str) -> Optional[int]:
    m = re.match(r"sotu/(\d{4})-", doc_id)
    return int(m.group(1)) if m else None


LABELERS: Dict[str, Callable[[dict], Optional[str]]] = {
    "register": lambda r: r["source"],
    "era": lambda r: (None if sotu_year(r["id"]) is None else
                      ("before-1900" if sotu_year(r["id"]) < 1900 else "1900-on")),
}


def build_task(records: List[dict], name: str, seed: int = 1, dev_doc_fraction: float = 0.25,
               max_train_per_class: int = 1000, max_dev_per_class: int = 250, min_chars: int = 80,
               max_chars: int = 1000) -> Tuple[List[Tuple[str, str]], List[Tuple[str, str]]]:
    """(train, dev) lists of (paragraph, label)."""
    label_of = LABELERS[name]
    docs: Dict[str, List[dict]] = {}
    for r in records:
        y = label_of(r)
        if y is not None:
            docs.setdefault(y, []).append(r)
    if len(docs) < 2:
        raise DataError(f"task {name}: the held-out documents give {len(docs)} class(es); need 2")
    train: Dict[str, List[str]] = {}
    dev: Dict[str, List[str]] = {}
    for y, rs in sorted(docs.items()):
        if len(rs) < 2:
            raise DataError(f"task {name}: class {y!r} has {len(rs)} held-out document; need 2 (one for dev): "
                            f"hold out more (tools/build_corpus.py --valid-fraction)")
        rs = sorted(rs, key=lambda r: _doc_hash(r["id"]))
        n_dev = max(1, round(dev_doc_fraction * len(rs)))
        dev[y] = [p for r in rs[:n_dev] for p in _paragraphs(r["text"], min_chars, max_chars)]
        train[y] = [p for r in rs[n_dev:] for p in _paragraphs(r["text"], min_chars, max_chars)]
    rng = random.Random(seed)

    def balanced(parts: Dict[str, List[str]], cap: int, what: str):
        n = min(cap, min(len(v) for v in parts.values()))
        if n == 0:
            empty = [y for y, v in parts.items() if not v]
            raise DataError(f"task {name}: no {what} paragraph of class {empty[0]!r}")
        out = [(p, y) for y, v in sorted(parts.items()) for p in rng.sample(v, n)]
        rng.shuffle(out)
        return out

    return balanced(train, max_train_per_class, "training"), balanced(dev, max_dev_per_class, "dev")


def write_glue(out_dir: str, train, dev, info: dict):
    """train.tsv, dev.tsv and task.json in out_dir (SST-2 format), written beside it and moved into
    place; replaces only a folder that a task tool wrote (it holds task.json)."""
    if os.path.exists(out_dir) and not os.path.isfile(os.path.join(out_dir, "task.json")):
        raise DataError(f"--output-dir: {out_dir} exists and was not written by a task tool "
                        f"(no task.json); choose another folder")
    tmp = f"{out_dir.rstrip('/')}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for fname, part in (("train.tsv", train), ("dev.tsv", dev)):
        with open(os.path.join(tmp, fname), "w", encoding="utf-8") as f:
            f.write("sentence\tlabel\n")
            f.writelines(f"{t}\t{y}\n" for t, y in part)
    with open(os.path.join(tmp, "task.json"), "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def build_tasks(valid_jsonl: str, output_dir: str, names=TASK_NAMES, seed: int = 1, **kw) -> Dict[str, dict]:
    unknown = [n for n in names if n not in LABELERS]
    if unknown:
        raise DataError(f"--tasks: unknown task {unknown[0]!r}; choose from {', '.join(TASK_NAMES)}")
    records = list(read_corpus(valid_jsonl))
    built = {}
    for name in names:
        train, dev = build_task(records, name, seed=seed, **kw)
        labels = sorted({y for _, y in train})
        info = {"task": name, "source": os.path.abspath(valid_jsonl), "labels": labels, "train": len(train),
                "dev": len(dev), "finetune_task": "sst2", "seed": seed,
                "majority_dev_accuracy": max(sum(y == l for _, y in dev) for l in labels) / len(dev)}
        write_glue(os.path.join(output_dir, name), train, dev, info)
        built[name] = info
    return built
