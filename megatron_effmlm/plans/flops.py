"""A step's FLOPs by the FLOP model: each method's `Policy.layer_costs` (its layers and head,
from the primitives of model/flops.py) added up; read by the progress line,
--train-flops-budget's schedule, pipeline balancing and the benchmarks."""

from __future__ import annotations

from megatron_effmlm.model.flops import Shape
from megatron_effmlm.plans.base import POLICIES


def step_flops(method: str, shape: Shape, head_on_all: bool = False, **options) -> float:
    """Training FLOPs (forward + backward = 3 x forward) per sequence of one step of `method`
    (a --method name; "megatron-bert": vanilla with the head on every position, as
    megatron-core's BertModel); `options`: the method's (plans' constructor keywords)."""
    if method == "megatron-bert":
        method, head_on_all = "vanilla", True
    if method not in POLICIES:
        raise ValueError(f"no FLOP model for method {method!r}")
    enc, extra = POLICIES[method].layer_costs(shape, **options)
    if head_on_all:
        extra += shape.head(shape.seq_len) - shape.head()
    return 3.0 * (sum(enc) + extra)


def run_shape(cfg) -> Shape:
    """The Shape of a run (a RunConfig)."""
    m = cfg.model
    return Shape(m.num_layers, m.seq_length, m.hidden_size, m.ffn_hidden_size,
                 m.padded_vocab_size(cfg.parallel.tensor_model_parallel_size), cfg.data.mask_prob)


def iteration_flops(cfg) -> float:
    """The FLOP model's training FLOPs of one iteration (global batch) of a run (a RunConfig)."""
    t = cfg.train
    return t.global_batch_size * step_flops(t.method, run_shape(cfg), **t.method_options)
