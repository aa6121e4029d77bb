"""The model's MLM loss and gradients equal a plain-PyTorch computation of the same weights
on a real demo batch (fp32, dropout off)."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_effmlm.config import ModelConfig, ParallelConfig, PrecisionConfig
from megatron_effmlm.model.builder import build_transformer_config
from megatron_effmlm.model.mlm_model import MLMModel
from megatron_effmlm.model.specs import get_layer_spec
from megatron_effmlm.plans import get_policy


def reference_losses(sd, cfg: ModelConfig, ids, pad, loss_mask, labels, rope=False):
    """Pre-LN BERT encoder + BERT LM head, written out; per-predicted-token cross-entropy."""
    b, s = ids.shape
    H, nh = cfg.hidden_size, cfg.num_attention_heads
    hd, eps = H // nh, cfg.layernorm_epsilon

    def ln(x, name):
        return F.layer_norm(x, (H,), sd[name + ".weight"], sd[name + ".bias"], eps)

    def lin(x, name):
        return x @ sd[name + ".weight"].T + sd[name + ".bias"]

    x = sd["embedding.word_embeddings.weight"][ids]  # [b, s, H]
    if not rope:
        x = x + sd["embedding.position_embeddings.weight"][:s][None]
    else:
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        ang = torch.outer(torch.arange(s, dtype=torch.float32), inv)
        ang = torch.cat([ang, ang], -1)[None, :, None, :]  # [1, s, 1, hd]

        def rot(t):
            t1, t2 = t.chunk(2, dim=-1)
            return t * ang.cos() + torch.cat([-t2, t1], -1) * ang.sin()

    for l in range(cfg.num_layers):
        p = f"encoder.layers.{l}."
        qkv = lin(ln(x, p + "input_layernorm"), p + "self_attention.linear_qkv")
        q, k, v = qkv.view(b, s, nh, 3 * hd).split(hd, dim=-1)  # each [b, s, nh, hd]
        if rope:
            q, k = rot(q), rot(k)
        scores = torch.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(pad[:, None, None, :] == 0, -10000.0)
        ctx = torch.einsum("bnqk,bknd->bqnd", scores.softmax(-1), v).reshape(b, s, H)
        x = x + lin(ctx, p + "self_attention.linear_proj")
        h = ln(x, p + "pre_mlp_layernorm")
        x = x + lin(F.gelu(lin(h, p + "mlp.linear_fc1")), p + "mlp.linear_fc2")
    x = ln(x, "encoder.final_layernorm")
    sel = loss_mask.bool()
    h = ln(F.gelu(lin(x[sel], "lm_head.dense")), "lm_head.layer_norm")  # [m, H], row-major
    logits = h @ sd["embedding.word_embeddings.weight"].T + sd["output_layer.bias"]
    return F.cross_entropy(logits, labels[sel], reduction="none")


@pytest.mark.parametrize("pos", ["learned_absolute", "rope"])
def test_loss_and_grads_match_reference(demo_batch, demo_tokenizer, pos):
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=64,
                      vocab_size=demo_tokenizer.vocab_size, hidden_dropout=0.0, attention_dropout=0.0,
                      position_embedding_type=pos)
    tc = build_transformer_config(cfg, ParallelConfig(), PrecisionConfig())
    spec, _, _ = get_layer_spec("local", cfg.num_layers)
    model = MLMModel(tc, spec, cfg.padded_vocab_size(), cfg.max_position_embeddings, position_embedding_type=pos)
    # Non-trivial LayerNorm and bias values, so a mix-up of weights would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)

    policy = get_policy("vanilla")
    out = model(**policy.model_inputs(demo_batch, 0))
    loss_sum, n, _ = policy.loss(out)
    (loss_sum / n).backward()

    params = {k: p.detach().clone().requires_grad_(True) for k, p in model.named_parameters()}
    ref = reference_losses(params, cfg, demo_batch["text"], demo_batch["padding_mask"],
                           demo_batch["loss_mask"], demo_batch["labels"], rope=(pos == "rope"))
    assert int(n) == int(demo_batch["loss_mask"].sum()) == ref.numel()
    torch.testing.assert_close(out.lm_losses, ref, rtol=1e-5, atol=1e-5)
    ref.mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-5, atol=1e-6, msg=name)


def test_head_runs_on_predicted_positions_only(demo_batch, demo_tokenizer):
    """The output layer sees [m, 1, h], m = predicted tokens, never [s, b, h]."""
    cfg = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4, seq_length=64,
                      vocab_size=demo_tokenizer.vocab_size, hidden_dropout=0.0, attention_dropout=0.0)
    tc = build_transformer_config(cfg, ParallelConfig(), PrecisionConfig())
    spec, _, _ = get_layer_spec("local", 1)
    model = MLMModel(tc, spec, cfg.padded_vocab_size(), cfg.max_position_embeddings)
    seen = []
    model.output_layer.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    model(**get_policy("vanilla").model_inputs(demo_batch, 0))
    assert seen == [(int(demo_batch["loss_mask"].sum()), 1, 64)]


def test_binary_head_loss_matches_reference(demo_batch, demo_tokenizer):
    """--bert-binary-head: token types enter the embedding; the sentence-order loss is the CE
    of Linear(tanh(Dense(h_final[0]))) against is_random."""
    torch.manual_seed(1)
    cfg = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4, seq_length=64,
                      vocab_size=demo_tokenizer.vocab_size, hidden_dropout=0.0, attention_dropout=0.0,
                      bert_binary_head=True)
    tc = build_transformer_config(cfg, ParallelConfig(), PrecisionConfig())
    model = MLMModel(tc, get_layer_spec("local", 1)[0], cfg.padded_vocab_size(), 64, add_binary_head=True)
    batch = dict(demo_batch)
    batch["types"] = (torch.arange(64) >= 30).long().expand(4, 64).clone()
    batch["is_random"] = torch.tensor([0, 1, 1, 0])
    policy = get_policy("vanilla", binary_head=True)
    out = model(**policy.model_inputs(batch, 0))

    finals = {}
    hook = model.encoder.final_layernorm.register_forward_hook(lambda m, i, o: finals.__setitem__("h", o))
    model(**policy.model_inputs(batch, 0))
    hook.remove()
    sd = dict(model.named_parameters())
    pooled = torch.tanh(finals["h"][0] @ sd["pooler.dense.weight"].T + sd["pooler.dense.bias"])
    logits = pooled @ sd["binary_head.weight"].T + sd["binary_head.bias"]
    torch.testing.assert_close(out.binary_loss, F.cross_entropy(logits, batch["is_random"], reduction="none"))
    # the token types reach the embedding: changing them changes the MLM losses
    batch2 = dict(batch, types=torch.zeros_like(batch["types"]))
    assert not torch.allclose(model(**policy.model_inputs(batch2, 0)).lm_losses, out.lm_losses)
