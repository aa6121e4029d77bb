#!/usr/bin/env python
"""Import a Hugging Face BertForMaskedLM / RobertaForMaskedLM / MegatronBertForMaskedLM folder
as a checkpoint that pretrain_effmlm.py continues from with --load (any TP/PP layout, any method).

    python tools/import_hf.py --hf-dir runs/demo/hf --output runs/imported
    torchrun --nproc-per-node 2 pretrain_effmlm.py $(cat runs/imported/model_args.txt) \\
        --data-path ... --method token-drop --tensor-model-parallel-size 2 ...

The printed (and saved) flags rebuild the same model: keep them when continuing.
"""
import argparse
import sys


def main(argv=None) -> int:
    from megatron_effmlm.cli import HelpFormatter, no_such_dir  # --help shows the defaults

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--hf-dir", required=True, help="folder with config.json, weights and the tokenizer")
    p.add_argument("--output", required=True, help="the checkpoint folder to write (like --save)")
    p.add_argument("--seq-length", type=int, default=None, help="default: the position table, at most 512")
    p.add_argument("--max-tensor-model-parallel-size", type=int, default=8,
                   help="pad the vocabulary so that every TP size up to this loads the checkpoint")
    a = p.parse_args(argv)
    if missing := no_such_dir("--hf-dir", a.hf_dir):  # before the imports below (seconds)
        print(f"error: {missing}", file=sys.stderr)
        return 2
    import logging

    from megatron_effmlm.cli import quiet_dependencies

    quiet_dependencies()
    logging.getLogger("megatron").setLevel(logging.ERROR)
    from megatron_effmlm.checkpoint.dist_ckpt import CheckpointError
    from megatron_effmlm.data.errors import DataError
    from megatron_effmlm.hf.convert import ConversionError
    from megatron_effmlm.hf.import_hf import import_hf
    from megatron_effmlm.parallel.init import destroy

    try:
        flags = import_hf(a.hf_dir, a.output, a.seq_length, a.max_tensor_model_parallel_size)
    except (ConversionError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy()
    print(f"imported {a.hf_dir} -> {a.output}; continue with:\n  pretrain_effmlm.py {' '.join(flags)} "
          "--data-path ... (flags also in model_args.txt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
