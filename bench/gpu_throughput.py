"""Training throughput, model TFLOP/s and MFU of every method in BERT-base and BERT-large
shapes at T = 512, in bf16 (and FP8 where Transformer Engine or torchao runs it), with megatron-core's
`BertModel` (LM head on every position, the same layer spec) measured in the same run.

    python bench/gpu_throughput.py                      # GPU: base + large, bf16 (+ fp8 if TE or torchao)
    python bench/gpu_throughput.py --shapes bert-large --precisions bf16,fp8 --methods vanilla   # FP8 vs bf16
    python bench/gpu_throughput.py --quick              # CPU smoke run: tiny shape, fp32, 2 steps

A step is the trainer's (training/step.py, through bench/benchlib.py's Runner): zero grads, megatron-core's
forward/backward schedule on one micro-batch, finalize grads, the optimizer step (megatron-core's
mixed-precision optimizer: fp32 main weights), the policy's after_step. Batches are real packed
demo-corpus batches (bench/benchlib.py's build_data; T = 512, masking 0.15, 3ML 0.5).

Model FLOPs are the engine's own count of what ran (model/flops.py; backward = 2 x forward);
the baseline's are every layer and the head on all positions. MFU = model TFLOP/s / the
device's dense peak for the precision (--peak-tflops overrides; H100/H200 SXM: 989 bf16,
1979 FP8). Each configuration is measured on its own (build, warm-up, timed steps, free).
The FLOP-model check compares each method's step time ratio to the baseline with its
predicted FLOP ratio (target: within 8%).

Results: bench/results/gpu_throughput_<device>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (REPO_ROOT, os.path.join(REPO_ROOT, "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

SHAPES = {  # (layers, hidden, heads)
    "bert-base": (12, 768, 12),
    "bert-large": (24, 1024, 16),
    "tiny": (4, 128, 2),
}
METHODS = ["vanilla", "3ml", "token-drop", "sctd", "random-ltd", "megatron-bert"]
BASELINE = "megatron-bert"
# Dense peak TFLOP/s per GPU (NVIDIA data sheets, without sparsity).
PEAKS = {"h100 sxm": {"bf16": 989.4, "fp8": 1978.9}, "h100 pcie": {"bf16": 756.0, "fp8": 1513.0},
         "h200": {"bf16": 989.4, "fp8": 1978.9}, "a100": {"bf16": 312.0}}
TARGETS = {"bert-large bf16 mfu": 0.50, "fp8 / bf16 tokens/s": 1.20, "flop tolerance": 0.08}


def parse_args(argv=None):
    from megatron_effmlm.cli import HelpFormatter  # --help shows the defaults

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shape, T=128, fp32, vanilla + baseline, 2 steps (CPU smoke run)")
    p.add_argument("--shapes", default="bert-base,bert-large")
    p.add_argument("--precisions", default="auto",
                   help="comma list of fp32, bf16, fp8; auto: bf16 (+ fp8 where TE or torchao runs FP8: fp8_status)")
    p.add_argument("--fp8-recipe", default=None,
                   help="fp8's --fp8-recipe (default: the provider's, TE delayed, torchao tensorwise; torchao's "
                        "rowwise runs with --fp8-format e4m3, the others hybrid)")
    p.add_argument("--fp8-compile", action="store_true", help="fp8 with torchao: torch.compile its casts and GEMMs")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="default per shape: 64 for bert-base, 32 for bert-large (enough work per kernel launch)")
    p.add_argument("--vocab", type=int, default=30522, help="model vocabulary (BERT's); the demo tokenizer has 8192")
    p.add_argument("--tokenizer-vocab", type=int, default=8192)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--num-batches", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--decoder-layers", type=int, default=2)
    p.add_argument("--td-keep-ratio", type=float, default=0.5)
    p.add_argument("--sctd-interval", type=int, default=10)
    p.add_argument("--ltd-start", type=int, default=128, help="random-ltd kept tokens (its schedule's start)")
    p.add_argument("--transformer-impl", default="auto", choices=["auto", "local", "transformer_engine"])
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--live-token-multiple", type=int, default=1,
                   help="pad every live set to a multiple of this (kernel-friendly shapes; FP8 needs 16)")
    p.add_argument("--no-bias-fusions", action="store_true", help="megatron-core's bias-GELU / bias-dropout-add fusions off")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device (default: by name)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--data-dir", default=os.path.join(REPO_ROOT, "data", "bench"))
    p.add_argument("--results-dir", default=os.path.join(REPO_ROOT, "bench", "results"))
    p.add_argument("--tag", default=None)
    a = p.parse_args(argv)
    if a.quick:
        a.shapes, a.seq_length, a.micro_batch_size, a.vocab = "tiny", 128, 2, 8192
        a.methods, a.warmup, a.steps, a.num_batches, a.ltd_start = "vanilla,3ml,megatron-bert", 1, 2, 1, 32
    a.shapes = [s for s in a.shapes.split(",") if s]
    a.batch_by_shape = {s: a.micro_batch_size or {"bert-base": 64, "bert-large": 32}.get(s, 8) for s in a.shapes}
    a.micro_batch_size = max(a.batch_by_shape.values())  # build_data: batches of the largest, sliced
    for s in a.shapes:
        if s not in SHAPES:
            p.error(f"--shapes: unknown {s!r}; choose from {', '.join(SHAPES)}")
    a.methods = [m for m in METHODS if m in a.methods.split(",")]
    if BASELINE not in a.methods:
        a.methods.append(BASELINE)
    return a


def peak_for(name: str, precision: str, override=None):
    if precision == "fp32":
        return None
    if override:
        return override * (2 if precision == "fp8" else 1)
    n = name.lower()
    key = "h100 pcie" if "h100" in n and "pcie" in n else "h100 sxm" if "h100" in n else \
        "h200" if "h200" in n else "a100" if "a100" in n else None
    return PEAKS.get(key, {}).get(precision)


def resolve_precisions(spec: str, transformer_impl: str = "auto", recipe=None):
    from megatron_effmlm.model.backends import fp8_status

    if spec != "auto":
        return [s for s in spec.split(",") if s]
    if not torch.cuda.is_available():
        return ["fp32"]
    return ["bf16", "fp8"] if fp8_status(transformer_impl, "e4m3" if recipe == "rowwise" else "hybrid", recipe)[0] \
        else ["bf16"]


def fp8_line(a) -> str:
    from megatron_effmlm.model.backends import fp8_status

    provider, why = fp8_status(a.transformer_impl, "e4m3" if a.fp8_recipe == "rowwise" else "hybrid", a.fp8_recipe)
    return f"{provider}, recipe {a.fp8_recipe or 'its default'}{', compiled' if a.fp8_compile else ''}: {why}"


def build_runner(a, name, shape, precision, tok, batches):
    """One method's model, optimizer and policy (benchlib.Runner), in `precision`."""
    from megatron.core.models.bert.bert_model import BertModel

    from megatron_effmlm.config import ModelConfig, OptimConfig, ParallelConfig, PrecisionConfig
    from megatron_effmlm.model.builder import build_model, build_transformer_config, ddp_wrap, mark_replicated_params
    from megatron_effmlm.model.specs import get_layer_spec
    from megatron_effmlm.parallel.init import set_seed
    from megatron_effmlm.plans import POLICIES, get_policy
    from megatron_effmlm.training.step import build_optimizer, wire_grads
    from benchlib import Runner

    L, d, heads = SHAPES[shape]
    fp8_format = ("e4m3" if a.fp8_recipe == "rowwise" else "hybrid") if precision == "fp8" else None
    prec = PrecisionConfig(bf16=precision in ("bf16", "fp8"), fp8_format=fp8_format,
                           fp8_recipe=a.fp8_recipe if fp8_format else None, fp8_compile=a.fp8_compile and bool(fp8_format))
    set_seed(a.seed)
    opts = POLICIES[name].options(vars(a)) if name != BASELINE else {}  # the bench's flags of the method's names
    overrides = POLICIES[name].model_overrides(opts) if name != BASELINE else {}
    mcfg = ModelConfig(num_layers=L, hidden_size=d, num_attention_heads=heads, seq_length=a.seq_length,
                       vocab_size=a.vocab, hidden_dropout=a.dropout, attention_dropout=a.dropout,
                       transformer_impl=a.transformer_impl, attention_backend=a.attention_backend,
                       bias_gelu_fusion=not a.no_bias_fusions, bias_dropout_fusion=not a.no_bias_fusions, **overrides)
    tconfig = build_transformer_config(mcfg, ParallelConfig(), prec)
    if name == BASELINE:
        # Megatron-LM's BERT with the same layers (spec, kernels, precision) as ours. BertModel
        # recognises the local spec only by megatron-core's own core attention class: build it
        # with that, then put in the same SDPA attention our models use (it has no parameters).
        from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec

        spec, impl, kernels = get_layer_spec(a.transformer_impl, 1, a.attention_backend,
                                             attention_dropout=a.dropout, half=precision != "fp32")
        bert = BertModel(config=tconfig, num_tokentypes=0,
                         transformer_layer_spec=bert_layer_local_spec if impl == "local" else spec.layer_specs[0],
                         vocab_size=mcfg.padded_vocab_size(), max_sequence_length=mcfg.max_position_embeddings,
                         pre_process=True, post_process=True, share_embeddings_and_output_weights=True,
                         parallel_output=True, add_binary_head=False)
        if impl == "local" and kernels.attention in ("sdpa", "varlen"):  # BertModel cannot pack: padded SDPA
            from megatron_effmlm.model.specs import _sdpa_attention_class

            for layer in bert.encoder.layers:
                old = layer.self_attention.core_attention
                layer.self_attention.core_attention = _sdpa_attention_class()(
                    tconfig, old.layer_number, old.attn_mask_type, "self")
        from megatron_effmlm.model.fp8_torchao import apply_config_fp8

        apply_config_fp8(bert, tconfig)  # fp8 with the local spec: the same torchao GEMMs as ours
        if torch.cuda.is_available():
            bert.cuda()
        if prec.bf16:
            bert.to(dtype=torch.bfloat16)
        mark_replicated_params(bert)
        model = ddp_wrap([bert], tconfig)[0]
    else:
        model = build_model(mcfg, ParallelConfig(), tconfig)[0]
        from megatron_effmlm.model.builder import unwrap

        unwrap(model).live_token_multiple = max(unwrap(model).live_token_multiple, a.live_token_multiple)
    optimizer = build_optimizer([model], OptimConfig(lr=1e-4, min_lr=1e-5), prec)
    wire_grads(tconfig, [model], optimizer)
    policy, step_index = None, None
    if name != BASELINE:
        policy = get_policy(name, tokenizer=tok, num_layers=L, seed=a.seed, **opts)
        # sctd: its plain steps (every --sctd-interval-th adds a full pass); random-ltd: its start
        step_index = {"sctd": 1, "random-ltd": 0}.get(name)
    mb = a.batch_by_shape[shape]
    data = [{k: v[:mb] for k, v in b.items()} for b in batches["3ml" if name == "3ml" else "vanilla"]]
    if torch.cuda.is_available():
        data = [{k: v.cuda() for k, v in b.items()} for b in data]
    return Runner(name, model, optimizer, data, tconfig, policy, step_index), mcfg


def measure(a, runner, mcfg, log):
    from megatron_effmlm.model.flops import head_flops, layer_flops

    for _ in range(a.warmup):
        runner.step()
    times = []
    for _ in range(a.steps):
        times.append(runner.step())
        runner.opt_times.append(runner.last_opt)
    med = statistics.median(times)
    b, T = runner.batches[0]["text"].shape
    tokens = sum(int(x["padding_mask"].sum()) for x in runner.batches) / len(runner.batches)
    if runner.forward_flops:
        fwd = statistics.median(runner.forward_flops[a.warmup:])
    else:  # BertModel: every layer and the head on all T positions
        fwd = mcfg.num_layers * b * layer_flops(T, mcfg.hidden_size, mcfg.ffn_hidden_size) + \
            head_flops(b * T, mcfg.hidden_size, mcfg.padded_vocab_size())
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return dict(median_s=med, min_s=min(times), times_s=times, tokens_per_s=tokens / med,
                optimizer_s=statistics.median(runner.opt_times) if runner.opt_times else None,
                model_tflops=3 * fwd / med / 1e12, step_model_flops=3 * fwd, loss=runner.last_loss,
                cuda_peak_gib=peak_mem)


def main(argv=None):
    a = parse_args(argv)
    from benchlib import bench_logger, build_data, device_name, device_tag, git_state, predicted_flops

    log = bench_logger()
    start = time.perf_counter()
    import megatron.core

    from megatron_effmlm.config import pad_vocab_size
    from megatron_effmlm.model.backends import select_backends
    from megatron_effmlm.parallel.init import initialize_distributed

    initialize_distributed(1, 1, None, a.seed)
    kernels = select_backends(a.transformer_impl, a.attention_backend, a.dropout, half=True)
    log(f"device: {device_name()} | kernels: {kernels.summary()}")
    tok, batches = build_data(a, log)
    precisions = resolve_precisions(a.precisions, a.transformer_impl, a.fp8_recipe)
    dev = device_name()
    rows = []
    for shape in a.shapes:
        L, d, heads = SHAPES[shape]
        for precision in precisions:
            peak = peak_for(dev, precision, a.peak_tflops)
            for name in a.methods:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                try:
                    runner, mcfg = build_runner(a, name, shape, precision, tok, batches)
                    r = measure(a, runner, mcfg, log)
                except torch.OutOfMemoryError as e:  # report it, go on with the next configuration
                    log(f"{shape} {precision} {name}: out of memory ({str(e).splitlines()[0]})")
                    r = dict(error="out of memory")
                    runner = None
                r.update(shape=shape, precision=precision, method=name,
                         mfu=r["model_tflops"] / peak if peak and "model_tflops" in r else None)
                ns = argparse.Namespace(seq_length=a.seq_length, num_layers=L, hidden_size=d,
                                        model_vocab_padded=pad_vocab_size(a.vocab),
                                        decoder_layers=a.decoder_layers, td_keep_ratio=a.td_keep_ratio,
                                        ltd_len=a.ltd_start)
                r["predicted_flops_per_seq"] = predicted_flops(ns, "megatron-bert" if name == BASELINE else name)
                rows.append(r)
                if "median_s" in r:
                    log(f"{shape:10s} {precision:4s} {name:13s} step {r['median_s'] * 1e3:8.1f} ms "
                        f"(optimizer {r['optimizer_s'] * 1e3:.1f}) | "
                        f"{r['tokens_per_s']:10.0f} tok/s | {r['model_tflops']:7.1f} TFLOP/s"
                        + (f" | MFU {100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "")
                        + f" | loss {r['loss']:.3f}")
                del runner
    # Ratios to the baseline of the same shape and precision, and FP8 over bf16.
    for r in rows:
        base = next((x for x in rows if x["method"] == BASELINE and x["shape"] == r["shape"]
                     and x["precision"] == r["precision"] and "median_s" in x), None)
        if base and "median_s" in r:
            r["time_ratio"] = r["median_s"] / base["median_s"]
            r["predicted_ratio"] = r["predicted_flops_per_seq"] / base["predicted_flops_per_seq"]
            r["measured_over_predicted"] = r["time_ratio"] / r["predicted_ratio"]
            r["within_flop_tolerance"] = abs(r["measured_over_predicted"] - 1) <= TARGETS["flop tolerance"]
        bf = next((x for x in rows if x["precision"] == "bf16" and x["shape"] == r["shape"]
                   and x["method"] == r["method"] and "median_s" in x), None)
        if r["precision"] == "fp8" and bf and "median_s" in r:
            r["fp8_speedup"] = r["tokens_per_s"] / bf["tokens_per_s"]
    res = {
        "device": dev, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "megatron_core": getattr(megatron.core, "__version__", "?"),
        "kernels": kernels.reasons, "git": git_state(),
        "fp8": fp8_line(a) if "fp8" in precisions else None,
        "command": " ".join(["python", "bench/gpu_throughput.py", *(argv if argv is not None else sys.argv[1:])]),
        "config": dict(seq_length=a.seq_length, micro_batch_size=a.batch_by_shape, vocab=a.vocab,
                       warmup=a.warmup, steps=a.steps, dropout=a.dropout, decoder_layers=a.decoder_layers,
                       td_keep_ratio=a.td_keep_ratio, ltd_start=a.ltd_start),
        "targets": TARGETS, "rows": rows, "wall_s": time.perf_counter() - start,
    }
    tag = a.tag or device_tag()
    paths = write_outputs(a, res, tag)
    print()
    print(markdown(res))
    print("results:\n  " + "\n  ".join(os.path.relpath(p, os.getcwd()) for p in paths))
    return 0


def markdown(res):
    from benchlib import fmt

    c = res["config"]
    lines = [f"Device: {res['device']}; {res['date']}; torch {res['torch']}, megatron-core {res['megatron_core']}.",
             "Kernels: " + "; ".join(f"{k}: {v}" for k, v in res["kernels"].items()) + "."
             + (f" FP8: {res['fp8']}." if res.get("fp8") else ""),
             f"T={c['seq_length']}, micro-batch {c['micro_batch_size']}, vocab {c['vocab']}, dropout {c['dropout']}; "
             "local spec: attention by torch SDPA, bias fusions off, optimizer as the kernels line says; "
             f"{c['warmup']} warm-up + {c['steps']} timed steps each.", "",
             "| shape | precision | method | step (ms) | tokens/s | model TFLOP/s | MFU | / megatron-bert | FLOP-predicted | within 8% | FP8 / bf16 | peak mem (GiB) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|:---:|---:|---:|"]
    for r in res["rows"]:
        if "median_s" not in r:
            lines.append(f"| {r['shape']} | {r['precision']} | {r['method']} | {r.get('error')} | | | | | | | | |")
            continue
        w = r.get("within_flop_tolerance")
        lines.append(
            f"| {r['shape']} | {r['precision']} | {r['method']} | {r['median_s'] * 1e3:.1f} | {r['tokens_per_s']:.0f} "
            f"| {r['model_tflops']:.1f} | {fmt(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} "
            f"| {fmt(r.get('time_ratio'), '.3f')} | {fmt(r.get('predicted_ratio'), '.3f')} "
            f"| {'-' if w is None or r['method'] == BASELINE else ('yes' if w else 'no')} "
            f"| {fmt(r.get('fp8_speedup'), '.2f')} | {fmt(r.get('cuda_peak_gib'), '.1f')} |")
    return "\n".join(lines) + "\n"


def write_outputs(a, res, tag):
    from benchlib import save_figure, write_tables

    stem, plt = write_tables(a.results_dir, f"gpu_throughput_{tag}", res, markdown(res))
    groups = [(s, p) for s in a.shapes for p in sorted({r["precision"] for r in res["rows"]})]
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.4), squeeze=False)
    for ax, (shape, prec) in zip(axes[0], groups):
        rs = [r for r in res["rows"] if r["shape"] == shape and r["precision"] == prec and "median_s" in r]
        names = [r["method"] for r in rs]
        bars = ax.bar(names, [r["tokens_per_s"] / 1e3 for r in rs], color=["#888" if n == BASELINE else "#3b75af" for n in names])
        ax.bar_label(bars, labels=[f"{r['tokens_per_s'] / 1e3:.0f}k" + (f"\n{100 * r['mfu']:.0f}% MFU" if r["mfu"] else "")
                                   for r in rs], fontsize=7)
        ax.set_title(f"{shape} {prec}, T={a.seq_length}", fontsize=9)
        ax.set_ylabel("training tokens/s (thousands)")
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.suptitle(f"{res['device']} | {res['date']}", fontsize=8)
    fig.tight_layout()
    save_figure(fig, stem)
    return [stem + e for e in (".json", ".md", ".png")]


if __name__ == "__main__":
    sys.exit(main())
