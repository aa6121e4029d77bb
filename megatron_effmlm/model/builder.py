"""Build the model chunks this rank holds, wrapped in megatron-core's DDP."""

from __future__ import annotations

import logging
from typing import Optional

import torch

from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

from megatron_effmlm.config import ModelConfig, ParallelConfig, PrecisionConfig
from megatron_effmlm.model.mlm_model import MLMModel, tie_injection_params
from megatron_effmlm.model.specs import get_layer_spec, use_out_of_place_attention_mask, with_cross_attention

logger = logging.getLogger(__name__)


def build_transformer_config(model: ModelConfig, par: ParallelConfig, prec: PrecisionConfig,
                             stage_layers: Optional[list] = None):
    """megatron-core's TransformerConfig for this run.

    CPU-friendly switches are megatron-core's own: CPU initialisation when there is no GPU,
    no gradient-accumulation fusion and no fused kernels unless CUDA is there.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_effmlm.model.backends import select_backends

    on_gpu = torch.cuda.is_available()
    kernels = select_backends(model.transformer_impl, model.attention_backend, model.attention_dropout,
                              prec.bf16 or prec.fp16)
    te_attention = {}
    if kernels.transformer_impl == "transformer_engine":
        from megatron.core.transformer.enums import AttnBackend

        te_attention = dict(attention_backend=AttnBackend[model.attention_backend])
    fp8, torchao_fp8 = {}, None
    if prec.fp8_format and kernels.transformer_impl == "transformer_engine":
        fp8 = dict(fp8=prec.fp8_format, fp8_recipe=prec.fp8_recipe or "delayed", fp8_margin=prec.fp8_margin,
                   fp8_amax_history_len=prec.fp8_amax_history_len,
                   fp8_amax_compute_algo=prec.fp8_amax_compute_algo)
    elif prec.fp8_format:  # local spec: torchao in the parallel linears, applied by the model builder
        torchao_fp8 = (prec.fp8_format, prec.fp8_recipe or "tensorwise", prec.fp8_compile)
    tc = TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        ffn_hidden_size=model.ffn_hidden_size,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        layernorm_epsilon=model.layernorm_epsilon,
        attention_softmax_in_fp32=model.attention_softmax_in_fp32,
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_size(model.num_layers),
        sequence_parallel=par.sequence_parallel,
        recompute_granularity=par.recompute_granularity,
        # "full" recomputes each layer on its own (the engine may change the live tokens between layers)
        recompute_method="uniform" if par.recompute_granularity == "full" else None,
        recompute_num_layers=1 if par.recompute_granularity == "full" else None,
        bf16=prec.bf16,
        fp16=prec.fp16,
        params_dtype=prec.params_dtype,
        pipeline_dtype=prec.params_dtype,
        use_cpu_initialization=not on_gpu,
        # Fused kernels where this machine has them (model/backends.py logs the choice).
        # (not with torchao's FP8: its weight gradient goes to .grad, not into Apex's fused accumulation)
        gradient_accumulation_fusion=kernels.grad_accum_fusion and torchao_fp8 is None,
        bias_activation_fusion=kernels.jit_fusions and model.bias_gelu_fusion,
        bias_dropout_fusion=kernels.jit_fusions and model.bias_dropout_fusion,
        masked_softmax_fusion=False,  # the attention is fused as a whole instead (TE or SDPA)
        persist_layer_norm=kernels.fused_layer_norm,
        **te_attention,
        **fp8,
        apply_rope_fusion=False,
        # The MLM loss is a mean over predicted tokens of the whole global batch.
        calculate_per_token_loss=True,
        # 3ML and token dropping change the number of live tokens between pipeline stages
        # (shapes exchanged by megatron_effmlm.parallel.p2p).
        variable_seq_lengths=par.pipeline_model_parallel_size > 1,
        # A ring of two interleaved stages sends to its previous and next stage, the same rank,
        # in one call: batched, the two messages can be matched the wrong way round; megatron-core's
        # unbatched path orders them by rank parity on two groups.
        batch_p2p_comm=not (par.pipeline_model_parallel_size == 2 and par.num_layers_per_virtual_pipeline_stage),
        moe_token_dispatcher_type="alltoall",  # "allgather" refuses variable_seq_lengths
        pipeline_model_parallel_layout=_layout(stage_layers),
    )
    if torchao_fp8:  # megatron-core's fp8 fields mean Transformer Engine: torchao's settings ride beside them
        from megatron_effmlm.model.fp8_torchao import CONFIG_ATTR

        setattr(tc, CONFIG_ATTR, torchao_fp8)
    return tc


def _layout(stage_layers):
    if not stage_layers:
        return None
    from megatron_effmlm.parallel.balance import layout_string

    return layout_string(stage_layers)


def build_model(model_cfg: ModelConfig, par_cfg: ParallelConfig, transformer_config, wrap_ddp: bool = True):
    """Return the list of model chunks of this rank (one per virtual pipeline stage)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    vp_size = transformer_config.virtual_pipeline_model_parallel_size or 1
    vocab = model_cfg.padded_vocab_size(par_cfg.tensor_model_parallel_size)
    chunks = []
    for vp in range(vp_size):
        vp_stage = vp if vp_size > 1 else None
        half = transformer_config.bf16 or transformer_config.fp16
        spec, impl, backends = get_layer_spec(
            model_cfg.transformer_impl, get_num_layers_to_build(transformer_config, vp_stage=vp_stage),
            model_cfg.attention_backend, post_layernorm=model_cfg.post_layernorm,
            attention_dropout=model_cfg.attention_dropout, half=half,
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
                decoder_layer_spec=decoder_spec(model_cfg, half) if model_cfg.decoder_layers else None,
                post_layernorm=model_cfg.post_layernorm,
                num_tokentypes=model_cfg.num_tokentypes,
                lm_head_chunk_size=model_cfg.lm_head_chunk_size,
                packed_attention=backends.attention == "varlen",
            )
        )
    if ps.get_data_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage():
        logger.info("kernels: %s", backends.summary())
    from megatron_effmlm.model.dropout import replace_dropout_modules, use_dropout15
    from megatron_effmlm.model import fp8_torchao

    fp8_linears = 0
    for c in chunks:
        use_out_of_place_attention_mask(c)
        # --fp8-format with the local spec: torchao's float8 GEMMs in the layers' linears
        fp8_linears += fp8_torchao.apply_config_fp8(c, transformer_config)
        if use_dropout15():  # CPU: attention and embedding dropout with integer masks (model/dropout.py)
            replace_dropout_modules(c)
        # Modules built outside megatron-core's layers (torch LayerNorm, the LM head's dense,
        # e_mask) start on the CPU in fp32: move all to the GPU and to the model precision, as
        # Megatron-LM's Float16Module does (the loss itself is computed in fp32).
        if torch.cuda.is_available():
            c.cuda(torch.cuda.current_device())
        if transformer_config.bf16 or transformer_config.fp16:
            c.to(dtype=transformer_config.params_dtype)
        mark_replicated_params(c)
    if fp8_linears and ps.get_data_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0:
        logger.info("fp8: %s", fp8_torchao.describe(transformer_config, fp8_linears))
    tie_injection_params(chunks)
    if not wrap_ddp:
        return chunks
    return ddp_wrap(chunks, transformer_config, par_cfg.use_distributed_optimizer)


def mark_replicated_params(module: torch.nn.Module) -> None:
    """megatron-core's optimizer and grad-norm code read `tensor_model_parallel` on every
    parameter; modules built outside its layers lack it."""
    for p in module.parameters():
        if not hasattr(p, "tensor_model_parallel"):
            p.tensor_model_parallel = False


def ddp_wrap(chunks, transformer_config, use_distributed_optimizer: bool = False) -> list:
    """megatron-core's DDP around each chunk, as the trainer and the benchmarks use it
    (fp32 gradient reduction, no overlap), with identical parameters on every data-parallel rank."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    wrapped = [
        DistributedDataParallel(
            config=transformer_config, ddp_config=ddp_config, module=c, disable_bucketing=(i > 0)
        )
        for i, c in enumerate(chunks)
    ]
    for w in wrapped:
        w.broadcast_params()
    return wrapped


def decoder_spec(model_cfg: ModelConfig, half: bool = False):
    # 3ML's decoder is pre-training machinery, pre-LN whatever the encoder (export drops it).
    spec, impl, b = get_layer_spec(model_cfg.transformer_impl, model_cfg.decoder_layers, model_cfg.attention_backend,
                                   attention_dropout=model_cfg.attention_dropout, half=half)
    return with_cross_attention(spec, impl, b.attention) if model_cfg.decoder_type == "cross" else spec


def unwrap(chunk):
    return chunk.module if isinstance(chunk, DistributedDataParallel) else chunk
