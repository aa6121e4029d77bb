"""Command-line flags (Megatron-LM's names) -> the run's configuration dataclasses."""

from __future__ import annotations

import argparse
import os
import typing
from dataclasses import MISSING, fields

from megatron_effmlm.compat.cpu import cpu_bf16_error
from megatron_effmlm.config import (SECTIONS, ConfigError, DataConfig, ModelConfig, OptimConfig, ParallelConfig,
                                    PrecisionConfig, RunConfig, TrainConfig)
from megatron_effmlm.plans import POLICIES, all_flags


def _add_field(group, f, hints) -> None:
    """One dataclass field as a flag: its type, default, help and choices come from the field."""
    m = f.metadata
    kw = dict(dest=f.name, help=m["help"] or None)
    default = f.default_factory() if f.default_factory is not MISSING else f.default
    kw["default"] = m.get("cli_default", default)
    if m["action"] or hints[f.name] is bool:
        kw["action"] = m["action"] or "store_true"
    else:
        base = hints[f.name]
        args = [x for x in typing.get_args(base) if x is not type(None)]
        if args:  # Optional[X] -> X, List[X] -> X
            base = args[0]
        kw.update(type=m["type"] or base, choices=m["choices"], nargs=m["nargs"])
    group.add_argument(*(m["flags"] or ["--" + f.name.replace("_", "-")]), **kw)


def build_parser() -> argparse.ArgumentParser:
    """The flags of every configuration field (config.py), then the method's, then each
    method's own (declared on its policy)."""
    from megatron_effmlm.cli import HelpFormatter

    p = argparse.ArgumentParser(
        description="Pre-train a masked language model (BERT/RoBERTa) with megatron-core.",
        allow_abbrev=False, formatter_class=HelpFormatter,
    )
    groups = {}
    for cls, title in SECTIONS:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.metadata.get("cli", True):
                name = f.metadata.get("group") or title
                if name not in groups:
                    groups[name] = p.add_argument_group(name)
                _add_field(groups[name], f, hints)
    g = groups["data"]
    g.add_argument("--no-mask-80-10-10", dest="mask_80_10_10", action="store_false", default=None,
                   help="replace every masked token by [MASK] (the default for 3ml)")
    g.add_argument("--mask-80-10-10", dest="mask_80_10_10", action="store_true",
                   help="80%% [MASK] / 10%% random / 10%% unchanged (the default but for 3ml)")
    groups["training"].add_argument("--method", default="vanilla",
                                    help=f"the pre-training method: {' | '.join(sorted(POLICIES))} (docs/methods.md)")
    g = p.add_argument_group("methods (each declares its own flags: megatron_effmlm/plans/)")
    for flag in all_flags().values():
        flag.add_to(g)
    return p


def parse_args(argv=None) -> RunConfig:
    a = build_parser().parse_args(argv)
    return config_from_args(a)


def _from_args(cls, a, **extra):
    """A config dataclass from the parsed flags: its fields by name (None where the parser's
    default is None: the field's default applies), plus `extra`."""
    kw = {}
    for f in fields(cls):
        if f.metadata.get("cli", True) and f.name not in extra:
            v = getattr(a, f.name)
            if v is not None or "cli_default" not in f.metadata:
                kw[f.name] = list(v) if isinstance(v, list) else v
    return cls(**kw, **extra)


def config_from_args(a) -> RunConfig:
    """The run's configuration from parsed flags. The dataclasses check their own values; here
    what only the command line has: the method and its flags, the machine, the outputs."""
    if a.method not in POLICIES:
        raise ConfigError(f"--method {a.method!r} is not known; choose one of {sorted(POLICIES)}")
    policy_cls = POLICIES[a.method]
    check_method_flags(a, policy_cls)
    if a.mask_prob is None:
        a.mask_prob = policy_cls.default_mask_prob
    if a.mask_80_10_10 is None:
        a.mask_80_10_10 = policy_cls.default_mask_80_10_10
    method_options = policy_cls.options({f.dest: getattr(a, f.dest) for f in all_flags().values()})
    model = _from_args(ModelConfig, a, **policy_cls.model_overrides(method_options))
    # after ModelConfig: an impossible architecture is the first thing to hear about
    from megatron_effmlm.model.backends import select_backends

    try:
        select_backends(a.transformer_impl, a.attention_backend, a.attention_dropout, a.bf16 or a.fp16)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    why = policy_cls.check_options(method_options, model.seq_length)
    if why:
        raise ConfigError(why)
    prec = _from_args(PrecisionConfig, a)
    if prec.fp8_format:
        prec.fp8_recipe = check_fp8(a)
    # the flags' own consistency first, then whether this machine runs them
    if not __import__("torch").cuda.is_available():
        if prec.fp16:
            raise ConfigError("--fp16 needs a CUDA device; on the CPU use --bf16 (or fp32)")
        if prec.bf16 and (reason := cpu_bf16_error()):
            raise ConfigError(reason)
    par = _from_args(ParallelConfig, a)
    optim = _from_args(OptimConfig, a)
    data = _from_args(DataConfig, a, no_mask_80_10_10=not a.mask_80_10_10)
    if not data.data_path:
        raise ConfigError("--data-path is required")
    if not data.tokenizer_dir:
        raise ConfigError("--tokenizer-dir is required")
    train = _from_args(TrainConfig, a, method=a.method, method_options=method_options)
    check_outputs(a)
    return RunConfig(model, par, prec, optim, data, train)


def check_method_flags(a, policy_cls) -> None:
    """Each method's flags: their values whatever the method, then that this method has them."""
    flags = all_flags()
    for f in flags.values():
        v = getattr(a, f.dest, None)
        if v is not None and f.check is not None and (why := f.check(v)):
            raise ConfigError(f"{f.name} {why}")
    for f in flags.values():
        if getattr(a, f.dest, None) is not None and f not in policy_cls.flags:
            raise ConfigError(f"{f.name} is for --method {methods_with(f)}, not --method {a.method}")


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
    # Its data goes to <stem>.json: another extension (say .json) would have the two overwrite each other.
    if a.loss_curve and not a.loss_curve.lower().endswith(".png"):
        raise ConfigError(f"--loss-curve {a.loss_curve}: give a .png file name (the curve's data is written "
                          f"beside it as .json)")


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
