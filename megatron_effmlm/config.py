"""The run's configuration: the one place its defaults, help texts and value checks live.

Each field is declared with `opt(default, help, check=...)`: the dataclass is what the code
reads, and `arguments.py` generates the command line from the same fields (flag
`--num-layers` for field `num_layers`, Megatron-LM's names), so a default or a check is
written once. A field's check runs whenever the dataclass is built, from the command line or
not; checks that need two fields sit in the dataclass's `__post_init__`, and those that need
two dataclasses in `RunConfig`. A method's own flags are declared on its policy
(plans/base.Flag), not here.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, List, Optional

import torch


class ConfigError(ValueError):
    """A flag or value that cannot work; the message names it."""


MODEL_ARCHS = ("megatron-bert", "bert", "roberta")



def positive(v) -> Optional[str]:
    if isinstance(v, float) and not math.isfinite(v):
        return f"must be a finite number, got {v}"
    return None if v > 0 else f"must be > 0, got {v}"


def non_negative(v) -> Optional[str]:
    if isinstance(v, float) and not math.isfinite(v):
        return f"must be a finite number, got {v}"
    return None if v >= 0 else f"must be >= 0, got {v}"


def in_range(low: float, high: float, low_open: bool = False, high_open: bool = False):
    """A check for low <= v <= high, each end open or closed, written as [low, high)."""
    def check(v) -> Optional[str]:
        if isinstance(v, float) and not math.isfinite(v):
            return f"must be a finite number, got {v}"
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        return None if ok else f"must be in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}, got {v}"
    return check


def opt(default: Any = MISSING, help: str = "", *, factory: Optional[Callable] = None,
        check: Optional[Callable[[Any], Optional[str]]] = None, choices=None, flags=None, action=None,
        type=None, nargs=None, cli: bool = True, cli_default: Any = MISSING, group: Optional[str] = None):
    """A configuration field and its command-line flag.

    help: the flag's help (and the field's documentation); check(value) -> what is wrong, or
    None (skipped for None); flags: the option strings when not `--field-name`; action,
    type, nargs, choices: argparse's, where the annotation does not say; cli=False: set by
    code, not by a flag; cli_default: the parser's default when it differs from the field's
    (None: "not given", the field's default or a derived value applies); group: the help
    section, when not the dataclass's."""
    meta = dict(help=help, check=check, choices=choices, flags=flags, action=action, type=type, nargs=nargs,
                cli=cli, group=group)
    if cli_default is not MISSING:
        meta["cli_default"] = cli_default
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def flag_of(f) -> str:
    """The command-line name of a field (`dataclasses.Field`)."""
    return (f.metadata.get("flags") or ["--" + f.name.replace("_", "-")])[0]


def check_fields(cfg) -> None:
    """Each field's own check (ConfigError naming its flag); None is not checked."""
    for f in fields(cfg):
        check, v = f.metadata.get("check"), getattr(cfg, f.name)
        if check is not None and v is not None and (why := check(v)):
            raise ConfigError(f"{flag_of(f)} {why}")


def pad_vocab_size(vocab_size: int, divisible_by: int = 128, tensor_model_parallel_size: int = 1) -> int:
    """The rows the model allocates: the vocabulary padded so that every TP shard is a multiple of
    `divisible_by` (Megatron-LM's --make-vocab-size-divisible-by). The one place this is computed;
    checkpoints do not depend on it (another TP size loads them, see checkpoint/dist_ckpt.py)."""
    multiple = divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


@dataclass
class ModelConfig:
    """The encoder (and 3ML's decoder): megatron-core's TransformerConfig is built from it."""

    num_layers: int = opt(4, "transformer layers of the encoder", check=positive)
    hidden_size: int = opt(256, check=positive)
    num_attention_heads: int = opt(4, check=positive)
    ffn_hidden_size: Optional[int] = opt(None, "default: 4 x --hidden-size", check=positive)
    seq_length: int = opt(128, "tokens per sequence", check=positive)
    max_position_embeddings: Optional[int] = opt(None, "default: --seq-length", check=positive)
    vocab_size: int = opt(0, "model vocabulary (0: the tokenizer's); must be >= the tokenizer's", check=non_negative)
    make_vocab_size_divisible_by: int = opt(128, "pad the vocabulary to a multiple of this x TP", check=positive)
    position_embedding_type: str = opt("learned_absolute", choices=("learned_absolute", "rope"))
    rotary_percent: float = opt(1.0, check=in_range(0.0, 1.0, low_open=True))
    hidden_dropout: float = opt(0.1, check=in_range(0.0, 1.0, high_open=True))
    attention_dropout: float = opt(0.1, check=in_range(0.0, 1.0, high_open=True))
    init_method_std: float = opt(0.02, "std of the normal init of the weights (BERT's 0.02); small widths may need "
                                 "more: at hidden size 128, 0.02 kept a model at the unigram loss where 0.06 "
                                 "learned (bench/context_probe.py)", check=positive)
    layernorm_epsilon: float = opt(1e-5, check=positive)
    bert_binary_head: bool = opt(False, "BERT two-segment input and sentence-order head")
    transformer_impl: str = opt("auto", "layer spec: Transformer Engine where TE and a GPU exist (auto), else "
                                "megatron-core's local", choices=("auto", "local", "transformer_engine"))
    attention_backend: str = opt(
        "auto", "local spec: varlen (live tokens packed by row, no padding mask: torch's flash varlen_attn; auto "
        "on a GPU in bf16/fp16 with --attention-dropout 0; on CPU a slow reference), sdpa (torch fused attention "
        "with a padding mask, auto on a GPU otherwise) or local (megatron-core's unfused); Transformer Engine: "
        "flash, fused, unfused or auto", choices=("auto", "sdpa", "varlen", "local", "flash", "fused", "unfused"))
    bias_gelu_fusion: bool = opt(True, "unfused bias + GELU (the fusion is torch.compile'd: it recompiles for "
                                 "dynamic shapes)", flags=["--no-bias-gelu-fusion"], action="store_false")
    bias_dropout_fusion: bool = opt(True, "unfused bias + dropout + add", flags=["--no-bias-dropout-fusion"],
                                    action="store_false")
    # On 2 CPU cores a bf16 BERT step at T = 512 took 0.488 s without it, 0.556 s with it.
    attention_softmax_in_fp32: bool = opt(
        False, "bf16/fp16: attention mask and softmax in fp32 (Megatron-LM's flag; off: 16-bit, torch's softmax "
        "kernels accumulate in fp32)")
    decoder_layers: int = opt(0, "3ML's decoder (pre-training only; export drops it): set by the method",
                              cli=False)
    decoder_type: str = opt("self", "3ML-self, or cross: the decoder also cross-attends to the encoder", cli=False)
    model_arch: str = opt("megatron-bert", "megatron-bert: pre-LayerNorm (megatron-core); bert, roberta: "
                          "post-LayerNorm with an embedding LayerNorm, as the original models (tools/export_hf.py)",
                          choices=MODEL_ARCHS)
    num_tokentypes: int = opt(0, "token-type embeddings (2 with --bert-binary-head, else none; imported models "
                              "keep theirs)", check=non_negative)
    lm_head_chunk_size: int = opt(
        0, "LM head and loss on chunks of N predicted tokens, each recomputed in backward: the fp32 logits of all "
        "predicted tokens never exist at once (0: off)")

    @property
    def post_layernorm(self) -> bool:
        return self.model_arch != "megatron-bert"

    def __post_init__(self):
        check_fields(self)
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
    """How the model is split over processes (megatron-core's parallel_state builds the groups)."""

    tensor_model_parallel_size: int = opt(1, check=positive)
    pipeline_model_parallel_size: int = opt(1, check=positive)
    sequence_parallel: bool = opt(False, "shard LayerNorm and dropout activations over the TP group")
    use_distributed_optimizer: bool = opt(False, "shard the optimizer state over the data-parallel group")
    recompute_granularity: Optional[str] = opt(
        None, "activation recomputation: every layer (full) or the core attention (selective)",
        choices=("full", "selective"))
    num_layers_per_virtual_pipeline_stage: Optional[int] = opt(
        None, "interleaved pipeline schedule: layers per virtual stage (needs PP >= 2)", check=positive)
    pipeline_split_by: str = opt("layers", "even layer counts per stage, or a split balancing the stages' FLOPs "
                                 "(FLOP model)", choices=("layers", "flops"))
    pipeline_stage_layers: Optional[list] = opt(None, "explicit encoder layers per pipeline stage, e.g. 4 3 3 2",
                                                type=int, nargs="+")

    def virtual_pipeline_size(self, num_layers: int) -> Optional[int]:
        if not self.num_layers_per_virtual_pipeline_stage:
            return None
        return num_layers // self.pipeline_model_parallel_size // self.num_layers_per_virtual_pipeline_stage

    def __post_init__(self):
        check_fields(self)


@dataclass
class PrecisionConfig:
    """Number formats. FP8 uses Megatron-LM's flag names: through Transformer Engine with its
    layer spec, through torchao with the local spec (model/fp8_torchao.py)."""

    bf16: bool = opt(False, "bf16 parameters and activations (fp32 gradients and optimizer)")
    fp16: bool = opt(False, "fp16 with loss scaling (GPU only)")
    fp8_format: Optional[str] = opt(
        None, "FP8 GEMMs (with --bf16 or --fp16): hybrid = e4m3 forward, e5m2 gradients; through Transformer "
        "Engine with its layer spec, else through torchao in the local spec's linears", choices=("hybrid", "e4m3"))
    fp8_recipe: Optional[str] = opt(
        None, "scaling: Transformer Engine takes delayed (its default), tensorwise, blockwise, mxfp8; torchao "
        "takes tensorwise (its default) or rowwise (with --fp8-format e4m3)",
        choices=("delayed", "tensorwise", "blockwise", "mxfp8", "rowwise"))
    fp8_compile: bool = opt(False, "torchao's FP8 only: torch.compile its float8 casts and GEMMs (fuses the "
                            "scaling kernels; compiles on the first steps)")
    fp8_margin: int = opt(0, "Transformer Engine's delayed scaling only", check=non_negative)
    fp8_amax_history_len: int = opt(1, "Transformer Engine's delayed scaling only", check=positive)
    fp8_amax_compute_algo: str = opt("most_recent", "Transformer Engine's delayed scaling only",
                                     choices=("most_recent", "max"))
    loss_scale: Optional[float] = opt(None, "fp16: a constant loss scale (default: dynamic)", check=positive)
    initial_loss_scale: float = opt(2.0**32, check=positive)
    min_loss_scale: float = opt(1.0, check=positive)
    loss_scale_window: float = opt(1000, check=positive)
    hysteresis: int = opt(2, check=non_negative)

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32

    def __post_init__(self):
        check_fields(self)
        if self.bf16 and self.fp16:
            raise ConfigError("--bf16 and --fp16 are exclusive")
        if self.fp8_compile and not self.fp8_format:
            raise ConfigError("--fp8-compile needs --fp8-format")


@dataclass
class OptimConfig:
    """Adam and the learning-rate schedule (megatron-core's optimizer and scheduler)."""

    lr: float = opt(1e-4, "peak learning rate", check=non_negative)
    min_lr: float = opt(0.0, check=non_negative)
    lr_decay_style: str = opt("linear", choices=("constant", "linear", "cosine", "inverse-square-root"))
    lr_warmup_iters: int = opt(0, check=non_negative)
    lr_decay_iters: Optional[int] = opt(None, "default: --train-iters", check=positive)
    lr_warmup_fraction: Optional[float] = opt(
        None, "warm-up as a fraction of the decay span (of --lr-decay-iters or --train-iters; of the FLOP budget "
        "with --train-flops-budget); replaces --lr-warmup-iters", check=in_range(0.0, 1.0, high_open=True))
    weight_decay: float = opt(0.01, check=non_negative)
    clip_grad: float = opt(1.0, "gradient-norm clipping (0: off)", check=non_negative)
    adam_beta1: float = opt(0.9, check=in_range(0.0, 1.0, high_open=True))
    adam_beta2: float = opt(0.98, check=in_range(0.0, 1.0, high_open=True))
    adam_eps: float = opt(1e-6, check=positive)
    # resume: which LR schedule wins when the checkpoint's differs (neither: an error)
    override_opt_param_scheduler: bool = opt(
        False, "on --load: the LR schedule of the command line (--lr, --min-lr, warm-up, decay, --train-iters x "
        "--global-batch-size), continued from the checkpoint's position",
        flags=["--override-opt_param-scheduler", "--override-opt-param-scheduler"])
    use_checkpoint_opt_param_scheduler: bool = opt(
        False, "on --load: the checkpoint's LR schedule, whatever the command line says (neither flag: a "
        "schedule that differs from the checkpoint's is an error)",
        flags=["--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler"])

    def __post_init__(self):
        check_fields(self)
        if self.min_lr > self.lr:
            raise ConfigError(f"--min-lr {self.min_lr} exceeds --lr {self.lr}")
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise ConfigError("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler are exclusive")


@dataclass
class DataConfig:
    """The corpus, the tokenizer and the masking."""

    data_path: List[str] = opt(factory=list, help="prefix, or weight prefix weight prefix ...", nargs="+")
    split: str = opt("949,50,1", "train, validation and test shares of the documents")
    tokenizer_dir: str = opt("", "directory written by tools/train_tokenizer.py")
    mask_prob: Optional[float] = opt(0.15, "masking rate (default: 0.15; 0.5 for 3ml)", cli_default=None,
                                     check=in_range(0.0, 1.0, low_open=True, high_open=True))
    # the command line's --mask-80-10-10 / --no-mask-80-10-10 (arguments.py: the method decides when neither)
    no_mask_80_10_10: bool = opt(False, "replace every masked token by [MASK]", cli=False)
    whole_word_masking: bool = opt(False, "mask whole words (every piece of a chosen word)")
    data_cache_path: Optional[str] = opt(None, "where the dataset index caches go (default: beside the data)")

    def __post_init__(self):
        check_fields(self)


@dataclass
class TrainConfig:
    """The loop: batch sizes, length, evaluation, checkpoints, logging, faults."""

    method: str = opt("vanilla", "the pre-training method (plans/)", cli=False)  # its flag lists the methods
    method_options: dict = opt(factory=dict, help="the method's constructor keywords", cli=False)
    micro_batch_size: int = opt(8, check=positive)
    global_batch_size: Optional[int] = opt(None, "default: --micro-batch-size", check=positive)
    train_iters: int = opt(100, check=non_negative)
    log_interval: int = opt(10, check=positive)
    eval_interval: int = opt(0, "evaluate every this many iterations (0: never)", check=non_negative)
    eval_iters: int = opt(10, check=positive)
    save: Optional[str] = opt(None, "checkpoint folder")
    load: Optional[str] = opt(None, "resume from (or initialise from) this checkpoint folder")
    overwrite_save: bool = opt(False, "let a run that does not --load the --save folder write over the "
                               "checkpoints there (refused by default: they belong to another run)")
    save_interval: int = opt(0, check=non_negative)
    tensorboard_dir: Optional[str] = opt(None)
    seed: int = opt(1234)
    exit_interval: int = opt(0, "stop (after saving) at an iteration multiple of this", check=non_negative)
    loss_curve: Optional[str] = opt(
        None, "write the loss curve as a PNG here, its data beside it as .json (at the end and at each save)")
    train_flops_budget: Optional[float] = opt(
        None, "stop once the model FLOPs of training (FLOP model, fwd + bwd) reach this. The LR schedule is then "
        "laid out over the budget, not over --train-iters: its position is the fraction of the budget spent, "
        "warm-up over the first --lr-warmup-fraction of it (or --lr-warmup-iters steps at the FLOP model's cost "
        "of one step of --method), decay over the rest, so the lr reaches --min-lr at the step that spends the "
        "budget. --train-iters only caps the run (it must leave room for the budget); --lr-decay-iters does not "
        "apply", check=positive)
    summary_json: Optional[str] = opt(None, "at the end, write the run's FLOPs, tokens seen, wall-clock and final "
                                      "lr/loss here (JSON, atomically)")
    peak_tflops: Optional[float] = opt(None, "the device's dense peak per process, for MFU in the progress line",
                                       check=positive)
    # faults and preemption (training/resilience.py has the exit codes)
    exit_signal_handler: bool = opt(False, "on SIGTERM or SIGUSR1: finish the step, save, exit with code 75 (all "
                                    "ranks agree)", group="faults and preemption")
    exit_duration_in_mins: Optional[float] = opt(
        None, "save and exit with code 75 once this many minutes have passed since the start", check=positive,
        group="faults and preemption")
    max_skipped_iterations: int = opt(
        10, "stop (exit code 3, saving the last good state) after more than this many non-finite steps in a row; "
        "each such step is skipped and logged", check=non_negative, group="faults and preemption")
    distributed_timeout_minutes: float = opt(10.0, "timeout of torch.distributed collectives: a dead or hung rank "
                                             "ends the run", check=positive, group="faults and preemption")

    def __post_init__(self):
        check_fields(self)
        if self.global_batch_size is None:
            self.global_batch_size = self.micro_batch_size
        for flag, on in (("--exit-signal-handler", self.exit_signal_handler),
                         ("--exit-duration-in-mins", self.exit_duration_in_mins is not None)):
            if on and not self.save:
                raise ConfigError(f"{flag} needs --save: the checkpoint a restarted job resumes from")
        if self.train_iters == 0 and not self.save:
            raise ConfigError("--train-iters 0 writes the initial weights as a checkpoint: it needs --save")


@dataclass
class RunConfig:
    model: ModelConfig
    parallel: ParallelConfig
    precision: PrecisionConfig
    optim: OptimConfig
    data: DataConfig
    train: TrainConfig

    def __post_init__(self):
        o, t = self.optim, self.train
        decay = o.lr_decay_iters or t.train_iters
        # (--train-iters 0 takes no step: it only writes the initial weights, any schedule will do)
        if o.lr_warmup_iters and o.lr_warmup_iters >= decay and t.train_iters != 0:  # megatron-core's scheduler asserts it
            raise ConfigError(f"--lr-warmup-iters {o.lr_warmup_iters} must be below "
                              f"{'--lr-decay-iters' if o.lr_decay_iters else '--train-iters'} {decay}")


# the command line's sections, in order (a field's `group` overrides its dataclass's)
SECTIONS = ((ModelConfig, "model"), (ParallelConfig, "parallelism"), (PrecisionConfig, "precision"),
            (OptimConfig, "optimizer"), (DataConfig, "data"), (TrainConfig, "training"))


def check_layout(cfg: RunConfig, world_size: int) -> int:
    """Validate batch sizes against the parallel layout; return the data-parallel size."""
    par, t = cfg.parallel, cfg.train
    mp = par.tensor_model_parallel_size * par.pipeline_model_parallel_size
    if world_size % mp:
        raise ConfigError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size "
            f"{par.tensor_model_parallel_size} x --pipeline-model-parallel-size {par.pipeline_model_parallel_size}"
        )
    dp = world_size // mp
    tp = par.tensor_model_parallel_size
    for flag, size in (("--num-attention-heads", cfg.model.num_attention_heads),
                       ("--ffn-hidden-size", cfg.model.ffn_hidden_size)):
        if size % tp:
            raise ConfigError(f"{flag} {size} is not divisible by --tensor-model-parallel-size {tp}")
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"--global-batch-size {t.global_batch_size} is not divisible by --micro-batch-size "
            f"{t.micro_batch_size} x data-parallel size {dp}"
        )
    if par.sequence_parallel and par.tensor_model_parallel_size == 1:
        raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if par.sequence_parallel and cfg.model.seq_length % par.tensor_model_parallel_size:
        raise ConfigError(
            f"--seq-length {cfg.model.seq_length} is not divisible by --tensor-model-parallel-size "
            f"{par.tensor_model_parallel_size} (needed by --sequence-parallel)"
        )
    if par.num_layers_per_virtual_pipeline_stage:
        per_stage = cfg.model.num_layers // par.pipeline_model_parallel_size
        if par.pipeline_model_parallel_size < 2 or cfg.model.num_layers % par.pipeline_model_parallel_size \
                or per_stage % par.num_layers_per_virtual_pipeline_stage or par.pipeline_stage_layers \
                or par.pipeline_split_by != "layers":
            raise ConfigError(
                f"--num-layers-per-virtual-pipeline-stage {par.num_layers_per_virtual_pipeline_stage} needs "
                "--pipeline-model-parallel-size > 1, an even layer split, and must divide the layers of a stage"
            )
        if (t.global_batch_size // (t.micro_batch_size * dp)) % par.pipeline_model_parallel_size:
            raise ConfigError("the interleaved schedule needs the number of micro-batches to be a multiple "
                              f"of --pipeline-model-parallel-size {par.pipeline_model_parallel_size}")
    if par.pipeline_stage_layers:
        if len(par.pipeline_stage_layers) != par.pipeline_model_parallel_size or \
                sum(par.pipeline_stage_layers) != cfg.model.num_layers or min(par.pipeline_stage_layers) < 1:
            raise ConfigError(
                f"--pipeline-stage-layers {' '.join(map(str, par.pipeline_stage_layers))}: need "
                f"{par.pipeline_model_parallel_size} counts >= 1 summing to --num-layers {cfg.model.num_layers}"
            )
    elif par.pipeline_split_by == "flops":
        if par.pipeline_model_parallel_size > cfg.model.num_layers:
            raise ConfigError(f"--pipeline-model-parallel-size {par.pipeline_model_parallel_size} exceeds "
                              f"--num-layers {cfg.model.num_layers}")
    elif cfg.model.num_layers % par.pipeline_model_parallel_size:
        raise ConfigError(
            f"--num-layers {cfg.model.num_layers} is not divisible by --pipeline-model-parallel-size "
            f"{par.pipeline_model_parallel_size}"
        )
    return dp
