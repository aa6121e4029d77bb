#!/usr/bin/env python
"""Compare runs' loss curves: the data files `--loss-curve` writes (<name>.json beside the PNG).

    python tools/plot_loss_curves.py --curve "std 0.02=runs/a/loss.json" --curve "std 0.05=runs/b/loss.json" \\
        --hline "6.856=unigram" --output runs/compare.png

One colour per run: training loss as a thin line, validation loss as dots. Prints the
validation losses side by side at the iterations every run evaluated.
"""
import argparse
import json
import math
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def _pairs(path, data, key):
    rows = data.get(key) if isinstance(data, dict) else None
    ok = isinstance(rows, list) and all(
        isinstance(r, list) and len(r) == 2 and all(isinstance(v, (int, float)) for v in r) for r in rows)
    if not ok:
        raise ValueError(f"{path}: not a --loss-curve data file (needs '{key}' as a list of [iteration, loss])")
    return [(int(i), float(v)) for i, v in rows]


def load_curve(path):
    """{'train': [(iteration, loss)], 'valid': [...]} from a --loss-curve data file (plain JSON)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    try:
        with open(path) as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    return {key: _pairs(path, data, key) for key in ("train", "valid")}


def parse_curve(spec):
    """'[LABEL=]PATH' -> (label, path); the label may hold '=', so the path is after the last one."""
    label, _, path = spec.rpartition("=")
    return label or os.path.splitext(os.path.basename(path))[0], path


def parse_hline(spec):
    """'VALUE[=LABEL]' -> (label or None, value)."""
    value, _, label = spec.partition("=")
    try:
        return label or None, float(value)
    except ValueError:
        raise ValueError(f"--hline {spec!r}: {value!r} is not a number") from None


def side_by_side(curves):
    """Markdown rows of the validation loss at the iterations every curve evaluated."""
    valid = [dict(c["valid"]) for c in curves.values()]
    common = sorted(set.intersection(*(set(v) for v in valid)))
    lines = ["| iteration | " + " | ".join(curves) + " |", "|---:|" + "---:|" * len(curves)]
    for it in common:
        vals = [v[it] for v in valid]
        lines.append(f"| {it} | " + " | ".join(f"{v:.4f}" for v in vals) + " |")
    return lines


def main(argv=None):
    from megatron_effmlm.cli import HelpFormatter

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--curve", action="append", required=True, metavar="[LABEL=]PATH",
                   help="a --loss-curve data file (.json), repeated; the label defaults to the file name")
    p.add_argument("--output", required=True, help="the plot (.png)")
    p.add_argument("--hline", action="append", default=[], metavar="VALUE[=LABEL]",
                   help="a horizontal reference line, e.g. the unigram loss")
    p.add_argument("--title", default="MLM loss")
    a = p.parse_args(argv)
    try:
        if not a.output.lower().endswith(".png"):
            raise ValueError(f"--output {a.output}: give a .png file name")
        if os.path.isdir(a.output):
            raise ValueError(f"--output {a.output}: is a directory")
        curves = {}
        for spec in a.curve:
            label, path = parse_curve(spec)
            if label in curves:
                raise ValueError(f"--curve {spec!r}: label {label!r} given twice")
            curves[label] = load_curve(path)
        hlines = [parse_hline(spec) for spec in a.hline]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_effmlm.atomic import save_figure

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for n, (label, c) in enumerate(curves.items()):
        colour = f"C{n}"
        if c["train"]:
            ax.plot(*zip(*c["train"]), color=colour, lw=0.8, alpha=0.6, label=f"{label} (train)")
        if c["valid"]:
            ax.plot(*zip(*c["valid"]), "o-", color=colour, ms=3, label=f"{label} (validation)")
    for label, value in hlines:
        ax.axhline(value, color="grey", ls="--", lw=0.8, label=label or f"{value:g}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(a.title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
    save_figure(fig, a.output)
    if any(c["valid"] for c in curves.values()):
        print("\n".join(side_by_side(curves)))
    finals = {k: c["valid"][-1] for k, c in curves.items() if c["valid"]}
    for k, (it, v) in finals.items():
        gaps = [f"{v - h:+.3f} vs {lab or f'{h:g}'}" for lab, h in hlines if math.isfinite(h)]
        print(f"{k}: last validation loss {v:.4f} at iteration {it}" + (f" ({', '.join(gaps)})" if gaps else ""))
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
