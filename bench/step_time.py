"""Training-step time and activation memory of every method, side by side, against
megatron-core's own BertModel (the Megatron-LM baseline: LM head on every position).

    python bench/step_time.py            # default: 12 layers, T = 512, d = 256 (< 10 min on 2 CPU cores)
    python bench/step_time.py --quick    # tiny: 4 layers, T = 128 (about a minute)
    python bench/step_time.py --mode memory   # only the activation-memory part
    python bench/step_time.py --precisions fp32,bf16   # both precisions side by side (bf16 / fp32 per method)
    python bench/step_time.py --bf16          # bf16 only (megatron-core mixed precision; CPUs with avx512_bf16)

One process, world size 1 (gloo on CPU, NCCL on a GPU), fp32 unless --bf16 / --precisions. Every method gets its own model
(same seed, same initial weights where the shapes agree) and its own megatron-core optimizer
(`get_megatron_optimizer`, adam: torch AdamW on CPU, FusedAdam where Apex/TE exist), wrapped
in megatron-core DDP, and runs megatron-core's forward/backward schedule exactly as
`training/loop.py` does. A timed step = zero grads + forward + backward + finalize grads +
optimizer step + the policy's after_step (token dropping's importance update), on the same
real batches from the demo Wikipedia corpus. Methods run interleaved in rounds (A B C ... A B C),
warm-up rounds first; the median per method is reported.

Memory: one forward per method under `torch.autograd.graph.saved_tensors_hooks`, summing the
bytes of the distinct storages saved for backward (parameters excluded); on CUDA also the
peak of `torch.cuda.max_memory_allocated` over a whole step above the static state. Our methods
are measured again with the LM head in chunks (`--memory-head-chunk`, the model's
--lm-head-chunk-size): the chunks' logits are recomputed in backward, not saved (the head's
[m, h] input rows, held by the chunks' checkpoints, are then not seen by the hook).

Model FLOP/s (the FLOP model's FLOPs of the step over its median time) is reported as a fraction
of this machine's own peak, measured in the same run by a timed large matrix product in the same
precision (`--peak-shape`): the CPU's MFU.

Results: bench/results/step_time_<device>[_<precisions>].{json,md,png}. Targets are reported, not asserted.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402

from megatron_effmlm.plans import POLICIES  # noqa: E402
from benchlib import (BASELINE, Runner, bench_logger, build_data, device_name, device_tag, fmt, git_state,  # noqa: E402
                      masking_of, policy_of, predicted_flops, save_figure, sync, write_tables)

# The methods in table order: every registered policy. "sctd" is ScTD's plain (token-dropping)
# step, "sctd-consistency" its every-F-th step with the second, full pass; "megatron-bert" is
# the baseline.
_FIRST = ["vanilla", "3ml", "token-drop", "sctd"]
ALL_METHODS = [m for m in _FIRST if m in POLICIES] + ["sctd-consistency"] + \
    sorted(set(POLICIES) - set(_FIRST)) + [BASELINE]
# Step-time targets, as fractions of the baseline's step time.
TARGETS = {"vanilla": 0.80, "3ml": 0.65, "token-drop": 0.63}
FLOP_TOLERANCE = 0.08  # |measured / predicted - 1| <= 8%
# Each method's step time over our vanilla's, against the FLOP model's ratio: within 5%.
VANILLA_TOLERANCE = 0.05
BF16_OVER_FP32_MAX = 0.6  # bf16 step time / fp32 step time, vanilla, default config
MFU_MIN = 0.5  # vanilla's model FLOP/s over the measured matmul peak
PRECISIONS = ("fp32", "bf16")
# RoBERTa-base, for --vocab auto: the LM head's share of the FLOPs is kept at base's.
ROBERTA_BASE = dict(num_layers=12, d=768, vocab=50265, seq_len=512)


def parse_args(argv=None):
    from megatron_effmlm.cli import HelpFormatter  # --help shows the defaults

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny config: 4 layers, T=128, d=128, 2 warm-up + 4 timed rounds")
    p.add_argument("--mode", choices=["all", "time", "memory"], default="all")
    p.add_argument("--num-layers", type=int, default=None, help="12 (quick: 4)")
    p.add_argument("--hidden-size", type=int, default=None, help="256 (quick: 128)")
    p.add_argument("--num-attention-heads", type=int, default=None, help="4 (quick: 2)")
    p.add_argument("--seq-length", type=int, default=None, help="512 (quick: 128)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="2 (quick: 4)")
    p.add_argument("--vocab", default="auto",
                   help="model vocabulary (>= the tokenizer's; padded to a multiple of 128). 'auto': chosen so "
                        "the LM head's share of the step FLOPs equals RoBERTa-base's (d=768, V=50265, L=12, T=512)")
    p.add_argument("--tokenizer-vocab", type=int, default=8192, help="WordPiece vocabulary trained on the demo corpus")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (2)")
    p.add_argument("--steps", type=int, default=None, help="timed rounds, i.e. timed steps per method (10; quick: 4)")
    p.add_argument("--num-batches", type=int, default=4, help="distinct real batches, cycled")
    p.add_argument("--methods", default=",".join(ALL_METHODS),
                   help=f"comma-separated subset of {','.join(ALL_METHODS)} (the baseline is always added)")
    p.add_argument("--dropout", type=float, default=0.1, help="hidden and attention dropout")
    p.add_argument("--decoder-layers", type=int, default=2, help="3ml decoder layers")
    p.add_argument("--td-keep-ratio", type=float, default=0.5)
    p.add_argument("--sctd-interval", type=int, default=10)
    p.add_argument("--ltd-start", type=int, default=None, help="random-ltd kept length (its schedule's start; default 64, quick 16)")
    p.add_argument("--lm-head-chunk-size", type=int, default=0,
                   help="our models' --lm-head-chunk-size in every measurement (0: the head on all predicted rows at once)")
    p.add_argument("--memory-head-chunk", type=int, default=256,
                   help="memory mode: each of our methods' saved bytes also with the LM head in chunks of this many rows")
    p.add_argument("--transformer-impl", default="local", choices=["local", "transformer_engine"],
                   help="layer spec of our models (the baseline always uses bert_layer_local_spec)")
    p.add_argument("--precisions", default="fp32",
                   help="comma-separated subset of fp32,bf16: every method in each, interleaved in the same rounds")
    p.add_argument("--bf16", action="store_true", help="the same as --precisions bf16")
    p.add_argument("--peak-shape", default="4096,2048,2048",
                   help="M,K,N of the timed matrix product that measures the machine's peak FLOP/s")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--data-dir", default=os.path.join(REPO_ROOT, "data", "bench"))
    p.add_argument("--results-dir", default=os.path.join(REPO_ROOT, "bench", "results"))
    p.add_argument("--tag", default=None, help="results file suffix (default: the device name, e.g. cpu)")
    a = p.parse_args(argv)
    q = a.quick
    defaults = dict(num_layers=(4, 12), hidden_size=(128, 256), num_attention_heads=(2, 4), seq_length=(128, 512),
                    micro_batch_size=(4, 2), warmup=(2, 2), steps=(4, 10), ltd_start=(16, 64))
    for k, (quick, full) in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, quick if q else full)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        p.error(f"--methods: unknown {bad}; choose from {ALL_METHODS}")
    if BASELINE not in methods:
        methods.append(BASELINE)
    a.methods = [m for m in ALL_METHODS if m in methods]
    precs = ["bf16"] if a.bf16 else [x.strip() for x in a.precisions.split(",") if x.strip()]
    bad = [x for x in precs if x not in PRECISIONS]
    if bad or not precs:
        p.error(f"--precisions: unknown {bad}; choose from {','.join(PRECISIONS)}")
    a.precisions = [x for x in PRECISIONS if x in precs]
    if "bf16" in a.precisions and not torch.cuda.is_available():
        from megatron_effmlm.compat.cpu import cpu_bf16_error

        if (why := cpu_bf16_error()) is not None:
            p.error(why)
    try:
        a.peak_shape = tuple(int(x) for x in a.peak_shape.split(","))
        assert len(a.peak_shape) == 3 and min(a.peak_shape) > 0
    except (ValueError, AssertionError):
        p.error(f"--peak-shape {a.peak_shape!r}: give three positive integers M,K,N")
    return a


# ----------------------------------------------------------------------------- helpers

def auto_vocab(num_layers: int, d: int, seq_len: int) -> int:
    """The vocabulary whose LM head costs the same share of a head-on-all step as RoBERTa-base's."""
    from megatron_effmlm.model.flops import head_flops, layer_flops

    rb = ROBERTA_BASE
    share = head_flops(1, rb["d"], rb["vocab"]) / (
        rb["num_layers"] * layer_flops(rb["seq_len"], rb["d"], 4 * rb["d"]) / rb["seq_len"])
    per_token_layers = num_layers * layer_flops(seq_len, d, 4 * d) / seq_len
    v = share * per_token_layers / (2 * d) - d
    return int(round(v / 128)) * 128


# ----------------------------------------------------------------------------- data

# ----------------------------------------------------------------------------- models and steps

def build_runners(a, tok, batches, log):
    from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
    from megatron.core.models.bert.bert_model import BertModel

    from megatron_effmlm.config import ModelConfig, OptimConfig, ParallelConfig, PrecisionConfig
    from megatron_effmlm.model.builder import build_model, build_transformer_config, ddp_wrap, mark_replicated_params
    from megatron_effmlm.parallel.init import set_seed
    from megatron_effmlm.plans import get_policy
    from megatron_effmlm.training.step import build_optimizer, wire_grads

    runners = []
    for precision, name in [(pr, m) for pr in a.precisions for m in a.methods]:
        bf16 = precision == "bf16"
        par, prec = ParallelConfig(), PrecisionConfig(bf16=bf16)
        set_seed(a.seed)  # the same initial weights for every model (where the shapes agree)
        cls = policy_of(name)
        opts = cls.options(vars(a))  # the bench's flags that are the method's (same names), else its defaults
        mcfg = ModelConfig(
            num_layers=a.num_layers, hidden_size=a.hidden_size, num_attention_heads=a.num_attention_heads,
            seq_length=a.seq_length, vocab_size=a.model_vocab, hidden_dropout=a.dropout,
            attention_dropout=a.dropout, transformer_impl=a.transformer_impl,
            lm_head_chunk_size=a.lm_head_chunk_size, **cls.model_overrides(opts),
        )
        tconfig = build_transformer_config(mcfg, par, prec)
        if name == BASELINE:
            bert = BertModel(
                config=tconfig, num_tokentypes=0, transformer_layer_spec=bert_layer_local_spec,
                vocab_size=mcfg.padded_vocab_size(), max_sequence_length=mcfg.max_position_embeddings,
                pre_process=True, post_process=True, share_embeddings_and_output_weights=True,
                parallel_output=True, add_binary_head=False,
            )
            if torch.cuda.is_available():
                bert.cuda()
            if bf16:
                bert.to(torch.bfloat16)
            mark_replicated_params(bert)
            model = ddp_wrap([bert], tconfig)[0]
        else:
            model = build_model(mcfg, par, tconfig)[0]
        optimizer = build_optimizer([model], OptimConfig(lr=1e-4, min_lr=1e-5), prec)
        wire_grads(tconfig, [model], optimizer)

        policy, step_index = None, None
        if name != BASELINE:
            policy = get_policy(cls.name, tokenizer=tok, num_layers=a.num_layers, seed=a.seed, **opts)
            # sctd: never a multiple of the interval, a plain token-dropping step; sctd-consistency:
            # a multiple, the two-pass step; random-ltd: the schedule's start (ltd_start tokens)
            step_index = 1 if name == "sctd" else 0
        data = batches[masking_of(name)]
        if torch.cuda.is_available():
            data = [{k: v.cuda() for k, v in b.items()} for b in data]
        runners.append(Runner(name, model, optimizer, data, tconfig, policy, step_index, precision))
        nparams = sum(p.numel() for p in model.parameters())
        log(f"built {runners[-1].label:24s} {nparams / 1e6:7.2f}M parameters")
    return runners


# ----------------------------------------------------------------------------- memory

def saved_activation_bytes(runner) -> int:
    """Bytes of the distinct storages saved for backward during one training forward
    (parameters excluded), then a backward to release them."""
    model = runner.model
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        try:
            s = t.untyped_storage()
            ptr = s.data_ptr()
            if ptr not in param_ptrs and ptr not in seen:
                seen[ptr] = s.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. sparse or opaque tensors
            pass
        return t

    batch = runner.next_batch()
    model.zero_grad_buffer()
    runner.optimizer.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, loss_func = runner.train_step.forward_step(iter([batch]), model)
        total, n, _ = loss_func(out)
    (total / n).backward()
    model.zero_grad_buffer()
    runner.optimizer.zero_grad()
    return sum(seen.values())


def cuda_peak_bytes(runner):
    """Peak allocated bytes over one whole step above what was allocated before it (CUDA only)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    runner.step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


# ----------------------------------------------------------------------------- peak

def measured_peak_flops(shape, precision, reps=5, warmup=2):
    """This machine's dense peak in FLOP/s: the best of `reps` timed [M,K] x [K,N] products in
    the given precision (the same torch threads and kernels the models use)."""
    M, K, N = shape
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(M, K, generator=g).to(dev, dtype)
    w = torch.randn(K, N, generator=g).to(dev, dtype)
    best = float("inf")
    for i in range(warmup + reps):
        sync()
        t0 = time.perf_counter()
        torch.mm(x, w)
        sync()
        if i >= warmup:
            best = min(best, time.perf_counter() - t0)
    return 2.0 * M * K * N / best


# ----------------------------------------------------------------------------- predictions

def baseline_counted_flops(batches, a):
    """The engine's way of counting, applied to BertModel: every layer and the head on all T."""
    from megatron_effmlm.model.flops import head_flops, layer_flops

    b, T = batches[0]["text"].shape
    return a.num_layers * b * layer_flops(T, a.hidden_size, 4 * a.hidden_size) + head_flops(b * T, a.hidden_size, a.model_vocab_padded)


# ----------------------------------------------------------------------------- output

def write_outputs(a, res, log):
    stem, plt = write_tables(a.results_dir, f"step_time_{a.tag}", res, markdown_table(res))

    rows = res["methods"]
    names = [r["method"] if r["precision"] == "fp32" else f"{r['method']} ({r['precision']})" for r in rows]
    have_time = any(r.get("ratio_to_baseline") is not None for r in rows)
    have_mem = any(r.get("saved_bytes") is not None for r in rows)
    have_mfu = any(r.get("mfu_of_measured_peak") is not None for r in rows)
    panels = [p for p, ok in (("time", have_time), ("mfu", have_mfu), ("mem", have_mem)) if ok]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.6), squeeze=False)
    x = list(range(len(names)))
    w = 0.38
    for ax, panel in zip(axes[0], panels):
        if panel == "time":
            meas = [r.get("ratio_to_baseline") or 0 for r in rows]
            pred = [r.get("predicted_ratio") or 0 for r in rows]
            b1 = ax.bar([i - w / 2 for i in x], meas, w, label="measured step time", color="#3b75af")
            ax.bar([i + w / 2 for i in x], pred, w, label="FLOP-model prediction", color="#bbbbbb")
            for i, r in enumerate(rows):
                t = TARGETS.get(r["method"])
                if t:
                    ax.hlines(t, i - 0.45, i + 0.45, colors="#c0392b", linestyles="--", lw=1.2,
                              label="target" if i == 0 else None)
            ax.bar_label(b1, fmt="%.2f", fontsize=7)
            ax.set_ylabel(f"step time / {BASELINE}")
            ax.set_title("step time (fwd + bwd + optimizer), ratio to BertModel of the same precision")
        elif panel == "mfu":
            mfu = [100 * (r.get("mfu_of_measured_peak") or 0) for r in rows]
            b1 = ax.bar(x, mfu, 2 * w, color=["#3b75af" if r["precision"] == "fp32" else "#e08a2c" for r in rows])
            ax.bar_label(b1, fmt="%.0f", fontsize=7)
            ax.axhline(100 * MFU_MIN, color="#c0392b", ls="--", lw=1.2, label=f"target (vanilla) {MFU_MIN:.0%}")
            ax.set_ylabel("model FLOP/s, % of the measured matmul peak")
            ax.set_title("CPU MFU (peak: timed matrix product, same precision, same run)")
        else:
            base = [r.get("saved_ratio_to_baseline") or 0 for r in rows]
            van = [r.get("saved_ratio_to_vanilla") or 0 for r in rows]
            b1 = ax.bar([i - w / 2 for i in x], base, w, label="/ megatron-bert", color="#6a9f58")
            b2 = ax.bar([i + w / 2 for i in x], van, w, label="/ vanilla", color="#a8d08d")
            ax.bar_label(b1, fmt="%.2f", fontsize=7)
            ax.bar_label(b2, fmt="%.2f", fontsize=7)
            ax.set_ylabel("saved-for-backward bytes ratio")
            ax.set_title(f"activation memory (saved tensors), T = {a.seq_length}")
        if panel != "mfu":
            ax.axhline(1.0, color="black", lw=0.6)
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=7)
    c = res["config"]
    fig.suptitle(f"{res['device']}  |  L={c['num_layers']} d={c['hidden_size']} T={c['seq_length']} "
                 f"b={c['micro_batch_size']} V={c['model_vocab_padded']} {'/'.join(res['precisions'])}  |  {res['date']}", fontsize=8)
    fig.tight_layout()
    save_figure(fig, stem, dpi=120)
    return [stem + ext for ext in (".json", ".md", ".png")]


def yes_no(v):
    return "-" if v is None else ("yes" if v else "NO")


def markdown_table(res):
    c = res["config"]
    peaks = res.get("peak_flops") or {}
    lines = [
        f"Device: {res['device']}; date: {res['date']}; torch {res['torch']}, megatron-core {res['megatron_core']}.",
        f"Config: L={c['num_layers']}, d={c['hidden_size']}, heads={c['num_attention_heads']}, T={c['seq_length']}, "
        f"micro-batch {c['micro_batch_size']}, model vocab {c['model_vocab_padded']} (tokenizer {c['tokenizer_vocab']}), "
        f"dropout {c['dropout']}, {', '.join(res['precisions'])}, optimizer {c['optimizer']}; {c['warmup']} warm-up + "
        f"{c['steps']} timed rounds over {c['num_batches']} real batches; random-ltd at {c['ltd_len']} kept tokens; "
        f"3ml decoder {c['decoder_layers']}.",
    ]
    if peaks:
        shape = "x".join(str(x) for x in res["peak_shape"])
        lines.append("Measured peak (best of 5 timed " + shape + " matrix products, same run): " +
                     ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()) +
                     ". CPU MFU = the FLOP model's FLOPs of a step / its median time / that peak.")
    lines += [
        "",
        "| method | precision | median step (s) | of which optimizer (s) | / megatron-bert | (minima) | FLOP-predicted "
        "| measured / predicted | / vanilla | FLOP model / vanilla | measured / predicted (vs vanilla) "
        "| same, without the optimizer step "
        "| model GFLOP/s | MFU of measured peak | / fp32 | target | target held | saved activations (MiB) "
        "| mem / vanilla | mem / megatron-bert | CUDA peak (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|---:|---:|---:|",
    ]
    for r in res["methods"]:
        mib = None if r.get("saved_bytes") is None else r["saved_bytes"] / 2**20
        cuda = None if r.get("cuda_peak_bytes") is None else r["cuda_peak_bytes"] / 2**20
        gf = None if r.get("model_flops_per_s") is None else r["model_flops_per_s"] / 1e9
        mfu = None if r.get("mfu_of_measured_peak") is None else 100 * r["mfu_of_measured_peak"]
        lines.append(
            f"| {r['method']} | {r['precision']} | {fmt(r.get('median_s'), '.3f')} | {fmt(r.get('median_optimizer_s'), '.3f')} "
            f"| {fmt(r.get('ratio_to_baseline'), '.3f')} | {fmt(r.get('ratio_of_minima'), '.3f')} "
            f"| {fmt(r.get('predicted_ratio'), '.3f')} | {fmt(r.get('measured_over_predicted'), '.3f')} "
            f"| {fmt(r.get('ratio_to_vanilla'), '.3f')} | {fmt(r.get('predicted_ratio_to_vanilla'), '.3f')} "
            f"| {fmt(r.get('over_predicted_vs_vanilla'), '.3f')} | {fmt(r.get('fwd_bwd_over_predicted_vs_vanilla'), '.3f')} "
            f"| {fmt(gf, '.1f')} | {fmt(mfu, '.1f')}% "
            f"| {fmt(r.get('over_fp32'), '.3f')} | {fmt(r.get('target'), '.2f')} | {yes_no(r.get('target_held'))} "
            f"| {fmt(mib, '.1f')} | {fmt(r.get('saved_ratio_to_vanilla'), '.3f')} "
            f"| {fmt(r.get('saved_ratio_to_baseline'), '.3f')} | {fmt(cuda, '.1f')} |")
    if res.get("verdicts"):
        lines += ["", "Verdicts:", ""] + [f"- {v}" for v in res["verdicts"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main

def summarize(a, runners, mem, peaks):
    """One row per (precision, method): times, ratios to megatron-bert and to our vanilla of the
    same precision, the FLOP model's ratios, model FLOP/s against the measured peak, memory."""
    rows = []
    for prec in a.precisions:
        group = [r for r in runners if r.precision == prec]
        by_name = {r.name: r for r in group}
        base_r, van_r = by_name[BASELINE], by_name.get("vanilla")
        base_med = statistics.median(base_r.times) if base_r.times else None
        base_min = min(base_r.times) if base_r.times else None
        van_med = statistics.median(van_r.times) if van_r is not None and van_r.times else None
        base_pred = predicted_flops(a, BASELINE)
        van_pred = predicted_flops(a, "vanilla")
        base_counted = baseline_counted_flops(base_r.batches, a)
        van_saved = mem.get(("vanilla", prec), (None,))[0]
        base_saved = mem.get((BASELINE, prec), (None,))[0]
        for r in group:
            flops = predicted_flops(a, r.name)
            pred = flops / base_pred
            row = {"method": r.name, "precision": prec, "predicted_ratio": pred, "predicted_step_flops_per_seq": flops,
                   "predicted_ratio_to_vanilla": flops / van_pred}
            if r.forward_flops:
                row["engine_counted_ratio"] = statistics.median(r.forward_flops) / base_counted
            if r.times:
                med = statistics.median(r.times)
                ratio = med / base_med
                row.update(median_s=med, min_s=min(r.times), median_optimizer_s=statistics.median(r.opt_times),
                           times_s=r.times, ratio_to_baseline=ratio, ratio_of_minima=min(r.times) / base_min,
                           # per round: this method's time over the baseline's in the same round
                           paired_ratio_median=statistics.median(t / tb for t, tb in zip(r.times, base_r.times)),
                           measured_over_predicted=ratio / pred,
                           within_flop_tolerance=abs(ratio / pred - 1) <= FLOP_TOLERANCE,
                           last_loss=r.last_loss)
                # model FLOP/s: the FLOP model's FLOPs of the step (b sequences) over its median time
                row["model_flops_per_s"] = flops * a.micro_batch_size / med
                if prec in peaks:
                    row["mfu_of_measured_peak"] = row["model_flops_per_s"] / peaks[prec]
                if van_med:
                    rv = med / van_med
                    # without the optimizer step, a cost of the parameters that the FLOP model leaves out
                    fb = (med - row["median_optimizer_s"]) / (van_med - statistics.median(van_r.opt_times))
                    row.update(ratio_to_vanilla=rv, over_predicted_vs_vanilla=rv / row["predicted_ratio_to_vanilla"],
                               within_vanilla_tolerance=abs(rv / row["predicted_ratio_to_vanilla"] - 1) <= VANILLA_TOLERANCE,
                               fwd_bwd_ratio_to_vanilla=fb, fwd_bwd_over_predicted_vs_vanilla=fb / row["predicted_ratio_to_vanilla"])
                if r.name in TARGETS:
                    row.update(target=TARGETS[r.name], target_held=ratio <= TARGETS[r.name])
                if prec != "fp32" and "fp32" in a.precisions:
                    fp32_r = next(x for x in runners if x.precision == "fp32" and x.name == r.name)
                    if fp32_r.times:
                        row["over_fp32"] = med / statistics.median(fp32_r.times)
            if (r.name, prec) in mem:
                saved, cuda = mem[(r.name, prec)]
                row.update(saved_bytes=saved, cuda_peak_bytes=cuda,
                           saved_ratio_to_vanilla=saved / van_saved if van_saved else None,
                           saved_ratio_to_baseline=saved / base_saved if base_saved else None)
            rows.append(row)
    return rows


def verdicts(res):
    """The targets' verdicts, one line each, from the measured rows."""
    out = []
    rows = [r for r in res["methods"] if r.get("median_s") is not None]
    for r in rows:
        if "target" in r:
            out.append(f"target {r['method']} ({r['precision']}) <= {r['target']:.2f} x megatron-bert: "
                       f"{'held' if r['target_held'] else 'NOT held'} ({r['ratio_to_baseline']:.3f})")
    for prec in res["precisions"]:
        group = [r for r in rows if r["precision"] == prec]
        bad = [r["method"] for r in group if r.get("within_flop_tolerance") is False]
        out.append(f"{prec}: within {FLOP_TOLERANCE:.0%} of the FLOP model (ratio to megatron-bert): "
                   f"{'all' if not bad else 'all but ' + ', '.join(bad)}")
        for r in group:
            if r["method"] in ("vanilla", BASELINE) or r.get("ratio_to_vanilla") is None:
                continue
            held = r["within_vanilla_tolerance"]
            out.append(f"{prec}: {r['method']} / vanilla {r['ratio_to_vanilla']:.3f} against the FLOP model's "
                       f"{r['predicted_ratio_to_vanilla']:.3f} ({r['over_predicted_vs_vanilla']:.3f} x; "
                       f"{r['fwd_bwd_over_predicted_vs_vanilla']:.3f} x without the optimizer step): "
                       f"{'within' if held else 'NOT within'} {VANILLA_TOLERANCE:.0%}")
        van = next((r for r in group if r["method"] == "vanilla"), None)
        if van is not None and van.get("mfu_of_measured_peak") is not None:
            m = van["mfu_of_measured_peak"]
            out.append(f"{prec}: vanilla model FLOP/s {van['model_flops_per_s'] / 1e9:.1f} G = {m:.1%} of the measured "
                       f"peak {res['peak_flops'][prec] / 1e9:.1f} G: target >= {MFU_MIN:.0%} {'held' if m >= MFU_MIN else 'NOT held'}")
        if van is not None and van.get("over_fp32") is not None:
            o = van["over_fp32"]
            out.append(f"{prec}: vanilla step time {o:.3f} x fp32's: target <= {BF16_OVER_FP32_MAX} "
                       f"{'held' if o <= BF16_OVER_FP32_MAX else 'NOT held'}")
    return out


def main(argv=None):
    a = parse_args(argv)
    log = bench_logger()
    start = time.perf_counter()

    from megatron_effmlm.parallel.init import initialize_distributed
    from megatron_effmlm.config import pad_vocab_size
    from megatron_effmlm.plans.random_ltd import ltd_length

    initialize_distributed(1, 1, None, a.seed)
    tok, batches = build_data(a, log, [masking_of(m) for m in a.methods])
    a.model_vocab = auto_vocab(a.num_layers, a.hidden_size, a.seq_length) if a.vocab == "auto" else int(a.vocab)
    a.model_vocab = max(a.model_vocab, tok.vocab_size)
    a.model_vocab_padded = pad_vocab_size(a.model_vocab)
    a.ltd_len = ltd_length(0, a.seq_length, a.ltd_start, 1000, 16)
    a.tag = a.tag or device_tag() + ("" if a.precisions == ["fp32"] else "_" + "-".join(a.precisions))
    real = float(torch.stack([b["padding_mask"].float().mean() for b in batches[(0.15, True)]]).mean())
    # per method: the predicted fraction of the real tokens in its batches (its masking)
    masked = {m: float(sum(int(b["loss_mask"].sum()) for b in batches[masking_of(m)])
                       / sum(int(b["padding_mask"].sum()) for b in batches[masking_of(m)])) for m in a.methods}
    log(f"device: {device_name()}")
    log(f"config: L={a.num_layers} d={a.hidden_size} heads={a.num_attention_heads} T={a.seq_length} "
        f"b={a.micro_batch_size} vocab={a.model_vocab_padded} (tokenizer {tok.vocab_size}) | "
        f"{a.num_batches} real batches, {100 * real:.1f}% real tokens, predicted fraction "
        + " / ".join(f"{k} {v:.3f}" for k, v in masked.items()))
    runners = build_runners(a, tok, batches, log)

    loads = []  # 1-minute load average after each timed round (other processes on the machine)
    if a.mode in ("all", "time"):
        total_rounds = a.warmup + a.steps
        for rnd in range(total_rounds):
            line = []
            for r in runners:
                dt = r.step()
                if rnd >= a.warmup:
                    r.times.append(dt)
                    r.opt_times.append(r.last_opt)
                line.append(f"{r.label} {dt:.2f}")
            load = os.getloadavg()[0]
            if rnd >= a.warmup:
                loads.append(load)
            log(f"round {rnd + 1}/{total_rounds}{' (warm-up)' if rnd < a.warmup else ''}: " + ", ".join(line)
                + f" | load {load:.1f}")
        if loads and max(loads) > (os.cpu_count() or 1) + 1:
            log(f"WARNING: the 1-minute load average reached {max(loads):.1f} on {os.cpu_count()} cores during the "
                "timed rounds: other processes competed for the CPU; the medians are noisier than usual")

    mem, mem_chunked = {}, {}
    if a.mode in ("all", "memory"):
        for r in runners:
            mem[(r.name, r.precision)] = (saved_activation_bytes(r), cuda_peak_bytes(r))
            log(f"memory {r.label:24s} saved-for-backward {mem[(r.name, r.precision)][0] / 2**20:8.1f} MiB")
            if r.policy is not None and a.memory_head_chunk > 0:  # the chunked LM head (--lm-head-chunk-size)
                from megatron_effmlm.model.builder import unwrap

                inner = unwrap(r.model)
                before, inner.lm_head_chunk_size = inner.lm_head_chunk_size, a.memory_head_chunk
                mem_chunked[(r.name, r.precision)] = saved_activation_bytes(r)
                inner.lm_head_chunk_size = before
                log(f"memory {r.label:24s} saved-for-backward {mem_chunked[(r.name, r.precision)] / 2**20:8.1f} MiB "
                    f"with the LM head in chunks of {a.memory_head_chunk}")

    peaks = {}
    if a.mode in ("all", "time"):
        for prec in a.precisions:
            peaks[prec] = measured_peak_flops(a.peak_shape, prec)
            log(f"measured peak ({prec}, {'x'.join(map(str, a.peak_shape))} matrix product): "
                f"{peaks[prec] / 1e9:.1f} GFLOP/s")
    rows = summarize(a, runners, mem, peaks)
    for row in rows:
        if (row["method"], row["precision"]) in mem_chunked:
            row["saved_bytes_head_chunked"] = mem_chunked[(row["method"], row["precision"])]
    try:
        date = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
    except OSError:
        date = datetime.datetime.now().isoformat()
    import megatron.core

    res = {
        "device": device_name(), "device_tag": a.tag, "date": date, "torch": torch.__version__,
        "megatron_core": getattr(megatron.core, "__version__", "?"),
        "git": git_state(),
        "command": " ".join(["python", "bench/step_time.py", *(argv if argv is not None else sys.argv[1:])]),
        "config": dict(num_layers=a.num_layers, hidden_size=a.hidden_size, num_attention_heads=a.num_attention_heads,
                       seq_length=a.seq_length, micro_batch_size=a.micro_batch_size, model_vocab=a.model_vocab,
                       model_vocab_padded=a.model_vocab_padded, tokenizer_vocab=tok.vocab_size, dropout=a.dropout,
                       warmup=a.warmup, steps=a.steps, num_batches=a.num_batches, decoder_layers=a.decoder_layers,
                       td_keep_ratio=a.td_keep_ratio, sctd_interval=a.sctd_interval, ltd_start=a.ltd_start,
                       ltd_len=a.ltd_len, transformer_impl=a.transformer_impl, mode=a.mode,
                       lm_head_chunk_size=a.lm_head_chunk_size, memory_head_chunk=a.memory_head_chunk,
                       optimizer="megatron-core get_megatron_optimizer(adam) -> "
                                 + type(runners[0].optimizer.optimizer).__name__,
                       real_token_fraction=real, predicted_fraction=masked),
        "targets": {"step_time_ratio_max": TARGETS, "flop_tolerance": FLOP_TOLERANCE,
                    "vanilla_relative_tolerance": VANILLA_TOLERANCE, "bf16_over_fp32_max": BF16_OVER_FP32_MAX,
                    "vanilla_mfu_min": MFU_MIN},
        "precisions": a.precisions,
        "peak_flops": peaks, "peak_shape": list(a.peak_shape),
        "load_average_1min_timed_rounds": loads,
        "methods": rows,
        "wall_s": time.perf_counter() - start,
    }
    res["verdicts"] = verdicts(res)
    print()
    print(markdown_table(res))
    if a.mode in ("all", "time"):
        for line in verdicts(res):
            print(line)
    paths = write_outputs(a, res, log)
    print("results:\n  " + "\n  ".join(os.path.relpath(p, os.getcwd()) for p in paths))
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
