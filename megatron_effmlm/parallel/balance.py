"""Pipeline stage splits. With token plans the live tokens change from layer to layer (and
3ML's decoder and the LM head sit on the last stage), so an even layer split gives the stages
uneven work. `split_by_flops` finds the contiguous split of the encoder layers that minimises
the busiest stage's FLOPs (the pipeline's step time), given each layer's cost by the method's
FLOP model (`Policy.layer_costs`)."""

from __future__ import annotations

from typing import List, Sequence

def stage_loads(costs: Sequence[float], extra_last: float, counts: Sequence[int]) -> List[float]:
    loads, start = [], 0
    for n in counts:
        loads.append(sum(costs[start:start + n]))
        start += n
    loads[-1] += extra_last
    return loads


def split_by_flops(costs: Sequence[float], extra_last: float, stages: int) -> List[int]:
    """Layers per stage (each >= 1), contiguous, minimising the largest stage load."""
    L = len(costs)
    if stages > L:
        raise ValueError(f"{stages} pipeline stages for {L} layers")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: minimal max-load splitting the first i layers into s stages (not the last)
    best = [[inf] * (L + 1) for _ in range(stages + 1)]
    cut = [[0] * (L + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, L - (stages - s) + 1):
            for j in range(s - 1, i):
                load = prefix[i] - prefix[j] + (extra_last if s == stages and i == L else 0.0)
                v = max(best[s - 1][j], load)
                if v < best[s][i]:
                    best[s][i], cut[s][i] = v, j
    counts, i = [], L
    for s in range(stages, 0, -1):
        j = cut[s][i]
        counts.append(i - j)
        i = j
    return counts[::-1]


def pipeline_efficiency(loads: Sequence[float], micro_batches: int) -> float:
    """1F1B: the step takes (m + p - 1) slots of the busiest stage; ideal is m x mean load."""
    p = len(loads)
    return (micro_batches * sum(loads) / p) / ((micro_batches + p - 1) * max(loads))


def layout_string(counts: Sequence[int]) -> str:
    """megatron-core's pipeline_model_parallel_layout for these per-stage layer counts."""
    stages = [f"t*{n}" for n in counts]
    return "E" + "|".join(stages) + "L"
