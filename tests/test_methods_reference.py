"""Each method's loss and gradients equal a straightforward plain-PyTorch computation on the
same weights and a real batch with ragged rows (fp32, 1e-5). The references loop over rows
and never pad, so they share nothing with the engine's gather/scatter machinery."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_effmlm.config import ModelConfig, ParallelConfig, PrecisionConfig
from megatron_effmlm.model.builder import build_transformer_config
from megatron_effmlm.model.mlm_model import MLMModel
from megatron_effmlm.model.specs import get_layer_spec
from megatron_effmlm.plans import get_policy

L, H, NH = 4, 64, 4


def make_model(vocab, decoder_layers=0, decoder_type="self"):
    from megatron_effmlm.model.builder import decoder_spec

    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=L, hidden_size=H, num_attention_heads=NH, seq_length=64, vocab_size=vocab,
                      hidden_dropout=0.0, attention_dropout=0.0, decoder_layers=decoder_layers,
                      decoder_type=decoder_type, transformer_impl="local")
    tc = build_transformer_config(cfg, ParallelConfig(), PrecisionConfig())
    model = MLMModel(tc, get_layer_spec("local", L)[0], cfg.padded_vocab_size(), 64,
                     decoder_layers=decoder_layers,
                     decoder_layer_spec=decoder_spec(cfg) if decoder_layers else None)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return cfg, model


class Ref:
    """Plain-PyTorch pre-LN BERT on one row (x: [n, H]), from the model's parameters."""

    def __init__(self, model, eps):
        self.p = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
        self.eps = eps

    def ln(self, x, name):
        return F.layer_norm(x, (H,), self.p[name + ".weight"], self.p[name + ".bias"], self.eps)

    def lin(self, x, name):
        return x @ self.p[name + ".weight"].T + self.p[name + ".bias"]

    def layer(self, x, prefix, context=None):
        n, hd = x.shape[0], H // NH
        q, k, v = self.lin(self.ln(x, prefix + "input_layernorm"), prefix + "self_attention.linear_qkv") \
            .view(n, NH, 3 * hd).split(hd, -1)
        x = x + self.lin(self.attend(q, k, v), prefix + "self_attention.linear_proj")
        if context is not None:  # 3ML-cross: queries from the stream, keys/values from the encoder
            q = self.lin(self.ln(x, prefix + "pre_cross_attn_layernorm"), prefix + "cross_attention.linear_q")
            k, v = self.lin(context, prefix + "cross_attention.linear_kv").view(-1, NH, 2 * hd).split(hd, -1)
            x = x + self.lin(self.attend(q.view(n, NH, hd), k, v), prefix + "cross_attention.linear_proj")
        h = self.ln(x, prefix + "pre_mlp_layernorm")
        return x + self.lin(F.gelu(self.lin(h, prefix + "mlp.linear_fc1")), prefix + "mlp.linear_fc2")

    def attend(self, q, k, v):
        att = (torch.einsum("qnd,knd->nqk", q, k) / math.sqrt(q.shape[-1])).softmax(-1)
        return torch.einsum("nqk,knd->qnd", att, v).reshape(q.shape[0], H)

    def embed(self, ids, pos):
        return self.p["embedding.word_embeddings.weight"][ids] + self.p["embedding.position_embeddings.weight"][pos]

    def head_losses(self, x, labels):
        h = self.ln(F.gelu(self.lin(x, "lm_head.dense")), "lm_head.layer_norm")
        logits = h @ self.p["embedding.word_embeddings.weight"].T + self.p["output_layer.bias"]
        return F.cross_entropy(logits, labels, reduction="none")


def rows(batch):
    """Per row: real positions, predicted positions (in order), their labels."""
    for r in range(batch["text"].shape[0]):
        real = batch["padding_mask"][r].nonzero().squeeze(1)
        pred = batch["loss_mask"][r].nonzero().squeeze(1)
        yield r, real, pred, batch["labels"][r, pred]


def engine_loss(model, policy, batch, step=0):
    out = model(**policy.model_inputs(batch, step))
    total, n, _ = policy.loss(out)
    loss = total / n
    loss.backward()
    return loss, out


def assert_same(model, ref, loss, ref_loss):
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    ref_loss.backward()
    for name, p in model.named_parameters():
        g = ref.p[name].grad
        if g is None:
            g = torch.zeros_like(p)
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6, msg=name)


def test_3ml(demo_batch, demo_tokenizer):
    tok = demo_tokenizer
    batch = {k: v.clone() for k, v in demo_batch.items()}
    batch["text"][batch["loss_mask"].bool()] = tok.mask  # 3ML masks without 80/10/10
    cfg, model = make_model(tok.vocab_size, decoder_layers=2)
    loss, out = engine_loss(model, get_policy("3ml", tokenizer=tok, num_layers=L, decoder_layers=2), batch)

    ref = Ref(model, cfg.layernorm_epsilon)
    losses = []
    for r, real, pred, labels in rows(batch):
        kept = real[batch["text"][r, real] != tok.mask]
        masked = real[batch["text"][r, real] == tok.mask]
        x = ref.embed(batch["text"][r, kept], kept)
        for l in range(L):
            x = ref.layer(x, f"encoder.layers.{l}.")
        x = ref.ln(x, "encoder.final_layernorm")
        inj = ref.p["mask_embedding"] + ref.p["embedding.position_embeddings.weight"][masked]
        x = torch.cat([x, inj])  # append the masks; their positions are in `order`
        order = torch.cat([kept, masked])
        for l in range(2):
            x = ref.layer(x, f"decoder.layers.{l}.")
        x = ref.ln(x, "decoder.final_layernorm")
        slot = {int(p): i for i, p in enumerate(order)}
        losses.append(ref.head_losses(x[[slot[int(p)] for p in pred]], labels))
    # The encoder saw fewer tokens than the sequence, and rows differ in [MASK] counts.
    assert out.lm_losses.numel() == sum(l.numel() for l in losses)
    assert_same(model, ref, loss, torch.cat(losses).mean())


def test_3ml_cross(demo_batch, demo_tokenizer):
    """Decoder stream = the masked positions; self-attention among them, cross-attention to
    the encoder output."""
    tok = demo_tokenizer
    batch = {k: v.clone() for k, v in demo_batch.items()}
    batch["text"][batch["loss_mask"].bool()] = tok.mask
    cfg, model = make_model(tok.vocab_size, decoder_layers=2, decoder_type="cross")
    policy = get_policy("3ml", tokenizer=tok, num_layers=L, decoder_layers=2, decoder_type="cross")
    loss, out = engine_loss(model, policy, batch)
    ref = Ref(model, cfg.layernorm_epsilon)
    losses = []
    for r, real, pred, labels in rows(batch):
        kept = real[batch["text"][r, real] != tok.mask]
        x = ref.embed(batch["text"][r, kept], kept)
        for l in range(L):
            x = ref.layer(x, f"encoder.layers.{l}.")
        enc = ref.ln(x, "encoder.final_layernorm")
        y = ref.p["mask_embedding"] + ref.p["embedding.position_embeddings.weight"][pred]
        for l in range(2):
            y = ref.layer(y, f"decoder.layers.{l}.", context=enc)
        losses.append(ref.head_losses(ref.ln(y, "decoder.final_layernorm"), labels))
    assert_same(model, ref, loss, torch.cat(losses).mean())


def _token_drop_reference(ref, batch, importance, keep_ratio, full=False):
    """Per row: layers 0..c-1 on all; layer c on all, kept outputs continue; layers c+1..L-2 on
    kept; dropped tokens return with their pre-layer-c states for the last layer."""
    c = L // 2 - 1
    losses, firsts = [], {L - 2: [], L - 1: []}
    for r, real, pred, labels in rows(batch):
        x = ref.embed(batch["text"][r, real], real)
        scores = importance[batch["text"][r, real]]
        k = max(1, round(keep_ratio * real.numel()))
        keep_slots = torch.sort(torch.sort(scores, descending=True, stable=True).indices[:k]).values
        for l in range(L):
            if not full and l == c:
                saved = x
            if not full and l == c + 1:
                x_full_after_c = x
                x = x[keep_slots]
            if not full and l == L - 1:
                back = saved.clone()
                back[keep_slots] = x
                x = back
            x = ref.layer(x, f"encoder.layers.{l}.")
            if l in firsts:
                firsts[l].append(x[0])  # [CLS] is position 0 and always kept (slot 0)
        x = ref.ln(x, "encoder.final_layernorm")
        losses.append(ref.head_losses(x[pred], labels))  # real positions start at 0
    return torch.cat(losses), {l: torch.stack(v) for l, v in firsts.items()}


def test_token_drop(demo_batch, demo_tokenizer):
    tok = demo_tokenizer
    cfg, model = make_model(tok.vocab_size)
    policy = get_policy("token-drop", tokenizer=tok, num_layers=L)
    g = torch.Generator().manual_seed(3)
    policy.importance = torch.rand(tok.vocab_size, generator=g, dtype=torch.float64) * 20  # a learned-looking table
    policy._pin()
    loss, out = engine_loss(model, policy, demo_batch)
    ref = Ref(model, cfg.layernorm_epsilon)
    ref_losses, _ = _token_drop_reference(ref, demo_batch, policy.importance, 0.5)
    assert_same(model, ref, loss, ref_losses.mean())


@pytest.mark.parametrize("decoder_type", ["self", "cross"])
def test_3ml_td(demo_batch, demo_tokenizer, decoder_type):
    """3ML whose encoder drops tokens: layers 0..c-1 on the unmasked tokens, layer c on them
    all, layers c+1..L-2 on the kept ones (top half of each row's unmasked tokens by
    importance), the dropped ones back with their pre-layer-c states for the last encoder
    layer; then the mask vectors and the decoder as in 3ML."""
    tok = demo_tokenizer
    batch = {k: v.clone() for k, v in demo_batch.items()}
    batch["text"][batch["loss_mask"].bool()] = tok.mask
    cfg, model = make_model(tok.vocab_size, decoder_layers=2, decoder_type=decoder_type)
    policy = get_policy("3ml-td", tokenizer=tok, num_layers=L, decoder_layers=2, decoder_type=decoder_type)
    policy.importance = torch.rand(tok.vocab_size, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 20
    policy._pin()
    loss, out = engine_loss(model, policy, batch)
    ref = Ref(model, cfg.layernorm_epsilon)
    c, losses, dropped = L // 2 - 1, [], 0
    for r, real, pred, labels in rows(batch):
        unmasked = real[batch["text"][r, real] != tok.mask]
        masked = real[batch["text"][r, real] == tok.mask]
        x = ref.embed(batch["text"][r, unmasked], unmasked)
        scores = policy.importance[batch["text"][r, unmasked]]
        k = max(1, round(0.5 * unmasked.numel()))
        keep_slots = torch.sort(torch.sort(scores, descending=True, stable=True).indices[:k]).values
        dropped += unmasked.numel() - k
        for l in range(L):
            if l == c:
                saved = x
            if l == c + 1:
                x = x[keep_slots]
            if l == L - 1:
                back = saved.clone()
                back[keep_slots] = x
                x = back
            x = ref.layer(x, f"encoder.layers.{l}.")
        x = ref.ln(x, "encoder.final_layernorm")
        if decoder_type == "cross":
            y = ref.p["mask_embedding"] + ref.p["embedding.position_embeddings.weight"][pred]
            for l in range(2):
                y = ref.layer(y, f"decoder.layers.{l}.", context=x)
            losses.append(ref.head_losses(ref.ln(y, "decoder.final_layernorm"), labels))
            continue
        inj = ref.p["mask_embedding"] + ref.p["embedding.position_embeddings.weight"][masked]
        x, order = torch.cat([x, inj]), torch.cat([unmasked, masked])
        for l in range(2):
            x = ref.layer(x, f"decoder.layers.{l}.")
        x = ref.ln(x, "decoder.final_layernorm")
        slot = {int(p): i for i, p in enumerate(order)}
        losses.append(ref.head_losses(x[[slot[int(p)] for p in pred]], labels))
    assert dropped > 0
    assert_same(model, ref, loss, torch.cat(losses).mean())


@pytest.mark.parametrize("compat", [False, True])
def test_sctd_consistency_step(demo_batch, demo_tokenizer, compat):
    tok = demo_tokenizer
    cfg, model = make_model(tok.vocab_size)
    policy = get_policy("sctd", tokenizer=tok, num_layers=L, sctd_interval=10, sctd_code_compat=compat)
    policy.importance = torch.rand(tok.vocab_size, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 20
    policy._pin()
    loss, out = engine_loss(model, policy, demo_batch, step=10)  # 10 % 10 == 0: a consistency step
    assert out.consistency is not None
    ref = Ref(model, cfg.layernorm_epsilon)
    drop, drop_first = _token_drop_reference(ref, demo_batch, policy.importance, 0.5)
    full, full_first = _token_drop_reference(ref, demo_batch, policy.importance, 0.5, full=True)
    # KL(p_full || p_drop) over the hidden dimension, summed over the batch: F.kl_div's
    # convention takes log-probabilities of the second distribution as its first argument.
    kl = sum((F.softmax(full_first[l], -1) * (F.log_softmax(full_first[l], -1) - F.log_softmax(drop_first[l], -1))).sum()
             for l in (L - 2, L - 1))
    mlm_full = drop if compat else full
    # The published code's one normaliser: MLM sums and the KL sum over the predicted tokens.
    n = drop.numel()
    assert_same(model, ref, loss, (0.5 * drop.sum() + 0.5 * mlm_full.sum() + 0.05 * kl) / n)


@pytest.mark.parametrize("kl_weight", [0.05, 2.0])
def test_sctd_loss_does_not_depend_on_the_micro_batch_split(demo_batch, demo_tokenizer, kl_weight):
    """The same 4 rows as 1 micro-batch of 4 and as 4 of 1 (the schedule sums the micro-batches'
    loss sums and divides by the global predicted-token count): same loss and gradients."""
    tok = demo_tokenizer
    _, model = make_model(tok.vocab_size)
    policy = get_policy("sctd", tokenizer=tok, num_layers=L, sctd_interval=10, sctd_kl_weight=kl_weight)

    def step(micro_batches):
        model.zero_grad()
        parts = []
        for mb in micro_batches:
            out = model(**policy.model_inputs(mb, 10))
            assert out.consistency is not None
            total, n, report = policy.loss(out)
            parts.append((total, n, report["consistency kl"]))
        n = sum(int(p[1]) for p in parts)
        loss = sum(p[0] for p in parts) / n
        loss.backward()
        kl = sum(p[2] for p in parts)
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}, kl

    one_by_four = step([demo_batch])
    four_by_one = step([{k: v[i:i + 1] for k, v in demo_batch.items()} for i in range(4)])
    torch.testing.assert_close(one_by_four[0], four_by_one[0], rtol=1e-5, atol=1e-6)
    for name, g in one_by_four[1].items():
        torch.testing.assert_close(g, four_by_one[1][name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(one_by_four[2], four_by_one[2])  # the reported KL per row, too
    assert one_by_four[2][0] > 0 and one_by_four[2][1] == 4


def test_sctd_plain_step_is_token_dropping(demo_batch, demo_tokenizer):
    tok = demo_tokenizer
    _, model = make_model(tok.vocab_size)
    policy = get_policy("sctd", tokenizer=tok, num_layers=L, sctd_interval=10)
    out = model(**policy.model_inputs(demo_batch, 3))
    assert out.consistency is None and not out.captured


def test_random_ltd(demo_batch, demo_tokenizer):
    tok = demo_tokenizer
    cfg, model = make_model(tok.vocab_size)
    policy = get_policy("random-ltd", tokenizer=tok, num_layers=L, ltd_start=16, ltd_steps=100, seed=5)
    plan = policy.plan(demo_batch, 0)
    policy.plan = lambda b, s: plan  # the reference reads the same sampled subsets
    loss, _ = engine_loss(model, policy, demo_batch)
    ref = Ref(model, cfg.layernorm_epsilon)
    losses = []
    for r, real, pred, labels in rows(demo_batch):
        x = ref.embed(demo_batch["text"][r, real], real)
        for l in range(L):
            live = plan.steps.get(l)
            if live is None or live.live.identity:
                x = ref.layer(x, f"encoder.layers.{l}.")
            else:
                sel = live.live.idx[r][live.live.valid[r]]
                assert sel.numel() == min(16, real.numel()) and torch.all(sel[1:] > sel[:-1])
                x = x.clone()
                x[sel] = ref.layer(x[sel], f"encoder.layers.{l}.")  # the others pass unchanged
        x = ref.ln(x, "encoder.final_layernorm")
        losses.append(ref.head_losses(x[pred], labels))
    assert_same(model, ref, loss, torch.cat(losses).mean())


def test_sctd_kl_direction_and_reduction():
    """KL(p_full || p_drop), softmax over the hidden dimension, summed over batch and hidden."""
    from megatron_effmlm.plans.sctd import consistency_kl

    g = torch.Generator().manual_seed(0)
    drop, full = torch.randn(3, 16, generator=g) * 3, torch.randn(3, 16, generator=g) * 3
    p_full, p_drop = full.softmax(-1), drop.softmax(-1)
    expected = (p_full * (p_full.log() - p_drop.log())).sum()
    swapped = (p_drop * (p_drop.log() - p_full.log())).sum()
    assert abs(expected - swapped) > 0.1  # the two directions differ on these inputs
    torch.testing.assert_close(consistency_kl(drop, full), expected)


def test_flop_count_follows_the_plan(demo_batch, demo_tokenizer):
    """The engine counts the FLOP model on the shapes it ran: 3ML's encoder on the kept tokens
    (padded to the row maximum), its decoder on all, the head on the predicted tokens."""
    from megatron_effmlm.model.flops import head_flops, layer_flops

    tok = demo_tokenizer
    batch = {k: v.clone() for k, v in demo_batch.items()}
    batch["text"][batch["loss_mask"].bool()] = tok.mask
    _, model = make_model(tok.vocab_size, decoder_layers=2)
    b, T = batch["text"].shape
    m = int(batch["loss_mask"].sum())
    n_kept = int((batch["padding_mask"].bool() & (batch["text"] != tok.mask)).sum(1).max())
    vocab = model.vocab_size
    model.forward_flops = 0.0
    model(**get_policy("vanilla").model_inputs(batch, 0))  # no plan: all layers, decoder included, on T
    assert model.forward_flops == (L + 2) * b * layer_flops(T, H, 4 * H) + head_flops(m, H, vocab)
    model.forward_flops = 0.0
    model(**get_policy("3ml", tokenizer=tok, num_layers=L, decoder_layers=2).model_inputs(batch, 0))
    expected = L * b * layer_flops(n_kept, H, 4 * H) + 2 * b * layer_flops(T, H, 4 * H) + head_flops(m, H, vocab)
    assert model.forward_flops == expected and n_kept < T


@pytest.mark.parametrize("method,opts", [
    ("vanilla", {}), ("3ml", dict(decoder_layers=2)), ("3ml", dict(decoder_layers=2, decoder_type="cross")),
    ("token-drop", dict(td_keep_ratio=0.5)), ("sctd", dict(td_keep_ratio=0.5, sctd_interval=2)),
    ("random-ltd", dict(ltd_start=32, ltd_steps=1000, ltd_granularity=16)), ("3ml-td", dict(decoder_layers=2)),
], ids=["vanilla", "3ml", "3ml-cross", "token-drop", "sctd", "random-ltd", "3ml-td"])
def test_policy_flop_model_matches_what_the_engine_ran(demo_batch, demo_tokenizer, method, opts):
    """Each policy's own FLOP model (`layer_costs`: what the progress line, the budget's schedule,
    pipeline balancing and the benchmarks use) against the engine's count of what it ran on a
    real batch: within 10% (the analytic model takes round(p T) masked tokens in every row, the
    batch has its own counts). random-LTD at its start length."""
    from megatron_effmlm.model.flops import Shape
    from megatron_effmlm.plans import POLICIES

    tok = demo_tokenizer
    batch = {k: v.clone() for k, v in demo_batch.items()}
    if method.startswith("3ml"):
        batch["text"][batch["loss_mask"].bool()] = tok.mask
    dec = dict(decoder_layers=2, decoder_type=opts.get("decoder_type", "self")) if method.startswith("3ml") else {}
    _, model = make_model(tok.vocab_size, **dec)
    b, T = batch["text"].shape
    policy = get_policy(method, tokenizer=tok, num_layers=L, **opts)
    model.forward_flops = 0.0
    model(**policy.model_inputs(batch, 1))  # sctd: a plain (dropping) step
    enc, extra = POLICIES[method].layer_costs(
        Shape(L, T, H, 4 * H, model.vocab_size, 0.15), **opts, **({"ltd_len": 32} if method == "random-ltd" else {}))
    assert len(enc) == L
    assert b * (sum(enc) + extra) == pytest.approx(model.forward_flops, rel=0.1)
