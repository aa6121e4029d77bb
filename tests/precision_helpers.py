"""One model forward + backward of every method in a chosen precision, and the comparison of
two such runs (loss and per-parameter gradient cosine). Used by the CPU bf16 tests
(tests/test_bf16_cpu.py) and the GPU tests (tests/test_gpu.py)."""

import torch

L, H, NH = 4, 128, 4
METHODS = ["vanilla", "3ml", "3ml-cross", "token-drop", "sctd", "random-ltd"]


def tiny_model(vocab, precision="fp32", impl="local", attention="local", method="vanilla", arch="megatron-bert"):
    from megatron_effmlm.config import ModelConfig, ParallelConfig, PrecisionConfig
    from megatron_effmlm.model.builder import build_model, build_transformer_config

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


def fused_and_default_adamw_steps(tok, batch, bf16: bool, steps: int = 3):
    """Two copies of one small model, each with megatron-core's optimizer: one switched to torch's
    fused AdamW (compat.gpu_fallbacks.fuse_torch_adamw), one on torch's default update; both
    take `steps` steps from the same gradients (computed once and copied). Returns the two
    optimizers' main parameters and the fused one's before the steps."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_effmlm.compat.gpu_fallbacks import fuse_torch_adamw
    from megatron_effmlm.config import ModelConfig, ParallelConfig, PrecisionConfig
    from megatron_effmlm.model.builder import build_model, build_transformer_config

    runs, start = [], None
    for fused in (False, True):
        cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=2, seq_length=64, vocab_size=tok.vocab_size,
                          hidden_dropout=0.0, attention_dropout=0.0)
        prec = PrecisionConfig(bf16=bf16)
        ddp = build_model(cfg, ParallelConfig(), build_transformer_config(cfg, ParallelConfig(), prec))[0]
        if start is None:  # the same initial weights for both (the RNG moved on after the first build)
            start = {k: v.clone() for k, v in ddp.module.state_dict().items() if torch.is_tensor(v)}
        ddp.module.load_state_dict(start, strict=False)  # before the optimizer copies its main parameters
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.01, bf16=bf16,
                                                     params_dtype=prec.params_dtype), [ddp])
        assert fuse_torch_adamw(opt) == 1
        if not fused:  # the reference: torch's default update
            for g in opt.optimizer.param_groups:
                g.update(fused=False, foreach=None)
        runs.append((ddp, opt))
    (ddp_a, opt_a), (ddp_b, opt_b) = runs
    before = [p.detach().clone() for g in opt_b.optimizer.param_groups for p in g["params"]]
    for _ in range(steps):
        for ddp, opt in runs:
            ddp.zero_grad_buffer()
            opt.zero_grad()
        loss_and_grads(ddp_a.module, "vanilla", tok, batch)
        ddp_a.finish_grad_sync()
        for pa, pb in zip(ddp_a.module.parameters(), ddp_b.module.parameters()):
            pb.main_grad.copy_(pa.main_grad)
        opt_a.step()
        opt_b.step()
    assert opt_b.optimizer.param_groups[0]["fused"] is True and not opt_a.optimizer.param_groups[0]["fused"]
    main = [[p for g in o.optimizer.param_groups for p in g["params"]] for o in (opt_a, opt_b)]
    return main[0], main[1], before


def assert_same_update(default, fused, before):
    assert default and all(p.dtype == torch.float32 for p in fused)
    assert all(not torch.equal(p, q) for p, q in zip(fused, before) if p.numel() > 1)  # it moved
    for a, b in zip(default, fused):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
