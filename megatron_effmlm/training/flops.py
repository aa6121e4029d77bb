"""The FLOP model (docs/methods.md): a layer on n query tokens attending over n_kv keys costs
n * (8 d^2 + 4 d f) for the projections and MLP plus 4 n n_kv d for attention (forward);
the LM head 2 (d^2 + d V) per predicted token; backward is twice the forward.

`runner_layer_flops` counts what the engine actually ran (padded live counts included);
`predicted_step_flops` is the analytic model of a method for bench comparisons.
"""

from __future__ import annotations


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


def predicted_step_flops(method: str, seq_len: int, num_layers: int, d: int, f: int, vocab: int,
                         mask_prob: float, decoder_layers: int = 2, keep_ratio: float = 0.5,
                         ltd_len: int = None, head_on_all: bool = False, decoder_type: str = "self") -> float:
    """Training FLOPs (forward + backward = 3x forward) per sequence of a method."""
    T, L = seq_len, num_layers
    m = round(mask_prob * T)
    if method in ("vanilla", "megatron-bert"):
        layers = L * layer_flops(T, d, f)
    elif method == "3ml" and decoder_type == "cross":
        layers = L * layer_flops(T - m, d, f) + decoder_layers * (layer_flops(m, d, f) + cross_attention_flops(m, T - m, d))
    elif method == "3ml":
        layers = L * layer_flops(T - m, d, f) + decoder_layers * layer_flops(T, d, f)
    elif method in ("token-drop", "sctd"):
        k = round(keep_ratio * T)
        c = L // 2 - 1  # layers 0..c run on all tokens (layer c yields the kept outputs)
        layers = (c + 1) * layer_flops(T, d, f) + (L - c - 2) * layer_flops(k, d, f) + layer_flops(T, d, f)
    elif method == "random-ltd":
        k = T if ltd_len is None else ltd_len
        layers = 2 * layer_flops(T, d, f) + (L - 2) * layer_flops(k, d, f)
    else:
        raise ValueError(f"no FLOP model for method {method!r}")
    head = head_flops(T if head_on_all else m, d, vocab)
    return 3.0 * (layers + head)


def iteration_flops(cfg) -> float:
    """The FLOP model's training FLOPs of one iteration (global batch) of a run (a RunConfig)."""
    m, t, o = cfg.model, cfg.train, cfg.train.method_options
    per_seq = predicted_step_flops(
        t.method, m.seq_length, m.num_layers, m.hidden_size, m.ffn_hidden_size,
        m.padded_vocab_size(cfg.parallel.tensor_model_parallel_size), cfg.data.mask_prob,
        decoder_layers=m.decoder_layers or 2, keep_ratio=o.get("td_keep_ratio", 0.5),
        decoder_type=m.decoder_type)
    return t.global_batch_size * per_seq
