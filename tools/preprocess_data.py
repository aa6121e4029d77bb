#!/usr/bin/env python
"""Tokenize a JSONL corpus into megatron-core .bin/.idx files (Megatron-LM's flag names).

    python tools/preprocess_data.py --input data/demo/wiki.jsonl --tokenizer-dir data/tok \\
        --output-prefix data/demo/wiki --split-sentences --workers 2

writes data/demo/wiki_text_sentence.bin/.idx (one sequence per sentence, documents kept);
without --split-sentences, data/demo/wiki_text_document.bin/.idx (one sequence per document).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_effmlm.data.errors import run_cli  # noqa: E402

from megatron_effmlm.cli import quiet_dependencies  # noqa: E402

quiet_dependencies()  # megatron-core's import warns about GPU-only packages: no part in preprocessing


def parse_args(argv=None):
    from megatron_effmlm.cli import HelpFormatter  # --help shows the defaults

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True, help="JSONL file, one document per line")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract from each line")
    g.add_argument("--split-sentences", action="store_true", help="one sequence per sentence (nltk Punkt)")
    g.add_argument("--keep-newlines", action="store_true",
                   help="keep the newline ending each paragraph when splitting sentences")
    g.add_argument("--lang", default="english", help="language of nltk's pretrained Punkt, if installed")
    g.add_argument("--punkt-cache", default=None,
                   help="JSON of trained Punkt parameters to use or write (default {output-prefix}_punkt.json)")
    g.add_argument("--punkt-train-chars", type=int, default=5_000_000,
                   help="characters of the input to train Punkt on when no pretrained model exists")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-dir", required=True, help="directory written by tools/train_tokenizer.py")
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document token")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="path prefix of the .bin/.idx files")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer worker processes")
    g.add_argument("--partitions", type=int, default=1,
                   help="split the input into this many parts, encode each, merge the results")
    g.add_argument("--log-interval", type=int, default=1000, help="documents between progress lines")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from megatron_effmlm.data.preprocess import preprocess

    preprocess(
        args.input, args.output_prefix, args.tokenizer_dir, json_keys=args.json_keys,
        split_sentences=args.split_sentences, keep_newlines=args.keep_newlines,
        append_eod=args.append_eod, workers=args.workers, partitions=args.partitions,
        log_interval=args.log_interval, lang=args.lang, punkt_cache=args.punkt_cache,
        punkt_train_chars=args.punkt_train_chars,
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
