#!/usr/bin/env python
"""Pre-train a masked language model with megatron-core.

    torchrun --nproc-per-node 2 pretrain_effmlm.py --data-path data/demo/wiki_text_sentence \\
        --tokenizer-dir data/demo/tokenizer --num-layers 4 --hidden-size 256 ...

Flags follow Megatron-LM's names; `--method` picks the pre-training method.
Imports stay inside main(): dist_checkpointing's writer starts a spawn-context process
that re-imports this module, which must then be cheap and must not train.
"""
import logging
import sys


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO lines drown the progress
    import warnings

    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    from megatron_effmlm.arguments import parse_args
    from megatron_effmlm.config import ConfigError
    from megatron_effmlm.checkpoint.dist_ckpt import CheckpointError
    from megatron_effmlm.data.errors import DataError

    try:
        cfg = parse_args(argv)
        from megatron_effmlm.training.loop import Trainer

        trainer = Trainer(cfg)
        trainer.train()
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        from megatron_effmlm.parallel.init import destroy

        destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
