"""The GPU paths: bf16 / fp16 against fp32, torch SDPA against megatron-core's attention,
the Transformer Engine spec against the local spec, FP8 training, and the trainer end to end
in 16-bit precision. Run on a GPU machine with

    EFFMLM_TEST_GPU=1 .venv/bin/python -m pytest -q tests/test_gpu.py

(without EFFMLM_TEST_GPU=1 the suite hides CUDA and tests the CPU path, so these skip)."""

import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import GPU_TESTS, tiny_model_args
from precision_helpers import METHODS, batch_for
from precision_helpers import compare as _compare
from precision_helpers import loss_and_grads as _run
from precision_helpers import tiny_model as _model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (GPU_TESTS and torch.cuda.is_available()), reason="needs a CUDA device and EFFMLM_TEST_GPU=1"),
]

def _batch(demo_batch, tok, method):
    return batch_for(demo_batch, tok, method, "cuda")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_16bit_matches_fp32(mcore_single, demo_batch, demo_tokenizer, method, precision):
    tok = demo_tokenizer
    ref = _model(tok.vocab_size, method=method)
    half = _model(tok.vocab_size, precision, method=method)
    half.load_state_dict(ref.state_dict())
    assert next(half.parameters()).dtype == (torch.bfloat16 if precision == "bf16" else torch.float16)
    batch = _batch(demo_batch, tok, method)
    _compare(_run(ref, method, tok, batch), _run(half, method, tok, batch), loss_rtol=2e-2, min_cos=0.98)


@pytest.mark.parametrize("method", ["vanilla", "3ml", "token-drop"])
def test_post_layernorm_bert_16bit_matches_fp32(mcore_single, demo_batch, demo_tokenizer, method):
    """--model-arch bert (post-LN, embedding LayerNorm) in bf16 against fp32."""
    tok = demo_tokenizer
    ref = _model(tok.vocab_size, method=method, arch="bert")
    half = _model(tok.vocab_size, "bf16", method=method, arch="bert")
    half.load_state_dict(ref.state_dict())
    batch = _batch(demo_batch, tok, method)
    _compare(_run(ref, method, tok, batch), _run(half, method, tok, batch), loss_rtol=2e-2, min_cos=0.98)


@pytest.mark.parametrize("method", METHODS)
def test_sdpa_matches_local_attention_bf16(mcore_single, demo_batch, demo_tokenizer, method):
    tok = demo_tokenizer
    ref = _model(tok.vocab_size, "bf16", attention="local", method=method)
    sdpa = _model(tok.vocab_size, "bf16", attention="sdpa", method=method)
    sdpa.load_state_dict(ref.state_dict())
    assert type(sdpa.encoder.layers[0].self_attention.core_attention).__name__ == "SDPAttention"
    batch = _batch(demo_batch, tok, method)
    _compare(_run(ref, method, tok, batch), _run(sdpa, method, tok, batch), loss_rtol=1e-2, min_cos=0.99)


def _te_state_from_local(sd):
    """Local-spec parameter names -> the TE spec's (LayerNorms fused into the next linear)."""
    out = {}
    for k, v in sd.items():
        k2 = k.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight") \
              .replace("input_layernorm.bias", "self_attention.linear_qkv.layer_norm_bias") \
              .replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight") \
              .replace("pre_mlp_layernorm.bias", "mlp.linear_fc1.layer_norm_bias") \
              .replace("pre_cross_attn_layernorm.weight", "pre_cross_attn_layernorm.weight")
        out[k2] = v
    return out


@pytest.mark.parametrize("method", METHODS)
def test_transformer_engine_spec_matches_local_bf16(mcore_single, demo_batch, demo_tokenizer, method):
    from megatron_effmlm.model.backends import te_status

    ok, why = te_status()
    if not ok:
        pytest.skip(f"Transformer Engine: {why}")
    tok = demo_tokenizer
    ref = _model(tok.vocab_size, "bf16", impl="local", method=method)
    te = _model(tok.vocab_size, "bf16", impl="transformer_engine", attention="auto", method=method)
    missing, unexpected = te.load_state_dict(_te_state_from_local(ref.state_dict()), strict=False)
    assert not [k for k in missing if not k.endswith("_extra_state")], missing
    assert not unexpected, unexpected
    batch = _batch(demo_batch, tok, method)
    (l1, g1), (l2, g2) = _run(ref, method, tok, batch), _run(te, method, tok, batch)
    assert abs(l2 - l1) <= 2e-2 * abs(l1), (l1, l2)


def _pretrain(args, timeout=600):
    env = dict(os.environ, PYTHONWARNINGS="ignore", EFFMLM_TEST_GPU="1")
    r = subprocess.run([sys.executable, "pretrain_effmlm.py", *args], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    losses = [float(x) for x in re.findall(r"\| loss ([0-9.]+)", r.stdout)]
    return r.stdout, losses


@pytest.mark.parametrize("method,precision", [("vanilla", "--bf16"), ("3ml", "--bf16"), ("token-drop", "--bf16"),
                                              ("sctd", "--fp16"), ("random-ltd", "--fp16")])
def test_trainer_16bit_loss_falls(demo_data_prefix, demo_tokenizer_dir, test_cache_dir, method, precision):
    args = tiny_model_args(demo_data_prefix, demo_tokenizer_dir, test_cache_dir, **{
        "--method": method, precision: "", "--num-layers": "4", "--hidden-size": "128", "--train-iters": "40",
        "--micro-batch-size": "8", "--global-batch-size": "16", "--lr": "1e-3", "--log-interval": "5"})
    out, losses = _pretrain(args)
    assert len(losses) == 8, out[-3000:]
    assert losses[-1] < losses[0] - 0.5, losses  # about 8.1 -> 7.1 in fp32 on CPU


def test_fp8_trains(demo_data_prefix, demo_tokenizer_dir, test_cache_dir):
    from megatron_effmlm.model.backends import fp8_status

    ok, why = fp8_status()
    if not ok:
        pytest.skip(f"FP8: {why}")
    args = tiny_model_args(demo_data_prefix, demo_tokenizer_dir, test_cache_dir, **{
        "--bf16": "", "--fp8-format": "hybrid", "--num-layers": "4", "--hidden-size": "128", "--train-iters": "40",
        "--micro-batch-size": "8", "--global-batch-size": "16", "--lr": "1e-3", "--log-interval": "5",
        "--method": "token-drop"})
    out, losses = _pretrain(args)
    assert losses[-1] < losses[0] - 0.5, losses  # about 8.1 -> 7.1 in fp32 on CPU


@pytest.mark.parametrize("method,fmt,recipe", [("vanilla", "hybrid", "tensorwise"), ("vanilla", "e4m3", "rowwise"),
                                               ("3ml-cross", "hybrid", "tensorwise"), ("token-drop", "hybrid", "tensorwise")])
def test_torchao_fp8_matches_bf16(mcore_single, demo_batch, demo_tokenizer, method, fmt, recipe):
    """FP8 without Transformer Engine (model/fp8_torchao.py) on the GPU: every transformer-layer
    GEMM is a torch._scaled_mm, and loss and gradients follow bf16 (tests/test_fp8_torchao.py's
    bounds, which the CPU's reference kernel meets)."""
    from megatron_effmlm.model.backends import fp8_status
    from megatron_effmlm.model.fp8_torchao import transformer_linears
    from test_fp8_torchao import fp8_model, step

    provider, why = fp8_status("local", fmt, recipe)
    if provider != "torchao":
        pytest.skip(f"torchao FP8: {why}")
    tok = demo_tokenizer
    ref = fp8_model(tok.vocab_size, method)
    fp8 = fp8_model(tok.vocab_size, method, fmt, recipe)
    fp8.load_state_dict(ref.state_dict())
    l1, g1, c1 = step(ref, method, tok, demo_batch, "cuda")
    l2, g2, c2 = step(fp8, method, tok, demo_batch, "cuda")
    assert (c1, c2) == (0, 3 * len(list(transformer_linears(fp8))))
    assert abs(l2 - l1) <= 2e-3 * abs(l1), (l1, l2)
    for k in g1:
        cos = torch.nn.functional.cosine_similarity(g1[k].flatten(), g2[k].flatten(), dim=0).item()
        assert cos >= 0.97, (k, cos)


def test_fused_adamw_fallback_same_training(mcore_single, demo_batch, demo_tokenizer):
    """Without TE/Apex, megatron-core's torch AdamW is switched to torch's fused kernel: given
    the same gradients, three bf16 optimizer steps give the same fp32 main weights as torch's
    default (foreach) update. (Gradients are computed once and copied: cuDNN's backward is not
    bit-deterministic, and Adam's first steps amplify tiny gradient differences.)"""
    from megatron_effmlm.model.backends import select_backends
    from precision_helpers import assert_same_update, fused_and_default_adamw_steps

    if select_backends().optimizer != "torch AdamW (fused)":
        pytest.skip("TE or Apex provides the fused Adam here")
    batch = _batch(demo_batch, demo_tokenizer, "vanilla")
    assert_same_update(*fused_and_default_adamw_steps(demo_tokenizer, batch, bf16=True))
