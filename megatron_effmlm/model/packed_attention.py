"""Attention over packed live tokens: no padding mask, so a GPU keeps its flash kernel.

The engine's live sets are ragged: row i of a batch has c_i live tokens in n slots, the valid
ones first (`LiveSet`'s invariant). The padded path attends over [b, n] with a mask, and on a
GPU any mask makes torch's SDPA leave its flash kernel. Here the [n, b] slots are read row by
row as one packed sequence of b * n tokens cut into 2b segments, each row's valid tokens then
its padded slots:

    cu_seqlens = [0, c_0, n, n + c_1, 2n, ...]        (int32, on the device: no host read)

Valid tokens attend to their row's valid tokens only, exactly as the mask allowed; padded
slots attend among themselves (their outputs are never read: they go to the engine's bin row
and are no key of any valid token). A padded query segment with no padded key (cross-attention,
where queries and keys come from different live sets) would have nothing to attend to, so the
keys get one zero slot per row for it.

Kernels: torch's `varlen_attn` (flash forward and backward on packed sequences, torch 2.10+,
CUDA, no dropout); elsewhere `reference_varlen_attn`, the same interface computed segment by
segment with SDPA (slow: for tests and CPU checks; padded SDPA stays the CPU default).
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor


def segment_bounds(valid: Tensor, extra_slot: bool = False) -> Tensor:
    """[2b + 1] int32 cumulative lengths of (valid, padded) segments per row of valid [b, n]."""
    b, n = valid.shape
    count = valid.sum(1, dtype=torch.int32)  # [b]
    width = n + int(extra_slot)
    lens = torch.stack([count, width - count], 1).reshape(-1)  # [2b]: c_0, n - c_0, c_1, ...
    return torch.nn.functional.pad(torch.cumsum(lens, 0, dtype=torch.int32), (1, 0))


def live_packing(q_valid: Tensor, kv_valid: Optional[Tensor] = None) -> Tensor:
    """The packing of a self-attention (kv_valid None) or a cross-attention over live sets'
    valid masks [b, n_q], [b, n_kv]: an int32 tensor handed to the core attention where the
    padding mask would go (a tensor, so megatron-core's recompute can save it):
    [1, 2b + 1] the bounds of queries and keys alike, or [2, 2b + 1] query bounds then key
    bounds with one extra (zero) key slot per row."""
    if kv_valid is None:
        return segment_bounds(q_valid).unsqueeze(0)
    return torch.stack([segment_bounds(q_valid), segment_bounds(kv_valid, extra_slot=True)])


def is_packing(mask) -> bool:
    return isinstance(mask, Tensor) and mask.dtype == torch.int32 and mask.dim() == 2


@functools.lru_cache(maxsize=None)
def varlen_status() -> Tuple[bool, str]:
    """(usable, why): torch's flash varlen attention needs CUDA and torch 2.10+."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError as e:
        return False, f"torch {torch.__version__} has no torch.nn.attention.varlen ({e})"
    return True, f"torch {torch.__version__} varlen_attn (flash, packed live tokens)"


def reference_varlen_attn(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
                          scale: Optional[float] = None) -> Tensor:
    """`varlen_attn`'s contract ([t, h, d] packed q/k/v, cumulative lengths) computed one
    segment at a time by SDPA; reads cu_seqlens on the host (it is the CPU / test path)."""
    out = []
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for q0, q1, k0, k1 in zip(bq, bq[1:], bk, bk[1:]):
        if q1 == q0:
            continue
        qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (q[q0:q1], k[k0:k1], v[k0:k1]))  # [1, h, s, d]
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, scale=scale)
        out.append(o.squeeze(0).transpose(0, 1))  # [s, h, d]
    return torch.cat(out, 0)


def packed_attention(query: Tensor, key: Tensor, value: Tensor, packing: Tensor, scale: Optional[float]) -> Tensor:
    """query [sq, b, np, hn], key/value [sk, b, np, hn], packing from `live_packing`
    -> context [sq, b, np * hn]."""
    sq, b, heads, hn = query.shape
    sk = key.shape[0]
    # [s, b, np, hn] -> [b * s, np, hn]: row-major over the [b, s] slots, as the bounds count them
    q = query.transpose(0, 1).reshape(b * sq, heads, hn)
    k, v = (t.transpose(0, 1) for t in (key, value))  # [b, sk, np, hn]
    cross = packing.shape[0] == 2
    if cross:  # one zero key/value per row for the padded queries of cross-attention
        k, v = (torch.nn.functional.pad(t, (0, 0, 0, 0, 0, 1)) for t in (k, v))
        sk += 1
    k, v = (t.reshape(b * sk, heads, hn) for t in (k, v))
    args = (q, k, v, packing[0], packing[-1], sq, sk)  # max lengths: the slot counts, host ints
    if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and varlen_status()[0]:  # flash: 16-bit
        from torch.nn.attention.varlen import varlen_attn

        ctx = varlen_attn(*args, scale=scale)
    else:
        ctx = reference_varlen_attn(*args, scale=scale)
    return ctx.reshape(b, sq, heads * hn).transpose(0, 1)  # [sq, b, hp]
