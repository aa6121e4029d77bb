"""Throughput of the preprocessing tool (tools/preprocess_data.py's `preprocess`) on the demo
corpus for 1, 2 and 4 workers: documents/s, MB/s of input and tokens/s, the speed-up over one
worker and the scaling efficiency, with sentence splitting (Punkt) and without. Every worker
count must write byte-identical .bin/.idx files (checked).

    python bench/preprocess.py                 # the demo corpus repeated 4x (~11 MB), workers 1,2,4
    python bench/preprocess.py --quick         # 1x, workers 1,2 (a smoke run)

Results: bench/results/preprocess_<tag>.{json,md,png} (tag: cpu<cores>, e.g. cpu2).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import shutil
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (REPO_ROOT, os.path.join(REPO_ROOT, "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)


def parse_args(argv=None):
    from megatron_effmlm.cli import HelpFormatter  # --help shows the defaults

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--workers", default=None, help="comma list (default 1,2,4; quick 1,2)")
    p.add_argument("--repeat", type=int, default=None, help="copies of the demo corpus in the input (default 4; quick 1)")
    p.add_argument("--tokenizer-vocab", type=int, default=8192)
    p.add_argument("--data-dir", default=os.path.join(REPO_ROOT, "data", "bench"))
    p.add_argument("--results-dir", default=os.path.join(REPO_ROOT, "bench", "results"))
    p.add_argument("--tag", default=None)
    a = p.parse_args(argv)
    a.workers = [int(w) for w in (a.workers or ("1,2" if a.quick else "1,2,4")).split(",")]
    a.repeat = a.repeat or (1 if a.quick else 4)
    return a


def _digest(paths):
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def main(argv=None):
    a = parse_args(argv)
    from megatron_effmlm.data.preprocess import preprocess, train_punkt
    from benchlib import corpus_and_tokenizer

    start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", flush=True)

    jsonl, tok_dir = corpus_and_tokenizer(a, log)
    work = tempfile.mkdtemp(prefix="effmlm_prep_bench_")
    try:
        corpus = os.path.join(work, "corpus.jsonl")
        with open(corpus, "wb") as out, open(jsonl, "rb") as src:
            data = src.read()
            for _ in range(a.repeat):
                out.write(data)
        size = os.path.getsize(corpus)
        punkt = train_punkt([corpus], ["text"], os.path.join(work, "punkt.json"))  # outside the timing
        log(f"input: {corpus} ({size / 1e6:.1f} MB, the demo corpus x{a.repeat}); cores: {os.cpu_count()}")
        # An untimed first pass: imports, the tokenizer and Punkt loading, the page cache.
        preprocess(corpus, os.path.join(work, "warmup"), tok_dir, split_sentences=True, workers=1, log_interval=0,
                   punkt_cache=punkt)
        rows = []
        for split in (True, False):
            for w in a.workers:
                prefix = os.path.join(work, f"out_w{w}_{int(split)}")
                t0 = time.perf_counter()
                st = preprocess(corpus, prefix, tok_dir, split_sentences=split, workers=w, log_interval=0,
                                punkt_cache=punkt)
                dt = time.perf_counter() - t0
                outs = sorted(v for v in st.outputs.values())
                files = [o + ext for o in outs for ext in (".bin", ".idx")]
                tokens = sum(st.tokens.values())
                rows.append(dict(split_sentences=split, workers=w, seconds=dt, documents=st.documents,
                                 documents_per_s=st.documents / dt, mb_per_s=size / 1e6 / dt, tokens=tokens,
                                 tokens_per_s=tokens / dt, output_sha256_16=_digest(files)))
                log(f"split_sentences={split!s:5s} workers={w}: {dt:6.2f} s | {st.documents / dt:8.0f} docs/s | "
                    f"{size / 1e6 / dt:6.2f} MB/s | {tokens / dt:10.0f} tokens/s")
        for r in rows:
            one = next(x for x in rows if x["split_sentences"] == r["split_sentences"] and x["workers"] == a.workers[0])
            r["speedup"] = one["seconds"] / r["seconds"] * (a.workers[0])
            r["efficiency"] = r["speedup"] / r["workers"]
            r["identical_output"] = r["output_sha256_16"] == one["output_sha256_16"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), cpu_count=os.cpu_count(),
               load_average_1min_at_end=os.getloadavg()[0],
               input_mb=size / 1e6, repeat=a.repeat, tokenizer=f"wordpiece {a.tokenizer_vocab}", rows=rows,
               command=" ".join(["python", "bench/preprocess.py", *(argv if argv is not None else sys.argv[1:])]))
    tag = a.tag or f"cpu{os.cpu_count()}"
    paths = write_outputs(a, res, tag)
    print("\n" + markdown(res))
    bad = [r for r in rows if not r["identical_output"]]
    print("outputs identical across worker counts: " + ("yes" if not bad else f"NO ({len(bad)} differ)"))
    print("results:\n  " + "\n  ".join(os.path.relpath(p, os.getcwd()) for p in paths))
    return 1 if bad else 0


def markdown(res):
    lines = [f"{res['date']}; {res['cpu_count']} CPU cores (1-min load {res['load_average_1min_at_end']:.1f} at the end); input {res['input_mb']:.1f} MB (demo corpus x{res['repeat']}); "
             f"tokenizer {res['tokenizer']}.", "",
             "| sentence split | workers | seconds | documents/s | MB/s | tokens/s | speed-up | efficiency | same output |",
             "|---|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in res["rows"]:
        lines.append(f"| {'yes' if r['split_sentences'] else 'no'} | {r['workers']} | {r['seconds']:.2f} | "
                     f"{r['documents_per_s']:.0f} | {r['mb_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['speedup']:.2f} | "
                     f"{100 * r['efficiency']:.0f}% | {'yes' if r['identical_output'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def write_outputs(a, res, tag):
    from benchlib import save_figure, write_tables

    stem, plt = write_tables(a.results_dir, f"preprocess_{tag}", res, markdown(res))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for split, color in ((True, "#3b75af"), (False, "#e08a2c")):
        rs = [r for r in res["rows"] if r["split_sentences"] == split]
        ax.plot([r["workers"] for r in rs], [r["mb_per_s"] for r in rs], "o-", color=color,
                label=f"{'with' if split else 'without'} sentence splitting")
        base = rs[0]
        ax.plot([r["workers"] for r in rs], [base["mb_per_s"] * r["workers"] / base["workers"] for r in rs], ":",
                color=color, lw=0.8)
    ax.set_xlabel("workers")
    ax.set_ylabel("input MB/s")
    ax.set_xticks(sorted({r["workers"] for r in res["rows"]}))
    ax.set_title(f"preprocessing throughput ({res['cpu_count']} cores; dotted: linear scaling)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, stem)
    return [stem + e for e in (".json", ".md", ".png")]


if __name__ == "__main__":
    sys.exit(main())
