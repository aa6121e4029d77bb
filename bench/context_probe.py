"""Does a model learn to use context? A synthetic neighbour-copy probe, ours against plain PyTorch.

Each sequence holds T/2 words drawn uniformly from W ids, each written twice in a row, from a
random phase; positions are masked independently with --mask-prob (all [MASK], no 80/10/10).
A masked word is predictable only from its visible partner: a model that ignores context
scores the unigram loss ln W, one that copies its partner about mask_prob x ln W plus the
left/right ambiguity. The 3ML rows of the method-quality study stay near unigram on real text;
this probe separates "our code" from "the method at this size":

- `ours/...`: the project's MLMModel (megatron-core layers) run by the method's policy through
  the plan engine (built by the trainer's build_model, without the DDP wrapper), `--init-method-std` as given.
- `torch/...`: an independent plain-PyTorch pre-LN encoder (`nn.TransformerEncoderLayer`; 3ML by
  gathering the unmasked tokens and scattering them over `e_mask + P[pos]`), no megatron-core,
  PyTorch's default initialisation or the normal(0, std) one megatron-core uses.

Every run sees the same batches, optimizer (torch AdamW, linear warm-up and decay), steps and
validation batches. Each finished run writes its result (`<results>/context_probe_<tag>_runs/`);
a rerun skips it. Output: `context_probe_<tag>.{md,json,png}`: validation loss against steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402  (puts the repository on the path)
from benchlib import REPO_ROOT, bench_logger, write_tables  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_effmlm.cli import HelpFormatter  # noqa: E402

# name -> (implementation, method, init std (None: PyTorch's default), encoder layers (None: --num-layers))
RUNS = {
    "ours/vanilla/std0.02": ("ours", "vanilla", 0.02, None),
    "ours/vanilla/std0.06": ("ours", "vanilla", 0.06, None),
    "ours/3ml/std0.02": ("ours", "3ml", 0.02, None),
    "ours/3ml/std0.06": ("ours", "3ml", 0.06, None),
    "torch/vanilla/default-init": ("torch", "vanilla", None, None),
    "torch/vanilla/std0.02": ("torch", "vanilla", 0.02, None),
    "torch/3ml/default-init": ("torch", "3ml", None, None),
    "torch/3ml-no-encoder/default-init": ("torch", "3ml", None, 0),
    "torch/3ml-1-encoder-layer/default-init": ("torch", "3ml", None, 1),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of: {', '.join(RUNS)}")
    p.add_argument("--num-layers", type=int, default=4, help="encoder layers (3ML's decoder comes on top)")
    p.add_argument("--decoder-layers", type=int, default=2, help="3ML's decoder layers")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=64, help="even: the words come in pairs")
    p.add_argument("--words", type=int, default=200, help="W: word ids drawn uniformly (unigram loss ln W)")
    p.add_argument("--mask-prob", type=float, default=0.4)
    p.add_argument("--micro-batch-size", type=int, default=32)
    p.add_argument("--train-iters", type=int, default=800)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-warmup-iters", type=int, default=30)
    p.add_argument("--eval-interval", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (two probes side by side: 1 each)")
    p.add_argument("--results-dir", default=os.path.join(REPO_ROOT, "bench", "results"))
    p.add_argument("--tag", default="cpu", help="names the output files: context_probe_<tag>.*")
    p.add_argument("--quick", action="store_true", help="tiny sizes and a few steps (the test suite's smoke run)")
    a = p.parse_args(argv)
    if a.quick:
        a.num_layers, a.decoder_layers, a.hidden_size, a.num_attention_heads = 2, 1, 32, 2
        a.seq_length, a.words, a.micro_batch_size, a.train_iters, a.eval_interval, a.eval_batches = 16, 20, 8, 4, 2, 2
    a.runs = [r for r in a.runs.split(",") if r]
    bad = [r for r in a.runs if r not in RUNS]
    if bad:
        p.exit(2, f"error: --runs: {bad[0]!r} is not a run of this probe; choose from {', '.join(RUNS)}\n")
    if a.seq_length % 2:
        p.exit(2, f"error: --seq-length must be even (the words come in pairs), got {a.seq_length}\n")
    return a


def make_batch(a, g):
    """(ids [b, T], masked [b, T] bool): pairs of words from a random phase."""
    b, T = a.micro_batch_size, a.seq_length
    words = torch.randint(0, a.words, (b, T // 2 + 1), generator=g).repeat_interleave(2, 1)  # [b, T + 2]
    phase = torch.randint(0, 2, (b, 1), generator=g)
    ids = words.gather(1, torch.arange(T).expand(b, T) + phase)
    return ids, torch.rand(b, T, generator=g) < a.mask_prob


# ---------------------------------------------------------------- the plain-PyTorch model
class TorchMLM(nn.Module):
    """Pre-LN encoder; 3ML: the encoder on the unmasked tokens, then `e_mask + P[pos]` at the
    masked positions and the decoder layers on all; LM head (dense, GELU, LayerNorm, tied)."""

    def __init__(self, a, method, std, enc_layers):
        super().__init__()
        D, self.T, self.mask_id, self.method = a.hidden_size, a.seq_length, a.words, method

        def layer():
            return nn.TransformerEncoderLayer(D, a.num_attention_heads, 4 * D, 0.0, activation="gelu",
                                              batch_first=True, norm_first=True)

        self.word = nn.Embedding(a.words + 1, D)  # + [MASK]
        self.pos = nn.Embedding(a.seq_length, D)
        self.encoder = nn.ModuleList(layer() for _ in range(enc_layers))
        self.encoder_ln = nn.LayerNorm(D)
        self.decoder = nn.ModuleList(layer() for _ in range(a.decoder_layers if method == "3ml" else 0))
        self.decoder_ln = nn.LayerNorm(D)
        self.mask_embedding = nn.Parameter(torch.zeros(D))
        self.dense, self.head_ln, self.bias = nn.Linear(D, D), nn.LayerNorm(D), nn.Parameter(torch.zeros(a.words + 1))
        for t in (self.word.weight, self.pos.weight, self.mask_embedding):
            nn.init.normal_(t, std=0.02)
        if std is not None:  # megatron-core's: normal(0, std), output projections / sqrt(2 L), zero biases
            scaled = std / math.sqrt(2 * (enc_layers + len(self.decoder)))
            for name, t in self.named_parameters():
                if t.dim() > 1:
                    nn.init.normal_(t, std=scaled if name.endswith(("out_proj.weight", "linear2.weight")) else std)
                elif name.endswith("bias") and "norm" not in name and "ln" not in name:
                    nn.init.zeros_(t)

    def forward(self, ids, masked):  # -> [m, V] logits at the masked positions (row-major)
        b, T = ids.shape
        pos = torch.arange(T).expand(b, T)
        if self.method == "vanilla":
            h = self.word(ids.masked_fill(masked, self.mask_id)) + self.pos(pos)
            for l in self.encoder:
                h = l(h)
            h = self.encoder_ln(h)
        else:
            n_kept = (~masked).sum(1)
            n = int(n_kept.max())
            kept = torch.sort(masked.int(), dim=1, stable=True).indices[:, :n]  # [b, n] unmasked positions first
            pad = torch.arange(n).expand(b, n) >= n_kept[:, None]  # [b, n] slots past a row's count
            h = self.word(ids.gather(1, kept)) + self.pos(kept)
            for l in self.encoder:
                h = l(h, src_key_padding_mask=pad)
            h = self.encoder_ln(h)
            full = self.pos(pos) + self.mask_embedding  # [b, T, D]: e_mask + P[pos]
            idx = kept.unsqueeze(-1).expand(-1, -1, h.shape[-1])
            h = full.scatter(1, idx, torch.where(pad.unsqueeze(-1), full.gather(1, idx), h))
            for l in self.decoder:
                h = l(h)
            h = self.decoder_ln(h)
        h = self.head_ln(F.gelu(self.dense(h[masked])))  # [m, D]
        return F.linear(h, self.word.weight, self.bias)


def torch_run(a, method, std, enc_layers):
    model = TorchMLM(a, method, std, a.num_layers if enc_layers is None else enc_layers)

    def loss_of(ids, masked):
        return F.cross_entropy(model(ids, masked), ids[masked])

    return model, loss_of


# ---------------------------------------------------------------- ours
def ours_run(a, method, std):
    from megatron_effmlm.parallel.init import initialize_distributed

    initialize_distributed(seed=a.seed)
    from megatron_effmlm.config import ModelConfig, ParallelConfig, PrecisionConfig
    from megatron_effmlm.model.builder import build_model, build_transformer_config
    from megatron_effmlm.plans import get_policy

    torch.manual_seed(a.seed)
    dec = a.decoder_layers if method == "3ml" else 0
    cfg = ModelConfig(num_layers=a.num_layers, hidden_size=a.hidden_size, num_attention_heads=a.num_attention_heads,
                      seq_length=a.seq_length, vocab_size=a.words + 1, hidden_dropout=0.0, attention_dropout=0.0,
                      decoder_layers=dec, transformer_impl="local", init_method_std=std,
                      make_vocab_size_divisible_by=1)  # the same W + 1 logits as the torch model
    tc = build_transformer_config(cfg, ParallelConfig(), PrecisionConfig())
    model = build_model(cfg, ParallelConfig(), tc, wrap_ddp=False)[0]  # as the trainer builds it, less DDP
    tokenizer = types.SimpleNamespace(mask=a.words)
    policy = get_policy(method, tokenizer=tokenizer, num_layers=a.num_layers,
                        **(dict(decoder_layers=dec, decoder_type="self") if dec else {}))

    def loss_of(ids, masked):
        batch = dict(text=ids.masked_fill(masked, a.words), padding_mask=torch.ones_like(ids),
                     loss_mask=masked.long(), labels=ids)
        total, n, _ = policy.loss(model(**policy.model_inputs(batch, 0)))
        return total / n

    return model, loss_of


def train(a, name, log):
    impl, method, std, enc_layers = RUNS[name]
    torch.manual_seed(a.seed)
    model, loss_of = ours_run(a, method, std) if impl == "ours" else torch_run(a, method, std, enc_layers)
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() > 1], "weight_decay": 0.01},
                             {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}], lr=a.lr)
    warm, total = a.lr_warmup_iters, a.train_iters
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * max(0.01, 1 - s / total))
    g_val = torch.Generator().manual_seed(999)
    val = [make_batch(a, g_val) for _ in range(a.eval_batches)]
    g = torch.Generator().manual_seed(100 + a.seed)  # the same training batches for every run

    def evaluate():
        model.eval()
        with torch.no_grad():
            loss = sum(loss_of(ids, m).item() for ids, m in val) / len(val)
        model.train()
        return loss

    curve, start = [[0, evaluate()]], time.perf_counter()
    tokens = 0
    for step in range(1, total + 1):
        ids, masked = make_batch(a, g)
        loss = loss_of(ids, masked)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        tokens += ids.numel()
        if step % a.eval_interval == 0 or step == total:
            curve.append([step, evaluate()])
            el = time.perf_counter() - start
            log(f"{name}: step {step}/{total} | train loss {loss.item():.3f} | val loss {curve[-1][1]:.3f} | "
                f"{tokens / el:,.0f} tokens/s | ETA {el / step * (total - step):.0f}s")
    unigram = math.log(a.words)
    reach = next((s for s, v in curve if v < 0.9 * unigram), None)
    return dict(name=name, impl=impl, method=method, init_std=std, encoder_layers=a.num_layers if enc_layers is None
                else enc_layers, curve=curve, final=curve[-1][1], unigram=unigram, steps_to_0_9_unigram=reach,
                seconds=round(time.perf_counter() - start, 1))


def config_of(a):
    keys = ("num_layers", "decoder_layers", "hidden_size", "num_attention_heads", "seq_length", "words", "mask_prob",
            "micro_batch_size", "train_iters", "lr", "lr_warmup_iters", "eval_interval", "eval_batches", "seed")
    return {k: getattr(a, k) for k in keys}


def main(argv=None):
    a = parse_args(argv)
    log = bench_logger()
    torch.set_num_threads(a.threads)
    run_dir = os.path.join(a.results_dir, f"context_probe_{a.tag}_runs")
    os.makedirs(run_dir, exist_ok=True)
    config = config_of(a)
    paths = {name: os.path.join(run_dir, name.replace("/", "_") + ".json") for name in a.runs}
    done = {}
    for name, path in paths.items():  # every finished run checked before any training
        if os.path.exists(path):
            with open(path) as f:
                done[name] = json.load(f)
            if done[name]["config"] != config:
                print(f"error: {path} was run with another configuration; give another --tag or --results-dir",
                      file=sys.stderr)
                return 2
    results = {}
    for i, name in enumerate(a.runs):
        path = paths[name]
        if name in done:
            log(f"[{i + 1}/{len(a.runs)}] {name}: done before ({path}), skipped")
            results[name] = done[name]
            continue
        log(f"[{i + 1}/{len(a.runs)}] {name}")
        r = train(a, name, log)
        r["config"], r["device"], r["git"] = config, benchlib.device_name(), benchlib.git_state()
        benchlib.write_json(path, r)
        results[name] = r
    report(a, results, log)
    return 0


def report(a, results, log):
    unigram = math.log(a.words)
    steps = sorted({s for r in results.values() for s, _ in r["curve"]})
    lines = [f"# Neighbour-copy context probe ({a.tag})", "",
             f"Validation loss (nats per masked token) every {a.eval_interval} steps; unigram ln {a.words} = "
             f"{unigram:.3f}. Config: `{json.dumps(config_of(a))}`. Written by `bench/context_probe.py`.", "",
             "| run | init std | encoder layers | " + " | ".join(str(s) for s in steps) + " | steps to 0.9 x unigram |",
             "|---|---|---|" + "---|" * len(steps) + "---|"]
    for name, r in results.items():
        by_step = dict((s, v) for s, v in r["curve"])
        cells = [f"{by_step[s]:.3f}" if s in by_step else "" for s in steps]
        std = "PyTorch default" if r["init_std"] is None else str(r["init_std"])
        reach = r["steps_to_0_9_unigram"]
        lines.append(f"| {name} | {std} | {r['encoder_layers']} | " + " | ".join(cells)
                     + f" | {reach if reach is not None else '> ' + str(a.train_iters)} |")
    md = "\n".join(lines) + "\n"
    stem, plt = write_tables(a.results_dir, f"context_probe_{a.tag}", {"config": config_of(a), "runs": results}, md)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        ax.plot(*zip(*r["curve"]), marker=".", label=name, linestyle="-" if r["impl"] == "ours" else "--")
    ax.axhline(unigram, color="grey", linewidth=0.8, label=f"unigram (ln {a.words})")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("neighbour-copy probe: does the model use context?")
    ax.legend(fontsize=7)
    fig.tight_layout()
    benchlib.save_figure(fig, stem, dpi=120)
    print(md)
    log(f"wrote {stem}.md/.json/.png")


if __name__ == "__main__":
    sys.exit(main())
