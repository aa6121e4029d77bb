#!/usr/bin/env python
"""Train a tokenizer for MLM pre-training on JSONL corpora.

    python tools/train_tokenizer.py --input data/demo/wiki.jsonl --tokenizer-type wordpiece \\
        --vocab-size 30522 --lowercase --output-dir data/tokenizers/wp30k

Writes tokenizer.json (HF tokenizers format; sentencepiece kinds also keep spm.model) and
effmlm_tokenizer.json (kind, style, special tokens and their fixed ids). Load it with
megatron_effmlm.data.tokenizer.EffMLMTokenizer.from_dir(output_dir).

Keep the tokenizer with the data and checkpoints made with it: a WordPiece training is not
deterministic (Hugging Face tokenizers numbers the "##" alphabet, and so breaks ties between
equally frequent merges, in a per-process random order; the same corpus gave 262 of 8,192 ids
in another order), while bpe and the sentencepiece kinds gave identical files twice.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_effmlm.data.errors import DataError, run_cli  # noqa: E402


def parse_args(argv=None):
    from megatron_effmlm.data.tokenizer import KINDS, STYLES

    from megatron_effmlm.cli import HelpFormatter  # --help shows the defaults

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="JSONL file(s)")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys whose text is used")
    p.add_argument("--tokenizer-type", required=True, choices=KINDS)
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--lowercase", action="store_true")
    p.add_argument("--style", choices=STYLES, default=None,
                   help="special token naming; default bert for wordpiece, roberta otherwise")
    p.add_argument("--max-docs", type=int, default=None, help="train on the first N documents only")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from megatron_effmlm.data.jsonl import check_input_files, iter_jsonl
    from megatron_effmlm.data.tokenizer import train_tokenizer

    check_input_files(args.input)
    if args.max_docs is not None and args.max_docs <= 0:
        raise DataError(f"--max-docs must be positive, got {args.max_docs}")
    # Before anything is written (an existing tokenizer in --output-dir stays as it is).
    if next(iter_jsonl(args.input, args.json_keys), None) is None:
        raise DataError(f"--input: no documents in {', '.join(args.input)}")
    count = {"docs": 0}

    def texts():
        for _, _, values in iter_jsonl(args.input, args.json_keys):
            if args.max_docs is not None and count["docs"] >= args.max_docs:
                return
            count["docs"] += 1
            yield from values

    start = time.time()
    tok = train_tokenizer(
        texts(), args.tokenizer_type, args.vocab_size, args.output_dir, args.lowercase, args.style,
        extra_meta={"trained_on": [os.path.abspath(p) for p in args.input], "json_keys": args.json_keys},
    )
    print(f"trained {tok.kind} ({tok.style} style) tokenizer, vocab {tok.vocab_size}, on "
          f"{count['docs']} documents in {time.time() - start:.1f} s -> {args.output_dir}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run_cli(main))
