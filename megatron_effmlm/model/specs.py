"""Layer-spec selection: Transformer Engine where TE and a GPU exist, megatron-core's local
modules elsewhere. The choice and its reason are logged once."""

from __future__ import annotations

import dataclasses
import logging
import warnings

import torch
from megatron.core.transformer.spec_utils import ModuleSpec

logger = logging.getLogger(__name__)


def te_available() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False, "transformer_engine is not installed"
    return True, "Transformer Engine and a CUDA device are present"


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


def _local_block_spec(num_layers: int):
    """megatron-core's local BERT layer spec with `TorchLayerNorm` where Apex is absent."""
    from megatron.core.models.bert import bert_layer_specs
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    layer = bert_layer_specs.bert_layer_local_spec
    norm = bert_layer_specs.LNImpl
    if not bert_layer_specs.HAVE_APEX:
        norm = TorchLayerNorm
        layer = ModuleSpec(
            module=layer.module,
            params=layer.params,
            submodules=dataclasses.replace(layer.submodules, input_layernorm=norm, pre_mlp_layernorm=norm),
        )
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=norm)


def with_cross_attention(block_spec, transformer_impl: str):
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

        q, kv, core, proj = ColumnParallelLinear, ColumnParallelLinear, DotProductAttention, RowParallelLinear
        norm = block_spec.layer_norm
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
                cross_attn_bda=get_bias_dropout_add,
            ),
        ))
    return dataclasses.replace(block_spec, layer_specs=layers)


def get_layer_spec(transformer_impl: str = "auto", num_layers: int = 1, post_layernorm: bool = False):
    """Return (block spec, impl_name, reason) for `num_layers` layers on this stage.
    `post_layernorm`: original BERT/RoBERTa blocks (model/post_ln.py), local modules only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Apex is not installed": expected on CPU
        from megatron.core.models.bert import bert_layer_specs

    ok, why = te_available()
    if post_layernorm:
        if transformer_impl == "transformer_engine":
            raise ValueError("--transformer-impl transformer_engine: post-LayerNorm layers (--model-arch bert|roberta) "
                             "exist for the local spec only")
        ok, why = False, "post-LayerNorm layers use the local spec"
    if transformer_impl == "auto":
        transformer_impl = "transformer_engine" if ok else "local"
    if transformer_impl == "transformer_engine":
        if not ok:
            raise ValueError(f"--transformer-impl transformer_engine: {why}")
        from megatron.core.extensions.transformer_engine import TENorm
        from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

        layer = bert_layer_specs.get_bert_layer_with_transformer_engine_spec()
        return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=TENorm), "transformer_engine", why
    if transformer_impl != "local":
        raise ValueError(f"--transformer-impl {transformer_impl!r}: choose local, transformer_engine or auto")
    block = _local_block_spec(num_layers)
    if post_layernorm:
        from megatron_effmlm.model.post_ln import post_ln_layer_spec

        layer = post_ln_layer_spec(block.layer_specs[0], block.layer_norm)
        block = dataclasses.replace(block, layer_specs=[layer] * num_layers, layer_norm=None)  # no final LN
    return block, "local", why if not ok else "requested"
