#!/usr/bin/env python
"""Pre-train a masked language model with megatron-core.

    torchrun --nproc-per-node 2 pretrain_effmlm.py --data-path data/demo/wiki_text_sentence \\
        --tokenizer-dir data/demo/tokenizer --num-layers 4 --hidden-size 256 ...

Flags follow Megatron-LM's names; `--method` picks the pre-training method.
Imports stay inside main(): dist_checkpointing's writer starts a spawn-context process
that re-imports this module, which must then be cheap and must not train.
"""
import logging
import os
import sys


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from megatron_effmlm.cli import quiet_dependencies

    quiet_dependencies()
    from megatron_effmlm.arguments import parse_args
    from megatron_effmlm.config import ConfigError
    from megatron_effmlm.checkpoint.errors import CheckpointError
    from megatron_effmlm.data.errors import DataError
    from megatron_effmlm.training.resilience import EXIT_BAD_INPUT, EXIT_NON_FINITE, NonFiniteError, StopRequests

    stop = None
    try:
        cfg = parse_args(argv)
        # Before anything slow: SIGTERM/SIGUSR1 then mean "save and exit 75", never a kill.
        stop = StopRequests(cfg.train.exit_signal_handler, cfg.train.exit_duration_in_mins)
        from megatron_effmlm.data.tokenizer import EffMLMTokenizer

        EffMLMTokenizer.from_dir(cfg.data.tokenizer_dir)  # a bad --tokenizer-dir fails here, before the slow imports
        from megatron_effmlm.training.loop import Trainer

        trainer = Trainer(cfg, stop=stop)
        trainer.train()
    except (ConfigError, DataError, CheckpointError) as e:
        # Bad flags and checkpoints are the same on every rank (checkpoint errors are agreed by
        # all ranks): one line from rank 0, not one per process. Data can differ per node.
        if os.environ.get("RANK", "0") == "0" or isinstance(e, DataError):
            print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NON_FINITE
    except RuntimeError as e:  # torch.distributed.DistError is one
        if not _peer_failure(e):
            raise
        first = str(e).strip().splitlines()[0][:400] if str(e).strip() else type(e).__name__
        print(f"error: lost another rank (it died, or a collective passed --distributed-timeout-minutes): "
              f"{first}", file=sys.stderr)
        return 1
    finally:
        if stop is not None:
            stop.restore()
        from megatron_effmlm.parallel.init import destroy

        destroy()
    return trainer.exit_code  # 0, or 75: stopped on a signal / the time limit after saving


def _peer_failure(e: BaseException) -> bool:
    """A communication failure (gloo/NCCL/the store) rather than a bug of this process."""
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return any(k in text for k in ("gloo", "Gloo", "NCCL", "Connection reset", "Connection closed",
                                   "timed out", "Timed out", "TCPStore"))


def _report_exit_code(code: int):
    """torchrun reports a worker's non-zero exit as its own code 1; the Slurm launchers learn
    the real one (75: requeue) from this file, which local rank 0 of each node writes."""
    import os

    from megatron_effmlm.atomic import write_text

    path = os.environ.get("EFFMLM_EXIT_CODE_FILE")
    if path and os.environ.get("LOCAL_RANK", "0") == "0":
        write_text(path, f"{code}\n")


if __name__ == "__main__":
    code = main()
    _report_exit_code(code)
    sys.exit(code)
