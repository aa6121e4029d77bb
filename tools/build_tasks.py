#!/usr/bin/env python
"""Build downstream classification tasks from the corpus's held-out documents.

    python tools/build_tasks.py --corpus-valid data/corpus/valid.jsonl --output-dir data/tasks

Writes <output-dir>/register (which source a paragraph comes from: 4 classes) and
<output-dir>/era (a State of the Union paragraph before 1900 or from 1900 on), each as GLUE
SST-2-format train.tsv / dev.tsv (fine-tune with tools/finetune.py --task sst2) and task.json.
Train and dev paragraphs come from different documents; classes are balanced (--seed).
"""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron_effmlm.cli import HelpFormatter  # noqa: E402  (--help shows the defaults)
from megatron_effmlm.data.corpus_tasks import TASK_NAMES, build_tasks  # noqa: E402
from megatron_effmlm.data.errors import DataError, run_cli  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--corpus-valid", default="data/corpus/valid.jsonl", help="held-out JSONL of tools/build_corpus.py")
    p.add_argument("--output-dir", default="data/tasks")
    p.add_argument("--tasks", nargs="+", default=list(TASK_NAMES), help=f"any of {' '.join(TASK_NAMES)}")
    p.add_argument("--max-train-per-class", type=int, default=1000)
    p.add_argument("--max-dev-per-class", type=int, default=250)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    if a.max_train_per_class < 1 or a.max_dev_per_class < 1:
        raise DataError("--max-train-per-class and --max-dev-per-class must be positive")
    built = build_tasks(a.corpus_valid, a.output_dir, a.tasks, a.seed, max_train_per_class=a.max_train_per_class,
                        max_dev_per_class=a.max_dev_per_class)
    for name, info in built.items():
        print(f"{name}: {info['train']} train / {info['dev']} dev paragraphs, labels {info['labels']}, majority "
              f"dev accuracy {info['majority_dev_accuracy']:.3f} -> {os.path.join(a.output_dir, name)}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
