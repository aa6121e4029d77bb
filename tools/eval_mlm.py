#!/usr/bin/env python
"""Held-out MLM loss of one or more checkpoints, on the same rows and the same masks.

    python tools/eval_mlm.py --checkpoint runs/a/ckpt runs/b/ckpt --data data/corpus/valid.jsonl \\
        --tokenizer-dir data/corpus/tokenizer --unigram-data data/corpus/train_text_sentence \\
        --seq-length 128 --num-sequences 512 --output runs/eval.json

Rows: the held-out documents cut into [CLS] chunk [SEP] rows of --seq-length, --num-sequences
of them drawn with --seed. Masks: 15% of each row's tokens (--mask-prob), all replaced by
[MASK], the same positions for every checkpoint (seeded per row). Each checkpoint runs its own
method's inference path (3ML: encoder on the unmasked tokens, decoder with the mask vectors
injected; the others: the full encoder). Reported: mean cross-entropy per predicted token, per
source, and the unigram baseline (add-one smoothed token frequencies of --unigram-data) on the
same positions.
"""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron_effmlm.atomic import write_json  # noqa: E402
from megatron_effmlm.cli import HelpFormatter, no_such_dir  # noqa: E402  (--help shows the defaults)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", nargs="+", required=True, help="--save folders (their latest) or iter_* folders")
    p.add_argument("--data", required=True, help="held-out JSONL (a 'text' per line; 'source' optional)")
    p.add_argument("--tokenizer-dir", required=True, help="the tokenizer every checkpoint was trained with")
    p.add_argument("--unigram-data", default=None, help="training data prefix (.bin/.idx) for the unigram baseline")
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--num-sequences", type=int, default=512)
    p.add_argument("--mask-prob", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--output", default=None, help="write the results as JSON here (atomically)")
    a = p.parse_args(argv)
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    from megatron_effmlm.checkpoint.errors import CheckpointError
    from megatron_effmlm.data.errors import DataError
    from megatron_effmlm.data.tokenizer import EffMLMTokenizer

    # The flags' own checks before the imports below (megatron-core: seconds).
    if a.num_sequences < 1 or a.batch_size < 1:
        raise DataError(f"--num-sequences {a.num_sequences} and --batch-size {a.batch_size} must be positive")
    for c in a.checkpoint:
        if missing := no_such_dir("--checkpoint", c):
            raise DataError(missing)
    tok = EffMLMTokenizer.from_dir(a.tokenizer_dir)
    from megatron_effmlm.eval.heldout import build_heldout, evaluate_checkpoint, unigram_counts
    from megatron_effmlm.hf.convert import ConversionError
    from megatron_effmlm.parallel.init import destroy

    counts = unigram_counts(a.unigram_data, tok.vocab_size) if a.unigram_data else None
    heldout = build_heldout(a.data, tok, a.seq_length, a.num_sequences, a.mask_prob, a.seed)
    results = []
    try:
        for c in a.checkpoint:
            try:
                r = evaluate_checkpoint(c, heldout, tok, counts, a.batch_size)
            except (ConversionError, CheckpointError) as e:
                raise DataError(str(e)) from None
            uni = f", unigram {r['unigram_loss']:.4f} (gap {r['gap_to_unigram']:+.4f})" if counts is not None else ""
            print(f"{c}: {r['method']} at iteration {r['iteration']}: held-out MLM loss {r['loss']:.4f} over "
                  f"{r['predicted_tokens']} masked tokens{uni}", flush=True)
            results.append(r)
    finally:
        destroy()
    if a.output:
        os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
        write_json(a.output, {"data": os.path.abspath(a.data), "results": results})


if __name__ == "__main__":
    from megatron_effmlm.data.errors import run_cli

    sys.exit(run_cli(main))
