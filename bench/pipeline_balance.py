#!/usr/bin/env python
"""Per-stage work and the pipeline bubble of each method, with the even layer split and the
split balanced by FLOPs (`--pipeline-split-by flops`). Analytic, from the FLOP model on the
shapes the plans run (no timing): the 1F1B step takes (m + p - 1) slots of the busiest stage,
so its efficiency is (m * mean stage work) / ((m + p - 1) * max stage work).

    python bench/pipeline_balance.py                     # BERT-base shape, PP=4, 8 micro-batches
    python bench/pipeline_balance.py --num-layers 24 --hidden-size 1024 --pp 8 --micro-batches 32
"""
import argparse
import os

from benchlib import save_figure, write_json
from megatron_effmlm.model.flops import Shape
from megatron_effmlm.parallel.balance import pipeline_efficiency, split_by_flops, stage_loads
from megatron_effmlm.plans import POLICIES

METHODS = {"vanilla": 0.15, "3ml": 0.5, "3ml-cross": 0.5, "token-drop": 0.15}


def main():
    from megatron_effmlm.cli import HelpFormatter  # --help shows the defaults

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--num-layers", type=int, default=12)
    p.add_argument("--hidden-size", type=int, default=768)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--vocab", type=int, default=30592)
    p.add_argument("--pp", type=int, default=4)
    p.add_argument("--micro-batches", type=int, default=8)
    p.add_argument("--out", default="bench/results")
    a = p.parse_args()
    L, d = a.num_layers, a.hidden_size
    rows = []
    for name, mask in METHODS.items():
        method, dtype = ("3ml", "cross") if name == "3ml-cross" else (name, "self")
        costs, extra = POLICIES[method].layer_costs(Shape(L, a.seq_length, d, 4 * d, a.vocab, mask), decoder_type=dtype)
        if L % a.pp:
            raise SystemExit(f"error: --num-layers {L} is not divisible by --pp {a.pp} (the even split)")
        even = [L // a.pp] * a.pp
        bal = split_by_flops(costs, extra, a.pp)
        for split, counts in (("even", even), ("flops", bal)):
            loads = stage_loads(costs, extra, counts)
            rows.append({"method": name, "split": split, "layers": counts,
                         "stage_gflops": [round(x / 1e9, 2) for x in loads],
                         "max_over_mean": max(loads) / (sum(loads) / len(loads)),
                         "efficiency": pipeline_efficiency(loads, a.micro_batches)})
    print(f"L={L} d={d} T={a.seq_length} V={a.vocab} PP={a.pp} micro-batches={a.micro_batches} "
          "(forward GFLOPs per sequence per stage, FLOP model)")
    print(f"{'method':<11} {'split':<6} {'layers/stage':<16} {'stage GFLOPs':<34} {'max/mean':>8} {'1F1B eff.':>9} {'bubble':>7}")
    for r in rows:
        print(f"{r['method']:<11} {r['split']:<6} {str(r['layers']):<16} {str(r['stage_gflops']):<34} "
              f"{r['max_over_mean']:>8.3f} {r['efficiency']:>9.3f} {1 - r['efficiency']:>7.3f}")
    os.makedirs(a.out, exist_ok=True)
    tag = f"pipeline_balance_L{L}_pp{a.pp}"
    write_json(os.path.join(a.out, tag + ".json"), {"config": vars(a), "rows": rows}, indent=1)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METHODS), figsize=(3.2 * len(METHODS), 3.4), sharey=True)
    for ax, name in zip(axes, METHODS):
        for k, split in enumerate(("even", "flops")):
            r = next(r for r in rows if r["method"] == name and r["split"] == split)
            xs = [i + (k - 0.5) * 0.38 for i in range(a.pp)]
            ax.bar(xs, r["stage_gflops"], width=0.38, label=f"{split} {r['layers']} (eff. {r['efficiency']:.2f})")
        ax.set_title(name)
        ax.set_xlabel("pipeline stage")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("forward GFLOPs / sequence")
    fig.suptitle(f"Per-stage work, L={L}, T={a.seq_length}, PP={a.pp}")
    fig.tight_layout()
    png = save_figure(fig, os.path.join(a.out, tag))
    print(f"results: {os.path.join(a.out, tag + '.json')}, {png}")


if __name__ == "__main__":
    main()
