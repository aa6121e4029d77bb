"""tools/preprocess_data.py: .bin/.idx round trips and input errors."""

import json

import numpy

from megatron_effmlm.data.errors import run_cli
from megatron_effmlm.data.preprocess import SentenceSplitter


def _docs(jsonl, n=None):
    with open(jsonl, encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    return docs[:n]


def _indexed(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix)


def _per_document(ds):
    bounds = ds.document_indices
    return [[ds[int(i)].tolist() for i in range(bounds[d], bounds[d + 1])] for d in range(len(bounds) - 1)]


def test_sentence_level_round_trip_with_two_workers(tmp_path, demo_jsonl, demo_tokenizer, demo_tokenizer_dir,
                                                    demo_punkt_params, demo_data_prefix, capsys):
    from tools.preprocess_data import main

    prefix = tmp_path / "wiki"
    rc = run_cli(main, ["--input", demo_jsonl, "--tokenizer-dir", demo_tokenizer_dir, "--output-prefix",
                        str(prefix), "--split-sentences", "--workers", "2", "--log-interval", "50",
                        "--punkt-cache", demo_punkt_params])
    assert rc == 0
    err = capsys.readouterr().err
    assert "processed 100 documents (" in err and "docs/s, " in err and " MB/s)" in err
    assert "done: text: 106 documents (0 empty, skipped)" in err

    splitter = SentenceSplitter(demo_punkt_params)
    expected = [[ids for ids in demo_tokenizer.tokenize_batch(splitter.split(text)) if ids]
                for text in _docs(demo_jsonl)]
    ds = _indexed(f"{prefix}_text_sentence")
    assert ds.index.dtype == numpy.uint16  # vocab 4096 fits
    assert _per_document(ds) == expected
    assert sum(map(len, expected)) > 20000  # sentences, not paragraphs
    # The shared fixture is the same data, built the same way.
    assert (tmp_path / "wiki_text_sentence.bin").read_bytes() == open(f"{demo_data_prefix}.bin", "rb").read()


def test_document_level_partitions_append_eod_and_empty_docs(tmp_path, demo_jsonl, demo_tokenizer,
                                                            demo_tokenizer_dir):
    from megatron_effmlm.data.preprocess import preprocess

    texts = _docs(demo_jsonl, 12)
    texts[3], texts[7] = "", "  \n "
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "text": t, "title": f"T{i}"}) + "\n" for i, t in enumerate(texts)))
    outputs = {}
    for partitions in (1, 3):
        stats = preprocess(str(src), str(tmp_path / f"p{partitions}"), demo_tokenizer_dir,
                           json_keys=["text", "title"], append_eod=True, partitions=partitions, log_interval=0)
        assert stats.documents == 12 and stats.empty_documents == {"text": 2}
        outputs[partitions] = {k: (tmp_path / f"p{partitions}_{k}_document.bin").read_bytes() for k in ("text", "title")}
    assert outputs[1] == outputs[3]  # partitions are merged back in order

    ds = _indexed(str(tmp_path / "p3_text_document"))
    kept = [t for t in texts if t.strip()]
    assert _per_document(ds) == [[demo_tokenizer.tokenize(t) + [demo_tokenizer.eod]] for t in kept]
    titles = _indexed(str(tmp_path / "p3_title_document"))
    assert _per_document(titles) == [[demo_tokenizer.tokenize(f"T{i}") + [demo_tokenizer.eod]] for i in range(12)]


def test_sentence_splitter_paragraphs_and_newlines(demo_punkt_params):
    text = "The cat sat. It was Dr. Smith's cat.\nA new paragraph without a stop\nLast one. Really."
    assert SentenceSplitter(demo_punkt_params).split(text) == [
        "The cat sat.", "It was Dr. Smith's cat.", "A new paragraph without a stop", "Last one.", "Really."]
    assert SentenceSplitter(demo_punkt_params, keep_newlines=True).split(text) == [
        "The cat sat.", "It was Dr. Smith's cat.\n", "A new paragraph without a stop\n", "Last one.", "Really."]


def test_punkt_trained_on_the_input_is_cached(tmp_path, demo_tokenizer_dir, capsys):
    from megatron_effmlm.data.preprocess import preprocess

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "First sentence here. Second one follows. A third."}) + "\n")
    for _ in range(2):
        preprocess(str(src), str(tmp_path / "out"), demo_tokenizer_dir, split_sentences=True, log_interval=0)
    err = capsys.readouterr().err
    assert err.count("nltk's pretrained Punkt data (punkt_tab) is not installed; training a Punkt model on") == 1
    assert f"reusing the Punkt model trained on the input: {tmp_path / 'out'}_punkt.json" in err
    assert len(_indexed(str(tmp_path / "out_text_sentence"))) == 3


def test_errors(tmp_path, capsys, demo_tokenizer_dir):
    from tools.preprocess_data import main

    def run(src, *extra, tok=demo_tokenizer_dir):
        rc = run_cli(main, ["--input", str(src), "--tokenizer-dir", str(tok), "--output-prefix",
                            str(tmp_path / "out"), *extra])
        return rc, capsys.readouterr().err.splitlines()[-1]

    assert run(tmp_path / "missing.jsonl") == (2, f"error: --input: input file not found: {tmp_path / 'missing.jsonl'}")
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "ok"}\n' * 40 + '{"text": "ok"} trailing\n')
    assert run(src, "--workers", "2") == (2, f"error: {src}:41: bad JSON line: Extra data at column 16")
    src.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    assert run(src) == (2, f"error: {src}:2: missing json key 'text' (--json-keys); keys present: ['txt']")
    assert run(src, tok=tmp_path / "no_tok") == (
        2, f"error: tokenizer directory not found: {tmp_path / 'no_tok'} (write one with tools/train_tokenizer.py)")
    assert not list(tmp_path.glob("out*"))  # nothing half-written


def test_only_empty_documents_is_an_error_and_writes_nothing(tmp_path, capsys, demo_tokenizer_dir):
    from tools.preprocess_data import main

    src = tmp_path / "empty.jsonl"
    src.write_text('{"text": ""}\n{"text": "   "}\n{"text": "\\n"}\n')
    for extra in ([], ["--partitions", "2"], ["--split-sentences", "--punkt-cache", str(tmp_path / "p.json")]):
        rc = run_cli(main, ["--input", str(src), "--tokenizer-dir", demo_tokenizer_dir,
                            "--output-prefix", str(tmp_path / "out"), *extra])
        assert (rc, capsys.readouterr().err.splitlines()[-1]) == (
            2, f"error: --input {src}: no text under json key 'text' in any of its 3 documents (3 empty): "
               "nothing to write"), extra
        assert not list(tmp_path.glob("out*"))  # nothing half-written
