"""Post-LayerNorm blocks, as in the original BERT and RoBERTa (`--model-arch bert|roberta`).

megatron-core's `TransformerLayer` normalises before attention and MLP (pre-LN). The original
models normalise after each residual add: x = LN(x + Attn(x)); x = LN(x + MLP(x)), and have a
LayerNorm on the embedding sum and no final LayerNorm. `PostLNTransformerLayer` is the unchanged
megatron-core layer with identity pre-norms and a LayerNorm applied to the output of each
bias-dropout-add, so the token-plan engine, TP/SP/PP and recomputation see an ordinary layer.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer


class PostLNTransformerLayer(TransformerLayer):
    def __init__(self, config, submodules, *args, norm=None, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        make = lambda: norm(config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)  # noqa: E731
        self.post_attention_layernorm = make()
        self.post_mlp_layernorm = make()
        self.self_attn_bda = _then_norm(self.self_attn_bda, self.post_attention_layernorm)
        self.mlp_bda = _then_norm(self.mlp_bda, self.post_mlp_layernorm)


def _then_norm(bda, norm):
    """megatron-core calls `bda(training, fused)(x_with_bias, residual, p)`; normalise its output."""

    def make(training, fused):
        f = bda(training, fused)
        return lambda x_with_bias, residual, prob: norm(f(x_with_bias, residual, prob))

    return make


def post_ln_layer_spec(layer_spec: ModuleSpec, norm) -> ModuleSpec:
    """A pre-LN layer spec turned post-LN: same attention/MLP submodules, norms moved after the adds."""
    if layer_spec.submodules.cross_attention is not IdentityOp:
        raise ValueError("post-LayerNorm layers have no cross-attention variant")
    return ModuleSpec(
        module=PostLNTransformerLayer,
        params=dict(layer_spec.params or {}, norm=norm),
        submodules=dataclasses.replace(layer_spec.submodules, input_layernorm=IdentityOp, pre_mlp_layernorm=IdentityOp),
    )


class NormThenDropout(torch.nn.Module):
    """BERT's embedding output: LayerNorm of the sum, then dropout (replaces megatron-core's
    embedding dropout, so sequence parallelism's scatter and RNG fork stay as they are)."""

    def __init__(self, norm: torch.nn.Module, dropout: torch.nn.Module):
        super().__init__()
        self.norm, self.dropout = norm, dropout

    def forward(self, x):
        return self.dropout(self.norm(x))
