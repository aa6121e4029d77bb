"""Build the model chunks this rank holds, wrapped in megatron-core's DDP."""

from __future__ import annotations

import logging

from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

from megatron_effmlm.config import ModelConfig, ParallelConfig
from megatron_effmlm.model.mlm_model import MLMModel
from megatron_effmlm.model.specs import get_layer_spec, with_cross_attention

logger = logging.getLogger(__name__)


def build_model(model_cfg: ModelConfig, par_cfg: ParallelConfig, transformer_config, wrap_ddp: bool = True):
    """Return the list of model chunks of this rank (one per virtual pipeline stage)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    vp_size = transformer_config.virtual_pipeline_model_parallel_size or 1
    vocab = model_cfg.padded_vocab_size(par_cfg.tensor_model_parallel_size)
    chunks = []
    for vp in range(vp_size):
        vp_stage = vp if vp_size > 1 else None
        spec, impl, why = get_layer_spec(
            model_cfg.transformer_impl, get_num_layers_to_build(transformer_config, vp_stage=vp_stage),
            post_layernorm=model_cfg.post_layernorm,
        )
        chunks.append(
            MLMModel(
                config=transformer_config,
                transformer_layer_spec=spec,
                vocab_size=vocab,
                max_sequence_length=model_cfg.max_position_embeddings,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                position_embedding_type=model_cfg.position_embedding_type,
                rotary_percent=model_cfg.rotary_percent,
                add_binary_head=model_cfg.bert_binary_head,
                vp_stage=vp_stage,
                decoder_layers=model_cfg.decoder_layers,
                decoder_layer_spec=decoder_spec(model_cfg) if model_cfg.decoder_layers else None,
                post_layernorm=model_cfg.post_layernorm,
                num_tokentypes=model_cfg.num_tokentypes,
            )
        )
    if ps.get_data_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage():
        logger.info("layer spec: %s (%s)", impl, why)
    for c in chunks:
        for p in c.parameters():
            # megatron-core's optimizer and grad-norm code read this attribute
            if not hasattr(p, "tensor_model_parallel"):
                p.tensor_model_parallel = False
    if not wrap_ddp:
        return chunks
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=par_cfg.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    wrapped = [
        DistributedDataParallel(
            config=transformer_config, ddp_config=ddp_config, module=c, disable_bucketing=(i > 0)
        )
        for i, c in enumerate(chunks)
    ]
    for w in wrapped:
        w.broadcast_params()  # identical start on every data-parallel rank
    return wrapped


def decoder_spec(model_cfg: ModelConfig):
    # 3ML's decoder is pre-training machinery, pre-LN whatever the encoder (export drops it).
    spec, impl, _ = get_layer_spec(model_cfg.transformer_impl, model_cfg.decoder_layers)
    return with_cross_attention(spec, impl) if model_cfg.decoder_type == "cross" else spec


def unwrap(chunk):
    return chunk.module if isinstance(chunk, DistributedDataParallel) else chunk
