"""The built-in demo corpus: a real Wikipedia dump sample, as JSONL.

gensim ships a shortened enwiki dump (206 pages, 106 articles, 1.7 MB bz2) as test data. pip
fetches the gensim wheel (no install), we read the dump out of the zip and convert it with the
Wikipedia dump tool. Everything lands under ``<data_dir>`` and is reused when present.

    python -m megatron_effmlm.data.demo_corpus [--data-dir data]
"""

import argparse
import glob
import os
import subprocess
import sys
import zipfile

from megatron_effmlm.atomic import write_bytes
from megatron_effmlm.data.errors import DataError, run_cli

GENSIM_VERSION = "4.4.0"
DUMP_MEMBER = (
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
DUMP_NAME = os.path.basename(DUMP_MEMBER)


def download_wheel(package: str, version: str, cache_dir: str, what: str = None) -> str:
    """Path of ``<package>==<version>``'s wheel in ``cache_dir``, fetched by pip (no install)."""
    pattern = os.path.join(cache_dir, f"{package}-{version}-*.whl")
    wheels = sorted(glob.glob(pattern))
    if wheels:
        return wheels[0]
    os.makedirs(cache_dir, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
        f"{package}=={version}", "-d", cache_dir,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(glob.glob(pattern))
    if proc.returncode != 0 or not wheels:
        raise DataError(
            f"could not download {what or package} ({package}=={version} wheel) into "
            f"{cache_dir}: `{' '.join(cmd)}` failed: {proc.stderr.strip()[-500:]}"
        )
    return wheels[0]


def _download_wheel(cache_dir: str) -> str:
    return download_wheel("gensim", GENSIM_VERSION, cache_dir, "the demo corpus")


def get_demo_dump(data_dir: str = "data") -> str:
    """Path of the demo Wikipedia dump (.bz2), downloaded once into ``<data_dir>/cache``."""
    cache_dir = os.path.join(data_dir, "cache")
    dump_path = os.path.join(cache_dir, DUMP_NAME)
    if os.path.isfile(dump_path):
        return dump_path
    os.makedirs(cache_dir, exist_ok=True)
    wheel = _download_wheel(cache_dir)
    try:
        with zipfile.ZipFile(wheel) as zf:
            payload = zf.read(DUMP_MEMBER)
    except (zipfile.BadZipFile, KeyError) as err:
        raise DataError(f"{wheel}: no usable {DUMP_MEMBER} in it ({err}); delete it and retry") from err
    write_bytes(dump_path, payload)
    os.remove(wheel)  # 28 MB of which we need the 1.7 MB dump
    return dump_path


def get_demo_corpus(data_dir: str = "data") -> str:
    """Path of the demo corpus JSONL (``<data_dir>/demo/wiki.jsonl``), built on first use."""
    jsonl = os.path.join(data_dir, "demo", "wiki.jsonl")
    if os.path.isfile(jsonl):
        return jsonl
    from megatron_effmlm.data.wikidump import convert_dump

    convert_dump(get_demo_dump(data_dir), jsonl)  # writes atomically
    return jsonl


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default="data", help="root of downloaded and built data")
    args = parser.parse_args(argv)
    print(get_demo_corpus(args.data_dir))


if __name__ == "__main__":
    sys.exit(run_cli(main))
