#!/usr/bin/env python
"""Export a checkpoint (any TP/PP layout, any method) to a Hugging Face transformers folder.

    python tools/export_hf.py --checkpoint runs/demo/ckpt --output-dir runs/demo/hf
    # --target megatron-bert (pre-LN, the default arch) | bert | roberta (post-LN: --model-arch bert|roberta)

The folder loads with AutoModelForMaskedLM / AutoModel / AutoTokenizer.from_pretrained; 3ML
checkpoints export their encoder only (AutoModel). The export is checked against the
checkpoint's own model on sample text before the folder appears (written atomically).
"""
import argparse
import sys


def main(argv=None) -> int:
    from megatron_effmlm.cli import HelpFormatter, no_such_dir  # --help shows the defaults

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a --save folder (its latest iteration) or one iter_* folder")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--target", default=None, choices=["megatron-bert", "bert", "roberta"],
                   help="transformers class (default: the checkpoint's --model-arch)")
    p.add_argument("--tokenizer-dir", default=None, help="default: the tokenizer the checkpoint was trained with")
    a = p.parse_args(argv)
    if missing := no_such_dir("--checkpoint", a.checkpoint):  # before the imports below (seconds)
        print(f"error: {missing}", file=sys.stderr)
        return 2
    import logging

    from megatron_effmlm.cli import quiet_dependencies

    quiet_dependencies()
    logging.getLogger("megatron").setLevel(logging.ERROR)
    from megatron_effmlm.checkpoint.dist_ckpt import CheckpointError
    from megatron_effmlm.data.errors import DataError
    from megatron_effmlm.hf.convert import ConversionError
    from megatron_effmlm.hf.export import export
    from megatron_effmlm.parallel.init import destroy

    try:
        r = export(a.checkpoint, a.output_dir, a.target, a.tokenizer_dir)
    except (ConversionError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy()
    kind = "encoder only (3ML: no usable MLM head)" if r["encoder_only"] else "MLM"
    print(f"exported {r['checkpoint']} -> {a.output_dir}: {r['class']}, {kind}; "
          f"max |difference| to our model on sample text {r['max_abs_diff']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
