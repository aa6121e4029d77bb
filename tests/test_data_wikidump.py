"""Wikipedia dump -> JSONL, on the real demo dump and on small hand-written pages."""

import bz2
import json
import os

import pytest

from megatron_effmlm.data.errors import DataError, run_cli
from megatron_effmlm.data.wikidump import iter_articles, wikitext_to_text

MARKUP = ("{{", "}}", "[[", "]]", "{|", "|}", "<ref", "</ref", "&amp;", "&nbsp;", "thumb|", "__NOTOC__")


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_demo_dump_articles(demo_jsonl):
    docs = _read(demo_jsonl)
    # 206 pages: 99 redirects, 1 Wikipedia: page, 106 articles.
    assert len(docs) == 106
    assert len({d["id"] for d in docs}) == 106
    assert all(set(d) == {"id", "title", "text"} for d in docs)
    for d in docs:
        assert d["text"].strip() == d["text"] and d["text"]
        leftovers = [m for m in MARKUP if m in d["text"]]
        assert not leftovers, f"{d['title']}: wiki markup left: {leftovers}"
        assert "\n\n" not in d["text"] and "  " not in d["text"]
    albedo = next(d for d in docs if d["title"] == "Albedo")
    assert albedo["text"].startswith("Albedo or reflection coefficient, derived from Latin albedo")
    assert "Percentage of diffusely reflected sunlight" not in albedo["text"]  # a file caption
    assert "Environmental Encyclopedia" not in albedo["text"]  # a <ref>
    assert "Fresh asphalt" not in albedo["text"]  # a table


WIKITEXT = """{{Infobox thing|name=X}}
[[File:X.png|thumb|A caption]]
'''Thing''' is a [[concept (philosophy)|concept]] in [[philosophy]].<ref>Someone, 2001.</ref> It has a {{lang|la|nomen}} name (&quot;x&quot;).

== History ==
It began in 1900.<!-- comment --> See [http://example.org the site].
* First item
{| class="wikitable"
| a || b
|}

== References ==
{{reflist}}
* A book

== External links ==
* [http://example.org Site]
[[Category:Things]]
[[de:Ding]]
"""


def test_wikitext_to_text_keeps_prose_only():
    assert wikitext_to_text(WIKITEXT) == (
        'Thing is a concept in philosophy. It has a name ("x").\n'
        "It began in 1900. See the site.\n"
        "First item"
    )


def _page(title, ns, pid, text, redirect=None):
    red = f'<redirect title="{redirect}" />' if redirect else ""
    return (f"<page><title>{title}</title><ns>{ns}</ns><id>{pid}</id>{red}<revision><id>{pid}0</id>"
            f"<timestamp>2020-01-01T00:00:00Z</timestamp><contributor><username>u</username><id>1</id>"
            f"</contributor><model>wikitext</model><format>text/x-wiki</format>"
            f'<text xml:space="preserve">{text}</text></revision></page>')


def _dump(pages):
    return ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10" xml:lang="en">'
            "<siteinfo><sitename>Wikipedia</sitename><dbname>enwiki</dbname>"
            "<base>https://en.wikipedia.org/wiki/Main_Page</base><generator>MediaWiki</generator>"
            '<case>first-letter</case><namespaces><namespace key="0" case="first-letter" />'
            '<namespace key="1" case="first-letter">Talk</namespace></namespaces></siteinfo>'
            + "".join(pages) + "</mediawiki>")


def test_cli_skips_redirects_namespaces_and_short_articles(tmp_path, capsys):
    from tools.wikidump_to_jsonl import main

    xml = _dump([
        _page("Long", 0, 1, "'''Long''' article with [[some link|some]] text. " * 5),
        _page("Short", 0, 2, "Tiny."),
        _page("Old", 0, 3, "#REDIRECT [[Long]]", redirect="Long"),
        _page("Talk:Long", 1, 4, "Talk page text that is long enough to pass the filter."),
    ])
    for name, opener in (("dump.xml", open), ("dump.xml.bz2", bz2.open)):
        src, out = tmp_path / name, tmp_path / f"{name}.jsonl"
        with opener(src, "wt", encoding="utf-8") as f:
            f.write(xml)
        assert run_cli(main, ["--input", str(src), "--output", str(out), "--min-chars", "20"]) == 0
        docs = _read(out)
        assert [(d["id"], d["title"]) for d in docs] == [("1", "Long")]
        assert docs[0]["text"] == " ".join(["Long article with some text."] * 5)
        assert "1 articles written" in capsys.readouterr().err


def test_cli_errors(tmp_path, capsys):
    from tools.wikidump_to_jsonl import main

    missing = tmp_path / "nope.xml.bz2"
    assert run_cli(main, ["--input", str(missing), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert capsys.readouterr().err == f"error: --input: Wikipedia dump not found: {missing}\n"

    broken = tmp_path / "broken.xml.bz2"
    broken.write_bytes(bz2.compress(_dump([_page("A", 0, 1, "text " * 50)]).encode())[:60])
    with pytest.raises(DataError, match=f"--input: cannot read Wikipedia dump {broken}"):
        list(iter_articles(str(broken)))
    assert not os.path.exists(tmp_path / "o.jsonl")


def test_cli_refuses_to_write_over_its_input(tmp_path, capsys):
    from tools.wikidump_to_jsonl import main

    src = tmp_path / "dump.xml"
    src.write_text(_dump([_page("Long", 0, 1, "'''Long''' article with text. " * 5)]))
    before = src.read_bytes()
    os.link(src, tmp_path / "same.xml")
    for out in (src, tmp_path / "." / "dump.xml", tmp_path / "same.xml"):
        assert run_cli(main, ["--input", str(src), "--output", str(out)]) == 2
        assert capsys.readouterr().err == (f"error: --output {out} is the --input dump {src}: choose another "
                                           "output path\n")
        assert src.read_bytes() == before
