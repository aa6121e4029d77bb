"""Where a training step's time goes, per method: torch.profiler over a few steps (bench/
gpu_throughput.py's models and batches), each op's or kernel's time put into one category:
attention, GEMMs, head + loss, index ops (gathers/scatters), optimizer, other, and the rest of
the step (GPU: device idle between kernels; CPU: time outside any op: Python, the framework).

    python bench/profile_step.py --shape bert-base --precision bf16     # GPU: every method
    python bench/profile_step.py --quick                                # CPU smoke run, tiny shape

What is counted. GPU: each kernel's duration, by the kernel name and the CPU op that launched
it; idle = step wall time - the union of the step's kernel intervals (one stream: categories +
idle = step). CPU: each op's self CPU time on the thread that runs the step (forward and
backward; the fused AdamW's kernels too), so categories + outside-ops = step.

Categories, first match wins (names lowercased; patterns in CATEGORIES below):
- optimizer: inside bench/benchlib.Runner's "effmlm/optimizer" range (megatron-core's optimizer
  step with its grad-norm, clipping and copies, and the policy's after_step);
- head_loss: inside the model's "effmlm/head_loss" range (model/mlm_model.py: gather of the
  predicted rows, LM head, output layer, cross-entropy), and in backward the autograd nodes
  created in that range (linked by the autograd sequence number). megatron-core's BertModel
  (the megatron-bert baseline) has no such range: its head counts as GEMM / other;
- attention: scaled_dot_product / flash / fmha / cudnn / efficient attention kernels and ops,
  bmm / baddbmm (megatron-core's unfused attention), softmax (not log_softmax);
- gemm: addmm / mm / matmul / linear / _scaled_mm ops, gemm / cutlass / xmma / nvjet / cublas kernels;
- index: gather, scatter, index*, embedding, masked_select, nonzero;
- other: everything else (LayerNorm, GELU, dropout, residual adds, copies, communication).
An op that matches nothing takes the category of its nearest enclosing op that does (an
aten::empty inside aten::addmm is GEMM time). Results: bench/results/profile_step_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import warnings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (REPO_ROOT, os.path.join(REPO_ROOT, "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

STEP_SCOPE, OPT_SCOPE = "effmlm/step", "effmlm/optimizer"
HEAD_SCOPE = "effmlm/head_loss"  # = megatron_effmlm.model.mlm_model.HEAD_LOSS_SCOPE
CATEGORIES = [  # (category, patterns on the lowercased op / kernel name); the first match wins
    ("attention", [r"scaled_dot_product", r"flash", r"fmha", r"cudnn_attention", r"efficient_attention",
                   r"bmm", r"(?<!log_)softmax"]),
    ("gemm", [r"aten::(addmm|mm|matmul|linear|_scaled_mm)$", r"^(addmm|mm|matmul|linear)backward",
              r"gemm", r"cutlass", r"xmma", r"nvjet", r"cublas"]),
    ("index", [r"gather", r"scatter", r"index", r"embedding", r"masked_select", r"nonzero"]),
]
ORDER = ["attention", "gemm", "head_loss", "index", "optimizer", "other"]
_COMPILED = [(c, [re.compile(p) for p in ps]) for c, ps in CATEGORIES]


def by_name(name: str):
    n = name.lower()
    if n.startswith("autograd::engine::evaluate_function: "):
        n = n.split(": ", 1)[1]
    for cat, pats in _COMPILED:
        if any(p.search(n) for p in pats):
            return cat
    return None


def _ancestors(e):
    while e is not None:
        yield e
        e = e.cpu_parent


def _is_cpu(e):
    return e.device_type == torch.autograd.DeviceType.CPU


def head_backward_nodes(events, head_ranges):
    """Sequence numbers of the autograd nodes created inside the head + loss ranges: from the
    first op in each range to the first op after it (a custom autograd Function's node, such as
    megatron-core's vocab-parallel cross-entropy, has no op event of its own)."""
    fwd = sorted((e.time_range.start, e.sequence_nr) for e in events
                 if _is_cpu(e) and e.sequence_nr >= 0 and not e.name.startswith("autograd::engine"))
    spans = []
    for r in head_ranges:
        inside = [s for t, s in fwd if r.time_range.start <= t <= r.time_range.end]
        if inside:  # the counter only grows: a later op's number above the range's bounds it
            after = [s for t, s in fwd if t > r.time_range.end and s > max(inside)]
            spans.append((min(inside), min(after) if after else float("inf")))
    return spans


def categorize(e, head_spans):
    """The category of a CPU event: its scope (optimizer, head + loss) or else by name, its own
    or its nearest enclosing op's."""
    named = None
    for a in _ancestors(e):
        if a.name == OPT_SCOPE:
            return "optimizer"
        if a.name == HEAD_SCOPE:
            return "head_loss"
        if a.name.startswith("autograd::engine::evaluate_function") and \
                any(lo <= a.sequence_nr < hi for lo, hi in head_spans):
            return "head_loss"
        if named is None:
            named = by_name(a.name)
    return named or "other"


def _union_length(intervals):
    total, end = 0.0, float("-inf")
    for s, t in sorted(intervals):
        if t <= end:
            continue
        total += t - max(s, end)
        end = t
    return total


def attribute(prof, n_steps: int, on_gpu: bool):
    """{category: ms per step}, step ms and the unattributed rest (GPU idle / CPU outside ops)."""
    events = list(prof.events())
    steps = [e for e in events if e.name == STEP_SCOPE]
    assert len(steps) == n_steps, (len(steps), n_steps)
    head_spans = head_backward_nodes(events, [e for e in events if e.name == HEAD_SCOPE])
    step_us = sum(s.time_range.elapsed_us() for s in steps)
    windows = [(s.time_range.start, s.time_range.end) for s in steps]

    def in_step(t):
        return any(a <= t <= b for a, b in windows)

    totals = dict.fromkeys(ORDER, 0.0)
    if on_gpu:
        # a kernel's linked correlation id is the id of the op that launched it (as torch's own
        # parser pairs them: among the CPU events not linked to another)
        by_id = {e.id: e for e in events if _is_cpu(e) and e.linked_correlation_id == 0}
        intervals = []
        for k in events:
            if k.device_type != torch.autograd.DeviceType.CUDA or k.time_range.elapsed_us() <= 0:
                continue
            launcher = by_id.get(k.linked_correlation_id)
            if launcher is None or not in_step(launcher.time_range.start):
                continue
            cat = None
            scope = categorize(launcher, head_spans)
            if scope in ("optimizer", "head_loss"):
                cat = scope
            cat = cat or by_name(k.name) or scope
            totals[cat] += k.time_range.elapsed_us()
            intervals.append((k.time_range.start, k.time_range.end))
        rest = step_us - _union_length(intervals)
        rest_name = "idle"
    else:
        main = {s.thread for s in steps}
        for e in events:
            if not _is_cpu(e) or e.thread not in main or e.name == STEP_SCOPE or not in_step(e.time_range.start):
                continue
            totals[categorize(e, head_spans)] += e.self_cpu_time_total
        rest = step_us - sum(totals.values())
        rest_name = "outside_ops"
    ms = {k: v / n_steps / 1e3 for k, v in totals.items()}
    return dict(step_ms=step_us / n_steps / 1e3, categories_ms=ms, rest_name=rest_name,
                rest_ms=rest / n_steps / 1e3)


def parse_args(argv=None):
    from megatron_effmlm.cli import HelpFormatter  # --help shows the defaults

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--methods", default="vanilla,3ml,token-drop,sctd,random-ltd,megatron-bert")
    p.add_argument("--shape", default="bert-base", help="bench/gpu_throughput.py's shapes: bert-base, bert-large, tiny")
    p.add_argument("--precision", default="bf16", help="fp32, bf16 or fp8 (bench/gpu_throughput.py's)")
    p.add_argument("--steps", type=int, default=3, help="profiled steps per method (after 3 warm-up steps)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke run: tiny shape, T=128, fp32, 2 warm-up + 2 profiled steps per method")
    p.add_argument("--rows", type=int, default=0, help="also print each method's top N ops / kernels")
    p.add_argument("--trace-dir", default=None, help="also write Chrome traces here")
    p.add_argument("--results-dir", default=os.path.join(REPO_ROOT, "bench", "results"))
    p.add_argument("--tag", default=None, help="results name: profile_step_<tag> (default: the device)")
    a, rest = p.parse_known_args(argv)
    if a.quick:
        a.shape, a.precision, a.steps, a.warmup = "tiny", "fp32", 2, 2
        rest = ["--quick"] + rest
    return a, rest


def main(argv=None):
    a, rest = parse_args(argv)
    warnings.filterwarnings("ignore")
    import gpu_throughput as gt
    import megatron.core
    from benchlib import bench_logger, build_data, device_name, device_tag, git_state

    log = bench_logger()
    g = gt.parse_args(rest + ["--shapes", a.shape])
    g.methods = [m for m in gt.METHODS if m in a.methods.split(",")]  # every method also with --quick
    from megatron_effmlm.parallel.init import initialize_distributed

    initialize_distributed(1, 1, None, g.seed)
    tok, batches = build_data(g, log)
    on_gpu = torch.cuda.is_available()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
    rows = []
    for name in g.methods:
        runner, _ = gt.build_runner(g, name, a.shape, a.precision, tok, batches)
        for _ in range(a.warmup):
            runner.step()
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(a.steps):
                with torch.profiler.record_function(STEP_SCOPE):
                    runner.step()
        r = dict(method=name, **attribute(prof, a.steps, on_gpu))
        rows.append(r)
        log(f"{name:14s} step {r['step_ms']:8.1f} ms | " + " | ".join(
            f"{k} {v:.1f}" for k, v in r["categories_ms"].items()) + f" | {r['rest_name']} {r['rest_ms']:.1f}")
        if a.rows:
            key = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=a.rows, max_name_column_width=60))
        if a.trace_dir:
            os.makedirs(a.trace_dir, exist_ok=True)
            prof.export_chrome_trace(os.path.join(a.trace_dir, f"trace_{name}.json"))
        del runner, prof
        if on_gpu:
            torch.cuda.empty_cache()
    res = {"device": device_name(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "torch": torch.__version__, "megatron_core": getattr(megatron.core, "__version__", "?"), "git": git_state(),
           "command": " ".join(["python", "bench/profile_step.py", *(argv if argv is not None else sys.argv[1:])]),
           "config": dict(shape=a.shape, precision=a.precision, seq_length=g.seq_length,
                          micro_batch_size=g.batch_by_shape[a.shape], vocab=g.vocab, warmup=a.warmup, steps=a.steps),
           "what": "GPU: kernel time per category and device idle; CPU: self CPU time per category and time "
                   "outside ops; ms per step (bench/profile_step.py's docstring has the patterns)",
           "categories": ORDER, "patterns": dict(CATEGORIES), "rows": rows}
    from benchlib import write_tables

    md = markdown(res)
    stem, _ = write_tables(a.results_dir, f"profile_step_{a.tag or device_tag()}", res, md)
    print()
    print(md)
    print("results:\n  " + "\n  ".join(os.path.relpath(stem + e, os.getcwd()) for e in (".json", ".md")))
    return 0


def markdown(res):
    c = res["config"]
    rest = res["rows"][0]["rest_name"] if res["rows"] else "rest"
    lines = [f"Device: {res['device']}; {res['date']}; torch {res['torch']}, megatron-core {res['megatron_core']}.",
             f"{c['shape']}, {c['precision']}, T={c['seq_length']}, micro-batch {c['micro_batch_size']}, vocab "
             f"{c['vocab']}; {c['steps']} profiled steps after {c['warmup']} warm-up. {res['what']}.", "",
             "| method | step (ms) | " + " | ".join(ORDER) + f" | {rest} |",
             "|---|---:|" + "---:|" * (len(ORDER) + 1)]
    for r in res["rows"]:
        cells = [f"{r['categories_ms'][k]:.1f} ({100 * r['categories_ms'][k] / r['step_ms']:.0f}%)" for k in ORDER]
        lines.append(f"| {r['method']} | {r['step_ms']:.1f} | " + " | ".join(cells)
                     + f" | {r['rest_ms']:.1f} ({100 * r['rest_ms'] / r['step_ms']:.0f}%) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
