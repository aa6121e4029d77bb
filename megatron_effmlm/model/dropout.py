"""Dropout for CPU training: masks from 15-bit random integers.

On the CPU, torch's dropout draws its mask with `bernoulli_`, one uniform double per element
from the CPU generator. On the 2-core Intel Xeon (AMX) these tests run on, a mask for BERT's
attention probabilities (2 x 4 x 512 x 512) took 12 ms, about 30 times an elementwise multiply,
and dropout was the largest single cost of a bf16 BERT step at T = 512 (26%, more than all the
matrix products). `Dropout15` takes two 15-bit uniform integers from each 32-bit draw of the
same generator and keeps an element when its integer is >= round(p * 2^15); the kept values are
scaled by 1 / (1 - p'), p' = round(p * 2^15) / 2^15 (p' differs from p by at most 2^-16, and
the scaling keeps the expectation exact). Draws come from torch's default CPU generator, so
megatron-core's RNG tracker (its forks for attention dropout and sequence parallelism),
activation recomputation and checkpoint resume see the same streams as with torch's dropout.
In an A/B in one process the bf16 step went from 0.648 to 0.539 s.

On a GPU (Philox, parallel) torch's own dropout stays.
"""

from __future__ import annotations

import functools

import torch

_BITS = 15
_LEVELS = 1 << _BITS


def quantized_p(p: float) -> float:
    """The drop probability the masks realise: p rounded to a multiple of 2^-15."""
    return round(p * _LEVELS) / _LEVELS


def keep_mask(shape, p: float, device=None) -> torch.Tensor:
    """bool mask of `shape`, True with probability 1 - quantized_p(p)."""
    n = 1
    for s in shape:
        n *= s
    r = torch.empty((n + 1) // 2, dtype=torch.int32, device=device).random_()  # [0, 2^31): 16 + 15 random bits
    ints = r.view(torch.int16)[:n].view(shape)
    return (ints & (_LEVELS - 1)) >= round(p * _LEVELS)


class _Dropout15Fn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p):
        keep = keep_mask(x.shape, p, x.device)
        scale = 1.0 / (1.0 - quantized_p(p))
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return (x * keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return (grad * keep).mul_(ctx.scale), None


def dropout15(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    return _Dropout15Fn.apply(x, p)


class Dropout15(torch.nn.Dropout):
    """Drop-in for `torch.nn.Dropout` (same `p`, same training/eval behaviour)."""

    def forward(self, x):
        return dropout15(x, self.p, self.training)


def _bias_dropout_add(x_with_bias, residual, prob, training):
    """megatron-core's unfused bias-dropout-add (`fused_bias_dropout._bias_dropout_add_func`)
    with `dropout15`: out = residual + dropout(x + bias)."""
    x, bias = x_with_bias
    residual = residual if residual.dtype == x.dtype else residual.to(x.dtype)
    if bias is not None:
        x = x + bias
    return residual + dropout15(x, prob, training)


def get_bias_dropout_add(training, fused):
    """The `self_attn_bda` / `mlp_bda` / `cross_attn_bda` builder of a layer spec (CPU)."""
    return functools.partial(_bias_dropout_add, training=training)


def use_dropout15() -> bool:
    return not torch.cuda.is_available()


def replace_dropout_modules(module: torch.nn.Module) -> int:
    """Swap every `torch.nn.Dropout` under `module` (attention and embedding dropout) for
    `Dropout15`; returns how many."""
    n = 0
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Dropout:
                setattr(parent, name, Dropout15(child.p, child.inplace))
                n += 1
    return n
