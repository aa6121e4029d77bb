"""--recompute-granularity full | selective: the same loss and gradients as without
recomputation, for every method, with dropout on (the recomputed forward must replay the
dropout masks: CPU generator and megatron-core's RNG tracker). With EFFMLM_TEST_GPU=1 on a GPU
the same comparisons also run there (CUDA generator, megatron-core's CUDA tracker)."""


import pytest
import torch

from conftest import GPU_TESTS
from megatron_effmlm.config import ModelConfig, ParallelConfig, PrecisionConfig
from megatron_effmlm.model.builder import build_transformer_config, decoder_spec
from megatron_effmlm.model.mlm_model import MLMModel
from megatron_effmlm.model.specs import get_layer_spec
from megatron_effmlm.plans import get_policy

CASES = {  # method: (model options, policy options)
    "vanilla": ({}, {}),
    "token-drop": ({}, {}),
    "sctd": ({}, {}),  # step 0: a consistency step (both passes recomputed)
    "random-ltd": ({}, {"ltd_start": 20, "ltd_steps": 100, "ltd_granularity": 4}),
    "3ml": ({"decoder_layers": 1}, {"decoder_layers": 1}),
    "3ml-cross": ({"decoder_layers": 1, "decoder_type": "cross"}, {"decoder_layers": 1, "decoder_type": "cross"}),
}
DEVICES = ["cpu"] + (["cuda"] if GPU_TESTS and torch.cuda.is_available() else [])


def _grads(method, recompute, batch, tok, device="cpu"):
    from megatron.core import tensor_parallel

    model_kw, policy_kw = CASES[method]
    cfg = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=64, vocab_size=tok.vocab_size,
                      hidden_dropout=0.1, attention_dropout=0.1, transformer_impl="local", **model_kw)
    tc = build_transformer_config(cfg, ParallelConfig(recompute_granularity=recompute), PrecisionConfig())
    torch.manual_seed(0)
    model = MLMModel(tc, get_layer_spec("local", 4)[0], cfg.padded_vocab_size(), 64,
                     decoder_layers=cfg.decoder_layers,
                     decoder_layer_spec=decoder_spec(cfg) if cfg.decoder_layers else None).to(device)
    policy = get_policy(method.replace("-cross", ""), tokenizer=tok, num_layers=4, **policy_kw)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("model-parallel-rng", 77)  # the stream attention dropout forks
    torch.manual_seed(123)
    out = model(**policy.model_inputs(batch, 0))
    total, n, _ = policy.loss(out)
    (total / n).backward()
    return (total / n).item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", list(CASES))
@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_recompute_matches(demo_batch, demo_tokenizer, method, recompute, device):
    batch = {k: v.clone().to(device) for k, v in demo_batch.items()}
    if method.startswith("3ml"):
        batch["text"][batch["loss_mask"].bool()] = demo_tokenizer.mask
    loss0, g0 = _grads(method, None, batch, demo_tokenizer, device)
    loss1, g1 = _grads(method, recompute, batch, demo_tokenizer, device)
    assert g0.keys() == g1.keys()
    # CPU: bit-equal forward; a GPU's atomics (scatter-add backward, cuBLAS) reorder sums
    tol = dict(rtol=1e-6, atol=1e-7) if device == "cpu" else dict(rtol=1e-4, atol=1e-6)
    assert loss0 == pytest.approx(loss1, rel=0 if device == "cpu" else 1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], **tol, msg=name)


def test_dropout_is_really_on(demo_batch, demo_tokenizer):
    """Guard: two runs with different RNG seeds differ, so the equality above is about RNG replay."""
    from megatron.core import tensor_parallel

    a, _ = _grads("vanilla", None, demo_batch, demo_tokenizer)
    torch.manual_seed(999)
    cfg = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=64,
                      vocab_size=demo_tokenizer.vocab_size, hidden_dropout=0.1, attention_dropout=0.1)
    tc = build_transformer_config(cfg, ParallelConfig(), PrecisionConfig())
    torch.manual_seed(0)
    model = MLMModel(tc, get_layer_spec("local", 4)[0], cfg.padded_vocab_size(), 64)
    torch.manual_seed(124)  # another dropout stream
    out = model(**get_policy("vanilla").model_inputs(demo_batch, 0))
    assert out.lm_losses.mean().item() != a
