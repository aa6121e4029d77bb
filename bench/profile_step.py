"""Where a training step's time goes: torch.profiler over a few steps of chosen methods
(bench/gpu_throughput.py's models and batches), the top operators by device and by host time,
and the device-busy fraction of the step (kernel time / wall time).

    python bench/profile_step.py --methods vanilla,3ml,megatron-bert --shape bert-base
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (REPO_ROOT, os.path.join(REPO_ROOT, "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402


def main(argv=None):
    from megatron_effmlm.cli import HelpFormatter  # --help shows the defaults

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--methods", default="vanilla,3ml,megatron-bert")
    p.add_argument("--shape", default="bert-base")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--trace-dir", default=None, help="also write Chrome traces here")
    a, rest = p.parse_known_args(argv)
    warnings.filterwarnings("ignore")
    import gpu_throughput as gt

    g = gt.parse_args(rest + ["--shapes", a.shape])
    from megatron_effmlm.parallel.init import initialize_distributed
    from step_time import build_data

    initialize_distributed(1, 1, None, g.seed)
    tok, batches = build_data(g, print)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    for name in a.methods.split(","):
        runner, _ = gt.build_runner(g, name, a.shape, a.precision, tok, batches)
        for _ in range(3):
            runner.step()
        with torch.profiler.profile(activities=acts) as prof:
            t0 = time.perf_counter()
            for _ in range(a.steps):
                runner.step()
            wall = (time.perf_counter() - t0) / a.steps
        events = prof.key_averages()
        dev_total = sum(e.self_device_time_total for e in events) / a.steps / 1e6 if torch.cuda.is_available() else 0.0
        print(f"\n===== {name} ({a.shape}, {a.precision}): wall {wall * 1e3:.1f} ms/step, device busy "
              f"{dev_total * 1e3:.1f} ms/step ({100 * dev_total / wall:.0f}%), optimizer {runner.last_opt * 1e3:.1f} ms")
        key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        print(events.table(sort_by=key, row_limit=a.rows, max_name_column_width=60))
        print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
        if a.trace_dir:
            os.makedirs(a.trace_dir, exist_ok=True)
            prof.export_chrome_trace(os.path.join(a.trace_dir, f"trace_{name}.json"))
        del runner
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
