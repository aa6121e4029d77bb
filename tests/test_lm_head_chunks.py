"""--lm-head-chunk-size: the LM head and loss on chunks of predicted rows, each recomputed in
backward, give the same per-token losses and gradients as the head on all rows at once
(fp32), in one process and with a TP=2 vocabulary (torchrun)."""

import os

import numpy as np
import pytest
import torch

from conftest import run_scenarios, tiny_model_args
from megatron_effmlm.config import ModelConfig, ParallelConfig, PrecisionConfig
from megatron_effmlm.model.builder import build_transformer_config, decoder_spec
from megatron_effmlm.model.mlm_model import MLMModel
from megatron_effmlm.model.specs import get_layer_spec
from megatron_effmlm.plans import get_policy

L = 2


def make_model(vocab, decoder_layers=0):
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=L, hidden_size=64, num_attention_heads=4, seq_length=64, vocab_size=vocab,
                      hidden_dropout=0.0, attention_dropout=0.0, decoder_layers=decoder_layers,
                      transformer_impl="local")
    tc = build_transformer_config(cfg, ParallelConfig(), PrecisionConfig())
    model = MLMModel(tc, get_layer_spec("local", L)[0], cfg.padded_vocab_size(), 64, decoder_layers=decoder_layers,
                     decoder_layer_spec=decoder_spec(cfg) if decoder_layers else None)
    with torch.no_grad():  # non-trivial biases, so a mix-up of rows would show
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def mlm3_batch(batch, tok):
    """The demo batch re-masked as 3ML masks: half of each row's real tokens, all [MASK]."""
    b = {k: v.clone() for k, v in batch.items()}
    g = torch.Generator().manual_seed(3)
    pick = (torch.rand(b["text"].shape, generator=g) < 0.5) & b["padding_mask"].bool()
    pick[:, 0] = False  # [CLS]
    b["labels"] = torch.where(pick, batch["text"], torch.zeros_like(batch["text"]))
    b["loss_mask"] = pick.long()
    b["text"] = torch.where(pick, torch.full_like(b["text"], tok.mask), b["text"])
    return b


def step(model, policy, batch, chunk):
    model.lm_head_chunk_size = chunk
    model.zero_grad(set_to_none=True)
    calls = []
    hook = model.output_layer.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    out = model(**policy.model_inputs(batch, 0))
    total, n, _ = policy.loss(out)
    (total / n).backward()
    hook.remove()
    return out.lm_losses.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}, calls


@pytest.mark.parametrize("method", ["vanilla", "3ml"])
def test_chunked_head_equals_full_head(demo_batch, demo_tokenizer, method):
    tok = demo_tokenizer
    if method == "3ml":
        model, batch = make_model(tok.vocab_size, decoder_layers=2), mlm3_batch(demo_batch, tok)
        policy = get_policy("3ml", tokenizer=tok, num_layers=L, decoder_layers=2)
    else:
        model, batch, policy = make_model(tok.vocab_size), demo_batch, get_policy("vanilla")
    m = int(batch["loss_mask"].sum())
    if method == "3ml":
        assert m > 0.4 * int(batch["padding_mask"].sum())
    ref_losses, ref_grads, calls = step(model, policy, batch, 0)
    assert calls == [m]
    for chunk in (7, m):  # a ragged last chunk; one chunk
        losses, grads, calls = step(model, policy, batch, chunk)
        sizes = [min(chunk, m - s) for s in range(0, m, chunk)]
        assert calls == sizes + sizes[::-1]  # each chunk's forward, then its recompute in backward
        torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6, msg=f"{name} chunk {chunk}")


def test_chunked_head_without_grad(demo_batch, demo_tokenizer):
    """Evaluation (no autograd): chunks without checkpoints, same losses."""
    model, policy = make_model(demo_tokenizer.vocab_size), get_policy("vanilla")
    with torch.no_grad():
        ref = model(**policy.model_inputs(demo_batch, 0)).lm_losses
        model.lm_head_chunk_size = 5
        got = model(**policy.model_inputs(demo_batch, 0)).lm_losses
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


METHODS = {"vanilla": [], "3ml": ["--method", "3ml"]}
STEPS = 2


@pytest.fixture(scope="module")
def tp2_results(tmp_path_factory, demo_data_prefix, demo_tokenizer_dir, test_cache_dir):
    tmp = tmp_path_factory.mktemp("lm_head_chunks")
    base = tiny_model_args(demo_data_prefix, demo_tokenizer_dir, os.path.join(test_cache_dir, "dc"))
    refs = {m: {"args": base + a, "steps": STEPS, "grads": True, "save_init": str(tmp / f"init_{m}")}
            for m, a in METHODS.items()}
    ref = run_scenarios(tmp, 1, refs, "refs")
    scen = {m: {"args": base + a + ["--tensor-model-parallel-size", "2", "--lm-head-chunk-size", "5",
                                    "--load", str(tmp / f"init_{m}")], "steps": STEPS, "grads": True}
            for m, a in METHODS.items()}
    return ref, run_scenarios(tmp, 2, scen, "tp2")


@pytest.mark.parametrize("method", list(METHODS))
def test_chunked_head_tp2_equals_single_process(tp2_results, method):
    """Each TP rank holds half the vocabulary; the chunks' max and sum-exp are all-reduced as
    in megatron-core's vocab-parallel cross-entropy: same losses and gradients as TP=1 unchunked."""
    ref, got = tp2_results[0][method], tp2_results[1][method]
    for a, b in zip(got["steps"], ref["steps"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (method, a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=5e-5), (method, a, b)
    assert set(got["grads"]) == set(ref["grads"])
    for name, g in got["grads"].items():
        g, r = np.asarray(g), np.asarray(ref["grads"][name])
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * max(np.abs(r).max(), 1e-3), err_msg=name)


def test_negative_chunk_size_is_refused(demo_data_prefix, demo_tokenizer_dir, test_cache_dir):
    from megatron_effmlm.arguments import parse_args
    from megatron_effmlm.config import ConfigError

    args = tiny_model_args(demo_data_prefix, demo_tokenizer_dir, os.path.join(test_cache_dir, "dc"))
    with pytest.raises(ConfigError, match=r"^--lm-head-chunk-size must be >= 0 \(0: no chunking\), got -1$"):
        parse_args(args + ["--lm-head-chunk-size", "-1"])


def test_step_time_memory_mode_reports_the_chunked_head(repo_root, tmp_path, demo_tokenizer_dir, test_cache_dir):
    """bench/step_time.py --mode memory: with the head in chunks, the fp32 logits of the m
    predicted tokens (m x V x 4 bytes) are no longer saved for backward."""
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "bench/step_time.py", "--quick", "--mode", "memory", "--methods", "vanilla,3ml",
                        "--results-dir", str(tmp_path), "--tag", "q",
                        "--data-dir", test_cache_dir, "--tokenizer-vocab", "4096"],  # the suite's corpus and tokenizer
                       cwd=repo_root, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(tmp_path / "step_time_q.json"))
    c = res["config"]
    tokens = c["real_token_fraction"] * c["micro_batch_size"] * c["seq_length"]
    for row in res["methods"]:
        if row["method"] == "megatron-bert":
            assert "saved_bytes_head_chunked" not in row
            continue
        logits = c["predicted_fraction"][row["method"]] * tokens * c["model_vocab_padded"] * 4
        saved = row["saved_bytes"] - row["saved_bytes_head_chunked"]
        assert 0.75 * logits < saved < 1.33 * logits, (row["method"], saved, logits)
