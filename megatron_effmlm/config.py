"""Configuration dataclasses, built once from the command line and passed down explicitly.

Names follow Megatron-LM's flags (`--num-layers` -> `num_layers`), so a Megatron user can
read a config without a glossary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


class ConfigError(ValueError):
    """A flag or value that cannot work; the message names it."""


MODEL_ARCHS = ("megatron-bert", "bert", "roberta")


def pad_vocab_size(vocab_size: int, divisible_by: int = 128, tensor_model_parallel_size: int = 1) -> int:
    """The rows the model allocates: the vocabulary padded so that every TP shard is a multiple of
    `divisible_by` (Megatron-LM's --make-vocab-size-divisible-by). The one place this is computed;
    checkpoints do not depend on it (another TP size loads them, see checkpoint/dist_ckpt.py)."""
    multiple = divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


@dataclass
class ModelConfig:
    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 4
    ffn_hidden_size: Optional[int] = None  # 4 * hidden_size when None
    seq_length: int = 128
    max_position_embeddings: Optional[int] = None  # seq_length when None
    vocab_size: int = 0  # the tokenizer's; padded_vocab_size is what the model allocates
    make_vocab_size_divisible_by: int = 128
    position_embedding_type: str = "learned_absolute"  # or "rope"
    rotary_percent: float = 1.0
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    layernorm_epsilon: float = 1e-5
    bert_binary_head: bool = False
    transformer_impl: str = "auto"  # "local" | "transformer_engine" | "auto"
    attention_backend: str = "auto"  # local spec: sdpa | varlen | local; TE: flash | fused | unfused; auto
    bias_gelu_fusion: bool = True  # megatron-core's fused bias+GELU / bias+dropout+add, on a GPU
    bias_dropout_fusion: bool = True
    # Megatron-LM's --attention-softmax-in-fp32 (off by default there too): a 16-bit model's attention
    # mask and softmax in fp32. Off, torch's softmax still accumulates in fp32 internally; on 2 CPU
    # cores a bf16 BERT step at T = 512 took 0.488 s instead of 0.556 s.
    attention_softmax_in_fp32: bool = False
    decoder_layers: int = 0  # 3ML's decoder (pre-training only; export drops it)
    decoder_type: str = "self"  # 3ML-self, or "cross": the decoder also cross-attends to the encoder
    # "megatron-bert": pre-LN (megatron-core); "bert" / "roberta": post-LN with an embedding
    # LayerNorm, as the original models (exported exactly to BertForMaskedLM / RobertaForMaskedLM)
    model_arch: str = "megatron-bert"
    num_tokentypes: int = 0  # token-type embeddings (2 with --bert-binary-head; imported HF models keep theirs)
    # The LM head + loss on chunks of this many predicted rows, each recomputed in backward
    # (never all [m, V/tp] fp32 logits at once); 0: all rows at once.
    lm_head_chunk_size: int = 0

    @property
    def post_layernorm(self) -> bool:
        return self.model_arch != "megatron-bert"

    def __post_init__(self):
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"--hidden-size {self.hidden_size} is not divisible by "
                f"--num-attention-heads {self.num_attention_heads}"
            )
        if self.seq_length > self.max_position_embeddings:
            raise ConfigError(
                f"--seq-length {self.seq_length} exceeds --max-position-embeddings "
                f"{self.max_position_embeddings} (the position table)"
            )
        if self.lm_head_chunk_size < 0:
            raise ConfigError(f"--lm-head-chunk-size must be >= 0 (0: no chunking), got {self.lm_head_chunk_size}")
        if self.model_arch not in MODEL_ARCHS:
            raise ConfigError(f"--model-arch {self.model_arch!r}: choose one of {', '.join(MODEL_ARCHS)}")
        if self.post_layernorm and self.transformer_impl == "transformer_engine":
            raise ConfigError(f"--model-arch {self.model_arch} (post-LayerNorm) exists for --transformer-impl local only")
        if self.position_embedding_type not in ("learned_absolute", "rope"):
            raise ConfigError(
                f"--position-embedding-type {self.position_embedding_type!r}: "
                "choose learned_absolute or rope"
            )

    def padded_vocab_size(self, tensor_model_parallel_size: int = 1) -> int:
        return pad_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by, tensor_model_parallel_size)


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    recompute_granularity: Optional[str] = None  # "full" (every layer) or "selective" (core attention)
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    pipeline_split_by: str = "layers"  # "layers" (even) or "flops" (balanced by the FLOP model)
    pipeline_stage_layers: Optional[list] = None  # explicit encoder layers per stage

    def virtual_pipeline_size(self, num_layers: int) -> Optional[int]:
        if not self.num_layers_per_virtual_pipeline_stage:
            return None
        return num_layers // self.pipeline_model_parallel_size // self.num_layers_per_virtual_pipeline_stage


@dataclass
class PrecisionConfig:
    bf16: bool = False
    fp16: bool = False
    # FP8 GEMMs (on top of bf16/fp16), Megatron-LM's flag names: through Transformer Engine with
    # its layer spec, through torchao with the local spec (model/fp8_torchao.py).
    fp8_format: Optional[str] = None  # "hybrid" (e4m3 forward, e5m2 backward) | "e4m3"
    # TE: "delayed" | "tensorwise" | "blockwise" | "mxfp8"; torchao: "tensorwise" | "rowwise";
    # None: the provider's default (TE delayed, torchao tensorwise)
    fp8_recipe: Optional[str] = None
    fp8_compile: bool = False  # torchao only: torch.compile its float8 casts and GEMMs
    fp8_margin: int = 0
    fp8_amax_history_len: int = 1
    fp8_amax_compute_algo: str = "most_recent"
    # fp16 loss scaling: a constant --loss-scale, else dynamic from --initial-loss-scale.
    loss_scale: Optional[float] = None
    initial_loss_scale: float = 2.0**32
    min_loss_scale: float = 1.0
    loss_scale_window: float = 1000
    hysteresis: int = 2

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32


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

