"""Layer-spec selection: Transformer Engine where TE and a GPU exist, megatron-core's local
modules elsewhere. The choice and its reason are logged once."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings

import torch
from megatron.core.transformer.spec_utils import ModuleSpec

logger = logging.getLogger(__name__)


class TorchLayerNorm(torch.nn.LayerNorm):
    """torch LayerNorm for the local spec, usable with sequence parallelism.

    megatron-core's `WrappedTorchNorm` refuses `sequence_parallel` without Apex or TE. Under
    sequence parallelism each TP rank normalises its own sequence shard with replicated
    weights, so their gradients are partial sums: tagging the parameters
    `sequence_parallel` makes megatron-core's `finalize_model_grads` all-reduce them over TP.
    """

    def __init__(self, config, hidden_size, eps=1e-5, persist_layer_norm=False,
                 zero_centered_gamma=False, normalization="LayerNorm"):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in self.parameters():
            setattr(p, "sequence_parallel", config.sequence_parallel)


def out_of_place_attention_mask(attention_scores, attention_mask):
    """megatron-core's `attention_mask_func` without the in-place `masked_fill_`: the scores are a
    view of the baddbmm output, so the in-place fill made autograd's backward copy and re-stride
    the whole [b, np, sq, sk] gradient (CopySlices): an fp32 BERT step at T = 512 on 2 CPU cores
    took 0.98 s with it and 0.81 s without. Same values."""
    return attention_scores.masked_fill(attention_mask, -10000.0)


def use_out_of_place_attention_mask(module: torch.nn.Module) -> int:
    """Set `out_of_place_attention_mask` on every megatron-core core attention under `module`."""
    n = 0
    for m in module.modules():
        softmax = getattr(m, "scale_mask_softmax", None)
        if softmax is not None and hasattr(softmax, "mask_func"):
            softmax.mask_func = out_of_place_attention_mask
            n += 1
    return n


def _sdpa_attention_class():
    from megatron.core import tensor_parallel
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_effmlm.model.packed_attention import is_packing, packed_attention

    class SDPAttention(DotProductAttention):
        """megatron-core's DotProductAttention computed by torch's fused
        `scaled_dot_product_attention` (flash / memory-efficient kernels on a GPU): the local
        spec's fast attention where Transformer Engine is missing. Same parameters, same
        masks (True = blocked), same RNG tracker for attention dropout. Given the engine's
        packing (int32 segment bounds) where the mask goes, it attends over packed live tokens
        (--attention-backend varlen)."""

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            packed = is_packing(attention_mask)
            if self.softmax_offset is not None or attention_bias is not None or packed_seq_params is not None \
                    or getattr(self.scale_mask_softmax, "window_size", None) is not None:
                return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                       packed_seq_params)
            rep = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
            if rep > 1:
                key, value = key.repeat_interleave(rep, dim=2), value.repeat_interleave(rep, dim=2)
            if packed:  # live tokens packed by rows, no mask (model/packed_attention.py)
                if self.training and self.attention_dropout.p > 0:
                    raise RuntimeError("packed attention has no dropout: use --attention-dropout 0")
                return packed_attention(query, key, value, attention_mask, self.softmax_scale)
            # [s, b, np, hn] -> [b, np, s, hn]
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            allowed = None if attention_mask is None else ~attention_mask  # SDPA: True = attend
            p = self.attention_dropout.p if self.training else 0.0
            rng = tensor_parallel.get_cuda_rng_tracker().fork() if not self.config.sequence_parallel and p > 0 \
                else contextlib.nullcontext()
            with rng:
                ctx = torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=allowed, dropout_p=p, scale=self.softmax_scale)
            sq, b = query.shape[0], query.shape[1]
            return ctx.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)  # [sq, b, hp]

    return SDPAttention


def _local_block_spec(num_layers: int, attention: str = "local"):
    """megatron-core's local BERT layer spec with `TorchLayerNorm` where Apex is absent, and
    torch SDPA as core attention when `attention == "sdpa"`."""
    from megatron.core.models.bert import bert_layer_specs
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    layer = bert_layer_specs.bert_layer_local_spec
    norm = bert_layer_specs.LNImpl
    sub = layer.submodules
    if not bert_layer_specs.HAVE_APEX:
        norm = TorchLayerNorm
        sub = dataclasses.replace(sub, input_layernorm=norm, pre_mlp_layernorm=norm)
    if attention in ("sdpa", "varlen"):
        attn = sub.self_attention
        attn = ModuleSpec(module=attn.module, params=attn.params,
                          submodules=dataclasses.replace(attn.submodules, core_attention=_sdpa_attention_class()))
        sub = dataclasses.replace(sub, self_attention=attn)
    from megatron_effmlm.model import dropout

    if dropout.use_dropout15():  # CPU: integer-mask dropout (model/dropout.py)
        sub = dataclasses.replace(sub, self_attn_bda=dropout.get_bias_dropout_add, mlp_bda=dropout.get_bias_dropout_add)
    layer = ModuleSpec(module=layer.module, params=layer.params, submodules=sub)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=norm)


def with_cross_attention(block_spec, transformer_impl: str, attention: str = "local"):
    """3ML-cross's decoder: the block's layers plus megatron-core's cross-attention submodules
    (queries from the decoder stream, keys/values from the encoder output)."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.transformer.attention import CrossAttention, CrossAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType

    if transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear, TEDotProductAttention, TENorm, TERowParallelLinear)

        q, kv, core, proj, norm = (TEColumnParallelLinear, TEColumnParallelLinear, TEDotProductAttention,
                                   TERowParallelLinear, TENorm)
    else:
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        core = _sdpa_attention_class() if attention in ("sdpa", "varlen") else DotProductAttention
        q, kv, proj = ColumnParallelLinear, ColumnParallelLinear, RowParallelLinear
        norm = block_spec.layer_norm
    from megatron_effmlm.model import dropout

    bda = dropout.get_bias_dropout_add if transformer_impl != "transformer_engine" and dropout.use_dropout15() \
        else get_bias_dropout_add
    layers = []
    for layer in block_spec.layer_specs:
        layers.append(ModuleSpec(
            module=layer.module,
            params=layer.params,
            submodules=dataclasses.replace(
                layer.submodules,
                pre_cross_attn_layernorm=norm,
                cross_attention=ModuleSpec(
                    module=CrossAttention,
                    params={"attn_mask_type": AttnMaskType.padding},
                    submodules=CrossAttentionSubmodules(linear_q=q, linear_kv=kv, core_attention=core, linear_proj=proj),
                ),
                cross_attn_bda=bda,
            ),
        ))
    return dataclasses.replace(block_spec, layer_specs=layers)


def get_layer_spec(transformer_impl: str = "auto", num_layers: int = 1, attention_backend: str = "auto",
                   post_layernorm: bool = False, attention_dropout: float = 0.0, half: bool = False):
    """Return (block spec, resolved transformer_impl, `Backends`) for `num_layers` layers.
    `post_layernorm`: original BERT/RoBERTa blocks (model/post_ln.py), local modules only.
    `attention_dropout`, `half` (bf16/fp16): what `auto` needs to choose packed attention."""
    from megatron_effmlm.model.backends import select_backends

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Apex is not installed": expected on CPU
        from megatron.core.models.bert import bert_layer_specs

    if post_layernorm:
        if transformer_impl == "transformer_engine":
            raise ValueError("--transformer-impl transformer_engine: post-LayerNorm layers (--model-arch bert|roberta) "
                             "exist for the local spec only")
        transformer_impl = "local"
    b = select_backends(transformer_impl, attention_backend, attention_dropout, half)
    if post_layernorm:
        b.reasons["layer spec"] = "local (post-LayerNorm layers use the local spec)"
    if b.transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm
        from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

        layer = bert_layer_specs.get_bert_layer_with_transformer_engine_spec()
        return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=TENorm), b.transformer_impl, b
    block = _local_block_spec(num_layers, b.attention)
    if post_layernorm:
        from megatron_effmlm.model.post_ln import post_ln_layer_spec

        layer = post_ln_layer_spec(block.layer_specs[0], block.layer_norm)
        block = dataclasses.replace(block, layer_specs=[layer] * num_layers, layer_norm=None)  # no final LN
    return block, b.transformer_impl, b
