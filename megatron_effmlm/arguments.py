"""Command-line flags (Megatron-LM's names) -> the run's configuration dataclasses."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import List, Optional

from megatron_effmlm.compat.cpu import cpu_bf16_error
from megatron_effmlm.config import ConfigError, ModelConfig, ParallelConfig, PrecisionConfig
from megatron_effmlm.plans import POLICIES, all_flags


@dataclass
class OptimConfig:
    lr: float = 1e-4
    min_lr: float = 0.0
    lr_decay_style: str = "linear"
    lr_warmup_iters: int = 0
    lr_decay_iters: Optional[int] = None
    lr_warmup_fraction: Optional[float] = None  # of the decay span (iterations, or the FLOP budget)
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-6
    # resume: which LR schedule wins when the checkpoint's differs (Megatron-LM's flags; neither: an error)
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False


@dataclass
class DataConfig:
    data_path: List[str] = field(default_factory=list)
    split: str = "949,50,1"
    tokenizer_dir: str = ""
    mask_prob: float = 0.15
    no_mask_80_10_10: bool = False
    whole_word_masking: bool = False
    data_cache_path: Optional[str] = None


@dataclass
class TrainConfig:
    method: str = "vanilla"
    method_options: dict = field(default_factory=dict)
    micro_batch_size: int = 8
    global_batch_size: int = 8
    train_iters: int = 100
    log_interval: int = 10
    eval_interval: int = 0
    eval_iters: int = 10
    save: Optional[str] = None
    load: Optional[str] = None
    overwrite_save: bool = False  # a fresh run may write over another run's checkpoints in --save
    save_interval: int = 0
    tensorboard_dir: Optional[str] = None
    seed: int = 1234
    exit_interval: int = 0
    loss_curve: Optional[str] = None  # PNG written at the end (and at each save)
    train_flops_budget: Optional[float] = None
    peak_tflops: Optional[float] = None
    summary_json: Optional[str] = None  # FLOPs, tokens, wall-clock and the final lr/loss at the end
    # Faults and preemption (training/resilience.py has the exit codes)
    exit_signal_handler: bool = False
    exit_duration_in_mins: Optional[float] = None
    max_skipped_iterations: int = 10
    distributed_timeout_minutes: float = 10.0


@dataclass
class RunConfig:
    model: ModelConfig
    parallel: ParallelConfig
    precision: PrecisionConfig
    optim: OptimConfig
    data: DataConfig
    train: TrainConfig


def build_parser() -> argparse.ArgumentParser:
    from megatron_effmlm.cli import HelpFormatter

    p = argparse.ArgumentParser(
        description="Pre-train a masked language model (BERT/RoBERTa) with megatron-core.",
        allow_abbrev=False, formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=4)
    g.add_argument("--hidden-size", type=int, default=256)
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default: 4 x --hidden-size")
    g.add_argument("--seq-length", type=int, default=128)
    g.add_argument("--max-position-embeddings", type=int, default=None, help="default: --seq-length")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="model vocabulary (default: the tokenizer's); must be >= the tokenizer's")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--position-embedding-type", default="learned_absolute", choices=["learned_absolute", "rope"])
    g.add_argument("--rotary-percent", type=float, default=1.0)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--layernorm-epsilon", type=float, default=1e-5)
    g.add_argument("--no-bias-gelu-fusion", dest="bias_gelu_fusion", action="store_false",
                   help="unfused bias + GELU (the fusion is torch.compile'd: it recompiles for dynamic shapes)")
    g.add_argument("--no-bias-dropout-fusion", dest="bias_dropout_fusion", action="store_false")
    g.add_argument("--attention-softmax-in-fp32", action="store_true",
                   help="bf16/fp16: attention mask and softmax in fp32 (Megatron-LM's flag; off: 16-bit, "
                        "torch's softmax kernels accumulate in fp32)")
    g.add_argument("--lm-head-chunk-size", type=int, default=0,
                   help="LM head and loss on chunks of N predicted tokens, each recomputed in backward: the "
                        "fp32 logits of all predicted tokens never exist at once (0: off)")
    g.add_argument("--bert-binary-head", action="store_true", help="BERT two-segment input and sentence-order head")
    g.add_argument("--transformer-impl", default="auto", choices=["auto", "local", "transformer_engine"],
                   help="layer spec: Transformer Engine where TE and a GPU exist (auto), else megatron-core's local")
    g.add_argument("--attention-backend", default="auto",
                   choices=["auto", "sdpa", "varlen", "local", "flash", "fused", "unfused"],
                   help="local spec: varlen (live tokens packed by row, no padding mask: torch's flash "
                        "varlen_attn; auto on a GPU in bf16/fp16 with --attention-dropout 0; on CPU a slow "
                        "reference), sdpa (torch fused attention with a padding mask, auto on a GPU otherwise) "
                        "or local (megatron-core's unfused); Transformer Engine: flash, fused, unfused or auto")
    g.add_argument("--model-arch", default="megatron-bert", choices=["megatron-bert", "bert", "roberta"],
                   help="megatron-bert: pre-LayerNorm (megatron-core); bert, roberta: post-LayerNorm with an "
                        "embedding LayerNorm, as the original models (tools/export_hf.py)")
    g.add_argument("--num-tokentypes", type=int, default=0,
                   help="token-type embeddings (default: 2 with --bert-binary-head, else none; imported models keep theirs)")

    g = p.add_argument_group("parallelism and precision")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="interleaved pipeline schedule: layers per virtual stage (needs PP >= 2)")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--pipeline-split-by", default="layers", choices=["layers", "flops"],
                   help="even layer counts per stage, or a split balancing the stages' FLOPs (FLOP model)")
    g.add_argument("--pipeline-stage-layers", type=int, nargs="+", default=None,
                   help="explicit encoder layers per pipeline stage, e.g. 4 3 3 2")
    g.add_argument("--recompute-granularity", default=None, choices=["full", "selective"],
                   help="activation recomputation: every layer (full) or the core attention (selective)")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--loss-scale", type=float, default=None, help="fp16: a constant loss scale (default: dynamic)")
    g.add_argument("--initial-loss-scale", type=float, default=2.0**32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=float, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)
    g.add_argument("--fp8-format", default=None, choices=["hybrid", "e4m3"],
                   help="FP8 GEMMs (with --bf16 or --fp16): hybrid = e4m3 forward, e5m2 gradients; through "
                        "Transformer Engine with its layer spec, else through torchao in the local spec's linears")
    g.add_argument("--fp8-recipe", default=None, choices=["delayed", "tensorwise", "blockwise", "mxfp8", "rowwise"],
                   help="scaling: Transformer Engine takes delayed (its default), tensorwise, blockwise, mxfp8; "
                        "torchao takes tensorwise (its default) or rowwise (with --fp8-format e4m3)")
    g.add_argument("--fp8-compile", action="store_true",
                   help="torchao's FP8 only: torch.compile its float8 casts and GEMMs (fuses the scaling kernels; "
                        "compiles on the first steps)")
    g.add_argument("--fp8-margin", type=int, default=0, help="Transformer Engine's delayed scaling only")
    g.add_argument("--fp8-amax-history-len", type=int, default=1, help="Transformer Engine's delayed scaling only")
    g.add_argument("--fp8-amax-compute-algo", default="most_recent", choices=["most_recent", "max"],
                   help="Transformer Engine's delayed scaling only")

    g = p.add_argument_group("optimizer")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", default="linear", choices=["constant", "linear", "cosine", "inverse-square-root"])
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="warm-up as a fraction of the decay span (of --lr-decay-iters or --train-iters; of the "
                        "FLOP budget with --train-flops-budget); replaces --lr-warmup-iters")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.98)
    g.add_argument("--adam-eps", type=float, default=1e-6)
    g.add_argument("--override-opt_param-scheduler", "--override-opt-param-scheduler",
                   dest="override_opt_param_scheduler", action="store_true",
                   help="on --load: the LR schedule of the command line (--lr, --min-lr, warm-up, decay, "
                        "--train-iters x --global-batch-size), continued from the checkpoint's position")
    g.add_argument("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler",
                   dest="use_checkpoint_opt_param_scheduler", action="store_true",
                   help="on --load: the checkpoint's LR schedule, whatever the command line says (neither "
                        "flag: a schedule that differs from the checkpoint's is an error)")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=[], help="prefix, or weight prefix weight prefix ...")
    g.add_argument("--split", default="949,50,1")
    g.add_argument("--tokenizer-dir", required=False, default="", help="directory written by tools/train_tokenizer.py")
    g.add_argument("--mask-prob", type=float, default=None, help="masking rate (default: 0.15; 0.5 for 3ml)")
    g.add_argument("--no-mask-80-10-10", dest="mask_80_10_10", action="store_false", default=None,
                   help="replace every masked token by [MASK] (the default for 3ml)")
    g.add_argument("--mask-80-10-10", dest="mask_80_10_10", action="store_true",
                   help="80%% [MASK] / 10%% random / 10%% unchanged (the default but for 3ml)")
    g.add_argument("--whole-word-masking", action="store_true")
    g.add_argument("--data-cache-path", default=None)

    g = p.add_argument_group("training")
    g.add_argument("--method", default="vanilla",
                   help=f"the pre-training method: {' | '.join(sorted(POLICIES))} (docs/methods.md)")

    g.add_argument("--micro-batch-size", type=int, default=8)
    g.add_argument("--global-batch-size", type=int, default=None, help="default: --micro-batch-size")
    g.add_argument("--train-iters", type=int, default=100)
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--eval-interval", type=int, default=0)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--overwrite-save", action="store_true",
                   help="let a run that does not --load the --save folder write over the checkpoints there "
                        "(refused by default: they belong to another run)")
    g.add_argument("--save-interval", type=int, default=0)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--exit-interval", type=int, default=0, help="stop (after saving) at an iteration multiple of this")
    g.add_argument("--loss-curve", default=None, help="write the loss curve as a PNG here")
    g.add_argument("--train-flops-budget", type=float, default=None,
                   help="stop once the model FLOPs of training (FLOP model, fwd + bwd) reach this. The LR "
                        "schedule is then laid out over the budget, not over --train-iters: its position is "
                        "the fraction of the budget spent, warm-up over the first --lr-warmup-fraction of it "
                        "(or --lr-warmup-iters steps at the FLOP model's cost of one step of --method), decay "
                        "over the rest, so the lr reaches --min-lr at the step that spends the budget. "
                        "--train-iters only caps the run (it must leave room for the budget); "
                        "--lr-decay-iters does not apply")
    g.add_argument("--summary-json", default=None,
                   help="at the end, write the run's FLOPs, tokens seen, wall-clock and final lr/loss here "
                        "(JSON, atomically)")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense peak per process, for MFU in the progress line")

    g = p.add_argument_group("faults and preemption")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM or SIGUSR1: finish the step, save, exit with code 75 (all ranks agree)")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save and exit with code 75 once this many minutes have passed since the start")
    g.add_argument("--max-skipped-iterations", type=int, default=10,
                   help="stop (exit code 3, saving the last good state) after more than this many "
                        "non-finite steps in a row; each such step is skipped and logged")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0,
                   help="timeout of torch.distributed collectives: a dead or hung rank ends the run")

    g = p.add_argument_group("methods (each declares its own flags: megatron_effmlm/plans/)")
    for flag in all_flags().values():
        flag.add_to(g)

    return p


def parse_args(argv=None) -> RunConfig:
    a = build_parser().parse_args(argv)
    return config_from_args(a)


def config_from_args(a) -> RunConfig:
    check_values(a)
    if a.bf16 and a.fp16:
        raise ConfigError("--bf16 and --fp16 are exclusive")
    if not __import__("torch").cuda.is_available():
        if a.fp16:
            raise ConfigError("--fp16 needs a CUDA device; on the CPU use --bf16 (or fp32)")
        if a.bf16 and (reason := cpu_bf16_error()):
            raise ConfigError(reason)
    if a.fp8_format:
        a.fp8_recipe = check_fp8(a)
    elif a.fp8_compile:
        raise ConfigError("--fp8-compile needs --fp8-format")
    if not a.data_path:
        raise ConfigError("--data-path is required")
    if not a.tokenizer_dir:
        raise ConfigError("--tokenizer-dir is required")
    if a.method not in POLICIES:
        raise ConfigError(f"--method {a.method!r} is not known; choose one of {sorted(POLICIES)}")
    policy_cls = POLICIES[a.method]
    if a.mask_prob is None:
        a.mask_prob = policy_cls.default_mask_prob
    if a.mask_80_10_10 is None:
        a.mask_80_10_10 = policy_cls.default_mask_80_10_10
    given = {f.dest: getattr(a, f.dest) for f in all_flags().values()}
    method_options = policy_cls.options(given)
    model = ModelConfig(
        num_layers=a.num_layers,
        hidden_size=a.hidden_size,
        num_attention_heads=a.num_attention_heads,
        ffn_hidden_size=a.ffn_hidden_size,
        seq_length=a.seq_length,
        max_position_embeddings=a.max_position_embeddings,
        vocab_size=a.vocab_size or 0,
        make_vocab_size_divisible_by=a.make_vocab_size_divisible_by,
        position_embedding_type=a.position_embedding_type,
        rotary_percent=a.rotary_percent,
        hidden_dropout=a.hidden_dropout,
        attention_dropout=a.attention_dropout,
        init_method_std=a.init_method_std,
        layernorm_epsilon=a.layernorm_epsilon,
        bert_binary_head=a.bert_binary_head,
        transformer_impl=a.transformer_impl,
        attention_backend=a.attention_backend,
        bias_gelu_fusion=a.bias_gelu_fusion,
        bias_dropout_fusion=a.bias_dropout_fusion,
        attention_softmax_in_fp32=a.attention_softmax_in_fp32,
        **policy_cls.model_overrides(method_options),
        model_arch=a.model_arch,
        num_tokentypes=a.num_tokentypes,
        lm_head_chunk_size=a.lm_head_chunk_size,
    )
    # after ModelConfig: an impossible architecture is the first thing to hear about
    from megatron_effmlm.model.backends import select_backends

    try:
        select_backends(a.transformer_impl, a.attention_backend, a.attention_dropout, a.bf16 or a.fp16)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    par = ParallelConfig(
        tensor_model_parallel_size=a.tensor_model_parallel_size,
        pipeline_model_parallel_size=a.pipeline_model_parallel_size,
        sequence_parallel=a.sequence_parallel,
        use_distributed_optimizer=a.use_distributed_optimizer,
        recompute_granularity=a.recompute_granularity,
        num_layers_per_virtual_pipeline_stage=a.num_layers_per_virtual_pipeline_stage,
        pipeline_split_by=a.pipeline_split_by,
        pipeline_stage_layers=a.pipeline_stage_layers,
    )
    optim = OptimConfig(
        lr=a.lr, min_lr=a.min_lr, lr_decay_style=a.lr_decay_style, lr_warmup_iters=a.lr_warmup_iters,
        lr_decay_iters=a.lr_decay_iters, lr_warmup_fraction=a.lr_warmup_fraction, weight_decay=a.weight_decay, clip_grad=a.clip_grad,
        adam_beta1=a.adam_beta1, adam_beta2=a.adam_beta2, adam_eps=a.adam_eps,
        override_opt_param_scheduler=a.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=a.use_checkpoint_opt_param_scheduler,
    )
    if a.override_opt_param_scheduler and a.use_checkpoint_opt_param_scheduler:
        raise ConfigError("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler are exclusive")
    data = DataConfig(
        data_path=list(a.data_path), split=a.split, tokenizer_dir=a.tokenizer_dir, mask_prob=a.mask_prob,
        no_mask_80_10_10=not a.mask_80_10_10, whole_word_masking=a.whole_word_masking,
        data_cache_path=a.data_cache_path,
    )
    train = TrainConfig(
        method=a.method, method_options=method_options, micro_batch_size=a.micro_batch_size,
        global_batch_size=a.global_batch_size or a.micro_batch_size, train_iters=a.train_iters,
        log_interval=a.log_interval, eval_interval=a.eval_interval, eval_iters=a.eval_iters, save=a.save,
        load=a.load, overwrite_save=a.overwrite_save, save_interval=a.save_interval, tensorboard_dir=a.tensorboard_dir, seed=a.seed,
        exit_interval=a.exit_interval, loss_curve=a.loss_curve, train_flops_budget=a.train_flops_budget,
        peak_tflops=a.peak_tflops, summary_json=a.summary_json, exit_signal_handler=a.exit_signal_handler,
        exit_duration_in_mins=a.exit_duration_in_mins, max_skipped_iterations=a.max_skipped_iterations,
        distributed_timeout_minutes=a.distributed_timeout_minutes,
    )
    for flag, on in (("--exit-signal-handler", a.exit_signal_handler),
                     ("--exit-duration-in-mins", a.exit_duration_in_mins is not None)):
        if on and not a.save:
            raise ConfigError(f"{flag} needs --save: the checkpoint a restarted job resumes from")
    if a.exit_duration_in_mins is not None and not a.exit_duration_in_mins > 0:
        raise ConfigError(f"--exit-duration-in-mins must be > 0, got {a.exit_duration_in_mins}")
    if a.train_iters == 0 and not a.save:
        raise ConfigError("--train-iters 0 writes the initial weights as a checkpoint: it needs --save")
    if a.max_skipped_iterations < 0:
        raise ConfigError(f"--max-skipped-iterations must be >= 0, got {a.max_skipped_iterations}")
    if not a.distributed_timeout_minutes > 0:
        raise ConfigError(f"--distributed-timeout-minutes must be > 0, got {a.distributed_timeout_minutes}")
    prec = PrecisionConfig(
        bf16=a.bf16, fp16=a.fp16, fp8_format=a.fp8_format, fp8_recipe=a.fp8_recipe, fp8_compile=a.fp8_compile,
        fp8_margin=a.fp8_margin, fp8_amax_history_len=a.fp8_amax_history_len, fp8_amax_compute_algo=a.fp8_amax_compute_algo,
        loss_scale=a.loss_scale, initial_loss_scale=a.initial_loss_scale, min_loss_scale=a.min_loss_scale,
        loss_scale_window=a.loss_scale_window, hysteresis=a.hysteresis,
    )
    return RunConfig(model, par, prec, optim, data, train)


_POSITIVE = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "seq_length",
             "max_position_embeddings", "vocab_size", "make_vocab_size_divisible_by", "micro_batch_size",
             "global_batch_size", "log_interval", "eval_iters",
             "tensor_model_parallel_size", "pipeline_model_parallel_size", "num_layers_per_virtual_pipeline_stage",
             "lr_decay_iters", "init_method_std", "layernorm_epsilon", "adam_eps", "train_flops_budget",
             "peak_tflops", "loss_scale", "initial_loss_scale", "min_loss_scale", "loss_scale_window")
_NON_NEGATIVE = ("train_iters", "lr", "min_lr", "weight_decay", "clip_grad", "lr_warmup_iters", "eval_interval", "save_interval",
                 "exit_interval", "num_tokentypes", "hysteresis", "fp8_margin")
# (low, high, high included): [low, high) or [low, high]
_FRACTIONS = {"hidden_dropout": (0.0, 1.0, False), "attention_dropout": (0.0, 1.0, False),
              "adam_beta1": (0.0, 1.0, False), "adam_beta2": (0.0, 1.0, False),
              "lr_warmup_fraction": (0.0, 1.0, False)}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_values(a) -> None:
    """Values no run can use: one ConfigError naming the flag, before anything is built."""
    import math

    for dest in _POSITIVE + _NON_NEGATIVE + tuple(_FRACTIONS) + ("mask_prob", "rotary_percent"):
        v = getattr(a, dest, None)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{_flag(dest)} must be a finite number, got {v}")
    for dest in _POSITIVE:
        v = getattr(a, dest, None)
        if v is not None and not v > 0:
            raise ConfigError(f"{_flag(dest)} must be > 0, got {v}")
    for dest in _NON_NEGATIVE:
        v = getattr(a, dest, None)
        if v is not None and not v >= 0:
            raise ConfigError(f"{_flag(dest)} must be >= 0, got {v}")
    for dest, (low, high, closed) in _FRACTIONS.items():
        v = getattr(a, dest, None)
        if v is not None and not (low <= v <= high if closed else low <= v < high):
            raise ConfigError(f"{_flag(dest)} must be in [{low:g}, {high:g}{']' if closed else ')'}, got {v}")
    if a.mask_prob is not None and not 0 < a.mask_prob < 1:
        raise ConfigError(f"--mask-prob must be in (0, 1), got {a.mask_prob}")
    if not 0 < a.rotary_percent <= 1:
        raise ConfigError(f"--rotary-percent must be in (0, 1], got {a.rotary_percent}")
    if a.min_lr > a.lr:
        raise ConfigError(f"--min-lr {a.min_lr} exceeds --lr {a.lr}")
    decay = a.lr_decay_iters or a.train_iters
    # (--train-iters 0 takes no step: it only writes the initial weights, any schedule will do)
    if a.lr_warmup_iters and a.lr_warmup_iters >= decay and a.train_iters != 0:  # megatron-core's scheduler asserts it
        raise ConfigError(f"--lr-warmup-iters {a.lr_warmup_iters} must be below "
                          f"{'--lr-decay-iters' if a.lr_decay_iters else '--train-iters'} {decay}")
    # each method's flags: their values whatever the method, then that the method has them
    flags = all_flags()
    for f in flags.values():
        v = getattr(a, f.dest, None)
        if v is not None and f.check is not None and (why := f.check(v)):
            raise ConfigError(f"{f.name} {why}")
    policy_cls = POLICIES.get(a.method)
    if policy_cls is not None:
        for f in flags.values():
            if getattr(a, f.dest, None) is not None and f not in policy_cls.flags:
                raise ConfigError(f"{f.name} is for --method {methods_with(f)}, not --method {a.method}")
        why = policy_cls.check_options(policy_cls.options(vars(a)), a.seq_length)
        if why:
            raise ConfigError(why)
    check_outputs(a)


def methods_with(flag) -> str:
    """The methods that have a flag, as a phrase: "3ml", "3ml or 3ml-td", "3ml-td, sctd or token-drop"."""
    users = sorted(n for n, c in POLICIES.items() if flag in c.flags)
    return " or ".join([", ".join(users[:-1]), users[-1]] if len(users) > 1 else users)


def check_outputs(a) -> None:
    """--save, --tensorboard-dir and --loss-curve must be writable now, not at the first save."""
    for flag, path, is_dir in (("--save", a.save, True), ("--tensorboard-dir", a.tensorboard_dir, True),
                               ("--loss-curve", a.loss_curve, False)):
        if path:
            check_writable(flag, path, is_dir)


def check_writable(flag: str, path: str, is_dir: bool) -> None:
    """A directory (is_dir) or a file that can be created or written at `path`: a probe file is
    created and removed in the directory that would hold it (root ignores permission bits, and
    a read-only mount only shows on a write)."""
    import tempfile

    if os.path.exists(path):
        if is_dir and not os.path.isdir(path):
            raise ConfigError(f"{flag} {path}: exists and is not a directory")
        if not is_dir and os.path.isdir(path):
            raise ConfigError(f"{flag} {path}: is a directory (give a file name)")
    where = path if is_dir and os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    while not os.path.exists(where):  # created later: the nearest existing parent must allow it
        where = os.path.dirname(where)
    if not os.path.isdir(where):
        raise ConfigError(f"{flag} {path}: {where} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".effmlm_write_probe", dir=where)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write in {where} ({e.strerror or e})") from None
    if not is_dir and os.path.exists(path) and not os.access(path, os.W_OK):
        raise ConfigError(f"{flag} {path}: the file is not writable")


def check_fp8(a) -> str:
    """FP8 needs a provider for the layer spec (Transformer Engine on an FP8-capable GPU, or
    torchao where torch._scaled_mm runs float8) and a 16-bit model. Returns the recipe."""
    from megatron_effmlm.model.backends import default_fp8_recipe, fp8_provider_for, fp8_recipe_error, fp8_status

    fmt = a.fp8_format
    provider = fp8_provider_for(a.transformer_impl)
    recipe = a.fp8_recipe or default_fp8_recipe(provider)
    err = fp8_recipe_error(provider, fmt, recipe)
    if err:
        raise ConfigError(err)
    ok, why = fp8_status(a.transformer_impl, fmt, recipe)
    if not ok:
        raise ConfigError(f"--fp8-format {fmt} needs Transformer Engine on an FP8-capable GPU or torchao with "
                          f"float8 GEMMs: {why}")
    if not (a.bf16 or a.fp16):
        raise ConfigError(f"--fp8-format {fmt} needs --bf16 or --fp16 (FP8 covers the GEMMs only)")
    if provider == "torchao":
        for flag, value, default in (("--fp8-margin", a.fp8_margin, 0), ("--fp8-amax-history-len", a.fp8_amax_history_len, 1),
                                     ("--fp8-amax-compute-algo", a.fp8_amax_compute_algo, "most_recent")):
            if value != default:
                raise ConfigError(f"{flag} is for Transformer Engine's delayed scaling; torchao (FP8 here: {why}) "
                                  "scales each tensor from its own current amax")
    elif a.fp8_compile:
        raise ConfigError("--fp8-compile is for torchao's FP8 (--transformer-impl local); Transformer Engine's FP8 "
                          "kernels are fused already")
    elif a.recompute_granularity == "full":
        raise ConfigError(f"--fp8-format {fmt} with --recompute-granularity full is not supported with Transformer "
                          "Engine; use selective")
    return recipe


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
