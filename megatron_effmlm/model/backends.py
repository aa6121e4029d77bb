"""Which fast kernels this machine has, and which of them a run uses.

Each choice is made once, from what is importable and whether CUDA is present, and logged
with its reason, so a run on a cluster says why it did (or did not) get Transformer Engine,
Apex's fused LayerNorm / Adam / weight-gradient accumulation, or fused attention. On CPU
every answer is the plain PyTorch / megatron-core path.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Dict, Optional, Tuple

import torch



def _importable(name: str) -> Tuple[bool, str]:
    try:
        importlib.import_module(name)
        return True, f"{name} is installed"
    except Exception as e:  # ImportError, or an extension built for another torch/CUDA
        return False, f"{name} is not importable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


@functools.lru_cache(maxsize=None)
def te_status() -> Tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    ok, why = _importable("transformer_engine.pytorch")
    if not ok:
        return False, why
    import transformer_engine

    return True, f"Transformer Engine {getattr(transformer_engine, '__version__', '?')} and a CUDA device"


@functools.lru_cache(maxsize=None)
def te_fp8_status() -> Tuple[bool, str]:
    ok, why = te_status()
    if not ok:
        return False, why
    from transformer_engine.pytorch.fp8 import check_fp8_support

    supported, reason = check_fp8_support()
    return bool(supported), reason or "FP8 GEMMs supported by this GPU"


TE_FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")


def default_fp8_recipe(provider: str) -> str:
    """--fp8-recipe when not given: TE's delayed scaling (Megatron-LM's default), torchao's tensorwise."""
    return "delayed" if provider == "transformer_engine" else "tensorwise"


def fp8_provider_for(transformer_impl: str = "auto") -> str:
    """Who would run FP8 with this --transformer-impl: the provider follows the layer spec.
    Transformer Engine's spec (first choice where TE is installed and a GPU is there) runs TE's
    FP8; the local spec runs torchao's float8 matmul in megatron-core's parallel linears
    (model/fp8_torchao.py)."""
    if transformer_impl == "transformer_engine" or (transformer_impl == "auto" and te_status()[0]):
        return "transformer_engine"
    return "torchao"


def fp8_recipe_error(provider: str, fp8_format: str, recipe: str) -> Optional[str]:
    if provider == "transformer_engine":
        if recipe not in TE_FP8_RECIPES:
            return (f"--fp8-recipe {recipe} is torchao's (with --transformer-impl local); Transformer Engine takes "
                    f"{', '.join(TE_FP8_RECIPES)}")
        return None
    from megatron_effmlm.model.fp8_torchao import recipe_error

    return recipe_error(fp8_format, recipe)


@functools.lru_cache(maxsize=None)
def fp8_status(transformer_impl: str = "auto", fp8_format: str = "hybrid",
               recipe: Optional[str] = None) -> Tuple[Optional[str], str]:
    """(provider, reason): "transformer_engine" or "torchao" with what it runs on, or (None, why
    FP8 cannot run with this layer spec and recipe (default: the provider's)). The first value
    is truthy exactly when FP8 can run."""
    provider = fp8_provider_for(transformer_impl)
    recipe = recipe or default_fp8_recipe(provider)
    err = fp8_recipe_error(provider, fp8_format, recipe)
    if err:
        return None, err
    if provider == "transformer_engine":
        ok, why = te_fp8_status()
        return ("transformer_engine", f"Transformer Engine ({why})") if ok else (None, f"Transformer Engine: {why}")
    from megatron_effmlm.model import fp8_torchao

    ok, why = fp8_torchao.status(fp8_format, recipe)
    if ok:
        return "torchao", why
    return None, why if transformer_impl == "local" else f"Transformer Engine: {te_status()[1]}; torchao: {why}"


@functools.lru_cache(maxsize=None)
def apex_status() -> Dict[str, Tuple[bool, str]]:
    """Apex's pieces that megatron-core uses, each on its own (a partial Apex build is common)."""
    if not torch.cuda.is_available():
        return {k: (False, "no CUDA device") for k in ("fused_layer_norm", "fused_adam", "grad_accum_fusion")}
    return {
        "fused_layer_norm": _importable("fused_layer_norm_cuda"),
        "fused_adam": _importable("apex.optimizers"),
        "grad_accum_fusion": _importable("fused_weight_gradient_mlp_cuda"),
    }


def sdpa_status() -> Tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device (megatron-core's DotProductAttention is the tested CPU path)"
    return True, "torch scaled_dot_product_attention (fused flash / memory-efficient kernels)"


@dataclasses.dataclass
class Backends:
    """What a run uses; `reasons` says why, for the log."""

    transformer_impl: str  # "transformer_engine" | "local"
    attention: str  # "te" (TE picks flash/fused/unfused) | "sdpa" | "local" (megatron-core's unfused)
    fused_layer_norm: bool
    grad_accum_fusion: bool
    jit_fusions: bool  # megatron-core's bias-GELU and bias-dropout-add fusions (CUDA)
    optimizer: str  # what megatron-core's get_megatron_optimizer will build for adam
    reasons: Dict[str, str]

    def summary(self) -> str:
        return "; ".join(f"{k}: {v}" for k, v in self.reasons.items())


ATTENTION_CHOICES = ("auto", "sdpa", "varlen", "local", "flash", "fused", "unfused")


def select_backends(transformer_impl: str = "auto", attention_backend: str = "auto", attention_dropout: float = 0.0,
                    half: bool = False) -> Backends:
    """Resolve --transformer-impl and --attention-backend against this machine. `auto` packs the
    live tokens (varlen) on a GPU whose torch has flash varlen attention, when the run is in
    bf16/fp16 and has no attention dropout (the kernel has none); else SDPA with a padding mask.

    Raises ValueError naming the flag when an explicit request cannot be met."""
    te_ok, te_why = te_status()
    reasons = {}
    if transformer_impl == "auto":
        transformer_impl = "transformer_engine" if te_ok else "local"
        reasons["layer spec"] = f"{transformer_impl} ({te_why})"
    elif transformer_impl == "transformer_engine":
        if not te_ok:
            raise ValueError(f"--transformer-impl transformer_engine: {te_why}")
        reasons["layer spec"] = f"transformer_engine (requested; {te_why})"
    elif transformer_impl == "local":
        reasons["layer spec"] = "local (requested)"
    else:
        raise ValueError(f"--transformer-impl {transformer_impl!r}: choose local, transformer_engine or auto")

    if attention_backend not in ATTENTION_CHOICES:
        raise ValueError(f"--attention-backend {attention_backend!r}: choose one of {', '.join(ATTENTION_CHOICES)}")
    if transformer_impl == "transformer_engine":
        if attention_backend in ("sdpa", "varlen", "local"):
            raise ValueError(f"--attention-backend {attention_backend} is for --transformer-impl local; "
                             "Transformer Engine takes auto, flash, fused or unfused")
        attention = "te"
        reasons["attention"] = f"Transformer Engine DotProductAttention, backend {attention_backend}"
    else:
        if attention_backend in ("flash", "fused", "unfused"):
            raise ValueError(f"--attention-backend {attention_backend} selects a Transformer Engine kernel; "
                             "with --transformer-impl local choose auto, sdpa or local")
        from megatron_effmlm.model.packed_attention import varlen_status

        sdpa_ok, sdpa_why = sdpa_status()
        varlen_ok, varlen_why = varlen_status()
        if attention_backend == "varlen" and attention_dropout > 0:
            raise ValueError(f"--attention-backend varlen has no attention dropout: use --attention-dropout 0 "
                             f"(not {attention_dropout:g})")
        if attention_backend == "auto":
            attention = "sdpa" if sdpa_ok else "local"
            why = sdpa_why
            if varlen_ok and half and attention_dropout == 0:
                attention, why = "varlen", varlen_why
            elif varlen_ok:
                why += f"; not varlen: {'attention dropout' if attention_dropout else 'fp32'}"
            reasons["attention"] = f"{attention} ({why})"
        elif attention_backend == "varlen" and not varlen_ok:
            attention = "varlen"
            reasons["attention"] = f"varlen (requested; {varlen_why}: the reference implementation, segment by " \
                                   "segment, slow)"
        else:
            attention = attention_backend
            reasons["attention"] = f"{attention} (requested)"

    apex = apex_status()
    fused_ln = transformer_impl == "local" and apex["fused_layer_norm"][0]
    if transformer_impl == "local":
        reasons["layer norm"] = "apex FusedLayerNorm" if fused_ln else f"torch LayerNorm ({apex['fused_layer_norm'][1]})"
    grad_accum = torch.cuda.is_available() and (te_ok if transformer_impl == "transformer_engine"
                                                else apex["grad_accum_fusion"][0])
    reasons["grad-accumulation fusion"] = "on" if grad_accum else (
        f"off ({apex['grad_accum_fusion'][1] if transformer_impl == 'local' else te_why})")
    # megatron-core's bias fusions are torch.compile'd; with the local spec they made a BERT-base
    # step slower on an H100 (70 vs 55 ms: guard and recompile cost with changing live-token
    # counts), so they stay with the TE spec only.
    jit = torch.cuda.is_available() and transformer_impl == "transformer_engine"
    reasons["bias-gelu / bias-dropout-add fusion"] = "on (CUDA, TE spec)" if jit else (
        "off (local spec: torch.compile'd fusions measured slower)" if torch.cuda.is_available() else "off (no CUDA device)")
    # megatron-core's own import order for adam: TE's FusedAdam, then Apex's, then torch AdamW.
    if te_ok:
        opt = "Transformer Engine FusedAdam"
    elif apex["fused_adam"][0]:
        opt = "apex FusedAdam"
    else:
        from megatron_effmlm.compat.gpu_fallbacks import fused_adamw_supported

        opt = "torch AdamW (fused)" if fused_adamw_supported() else "torch AdamW"
    reasons["optimizer"] = opt
    reasons["dropout"] = "torch" if torch.cuda.is_available() else \
        "15-bit integer masks (CPU: torch's bernoulli_ is slow there, model/dropout.py)"
    return Backends(transformer_impl, attention, fused_ln, grad_accum, jit, opt, reasons)
