"""Kernel selection (TE / Apex / SDPA and their fallbacks), torch SDPA attention against
megatron-core's DotProductAttention, FP8's live-token padding (it must change no loss, no
gradient and no importance update), and the GPU benchmark's quick mode. CPU."""

import pytest
import torch

from megatron_effmlm.config import ConfigError, ModelConfig, ParallelConfig, PrecisionConfig
from megatron_effmlm.model.builder import build_transformer_config
from megatron_effmlm.model.backends import select_backends
from megatron_effmlm.model.mlm_model import MLMModel
from megatron_effmlm.model.specs import get_layer_spec
from megatron_effmlm.plans import get_policy

L, H, NH = 4, 64, 4
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU fallbacks (tests/test_gpu.py covers CUDA)")


def test_cpu_selects_local_kernels_and_says_why():
    b = select_backends("auto", "auto")
    assert (b.transformer_impl, b.attention, b.fused_layer_norm, b.grad_accum_fusion, b.jit_fusions) == \
        ("local", "local", False, False, False)
    assert b.reasons["layer spec"] == "local (no CUDA device)"
    assert b.reasons["optimizer"] == "torch AdamW (fused)"
    assert select_backends("local", "sdpa").attention == "sdpa"


@pytest.mark.parametrize("impl,attn,message", [
    ("transformer_engine", "auto", "--transformer-impl transformer_engine: no CUDA device"),
    ("local", "flash", "--attention-backend flash selects a Transformer Engine kernel; "
                       "with --transformer-impl local choose auto, sdpa or local"),
])
def test_impossible_kernel_requests_name_the_flag(impl, attn, message):
    with pytest.raises(ValueError) as e:
        select_backends(impl, attn)
    assert str(e.value) == message


@pytest.mark.parametrize("flags,message", [
    (["--transformer-impl", "transformer_engine"], "--transformer-impl transformer_engine: no CUDA device"),
    (["--fp16"], "--fp16 needs a CUDA device; on the CPU use --bf16 (or fp32)"),
])
def test_cli_refuses_gpu_only_flags_on_cpu(flags, message):
    from megatron_effmlm.arguments import parse_args

    with pytest.raises(ConfigError) as e:
        parse_args(["--data-path", "x", "--tokenizer-dir", "y", *flags])
    assert str(e.value) == message


def _model(vocab, attention="local", decoder_layers=0, decoder_type="self"):
    from megatron_effmlm.model.builder import decoder_spec

    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=L, hidden_size=H, num_attention_heads=NH, seq_length=64, vocab_size=vocab,
                      hidden_dropout=0.0, attention_dropout=0.0, decoder_layers=decoder_layers,
                      decoder_type=decoder_type, transformer_impl="local", attention_backend=attention)
    tc = build_transformer_config(cfg, ParallelConfig(), PrecisionConfig())
    return MLMModel(tc, get_layer_spec("local", L, attention)[0], cfg.padded_vocab_size(), 64,
                    decoder_layers=decoder_layers, decoder_layer_spec=decoder_spec(cfg) if decoder_layers else None,
                    packed_attention=attention == "varlen")


def _policy(method, tok):
    # keep ratio 0.4 and 20 random-LTD tokens: live counts that are not multiples of 16
    opts = {"3ml": dict(decoder_layers=2), "3ml-cross": dict(decoder_layers=2, decoder_type="cross"),
            "token-drop": dict(td_keep_ratio=0.4), "sctd": dict(td_keep_ratio=0.4),
            "random-ltd": dict(ltd_start=20, ltd_steps=100, ltd_granularity=4)}.get(method, {})
    p = get_policy(method.replace("-cross", ""), tokenizer=tok, num_layers=L, seed=3, **opts)
    if hasattr(p, "importance"):  # a learned-looking table, so the kept sets are not trivial
        p.importance = torch.rand(tok.vocab_size, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 20
        p._pin()
    return p


def _batch(demo_batch, tok, method):
    batch = {k: v.clone() for k, v in demo_batch.items()}
    if method.startswith("3ml"):
        batch["text"][batch["loss_mask"].bool()] = tok.mask
    return batch


def _loss_and_grads(model, policy, batch, step):
    model.zero_grad()
    out = model(**policy.model_inputs(batch, step))
    total, n, _ = policy.loss(out)
    (total / n).backward()
    return (total / n).detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


METHODS = ["vanilla", "3ml", "3ml-cross", "token-drop", "sctd", "random-ltd"]


@pytest.mark.parametrize("method", METHODS)
def test_sdpa_attention_equals_megatron_dot_product_attention(demo_batch, demo_tokenizer, method):
    tok = demo_tokenizer
    dec = dict(decoder_layers=2, decoder_type="cross" if method == "3ml-cross" else "self") if method.startswith("3ml") else {}
    ref = _model(tok.vocab_size, "local", **dec)
    sdpa = _model(tok.vocab_size, "sdpa", **dec)
    sdpa.load_state_dict(ref.state_dict())
    core = sdpa.encoder.layers[0].self_attention.core_attention
    assert type(core).__name__ == "SDPAttention"
    if method == "3ml-cross":
        assert type(sdpa.decoder.layers[0].cross_attention.core_attention).__name__ == "SDPAttention"
    batch = _batch(demo_batch, tok, method)
    step = 0  # sctd: a consistency step (two passes, KL terms)
    l1, g1 = _loss_and_grads(ref, _policy(method, tok), batch, step)
    l2, g2 = _loss_and_grads(sdpa, _policy(method, tok), batch, step)
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g2.keys()
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("method", METHODS)
def test_packed_attention_equals_padded_sdpa(demo_batch, demo_tokenizer, method):
    """--attention-backend varlen (live tokens packed by row, segment bounds instead of a mask;
    on CPU the segment-by-segment reference of varlen_attn's interface) against padded SDPA:
    the same loss and gradients for every method, cross-attention included."""
    tok = demo_tokenizer
    dec = dict(decoder_layers=2, decoder_type="cross" if method == "3ml-cross" else "self") if method.startswith("3ml") else {}
    ref = _model(tok.vocab_size, "sdpa", **dec)
    packed = _model(tok.vocab_size, "varlen", **dec)
    packed.load_state_dict(ref.state_dict())
    masks = []
    layers = list(packed.encoder.layers) + (list(packed.decoder.layers) if packed.decoder is not None else [])
    cores = [l.self_attention.core_attention for l in layers]
    cores += [l.cross_attention.core_attention for l in layers if hasattr(l.cross_attention, "core_attention")]
    for core in cores:
        core.register_forward_pre_hook(lambda mod, args: masks.append(args[3]))
    batch = _batch(demo_batch, tok, method)
    l1, g1 = _loss_and_grads(ref, _policy(method, tok), batch, 0)
    l2, g2 = _loss_and_grads(packed, _policy(method, tok), batch, 0)
    assert masks and all(m.dtype == torch.int32 for m in masks)  # every core attention ran packed
    if method == "3ml-cross":
        assert any(m.shape[0] == 2 for m in masks)
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g2.keys()
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("cross", [False, True])
def test_packed_attention_function_against_masked_sdpa(cross):
    """packed_attention on ragged rows (a full row, so a zero-length padded segment; a row of
    one token) equals SDPA with the padding mask at every valid query."""
    from megatron_effmlm.model.plan import LiveSet
    from megatron_effmlm.model.packed_attention import live_packing, packed_attention

    g = torch.Generator().manual_seed(0)
    b, n, heads, hn = 3, 7, 2, 4
    q_valid = LiveSet.from_mask(torch.tensor([[1] * 7, [1, 0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0]]).bool()).valid
    kv_valid = LiveSet.from_mask(torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 1, 0]]).bool()).valid \
        if cross else q_valid
    nq, nk = q_valid.shape[1], kv_valid.shape[1]
    q = torch.randn(nq, b, heads, hn, generator=g, requires_grad=True)
    k, v = (torch.randn(nk, b, heads, hn, generator=g, requires_grad=True) for _ in range(2))
    packing = live_packing(q_valid, kv_valid if cross else None)
    out = packed_attention(q, k, v, packing, scale=None)  # [nq, b, heads * hn]
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), attn_mask=kv_valid[:, None, None, :])
    ref = ref.permute(2, 0, 1, 3).reshape(nq, b, heads * hn)
    sel = q_valid.t()  # [nq, b]
    torch.testing.assert_close(out[sel], ref[sel], rtol=1e-6, atol=1e-6)
    assert torch.isfinite(out).all()  # padded queries too
    gq = torch.autograd.grad((out[sel] ** 2).sum(), (q, k, v))
    gr = torch.autograd.grad((ref[sel] ** 2).sum(), (q, k, v))
    for a, r in zip(gq, gr):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


def test_varlen_attention_needs_no_dropout_and_says_so():
    with pytest.raises(ValueError) as e:
        select_backends("local", "varlen", attention_dropout=0.1)
    assert str(e.value) == "--attention-backend varlen has no attention dropout: use --attention-dropout 0 (not 0.1)"
    b = select_backends("local", "varlen")
    assert b.attention == "varlen" and "reference implementation" in b.reasons["attention"]
    assert select_backends("auto", "auto", 0.0, True).attention == "local"  # CPU: padded path stays the default


@pytest.mark.parametrize("method", METHODS)
def test_fp8_live_token_padding_changes_nothing(demo_batch, demo_tokenizer, method):
    """Every live set padded to a multiple of 16 (what FP8 GEMMs need): the same losses and
    gradients, and (token dropping) the same importance table after the update."""
    tok = demo_tokenizer
    dec = dict(decoder_layers=2, decoder_type="cross" if method == "3ml-cross" else "self") if method.startswith("3ml") else {}
    plain = _model(tok.vocab_size, **dec)
    padded = _model(tok.vocab_size, **dec)
    padded.load_state_dict(plain.state_dict())
    padded.live_token_multiple = 16
    batch = _batch(demo_batch, tok, method)
    sizes = {"plain": [], "padded": []}
    hooks = []
    for key, m in (("plain", plain), ("padded", padded)):
        layers = list(m.encoder.layers) + (list(m.decoder.layers) if m.decoder is not None else [])
        for layer in layers:
            hooks.append(layer.register_forward_pre_hook(
                lambda mod, args, kwargs, key=key: sizes[key].append(kwargs["hidden_states"].shape[0]), with_kwargs=True))
    p1, p2 = _policy(method, tok), _policy(method, tok)
    for step in (0, 1):
        l1, g1 = _loss_and_grads(plain, p1, batch, step)
        l2, g2 = _loss_and_grads(padded, p2, batch, step)
        torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
        for k in g1:
            torch.testing.assert_close(g2[k], g1[k], rtol=1e-5, atol=1e-6, msg=k)
        p1.after_step(step + 1)
        p2.after_step(step + 1)
        if hasattr(p1, "importance"):
            torch.testing.assert_close(p2.importance, p1.importance, rtol=0, atol=1e-12)
    for h in hooks:
        h.remove()
    assert all(n % 16 == 0 for n in sizes["padded"]), sizes["padded"]
    if method != "vanilla":  # T = 64 is already a multiple of 16: only changed live sets pad
        assert sizes["padded"] != sizes["plain"], "no live set needed padding: the test would prove nothing"


def test_foreach_fallbacks_equal_megatron_core_local_ones():
    """The sync-free replacements (compat/gpu_fallbacks.py) compute what megatron-core's
    local multi-tensor fallbacks compute."""
    from megatron.core.utils import local_multi_tensor_scale

    from megatron_effmlm.compat.gpu_fallbacks import foreach_l2_norm, foreach_scale

    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(s, generator=g) for s in ((3, 4), (7,), (2, 5, 6))]
    with torch.device("cpu"):
        ours, _ = foreach_l2_norm(0, None, [ts], False)
        theirs = torch.norm(torch.stack([torch.norm(t) for t in ts]))
    torch.testing.assert_close(ours, theirs.reshape(1), rtol=1e-6, atol=0)
    dst1 = [torch.empty_like(t, dtype=torch.bfloat16) for t in ts]
    dst2 = [torch.empty_like(t, dtype=torch.bfloat16) for t in ts]
    foreach_scale(0, None, [ts, dst1], 0.37)
    local_multi_tensor_scale(0, None, [ts, dst2], 0.37)
    for a, b in zip(dst1, dst2):
        assert torch.equal(a, b)
    inplace = [t.clone() for t in ts]
    foreach_scale(0, None, [inplace, inplace], 2.0)
    for a, t in zip(inplace, ts):
        assert torch.equal(a, t * 2.0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_torch_adamw_makes_the_same_update(mcore_single, demo_batch, demo_tokenizer, precision):
    """compat.gpu_fallbacks.fuse_torch_adamw switches megatron-core's torch AdamW fallback to
    torch's fused kernel (on the CPU too): given the same gradients, three megatron-core
    optimizer steps give the same (fp32 main) weights as torch's default update."""
    from megatron_effmlm.compat.cpu import cpu_bf16_error
    from precision_helpers import assert_same_update, fused_and_default_adamw_steps

    if precision == "bf16" and cpu_bf16_error():
        pytest.skip(cpu_bf16_error())
    assert_same_update(*fused_and_default_adamw_steps(demo_tokenizer, demo_batch, precision == "bf16"))


@pytest.mark.parametrize("method", ["vanilla", "3ml-cross"])
def test_out_of_place_attention_mask_changes_nothing(mcore_single, demo_batch, demo_tokenizer, method):
    """Every core attention of a built model masks out of place (model/specs.py); the loss and
    every gradient equal those with megatron-core's in-place attention_mask_func, bit for bit."""
    from megatron.core.transformer.utils import attention_mask_func

    from megatron_effmlm.model.specs import out_of_place_attention_mask
    from precision_helpers import batch_for, loss_and_grads, tiny_model

    model = tiny_model(demo_tokenizer.vocab_size, method=method)
    cores = [m.scale_mask_softmax for m in model.modules() if hasattr(m, "scale_mask_softmax")]
    assert len(cores) == (4 + 2 * 2 if method == "3ml-cross" else 4)  # decoder layers: self + cross
    assert all(c.mask_func is out_of_place_attention_mask for c in cores)
    batch = batch_for(demo_batch, demo_tokenizer, method)
    ours = loss_and_grads(model, method, demo_tokenizer, batch)
    for c in cores:
        c.mask_func = attention_mask_func
    theirs = loss_and_grads(model, method, demo_tokenizer, batch)
    assert ours[0] == theirs[0]
    for k in ours[1]:
        assert torch.equal(ours[1][k], theirs[1][k]), k
