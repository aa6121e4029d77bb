"""Wikipedia XML dump -> plain-text articles (JSONL {"id", "title", "text"}).

Streaming: mwxml reads one page at a time, mwparserfromhell parses its wikitext, and a small
node walker keeps the prose: templates, <ref>s, tables, files, categories, interlanguage links,
comments and reference-like tail sections are dropped; link and formatting text is kept.
"""

import bz2
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import IO, Iterator, Optional

import mwparserfromhell
import mwxml
from mwparserfromhell import nodes

from megatron_effmlm.data.errors import DataError

# Tags whose content is not running prose.
_DROP_TAGS = {
    "ref", "references", "table", "gallery", "math", "chem", "ce", "timeline", "imagemap",
    "score", "hiero", "graph", "mapframe", "syntaxhighlight", "source", "pre",
    "templatedata", "noinclude", "includeonly",
}
# Tags that break a line.
_BREAK_TAGS = {"br", "p", "li", "dd", "dt", "hr"}
# Links into these namespaces are media or metadata, not text.
_DROP_LINK_NS = {"file", "image", "media", "category"}
# Sections after these headings are lists of links and citations.
_TAIL_SECTIONS = {
    "references", "external links", "see also", "further reading", "notes", "bibliography",
    "sources", "footnotes", "notes and references", "citations", "works cited",
}
_INTERLANGUAGE = re.compile(r"^[a-z]{2,3}(-[a-z]+)*$")
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:!?)])")
_SPACES = re.compile(r"[ \t\u00a0\u2009\u200b]+")
# What mwparserfromhell left unparsed (unbalanced quotes inside a tag make it give up).
_REF_BLOCK = re.compile(r"<ref\b[^>]*?/>|<ref\b[^>]*>.*?</ref\s*>", re.DOTALL | re.IGNORECASE)
_HTML_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(\s[^<>]*)?/?>")
_LEFTOVER = ("{{", "}}", "[[", "]]", "{|", "|}")


@dataclass
class DumpStats:
    pages: int = 0
    articles: int = 0
    redirects: int = 0
    other_namespace: int = 0
    too_short: int = 0


def _link_is_dropped(title: str, has_text: bool) -> bool:
    title = title.strip()
    if title.startswith(":"):  # [[:Category:X]] is a visible link
        return False
    if ":" not in title:
        return False
    prefix = title.split(":", 1)[0].strip().lower()
    if prefix in _DROP_LINK_NS:
        return True
    # [[de:Foo]] interlanguage links have no display text
    return not has_text and bool(_INTERLANGUAGE.match(prefix))


def _walk(code, out: list) -> None:
    """Append the prose of a parsed wikicode to ``out``; headings become paragraph breaks."""
    skip_level = None  # inside a tail section of this heading level
    for node in code.nodes:
        if isinstance(node, nodes.Heading):
            title = node.title.strip_code().strip().lower()
            if skip_level is not None and node.level > skip_level:
                continue
            skip_level = node.level if title in _TAIL_SECTIONS else None
            out.append("\n\n")
            continue
        if skip_level is not None:
            continue
        if isinstance(node, nodes.Text):
            out.append(node.value)
        elif isinstance(node, nodes.Wikilink):
            title = str(node.title)
            if _link_is_dropped(title, node.text is not None):
                continue
            if node.text is not None:
                _walk(node.text, out)
            else:
                out.append(node.title.strip_code().lstrip(":"))
        elif isinstance(node, nodes.ExternalLink):
            if node.title is not None:
                _walk(node.title, out)
        elif isinstance(node, nodes.Tag):
            tag = str(node.tag).strip().lower()
            if tag in _DROP_TAGS:
                continue
            if tag in _BREAK_TAGS:
                out.append("\n")
            if node.contents is not None:
                _walk(node.contents, out)
        elif isinstance(node, nodes.HTMLEntity):
            out.append(" " if node.normalize() == "\u00a0" else node.normalize())
        # Template, Comment, Argument and the rest carry no prose.


def wikitext_to_text(wikitext: str) -> str:
    """Plain text of one article: paragraphs separated by single newlines, spaces normalised."""
    parts: list = []
    _walk(mwparserfromhell.parse(wikitext), parts)
    text = _MAGIC_WORD.sub("", "".join(parts))
    text = _HTML_TAG.sub("", _REF_BLOCK.sub("", text))
    lines = []
    for line in text.split("\n"):
        line = _SPACES.sub(" ", line)
        line = _EMPTY_PARENS.sub("", line)
        line = _SPACE_BEFORE_PUNCT.sub(r"\1", line)
        line = _SPACES.sub(" ", line).strip()
        # Leftovers of unparsed markup (a broken template, a table row) are not prose.
        if not line or line.startswith(("{|", "|", "!")) or any(m in line for m in _LEFTOVER):
            continue
        lines.append(line)
    return "\n".join(lines)


def _open_dump(path: str) -> IO[bytes]:
    if not os.path.isfile(path):
        raise DataError(f"--input: Wikipedia dump not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(3)
    return bz2.open(path, "rb") if magic == b"BZh" else open(path, "rb")


def iter_articles(
    path: str, min_chars: int = 0, stats: Optional[DumpStats] = None
) -> Iterator[dict]:
    """Yield ``{"id", "title", "text"}`` for each main-namespace, non-redirect article."""
    stats = stats if stats is not None else DumpStats()
    with _open_dump(path) as stream:
        try:
            dump = mwxml.Dump.from_file(stream)
            for page in dump:
                stats.pages += 1
                if page.namespace != 0:
                    stats.other_namespace += 1
                    continue
                if page.redirect:
                    stats.redirects += 1
                    continue
                wikitext = None
                for revision in page:  # the last revision is the current text
                    wikitext = revision.text
                if wikitext is None or wikitext.lstrip().lower().startswith("#redirect"):
                    stats.redirects += 1
                    continue
                text = wikitext_to_text(wikitext)
                if len(text) < max(1, min_chars):
                    stats.too_short += 1
                    continue
                stats.articles += 1
                yield {"id": str(page.id), "title": page.title, "text": text}
        except DataError:
            raise
        except (OSError, EOFError) as err:  # truncated or corrupt .bz2
            raise DataError(f"--input: cannot read Wikipedia dump {path}: {err}") from err
        except Exception as err:  # mwxml / expat errors on malformed XML
            if type(err).__module__.split(".")[0] in ("mwxml", "mwtypes", "xml", "pyexpat"):
                raise DataError(f"--input: malformed Wikipedia dump {path}: {err}") from err
            raise


def convert_dump(
    input_path: str, output_path: str, min_chars: int = 0, log_interval: float = 10.0
) -> DumpStats:
    """Write the articles of a dump as JSONL, atomically (tmp file then rename)."""
    stats = DumpStats()
    if os.path.exists(output_path) and os.path.exists(input_path) and os.path.samefile(input_path, output_path):
        raise DataError(f"--output {output_path} is the --input dump {input_path}: choose another output path")
    out_dir = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(out_dir, exist_ok=True)
    tmp_path = f"{output_path}.tmp.{os.getpid()}"
    start = last = time.time()
    try:
        with open(tmp_path, "w", encoding="utf-8") as out:
            for article in iter_articles(input_path, min_chars, stats):
                out.write(json.dumps(article, ensure_ascii=False) + "\n")
                now = time.time()
                if now - last >= log_interval:
                    last = now
                    print(
                        f"{stats.articles} articles ({stats.pages} pages), "
                        f"{stats.articles / (now - start):.1f} articles/s",
                        file=sys.stderr,
                    )
        os.replace(tmp_path, output_path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    elapsed = max(time.time() - start, 1e-9)
    print(
        f"done: {stats.articles} articles written to {output_path} from {stats.pages} pages "
        f"(skipped {stats.redirects} redirects, {stats.other_namespace} other namespaces, "
        f"{stats.too_short} shorter than {min_chars} chars) in {elapsed:.1f} s, "
        f"{stats.articles / elapsed:.1f} articles/s",
        file=sys.stderr,
    )
    return stats
