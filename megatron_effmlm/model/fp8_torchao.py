"""FP8 GEMMs without Transformer Engine: torchao's float8 training matmul inside megatron-core's
Column/RowParallelLinear.

Both layers compute through `self._forward_impl(input, weight, bias, ...)`; `apply_fp8` gives
each of the transformer layers' linears an instance-level `_forward_impl` that keeps megatron-
core's tensor-parallel communication (its own `copy_to_tensor_model_parallel_region` /
`gather_from_sequence_parallel_region`, whose backward is the all-reduce / reduce-scatter that
megatron-core's linear does by hand) and replaces only the matmul by torchao's
`matmul_with_hp_or_float8_args`: dynamic scaling from the current tensor's amax (tensorwise,
or per row with the rowwise recipe), `torch._scaled_mm` forward and for both backward GEMMs.
No parameter changes: weights stay 16-bit (megatron-core's mixed precision), checkpoints are the
same as without FP8. The LM head and the embedding stay in 16 bits, as with Transformer Engine.

Recipes (--fp8-recipe): tensorwise (torchao's default; --fp8-format hybrid = e4m3 forward,
e5m2 gradients, as TE's hybrid; e4m3 = e4m3 everywhere) and rowwise (torchao's rowwise recipe:
e4m3 everywhere, power-of-2 scales, so --fp8-format e4m3 only).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Optional, Tuple

import torch

TORCHAO_RECIPES = ("tensorwise", "rowwise")
CONFIG_ATTR = "effmlm_torchao_fp8"  # on the TransformerConfig: (fp8_format, recipe, compile)
logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet_import():
    """torchao's import logs a warning per CUDA extension it cannot load (all of them on a CPU
    machine) and torch's pytree one about its enums; neither concerns the float8 matmul."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def import_torchao():
    with _quiet_import():
        import torchao
        import torchao.float8  # noqa: F401
    return torchao


def recipe_error(fp8_format: str, recipe: str) -> Optional[str]:
    """Why torchao cannot serve this --fp8-format / --fp8-recipe pair (None: it can)."""
    if recipe not in TORCHAO_RECIPES:
        return (f"--fp8-recipe {recipe} needs Transformer Engine; torchao (FP8 with the local layer spec) "
                f"takes {' or '.join(TORCHAO_RECIPES)}")
    if recipe == "rowwise" and fp8_format != "e4m3":
        return ("--fp8-recipe rowwise is torchao's rowwise recipe, e4m3 for activations, weights and gradients: "
                "use --fp8-format e4m3")
    return None


def float8_config(fp8_format: str, recipe: str):
    """torchao's Float8LinearConfig for the Megatron-LM flag pair."""
    import_torchao()
    from torchao.float8 import CastConfig, Float8LinearConfig
    from torchao.float8.config import e4m3_dtype

    err = recipe_error(fp8_format, recipe)
    if err:
        raise ValueError(err)
    if recipe == "rowwise":
        return Float8LinearConfig.from_recipe_name("rowwise")
    if fp8_format == "hybrid":  # torchao's tensorwise default: e4m3 forward, e5m2 gradients
        return Float8LinearConfig.from_recipe_name("tensorwise")
    return Float8LinearConfig(cast_config_grad_output=CastConfig(target_dtype=e4m3_dtype))


def _mm_config(config):
    """torchao's per-GEMM settings (output, grad_input, grad_weight), as its Float8Linear builds them."""
    from torchao.float8 import LinearMMConfig, ScaledMMConfig

    gemms = (config.gemm_config_output, config.gemm_config_grad_input, config.gemm_config_grad_weight)
    return LinearMMConfig(*(ScaledMMConfig(config.emulate, g.use_fast_accum, False, config.pad_inner_dim)
                            for g in gemms))


def float8_matmul(x: torch.Tensor, weight: torch.Tensor, config) -> torch.Tensor:
    """x @ weight.t() with torchao's float8 autograd function (both backward GEMMs in float8)."""
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

    return matmul_with_hp_or_float8_args.apply(x, weight.t(), _mm_config(config), config)


@functools.lru_cache(maxsize=None)
def compiled_float8_matmul():
    """float8_matmul under torch.compile, shared by every linear: the amax, scale and cast
    kernels that eager mode runs one by one fuse (torchao's recommended way to train in
    float8). dynamic=True: one graph serves the changing live-token counts and layer widths."""
    return torch.compile(float8_matmul, dynamic=True)


@functools.lru_cache(maxsize=None)
def status(fp8_format: str = "hybrid", recipe: str = "tensorwise") -> Tuple[bool, str]:
    """Whether torchao's float8 matmul runs here: torchao imports and a 32 x 32 x 32 bf16
    product with its gradients goes through torch._scaled_mm on the current device."""
    try:
        torchao = import_torchao()
    except Exception as e:  # not installed, or built for another torch
        return False, f"torchao is not importable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    err = recipe_error(fp8_format, recipe)
    if err:
        return False, err
    dev = torch.device("cpu")
    if torch.cuda.is_available():  # flags are checked before set_device: probe the GPU this rank will use
        dev = torch.device("cuda", torch.cuda.current_device() if torch.distributed.is_initialized()
                           else int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "the CPU"
    try:
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(32, 32, generator=g, device=dev, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(32, 32, generator=g, device=dev, dtype=torch.bfloat16, requires_grad=True)
        float8_matmul(x, w, float8_config(fp8_format, recipe)).float().sum().backward()
    except Exception as e:  # e.g. a GPU before Ada/Hopper: no float8 GEMM kernel
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return False, f"torchao {torchao.__version__}: torch._scaled_mm has no {recipe} float8 kernel on {where} " \
                      f"({type(e).__name__}: {msg})"
    if dev.type == "cpu":
        return True, (f"torchao {torchao.__version__}, torch._scaled_mm on the CPU (a reference kernel, 16 to "
                      "2000 times slower than bf16 GEMMs: for tests, not for training)")
    return True, f"torchao {torchao.__version__}, torch._scaled_mm on {where}"


class Float8ForwardImpl:
    """A Column/RowParallelLinear's `_forward_impl` with the GEMM in float8. Megatron-core's own
    implementation still serves what this does not cover: frozen weights and the deferred
    embedding weight-gradient buffer (neither occurs in a transformer layer here)."""

    def __init__(self, original, config, compile: bool = False):
        self.original, self.config = original, config
        self.matmul = compiled_float8_matmul() if compile else float8_matmul

    def __call__(self, input, weight, **kw):  # megatron-core passes everything else by keyword
        if not weight.requires_grad or kw.get("grad_output_buffer") is not None:
            return self.original(input=input, weight=weight, **kw)
        from megatron.core.tensor_parallel import mappings
        from megatron.core.utils import get_tensor_model_parallel_group_if_none

        # The same communication as megatron-core's linear: sequence parallel gathers the input
        # (backward: reduce-scatter of its gradient); a column-parallel input's gradient is
        # all-reduced over the TP group. The weight gradient lands in .grad, where megatron-core's
        # DDP hook adds it to main_grad (build_transformer_config turns off the Apex fusion).
        group = get_tensor_model_parallel_group_if_none(kw.get("tp_group"))
        if kw.get("sequence_parallel"):
            input = mappings.gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True, group=group)
        elif kw.get("allreduce_dgrad"):
            input = mappings.copy_to_tensor_model_parallel_region(input, group=group)
        out = self.matmul(input, weight, self.config)
        return out + kw["bias"] if kw.get("bias") is not None else out


def transformer_linears(model: torch.nn.Module):
    """(name, module) of the Column/RowParallelLinears inside the encoder's and 3ML decoder's
    layers; not the LM head's output layer, whose row count (the predicted tokens) is not
    padded to FP8's multiple of 16."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    for block_name in ("encoder", "decoder"):
        block = getattr(model, block_name, None)
        if block is None:
            continue
        for name, m in block.layers.named_modules(prefix=f"{block_name}.layers"):
            if isinstance(m, (ColumnParallelLinear, RowParallelLinear)):
                yield name, m


def apply_fp8(model: torch.nn.Module, fp8_format: str, recipe: str, compile: bool = False) -> int:
    """Route the GEMMs of `model`'s transformer layers through torchao's float8 matmul
    (torch.compile'd with `compile`). Returns how many linears were switched."""
    config = float8_config(fp8_format, recipe)
    n = 0
    for _, m in transformer_linears(model):
        if not isinstance(m._forward_impl, Float8ForwardImpl):
            m._forward_impl = Float8ForwardImpl(m._forward_impl, config, compile)
            n += 1
    return n


def apply_config_fp8(model: torch.nn.Module, transformer_config) -> int:
    """apply_fp8 with the settings build_transformer_config left on the config (none: no FP8
    through torchao); FP8 GEMMs need token counts in multiples of 16, so the engine pads every
    live set to that (padding changes no result, tests/test_kernels.py)."""
    settings = getattr(transformer_config, CONFIG_ATTR, None)
    if not settings:
        return 0
    n = apply_fp8(model, *settings)
    if hasattr(model, "live_token_multiple"):  # MLMModel (megatron-core's BertModel runs all T positions)
        model.live_token_multiple = max(model.live_token_multiple, 16)
    return n


def describe(transformer_config, n_linears: int) -> str:
    fmt, recipe, compiled = getattr(transformer_config, CONFIG_ATTR)
    return (f"torchao float8 GEMMs (format {fmt}, recipe {recipe}{', torch.compile' if compiled else ', eager'}) in "
            f"{n_linears} linears of the transformer layers; {status(fmt, recipe)[1]}")
