"""One model forward + backward of every method in a chosen precision, and the comparison of
two such runs (loss and per-parameter gradient cosine). Used by the CPU bf16 tests
(tests/test_bf16_cpu.py) and the GPU tests (tests/test_gpu.py)."""

import torch

L, H, NH = 4, 128, 4
METHODS = ["vanilla", "3ml", "3ml-cross", "token-drop", "sctd", "random-ltd"]


def tiny_model(vocab, precision="fp32", impl="local", attention="local", method="vanilla", arch="megatron-bert"):
    from megatron_effmlm.config import ModelConfig, ParallelConfig, PrecisionConfig, build_transformer_config
    from megatron_effmlm.model.builder import build_model

    torch.manual_seed(0)
    dec = dict(decoder_layers=2, decoder_type="cross" if method == "3ml-cross" else "self") if method.startswith("3ml") else {}
    cfg = ModelConfig(num_layers=L, hidden_size=H, num_attention_heads=NH, seq_length=64, vocab_size=vocab,
                      hidden_dropout=0.0, attention_dropout=0.0, transformer_impl=impl, attention_backend=attention,
                      model_arch=arch, **dec)
    prec = PrecisionConfig(bf16=precision == "bf16", fp16=precision == "fp16")
    tc = build_transformer_config(cfg, ParallelConfig(), prec)
    return build_model(cfg, ParallelConfig(), tc, wrap_ddp=False)[0]


def policy_for(method, tok):
    from megatron_effmlm.plans import get_policy

    opts = {"3ml": dict(decoder_layers=2), "3ml-cross": dict(decoder_layers=2, decoder_type="cross"),
            "token-drop": dict(td_keep_ratio=0.4), "sctd": dict(td_keep_ratio=0.4),
            "random-ltd": dict(ltd_start=20, ltd_steps=100, ltd_granularity=4)}.get(method, {})
    return get_policy(method.replace("-cross", ""), tokenizer=tok, num_layers=L, seed=3, **opts)


def batch_for(demo_batch, tok, method, device="cpu"):
    batch = {k: v.clone().to(device) for k, v in demo_batch.items()}
    if method.startswith("3ml"):
        batch["text"][batch["loss_mask"].bool()] = tok.mask
    return batch


def loss_and_grads(model, method, tok, batch):
    """Step 0 (ScTD's consistency step): the mean loss and every parameter's gradient in fp32."""
    model.zero_grad()
    policy = policy_for(method, tok)
    out = model(**policy.model_inputs(batch, 0))
    total, n, _ = policy.loss(out)
    (total / n).backward()
    grads = {k: p.grad.float() for k, p in model.named_parameters() if p.grad is not None}
    return float(total / n), grads


def compare(ref, other, loss_rtol, min_cos):
    (l1, g1), (l2, g2) = ref, other
    assert abs(l2 - l1) <= loss_rtol * abs(l1), (l1, l2)
    assert g1.keys() == g2.keys()
    for k in g1:
        a, b = g1[k].flatten(), g2[k].flatten()
        if a.norm() < 1e-8:
            continue
        cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
        assert cos >= min_cos, (k, cos)
