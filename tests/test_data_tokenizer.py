"""Tokenizer training and the EffMLMTokenizer interface, for all four kinds."""

import json
import os
import shutil

import pytest

from megatron_effmlm.data.errors import DataError, run_cli
from megatron_effmlm.data.tokenizer import META_FILE, EffMLMTokenizer

EXPECTED_SPECIALS = {
    "bert": {"pad": ("[PAD]", 0), "unk": ("[UNK]", 1), "cls": ("[CLS]", 2), "sep": ("[SEP]", 3), "mask": ("[MASK]", 4)},
    "roberta": {"cls": ("<s>", 0), "pad": ("<pad>", 1), "sep": ("</s>", 2), "unk": ("<unk>", 3), "mask": ("<mask>", 4)},
}
WORD_MARK = {"bpe": "\u0120", "sp-unigram": "\u2581", "sp-bpe": "\u2581"}


def _lines(jsonl, n_docs):
    lines = []
    with open(jsonl, encoding="utf-8") as f:
        for i, raw in enumerate(f):
            if i >= n_docs:
                break
            lines += [x for x in json.loads(raw)["text"].split("\n") if x]
    return lines


@pytest.fixture(scope="module")
def small_tokenizers(tmp_path_factory, demo_jsonl):
    """One tokenizer per kind, trained through the CLI on 30 demo articles."""
    from tools.train_tokenizer import main

    out = {}
    for kind in ("wordpiece", "bpe", "sp-unigram", "sp-bpe"):
        path = str(tmp_path_factory.mktemp("tok") / kind)
        rc = run_cli(main, ["--input", demo_jsonl, "--tokenizer-type", kind, "--vocab-size", "1000",
                            "--max-docs", "30", "--output-dir", path])
        assert rc == 0
        out[kind] = path
    return out


@pytest.mark.parametrize("kind", ["wordpiece", "bpe", "sp-unigram", "sp-bpe"])
def test_kind_round_trips(kind, small_tokenizers, demo_jsonl):
    tok = EffMLMTokenizer.from_dir(small_tokenizers[kind])
    style = "bert" if kind == "wordpiece" else "roberta"
    assert (tok.kind, tok.style) == (kind, style)
    with open(os.path.join(small_tokenizers[kind], META_FILE)) as f:
        meta = json.load(f)
    recorded = {role: (v["token"], v["id"]) for role, v in meta["special_tokens"].items()}
    assert recorded == EXPECTED_SPECIALS[style]
    assert meta["vocab_size"] == tok.vocab_size <= 1000 and tok.vocab_size > 900
    for role, (token, i) in EXPECTED_SPECIALS[style].items():
        assert getattr(tok, role) == i and tok.inv_vocab[i] == token and tok.vocab[token] == i
    assert (tok.bos, tok.eos, tok.eod) == (tok.cls, tok.sep, tok.sep)
    assert tok.special_ids == [tok.cls, tok.sep, tok.pad, tok.mask, tok.unk]
    assert list(tok.unique_identifiers)[:3] == ["class", "tokenizer_path", "kind"]
    assert tok.unique_identifiers["kind"] == kind

    lines = _lines(demo_jsonl, 40)  # includes 10 articles the tokenizer was not trained on
    ids = [tok.tokenize(x) for x in lines]
    assert ids == tok.tokenize_batch(lines)
    hf = tok.hf_tokenizer()
    assert [hf(x, add_special_tokens=False)["input_ids"] for x in lines] == ids
    assert hf(lines[0])["input_ids"] == [tok.cls] + ids[0] + [tok.sep]
    assert (hf.cls_token_id, hf.sep_token_id, hf.pad_token_id, hf.mask_token_id, hf.unk_token_id) == (
        tok.cls, tok.sep, tok.pad, tok.mask, tok.unk)
    assert tok.tokenize(f"one {tok.inv_vocab[tok.mask]} two").count(tok.mask) == 1

    # Decoding: exact for byte-level BPE; sentencepiece reproduces its NFKC-normalised text;
    # WordPiece loses spacing around punctuation, so re-encoding its decode gives the same ids.
    decoded = [tok.detokenize(i) for i in ids]
    if kind == "bpe":
        assert decoded == lines
    elif kind == "wordpiece":
        assert [tok.tokenize(d) for d in decoded] == ids
    else:  # ids with <unk> (characters unseen in training) cannot decode to the original
        known = [(d, x, i) for d, x, i in zip(decoded, lines, ids) if tok.unk not in i]
        assert len(known) > 0.5 * len(lines)
        assert sum(d == x for d, x, _ in known) >= 0.9 * len(known)
        assert [tok.tokenize(d) for d, _, _ in known] == [i for _, _, i in known]

    ws = tok.word_start_mask()
    assert ws.shape == (tok.vocab_size,) and ws.dtype == bool and ws[tok.special_ids].all()
    for i in range(5, tok.vocab_size):
        piece = tok.inv_vocab[i]
        expected = not piece.startswith("##") if kind == "wordpiece" else piece.startswith(WORD_MARK[kind])
        assert ws[i] == expected, piece


@pytest.mark.parametrize("kind", ["sp-unigram", "sp-bpe"])
def test_sentencepiece_conversion_matches_sentencepiece(kind, small_tokenizers, demo_jsonl):
    import sentencepiece

    tok = EffMLMTokenizer.from_dir(small_tokenizers[kind])
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(small_tokenizers[kind], "spm.model"))
    lines = _lines(demo_jsonl, 106)
    same = sum(tok.tokenize(x) == sp.encode(x) for x in lines)
    # Viterbi ties (equal-score segmentations) may resolve differently: a handful of lines.
    assert same >= len(lines) - 5, f"{len(lines) - same} of {len(lines)} lines differ"


def test_demo_tokenizer(demo_tokenizer):
    tok = demo_tokenizer
    assert (tok.kind, tok.style, tok.vocab_size) == ("wordpiece", "bert", 4096)
    assert tok.tokens("ALBEDO Depends") == tok.tokens("albedo depends")  # lowercased
    assert tok.tokens("albedo") == ["albedo"]
    assert 0.5 < tok.word_start_mask().mean() < 0.9


def test_errors(tmp_path, capsys, demo_jsonl):
    from tools.train_tokenizer import main

    with pytest.raises(DataError, match=f"^tokenizer directory not found: {tmp_path / 'nope'} "):
        EffMLMTokenizer.from_dir(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"^tokenizer directory {tmp_path / 'empty'} has no effmlm_tokenizer.json"):
        EffMLMTokenizer.from_dir(str(tmp_path / "empty"))

    args = ["--tokenizer-type", "bpe", "--vocab-size", "300", "--output-dir", str(tmp_path / "t")]
    assert run_cli(main, ["--input", str(tmp_path / "missing.jsonl")] + args) == 2
    assert capsys.readouterr().err == f"error: --input: input file not found: {tmp_path / 'missing.jsonl'}\n"

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken"\n')
    assert run_cli(main, ["--input", str(bad)] + args) == 2
    assert capsys.readouterr().err.startswith(f"error: {bad}:2: bad JSON line: Expecting ',' delimiter")

    bad.write_text('{"body": "no text key"}\n')
    assert run_cli(main, ["--input", str(bad)] + args) == 2
    assert capsys.readouterr().err == f"error: {bad}:1: missing json key 'text' (--json-keys); keys present: ['body']\n"

    assert run_cli(main, ["--input", demo_jsonl, "--tokenizer-type", "bpe", "--vocab-size", "100",
                          "--output-dir", str(tmp_path / "t")]) == 2
    assert capsys.readouterr().err == "error: --vocab-size 100 is too small for bpe: need at least 261\n"


def test_a_failed_training_keeps_the_tokenizer_already_there(tmp_path, capsys, demo_tokenizer_dir):
    """Empty input: refused before anything is written; the tokenizer in --output-dir is unchanged."""
    from tools.train_tokenizer import main

    out = tmp_path / "tok"
    shutil.copytree(demo_tokenizer_dir, out)
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert run_cli(main, ["--input", str(empty), "--tokenizer-type", "wordpiece", "--vocab-size", "300",
                          "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err == f"error: --input: no documents in {empty}\n"
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    # A training that fails at its last step (metadata that cannot be written as JSON) leaves it as
    # it was too, and no staging folder behind.
    from megatron_effmlm.data.tokenizer import train_tokenizer

    with pytest.raises(TypeError):
        train_tokenizer(iter(["some text"] * 3), "wordpiece", 300, str(out), extra_meta={"bad": object()})
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
