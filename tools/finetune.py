#!/usr/bin/env python
"""Fine-tune an exported model (tools/export_hf.py) with transformers on a GLUE-format task.

    python tools/finetune.py --model-dir runs/demo/hf --data-dir data/rotten_tomatoes --task sst2 \\
        --seeds 1 2 3 --epochs 3 --lr 5e-5 --output runs/demo/finetune.json

--data-dir holds train.tsv and dev.tsv as GLUE ships them (CoLA, SST-2, MRPC, QQP, MNLI
(dev_matched.tsv), QNLI, RTE, WNLI; --task auto reads the task from the folder name).
Reports dev accuracy (F1 for MRPC/QQP, Matthews correlation for CoLA) per seed and over seeds,
next to the majority-class baseline.
"""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def main(argv=None):
    from megatron_effmlm.cli import HelpFormatter  # --help shows the defaults

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model-dir", required=True, help="an exported Hugging Face folder")
    p.add_argument("--data-dir", required=True, help="GLUE-format task folder (train.tsv, dev.tsv)")
    p.add_argument("--task", default="auto", help="auto, cola, sst2, mrpc, qqp, mnli, qnli, rte, wnli")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: 2e-4 for hidden size < 768, the small models this project "
                        "trains; 5e-5 for BERT-base and larger)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-train-examples", type=int, default=None)
    p.add_argument("--log-interval", type=int, default=50)
    p.add_argument("--output", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    from megatron_effmlm.cli import quiet_dependencies

    quiet_dependencies()
    from megatron_effmlm.atomic import write_json
    from megatron_effmlm.hf.finetune import finetune

    r = finetune(a.model_dir, a.data_dir, a.task, a.seeds, a.epochs, a.lr, a.batch_size, a.max_length, a.warmup,
                 a.weight_decay, a.max_train_examples, a.log_interval)
    if a.output:
        write_json(a.output, r, indent=2)


if __name__ == "__main__":
    from megatron_effmlm.data.errors import run_cli

    sys.exit(run_cli(main))
