"""The common held-out evaluation: fixed rows and masks for every model, each model by its own
inference path, and its per-token loss equal to a plain-PyTorch reference (vanilla and 3ML)."""

import subprocess
import sys

import numpy
import pytest
import torch

from conftest import REPO_ROOT
from test_methods_reference import L, Ref, make_model

from megatron_effmlm.plans import get_policy

T, N = 64, 6


@pytest.fixture(scope="module")
def heldout(demo_jsonl, demo_tokenizer):
    from megatron_effmlm.eval.heldout import build_heldout

    return build_heldout(demo_jsonl, demo_tokenizer, T, N, seed=5)


def test_rows_and_masks_are_fixed(heldout, demo_jsonl, demo_tokenizer):
    from megatron_effmlm.eval.heldout import build_heldout

    again = build_heldout(demo_jsonl, demo_tokenizer, T, N, seed=5)
    assert again.digest() == heldout.digest()
    assert build_heldout(demo_jsonl, demo_tokenizer, T, N, seed=6).digest() != heldout.digest()
    tok = demo_tokenizer
    for row in range(N):
        real = heldout.padding_mask[row]
        n = int(real.sum()) - 2
        assert heldout.ids[row, 0] == tok.cls and heldout.ids[row, n + 1] == tok.sep
        assert heldout.masked[row].sum() == max(1, round(0.15 * n))
        assert not (heldout.masked[row] & ~real).any()  # never a pad
        assert not heldout.masked[row, 0] and not heldout.masked[row, n + 1]  # never [CLS]/[SEP]
    assert heldout.padding_mask[:, :2].all() and heldout.ids.shape == (N, T)


def _ref_rows(heldout, mask_id):
    for r in range(len(heldout.ids)):
        real = torch.from_numpy(heldout.padding_mask[r]).nonzero().squeeze(1)
        pred = torch.from_numpy(heldout.masked[r]).nonzero().squeeze(1)
        ids = torch.from_numpy(heldout.ids[r])
        yield ids.masked_fill(torch.from_numpy(heldout.masked[r]), mask_id), real, pred, ids[pred]


def test_vanilla_equals_reference(mcore_single, heldout, demo_tokenizer):
    from megatron_effmlm.eval.heldout import score

    tok = demo_tokenizer
    cfg, model = make_model(tok.vocab_size)
    got = score(model, get_policy("vanilla", tokenizer=tok, num_layers=L), heldout, tok.mask, batch_size=4)
    ref = Ref(model, cfg.layernorm_epsilon)
    want = []
    with torch.no_grad():
        for text, real, pred, labels in _ref_rows(heldout, tok.mask):
            x = ref.embed(text[real], real)
            for l in range(L):
                x = ref.layer(x, f"encoder.layers.{l}.")
            x = ref.ln(x, "encoder.final_layernorm")
            want.append(ref.head_losses(x[pred], labels))  # real positions are 0..n-1
    numpy.testing.assert_allclose(got, torch.cat(want).double().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("decoder_type", ["self", "cross"])
def test_3ml_equals_reference(mcore_single, heldout, demo_tokenizer, decoder_type):
    from megatron_effmlm.eval.heldout import score

    tok = demo_tokenizer
    cfg, model = make_model(tok.vocab_size, decoder_layers=2, decoder_type=decoder_type)
    policy = get_policy("3ml", tokenizer=tok, num_layers=L, decoder_layers=2, decoder_type=decoder_type)
    got = score(model, policy, heldout, tok.mask, batch_size=4)
    ref = Ref(model, cfg.layernorm_epsilon)
    P = ref.p["embedding.position_embeddings.weight"]
    want = []
    with torch.no_grad():
        for text, real, pred, labels in _ref_rows(heldout, tok.mask):
            kept = real[text[real] != tok.mask]
            x = ref.embed(text[kept], kept)
            for l in range(L):
                x = ref.layer(x, f"encoder.layers.{l}.")
            enc = ref.ln(x, "encoder.final_layernorm")
            if decoder_type == "cross":
                y = ref.p["mask_embedding"] + P[pred]
                for l in range(2):
                    y = ref.layer(y, f"decoder.layers.{l}.", context=enc)
                want.append(ref.head_losses(ref.ln(y, "decoder.final_layernorm"), labels))
                continue
            x = torch.cat([enc, ref.p["mask_embedding"] + P[pred]])  # the masks appended
            for l in range(2):
                x = ref.layer(x, f"decoder.layers.{l}.")
            x = ref.ln(x, "decoder.final_layernorm")
            want.append(ref.head_losses(x[len(kept):], labels))
    numpy.testing.assert_allclose(got, torch.cat(want).double().numpy(), rtol=1e-5, atol=1e-6)


def test_token_dropping_methods_score_with_the_full_encoder(mcore_single, heldout, demo_tokenizer):
    """Token drop, ScTD and random-LTD evaluate as the full model: on one set of weights their
    scores equal vanilla's, position for position (same rows, same masks)."""
    from megatron_effmlm.eval.heldout import score

    tok = demo_tokenizer
    _, model = make_model(tok.vocab_size)
    base = score(model, get_policy("vanilla", tokenizer=tok, num_layers=L), heldout, tok.mask)
    for method, opts in (("token-drop", {}), ("sctd", {}), ("random-ltd", {"ltd_start": 16})):
        policy = get_policy(method, tokenizer=tok, num_layers=L, **opts)
        got = score(model, policy, heldout, tok.mask)
        numpy.testing.assert_allclose(got, base, rtol=1e-6, atol=1e-7, err_msg=method)
        assert policy.training  # score() leaves the policy as it found it


def test_unigram_baseline(heldout, demo_data_prefix, demo_tokenizer):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_effmlm.eval.heldout import non_label_ids, summarize, unigram_counts, unigram_losses

    tok = demo_tokenizer
    counts = unigram_counts(demo_data_prefix, tok.vocab_size)
    ds = IndexedDataset(demo_data_prefix)
    assert counts.sum() == int(ds.sequence_lengths.sum())
    labels = heldout.ids[heldout.masked]
    got = unigram_losses(counts, labels, non_label_ids(tok))
    structural = {tok.cls, tok.sep, tok.pad, tok.mask}
    c = {i: int(counts[i]) + 1 for i in range(tok.vocab_size) if i not in structural}
    total = sum(c.values())
    numpy.testing.assert_allclose(got, [-numpy.log(c[int(y)] / total) for y in labels], rtol=1e-12)
    s = summarize(numpy.full(len(labels), 2.0), heldout, got)
    assert s["gap_to_unigram"] == pytest.approx(got.mean() - 2.0) and s["predicted_tokens"] == len(labels)
    assert s["mask_sha1"] == heldout.digest()
    # [UNK] is text: a masked [UNK] has a finite unigram loss
    assert numpy.isfinite(unigram_losses(counts, numpy.array([tok.unk]), non_label_ids(tok))).all()


def test_cli_errors(tmp_path, demo_jsonl, demo_tokenizer_dir):
    cmd = [sys.executable, "tools/eval_mlm.py", "--checkpoint", str(tmp_path / "nope"), "--data", demo_jsonl,
           "--tokenizer-dir", demo_tokenizer_dir]
    r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == f"error: --checkpoint {tmp_path / 'nope'}: no such directory"
    cmd = [sys.executable, "tools/eval_mlm.py", "--checkpoint", str(tmp_path), "--data",
           str(tmp_path / "none.jsonl"), "--tokenizer-dir", demo_tokenizer_dir]
    r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == f"error: held-out data not found: {tmp_path / 'none.jsonl'}"
