"""The FLOP model's parts (docs/methods.md): a layer on n query tokens attending over n_kv keys
costs n * (8 d^2 + 4 d f) for the projections and MLP plus 4 n n_kv d for attention (forward);
the LM head 2 (d^2 + d V) per predicted token; backward is twice the forward.

The model counts what the engine ran with these (padded live counts included); each method's
policy (plans/) says what its layers cost (`Policy.layer_costs`), and plans/flops.py adds
that up for the progress line, --train-flops-budget's schedule, pipeline balancing and the
benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass


def layer_flops(n: int, d: int, f: int, n_kv: int = None) -> float:
    """Forward FLOPs of one layer on one sequence of n tokens (keys/values: n_kv)."""
    n_kv = n if n_kv is None else n_kv
    return n * (8 * d * d + 4 * d * f) + 4 * n * n_kv * d


def cross_attention_flops(n: int, n_ctx: int, d: int) -> float:
    """Forward FLOPs of a cross-attention sublayer: q and output projections on n tokens, k/v
    projections on the n_ctx context tokens, and attention of n queries over n_ctx keys."""
    return 4 * n * d * d + 4 * n_ctx * d * d + 4 * n * n_ctx * d


def head_flops(m: int, d: int, vocab: int) -> float:
    return 2 * m * (d * d + d * vocab)


@dataclass
class Shape:
    """What a method's FLOP model needs to know about the model and the batch."""

    num_layers: int
    seq_len: int  # T
    hidden_size: int  # d
    ffn_hidden_size: int  # f
    vocab: int  # the padded vocabulary the head computes
    mask_prob: float  # predicted fraction: the head runs on round(mask_prob * T) tokens

    @property
    def predicted(self) -> int:
        return round(self.mask_prob * self.seq_len)

    def layer(self, n: int, n_kv: int = None) -> float:
        return layer_flops(n, self.hidden_size, self.ffn_hidden_size, n_kv)

    def head(self, m: int = None) -> float:
        return head_flops(self.predicted if m is None else m, self.hidden_size, self.vocab)
