#!/usr/bin/env python
"""Convert a Wikipedia XML dump (.xml or .xml.bz2, official enwiki format) to JSONL.

Each line is {"id", "title", "text"}: main-namespace articles only, redirects skipped, wiki
markup stripped, paragraphs separated by newlines.

    python tools/wikidump_to_jsonl.py --input enwiki-latest-pages-articles1.xml.bz2 \\
        --output data/wiki.jsonl --min-chars 200
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_effmlm.data.errors import DataError, run_cli  # noqa: E402


def parse_args(argv=None):
    from megatron_effmlm.cli import HelpFormatter  # --help shows the defaults

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--input", required=True, help="dump file (.xml or .xml.bz2)")
    parser.add_argument("--output", required=True, help="output JSONL path")
    parser.add_argument("--min-chars", type=int, default=0,
                        help="skip articles whose plain text is shorter than this")
    parser.add_argument("--log-interval", type=float, default=10.0,
                        help="seconds between progress lines")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.min_chars < 0:
        raise DataError(f"--min-chars must be >= 0, got {args.min_chars}")
    from megatron_effmlm.data.wikidump import convert_dump

    convert_dump(args.input, args.output, args.min_chars, args.log_interval)


if __name__ == "__main__":
    sys.exit(run_cli(main))
