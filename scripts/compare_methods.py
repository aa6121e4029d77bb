#!/usr/bin/env python
"""Train each method briefly at equal compute and plot the loss curves against FLOPs.

    python scripts/compare_methods.py --data-path data/demo/wiki_text_sentence \\
        --tokenizer-dir data/demo/tokenizer --out runs/compare --budget-vanilla-steps 80

Every method gets the same model, data and --train-flops-budget (the FLOP model's count of
`--budget-vanilla-steps` vanilla steps), so the x axis is compute, as in the 3ML paper. The
losses are each method's own training objective: 3ML predicts 50% of the tokens and its curve
is not on the same scale; downstream fine-tuning is the real comparison.
"""
import argparse
import json
import os
import subprocess
import sys
import time

METHODS = {
    "vanilla": [],
    "3ml": ["--method", "3ml"],
    "token-drop": ["--method", "token-drop"],
    "sctd": ["--method", "sctd"],
    "random-ltd": ["--method", "random-ltd", "--ltd-start", "32", "--ltd-steps", "100"],
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", required=True)
    p.add_argument("--tokenizer-dir", required=True)
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--budget-vanilla-steps", type=int, default=80)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("model_args", nargs="*", help="extra pretrain_effmlm.py flags (after --)")
    a = p.parse_args()

    from megatron_effmlm.data.tokenizer import EffMLMTokenizer
    from megatron_effmlm.config import pad_vocab_size
    from megatron_effmlm.training.flops import predicted_step_flops

    model = ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4", "--seq-length", "128",
             "--micro-batch-size", "8", "--global-batch-size", "16", "--lr", "5e-4", "--lr-warmup-iters", "10",
             "--lr-decay-style", "constant", "--log-interval", "10", "--split", "98,2,0", *a.model_args]
    vocab = EffMLMTokenizer.from_dir(a.tokenizer_dir).vocab_size
    per_step = 16 * predicted_step_flops("vanilla", 128, 4, 256, 1024, pad_vocab_size(vocab), 0.15)
    budget = a.budget_vanilla_steps * per_step
    os.makedirs(a.out, exist_ok=True)
    curves = {}
    for m in a.methods:
        t0 = time.time()
        png = os.path.join(a.out, f"{m}.png")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.nproc), "pretrain_effmlm.py",
               "--data-path", a.data_path, "--tokenizer-dir", a.tokenizer_dir, *model, *METHODS[m],
               "--train-iters", str(10 * a.budget_vanilla_steps), "--train-flops-budget", f"{budget:.6e}",
               "--loss-curve", png]
        print(f"== {m}: {' '.join(METHODS[m]) or '(vanilla)'}", flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        if r.returncode:
            sys.exit(f"error: {m} failed:\n{r.stderr[-3000:]}")
        lines = [l for l in r.stdout.splitlines() if l.startswith(("iter", "reached"))]
        print("\n".join(lines[-2:]), flush=True)
        hist = json.load(open(os.path.splitext(png)[0] + ".json"))
        flops = dict(hist["flops"])
        curves[m] = [(flops[i], loss) for i, loss in hist["train"] if i in flops]
        print(f"   {len(curves[m])} steps in {time.time() - t0:.0f} s", flush=True)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for m, pts in curves.items():
        x, y = zip(*pts)
        # a running mean over 5 steps: single steps of a tiny model are noisy
        ys = [sum(y[max(0, i - 4): i + 1]) / len(y[max(0, i - 4): i + 1]) for i in range(len(y))]
        ax.plot([v / 1e12 for v in x], ys, label=f"{m} ({len(pts)} steps)")
    ax.set_xlabel("training compute (TFLOPs, FLOP model)")
    ax.set_ylabel("training loss (own objective, 5-step mean)")
    ax.set_title(f"Methods at equal compute ({a.budget_vanilla_steps} vanilla steps)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = os.path.join(a.out, "methods_loss_vs_flops.png")
    fig.savefig(out, dpi=110)
    summary = {m: {"steps": len(p), "final_loss_mean5": sum(l for _, l in p[-5:]) / min(5, len(p))} for m, p in curves.items()}
    json.dump(summary, open(os.path.join(a.out, "summary.json"), "w"), indent=1)
    print(f"\nsteps at equal compute and the mean loss of the last 5: {json.dumps(summary)}")
    print(f"loss vs FLOPs: {out}")


if __name__ == "__main__":
    main()
