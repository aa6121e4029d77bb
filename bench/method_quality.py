#!/usr/bin/env python
"""Does each method reach vanilla's quality for less compute? Every method pre-trained to the
same FLOP budgets, judged by one held-out MLM evaluation and by downstream fine-tuning.

Preparation (once; everything under the git-ignored data/). The cpu study's corpus takes the kernel
docs of Debian's linux-doc-6.1 6.1.176-1 (the archive moves: a newer one is another corpus, and
the held-out check below refuses to mix them), and its WordPiece tokenizer is committed
(bench/results/method_quality_cpu_tokenizer, trained on that corpus with tools/train_tokenizer.py
--tokenizer-type wordpiece --vocab-size 8192 --lowercase): training one is not deterministic
(Hugging Face tokenizers orders the "##" alphabet and breaks ties between equally frequent
merges in a per-process random order), and other token ids are other held-out rows:

    python tools/build_corpus.py --output-dir data/corpus --debian-version linux-doc-6.1=6.1.176-1
    python tools/preprocess_data.py --input data/corpus/train.jsonl \\
        --tokenizer-dir bench/results/method_quality_cpu_tokenizer --output-prefix data/corpus/train --split-sentences
    python tools/build_tasks.py --corpus-valid data/corpus/valid.jsonl --output-dir data/tasks
    python tools/rotten_tomatoes_to_glue.py --output-dir data/rotten_tomatoes

    python bench/method_quality.py --config cpu --data-path data/corpus/train_text_sentence \\
        --tokenizer-dir bench/results/method_quality_cpu_tokenizer --heldout data/corpus/valid.jsonl \\
        --task-dirs data/rotten_tomatoes data/tasks/register data/tasks/era

Runs: every method of METHODS at every budget, then the config's SWEEP rows (other settings of
the methods, and 3ml-td) at B only (--budgets, fractions of B = the FLOP model's cost
of --vanilla-iters-at-B vanilla iterations), plus a no-pre-training floor (the same
architecture, randomly initialised). Each run pre-trains to its budget (pretrain_effmlm.py,
--train-flops-budget: the LR schedule decays over the budget), evaluates the held-out MLM
loss (tools/eval_mlm.py: same rows, same masks for every model, each by its own inference
path), exports the encoder (tools/export_hf.py) and fine-tunes it on every task with every
seed (tools/finetune.py, one recipe for all). A finished run leaves result.json in
<runs-dir>/<run>/ and is skipped when the bench runs again, so the study can be built over
several sittings; a half-finished run resumes from its last finished stage (a pre-training
run from its checkpoint).

Output: <results-dir>/method_quality_<config>.{json,md,png}: held-out loss and mean
downstream accuracy against training FLOPs and against time (one curve per method, error bars
over fine-tuning seeds), and the compute each method needs to reach vanilla's quality at B,
interpolated (in log compute) between budgets, by the FLOP model and by time. Time is each
run's iterations x its method's step time, measured side by side at the study's configuration
once every run is done (a run's own wall-clock depends on whatever else the machine ran during
its sitting; it is kept too). Each finished run's result is also kept in
<results-dir>/method_quality_<config>_runs/ (commit it: a later sitting on another machine
skips that run), and is reused only if the plan (its command line) is the same.

--quick: a tiny model, a few steps, one seed and one task, everything in this process (for
the test suite; it still runs every method at two budgets).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron_effmlm.atomic import write_json  # noqa: E402
from megatron_effmlm.cli import HelpFormatter  # noqa: E402  (--help shows the defaults)

# name: pretrain_effmlm.py flags. The papers' defaults (3ML 50% masking, 2 decoder layers;
# token dropping keeps 50% of the middle layers; random-LTD grows from half the length).
METHODS = {
    "vanilla-15": ["--method", "vanilla", "--mask-prob", "0.15"],
    "vanilla-40": ["--method", "vanilla", "--mask-prob", "0.4"],
    "3ml-self": ["--method", "3ml", "--3ml-decoder", "self"],
    "3ml-cross": ["--method", "3ml", "--3ml-decoder", "cross"],
    "token-drop": ["--method", "token-drop"],
    "sctd": ["--method", "sctd"],
    "random-ltd": ["--method", "random-ltd"],
}
# Other settings of the methods at this scale, at B only (the papers' defaults are the rows
# above), and this project's 3ml-td; a config lists the ones it runs ("sweep").
SWEEP = {
    "3ml-self-mask30": ["--method", "3ml", "--3ml-decoder", "self", "--mask-prob", "0.3"],
    "3ml-self-dec1": ["--method", "3ml", "--3ml-decoder", "self", "--decoder-layers", "1"],
    "token-drop-keep70": ["--method", "token-drop", "--td-keep-ratio", "0.7"],
    "3ml-td": ["--method", "3ml-td"],
}
ALL_METHODS = {**METHODS, **SWEEP}
BASELINE = "vanilla-15"
FLOOR = "no-pretraining"

CONFIGS = {
    # The 2-core CPU study (issue 14 section 5 tunes these; B = about 30-40 minutes of vanilla).
    "cpu": dict(model=["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4",
                       "--seq-length", "128"],
                micro_batch_size=16, global_batch_size=32, lr=1e-3, min_lr=1e-5, warmup_fraction=0.06,
                vanilla_iters_at_b=5000, budgets=[0.5, 1.0], seeds=[1, 2, 3], max_tasks=None, sweep=list(SWEEP),
                # the precision its runs pre-trained in: another one is another study (method_quality_cpu_fp32.*)
                precision="bf16",
                # chosen on vanilla at B among three (method_quality_cpu_calibration.md)
                finetune=dict(epochs=5, lr=3e-4, batch_size=32, max_length=128, max_train_examples=2000),
                eval_sequences=512, nproc=2, in_process=False, timing_iters=(10, 40), timing_rounds=2),
    # The demo's step 5: its model and data, every method at one budget, the held-out evaluation
    # only (no fine-tuning, no timing pass), in this process.
    "demo": dict(model=["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4",
                        "--seq-length", "128"],
                 micro_batch_size=16, global_batch_size=32, lr=1e-3, min_lr=1e-5, warmup_fraction=0.06,
                 vanilla_iters_at_b=30, budgets=[1.0], seeds=[1], max_tasks=0, finetune=None, sweep=[],
                 eval_sequences=128, nproc=1, in_process=True, timing_iters=(10, 40), timing_rounds=0),
    "quick": dict(model=["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
                         "--seq-length", "64", "--no-bias-gelu-fusion", "--hidden-dropout", "0",
                         "--attention-dropout", "0"],
                  micro_batch_size=4, global_batch_size=8, lr=1e-3, min_lr=1e-5, warmup_fraction=0.2,
                  vanilla_iters_at_b=4, budgets=[0.5, 1.0], seeds=[1], max_tasks=1, sweep=[],
                  finetune=dict(epochs=1, lr=1e-4, batch_size=16, max_length=64, max_train_examples=48),
                  eval_sequences=16, nproc=1, in_process=True, timing_iters=(2, 4), timing_rounds=1),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", default="cpu", choices=list(CONFIGS))
    p.add_argument("--quick", action="store_true", help="--config quick")
    p.add_argument("--data-path", required=True, help="pre-training data prefix (.bin/.idx)")
    p.add_argument("--tokenizer-dir", required=True)
    p.add_argument("--heldout", required=True, help="held-out JSONL (tools/build_corpus.py's valid.jsonl)")
    p.add_argument("--task-dirs", nargs="*", default=[],
                   help="GLUE SST-2-format task folders (none: no export, no fine-tuning)")
    p.add_argument("--unigram-data", default=None, help="data prefix for the unigram baseline (default --data-path)")
    p.add_argument("--methods", nargs="+", default=None, choices=list(ALL_METHODS),
                   help="default: every method of METHODS and the config's sweep (its rows at B only)")
    p.add_argument("--budgets", type=float, nargs="+", default=None, help="fractions of B (default: the config's)")
    p.add_argument("--vanilla-iters-at-b", type=int, default=None, help="B = this many vanilla iterations (FLOP model)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="fine-tuning seeds (default: the config's)")
    p.add_argument("--nproc", type=int, default=None, help="pre-training processes (torchrun)")
    p.add_argument("--in-process", action="store_true", default=None,
                   help="run every stage in this process (one pre-training process; the quick mode's way)")
    p.add_argument("--subprocesses", dest="in_process", action="store_false",
                   help="run every stage as its tool in a subprocess (pre-training under torchrun)")
    p.add_argument("--runs-dir", default=None, help="default: runs/method_quality_<config>")
    p.add_argument("--results-dir", default=os.path.join(REPO, "bench", "results"))
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="pre-training precision; auto: the config's (cpu: bf16, as its runs so far), else bf16 where "
                        "the CPU has bf16 instructions (or on a GPU), about 1.8x fp32's tokens/s for the cpu config's "
                        "model on 2 cores. Another precision than the config's is another study: its results are "
                        "method_quality_<config>_<precision>.*")
    p.add_argument("--only", nargs="+", default=None, metavar="RUN",
                   help="this sitting runs only these runs of the plan (names as in the table, e.g. vanilla-40@0.5B "
                        "token-drop@1B); the others are left for another sitting, their finished results still enter "
                        "the table")
    p.add_argument("--pretrain-args", nargs=argparse.REMAINDER, default=[],
                   help="more pretrain_effmlm.py flags for every run (last on the command line)")
    a = p.parse_args(argv)
    if a.quick:
        a.config = "quick"
    c = CONFIGS[a.config]
    a.budgets = a.budgets or c["budgets"]
    a.seeds = a.seeds or c["seeds"]
    a.vanilla_iters_at_b = a.vanilla_iters_at_b or c["vanilla_iters_at_b"]
    a.methods = a.methods or list(METHODS) + c["sweep"]
    a.nproc = a.nproc or c["nproc"]
    a.in_process = c["in_process"] if a.in_process is None else a.in_process
    a.unigram_data = a.unigram_data or a.data_path
    import torch

    from megatron_effmlm.compat.cpu import cpu_bf16_error

    # the machine check is main's, before any compute: the plan itself can be looked at anywhere
    a.precision, a.precision_error = resolve_precision(a.config, c.get("precision"), a.precision,
                                                       torch.cuda.is_available() or cpu_bf16_error() is None)
    # runs of another precision are another study: never skipped as if they were these
    a.tag = a.config if a.precision == c.get("precision", a.precision) else f"{a.config}_{a.precision}"
    a.runs_dir = a.runs_dir or os.path.join(REPO, "runs", f"method_quality_{a.config}_{a.precision}")
    if c["max_tasks"] is not None:
        a.task_dirs = a.task_dirs[:c["max_tasks"]]
    return a, c


def resolve_precision(config: str, fixed, requested: str, native_bf16: bool):
    """(precision, error or None): `requested`, or for auto the config's own (`fixed`), else bf16
    where this machine runs it natively (a GPU, or a CPU with bf16 instructions)."""
    from megatron_effmlm.compat.cpu import CPU_BF16_FLAGS

    precision = requested if requested != "auto" else fixed or ("bf16" if native_bf16 else "fp32")
    if precision != "bf16" or native_bf16:
        return precision, None
    why = f"the {config} config pre-trains in bf16 (its runs so far did)" if requested == "auto" else "--precision bf16"
    return precision, (f"{why}, and this machine has no GPU and no bf16 instructions ({' or '.join(CPU_BF16_FLAGS)} "
                       "in /proc/cpuinfo's flags), where emulated bf16 is far slower than fp32: continue on a machine "
                       f"that has them, or pass --precision fp32 for a separate fp32 study "
                       f"(method_quality_{config}_fp32.*)")


def fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def check_inputs(a):
    from megatron_effmlm.data.errors import DataError
    from megatron_effmlm.data.tokenizer import EffMLMTokenizer

    for ext in (".bin", ".idx"):
        if not os.path.isfile(a.data_path + ext):
            fail(f"--data-path {a.data_path}: no {a.data_path}{ext}")
    if not os.path.isfile(a.heldout):
        fail(f"--heldout {a.heldout}: no such file")
    for d in a.task_dirs:
        for f in ("train.tsv", "dev.tsv"):
            if not os.path.isfile(os.path.join(d, f)):
                fail(f"--task-dirs {d}: no {f} (a GLUE SST-2-format folder)")
    if a.in_process and a.nproc != 1:
        fail(f"--in-process runs one pre-training process, not --nproc {a.nproc}")
    if any(b <= 0 for b in a.budgets) or BASELINE not in a.methods or 1.0 not in a.budgets:
        fail("--budgets must be positive fractions of B including 1, and --methods must include vanilla-15 "
             "(the reference of the table)")
    try:
        return EffMLMTokenizer.from_dir(a.tokenizer_dir)
    except DataError as e:
        fail(str(e))


# ----------------------------------------------------------------------------------------------
# One run's stages


def common_pretrain_args(a, c):
    return [*c["model"], "--data-path", a.data_path, "--tokenizer-dir", a.tokenizer_dir,
            "--micro-batch-size", str(c["micro_batch_size"]), "--global-batch-size", str(c["global_batch_size"]),
            "--lr", str(c["lr"]), "--min-lr", str(c["min_lr"]), "--lr-decay-style", "linear",
            "--lr-warmup-fraction", str(c["warmup_fraction"]), "--split", "98,2,0", "--seed", "1234",
            "--data-cache-path", os.path.join(a.runs_dir, "data_cache"), *(["--bf16"] if a.precision == "bf16" else [])]


def parse_plan_argv(argv):
    """A run's pretrain_effmlm.py command line as the trainer reads it, on any machine: without
    its precision flag (the trainer refuses --bf16 where the CPU lacks bf16; FLOPs ignore it)."""
    from megatron_effmlm.arguments import parse_args as parse_pretrain

    return parse_pretrain([x for x in argv if x not in ("--bf16", "--fp16")])


def iteration_flops(argv, vocab: int) -> float:
    """The FLOP model's cost of one iteration of a pretrain_effmlm.py command line."""
    from megatron_effmlm.plans.flops import iteration_flops as flops_of

    cfg = parse_plan_argv(argv)
    cfg.model.vocab_size = max(cfg.model.vocab_size, vocab)
    return flops_of(cfg)


def plan_runs(a, c, vocab: int):
    """[(name, method, budget fraction, pretrain argv, budget FLOPs)] in execution order: the
    floor, the baseline at every budget (it calibrates the study: see its loss first), then the
    other methods, small budgets first."""
    base = common_pretrain_args(a, c)
    b_flops = a.vanilla_iters_at_b * iteration_flops(base + METHODS[BASELINE] + a.pretrain_args, vocab)
    # The floor: the same architecture, randomly initialised (one step at lr 0 writes the checkpoint).
    runs = [(FLOOR, FLOOR, 0.0, base + a.pretrain_args + ["--train-iters", "1", "--lr", "0", "--min-lr", "0"], 0.0)]
    seq = int(c["model"][c["model"].index("--seq-length") + 1])
    order = [(BASELINE, f) for f in sorted(a.budgets)] + \
        [(m, f) for f in sorted(a.budgets) for m in a.methods if m != BASELINE and m in METHODS] + \
        [(m, 1.0) for m in a.methods if m in SWEEP]
    for m, frac in order:
        flags = list(ALL_METHODS[m])
        per_iter = iteration_flops(base + flags + a.pretrain_args, vocab)
        est = math.ceil(frac * b_flops / per_iter)
        if m == "random-ltd":  # grow from half the length over 70% of the run (DeepSpeed's shape)
            flags += ["--ltd-start", str(seq // 2), "--ltd-steps", str(max(1, int(0.7 * est))),
                      "--ltd-granularity", str(max(1, seq // 8))]
        # --train-iters only caps the run: the measured step may cost less than the model's
        # checkpoints every quarter: a sitting that ends mid-run resumes there
        argv = base + flags + ["--train-flops-budget", f"{frac * b_flops:.6e}", "--train-iters",
                               str(3 * est + 10), "--log-interval", str(max(1, est // 20)),
                               "--save-interval", str(max(1, est // 4))] + a.pretrain_args
        runs.append((f"{m}@{frac:g}B", m, frac, argv, frac * b_flops))
    return runs, b_flops


def _load(path):
    with open(path) as f:
        return json.load(f)


@contextlib.contextmanager
def _logged(path):
    """This process's stdout (and stderr) into a stage log, for the in-process stages."""
    with open(path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield
        f.flush()


class Stopped(BaseException):
    """SIGTERM (or SIGHUP) reached the bench: unwinds through the running stage, which stops its tools."""


def _on_signal(signum, _frame):
    raise Stopped(signum)


def _stop_group(p, grace=60.0):
    """Stop a stage's whole process group: torchrun forwards SIGTERM to its workers (which save and
    exit); SIGKILL after the grace period to whatever is left (killing torchrun alone orphans them)."""

    def kill(sig):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:  # the group is gone
            pass

    kill(signal.SIGTERM)
    try:
        p.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    kill(signal.SIGKILL)
    p.wait()
    # p.wait() waits for torchrun only: its killed workers may still be exiting; the bench must
    # not return (and a rerun start) while one of them still runs.
    deadline = time.time() + 30
    while _group_running(p.pid) and time.time() < deadline:
        time.sleep(0.05)


def _group_running(pgid) -> bool:
    """Whether a process of group pgid still runs (zombies, awaiting their reaper, do not count)."""
    if not os.path.isdir("/proc/self"):
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in "ZX":
            return True
    return False


def _subprocess(cmd, log_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=REPO)
    with open(log_path, "a") as log:
        # Its own process group, so that a stopped bench (Ctrl-C, SIGTERM, scancel) can stop the
        # tool's whole tree instead of leaving torchrun's workers training on.
        p = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            p.wait()
        except BaseException:
            _stop_group(p)
            raise
    if p.returncode:
        with open(log_path) as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f"`{' '.join(cmd[:4])} ...` exited with {p.returncode}; log {log_path}:\n{tail}")


def stage_pretrain(a, run_dir, argv):
    summary = os.path.join(run_dir, "summary.json")
    if os.path.isfile(summary) and _load(summary)["exit_code"] == 0:
        return _load(summary)
    ckpt = os.path.join(run_dir, "ckpt")
    argv = argv + ["--save", ckpt, "--load", ckpt, "--summary-json", summary]
    log = os.path.join(run_dir, "pretrain.log")
    if a.in_process:
        import pretrain_effmlm

        with _logged(log):
            code = pretrain_effmlm.main(argv)
        if code:
            raise RuntimeError(f"pre-training exited with {code}; log {log}")
    else:
        # --exit-signal-handler: stopped by _stop_group, the workers save before they exit
        _subprocess([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.nproc),
                     "pretrain_effmlm.py", *argv, "--exit-signal-handler"], log)
    s = _load(summary)
    if s["train_flops_budget"] and not s["budget_reached"]:
        raise RuntimeError(f"{run_dir}: stopped before its budget (see pretrain.log)")
    return s


def stage_eval(a, c, run_dir, tok, heldout, counts):
    out = os.path.join(run_dir, "eval.json")
    if os.path.isfile(out):
        return _load(out)
    ckpt = os.path.join(run_dir, "ckpt")
    if a.in_process:
        from megatron_effmlm.eval.heldout import evaluate_checkpoint
        from megatron_effmlm.parallel.init import destroy

        try:
            with _logged(os.path.join(run_dir, "eval.log")):
                r = evaluate_checkpoint(ckpt, heldout, tok, counts)
        finally:
            destroy()
        write_json(out, {"data": os.path.abspath(a.heldout), "results": [r]})
    else:
        _subprocess([sys.executable, "tools/eval_mlm.py", "--checkpoint", ckpt, "--data", a.heldout,
                     "--tokenizer-dir", a.tokenizer_dir, "--unigram-data", a.unigram_data,
                     "--seq-length", str(heldout.seq_length), "--num-sequences", str(c["eval_sequences"]),
                     "--output", out], os.path.join(run_dir, "eval.log"))
    return _load(out)


def stage_export(a, run_dir):
    hf = os.path.join(run_dir, "hf")
    if os.path.isfile(os.path.join(hf, "config.json")):
        return hf
    ckpt = os.path.join(run_dir, "ckpt")
    log = os.path.join(run_dir, "export.log")
    if a.in_process:
        from megatron_effmlm.hf.export import export
        from megatron_effmlm.parallel.init import destroy

        try:
            with _logged(log):
                export(ckpt, hf)
        finally:
            destroy()
    else:
        _subprocess([sys.executable, "tools/export_hf.py", "--checkpoint", ckpt, "--output-dir", hf], log)
    return hf


def task_name(d):
    return os.path.basename(os.path.normpath(d))


def recipe(a, c) -> dict:
    """The fine-tuning recipe (one for every model): a finished run fine-tuned otherwise is
    fine-tuned again (its pre-training, evaluation and export are kept). None: no fine-tuning."""
    if not c["finetune"] or not a.task_dirs:
        return None
    return dict(c["finetune"], seeds=list(a.seeds))


def _recipe_tag(r: dict) -> str:
    import hashlib

    return hashlib.sha1(json.dumps(r, sort_keys=True).encode()).hexdigest()[:8]


# the recipe of the runs finished before results recorded theirs
FIRST_RECIPE = dict(epochs=3, lr=5e-5, batch_size=32, max_length=128, max_train_examples=2000, seeds=[1, 2, 3])


def stage_finetune(a, c, run_dir, hf, task_dir):
    out = os.path.join(run_dir, f"finetune_{task_name(task_dir)}_{_recipe_tag(recipe(a, c))}.json")
    if os.path.isfile(out):
        return _load(out)
    ft = c["finetune"]
    log = os.path.join(run_dir, f"finetune_{task_name(task_dir)}.log")
    if a.in_process:
        from megatron_effmlm.hf.finetune import finetune

        with _logged(log):
            r = finetune(hf, task_dir, "sst2", a.seeds, ft["epochs"], ft["lr"], ft["batch_size"], ft["max_length"],
                         0.1, 0.01, ft["max_train_examples"], 50)
        write_json(out, r)
    else:
        cmd = [sys.executable, "tools/finetune.py", "--model-dir", hf, "--data-dir", task_dir, "--task", "sst2",
               "--seeds", *map(str, a.seeds), "--epochs", str(ft["epochs"]), "--lr", str(ft["lr"]),
               "--batch-size", str(ft["batch_size"]), "--max-length", str(ft["max_length"]), "--output", out]
        if ft["max_train_examples"]:
            cmd += ["--max-train-examples", str(ft["max_train_examples"])]
        _subprocess(cmd, log)
    return _load(out)


def _flag(argv, flag):
    return argv[argv.index(flag) + 1] if flag in argv else None


def _without(argv, *flags):
    """argv less each flag and its value."""
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x in flags:
            skip = True
        else:
            out.append(x)
    return out


def timing_argv(argv, iters: int, method: str, seq: int):
    """A run's command line for a timing job of `iters` iterations: no budget, no checkpoint;
    random-LTD at the mean kept length of its schedule (it grows from --ltd-start to T over
    --ltd-steps, 70% of the run, then stays at T), held there."""
    out = _without(argv, "--train-flops-budget", "--train-iters", "--save-interval", "--log-interval")
    if method == "random-ltd":
        start, gran = int(_flag(argv, "--ltd-start")), int(_flag(argv, "--ltd-granularity"))
        mean = 0.7 * (start + seq) / 2 + 0.3 * seq
        out = _without(out, "--ltd-start", "--ltd-steps") + [
            "--ltd-start", str(min(seq, gran * round(mean / gran))), "--ltd-steps", str(10 ** 9)]
    return out + ["--train-iters", str(iters), "--log-interval", str(iters)]


def stage_step_times(a, c, runs, kept_dir):
    """Seconds per iteration of each method at this study's configuration, measured side by side
    in one sitting: timing jobs of c['timing_iters'] = (short, long) iterations, methods in turn,
    c['timing_rounds'] rounds, the minimum of (long - short) / (long iterations - short ones) per method (the
    difference cancels start-up and the first steps). The time axis of the table and the plot
    is iterations x this: the runs' own wall-clock depends on whatever else ran beside them
    during the sittings (it is kept in the results too)."""
    path = os.path.join(kept_dir, "step_times.json")
    if os.path.isfile(path):
        return _load(path)
    short, long_ = c["timing_iters"]
    seq = int(c["model"][c["model"].index("--seq-length") + 1])
    tdir = os.path.join(a.runs_dir, "timing")
    os.makedirs(tdir, exist_ok=True)
    best = {}
    first = {m: argv for _, m, frac, argv, _ in runs if m != FLOOR and frac == max(a.budgets)}
    rounds = c["timing_rounds"]
    for rnd in range(rounds):
        for method, argv in first.items():
            secs = []
            for iters in (short, long_):
                summary = os.path.join(tdir, f"{method}_{iters}_{rnd}.json")
                cmd = timing_argv(argv, iters, method, seq) + ["--summary-json", summary]
                log = os.path.join(tdir, f"{method}.log")
                if a.in_process:
                    import pretrain_effmlm

                    with _logged(log):
                        pretrain_effmlm.main(cmd)
                else:
                    _subprocess([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.nproc),
                                 "pretrain_effmlm.py", *cmd], log)
                secs.append(_load(summary)["train_seconds"])
            per_iter = max(secs[1] - secs[0], 1e-9) / (long_ - short)
            best[method] = min(best.get(method, per_iter), per_iter)
            print(f"  timing {method} (round {rnd + 1}/{rounds}): {per_iter * 1e3:.1f} ms/iteration", flush=True)
    res = {"seconds_per_iteration": best, "timing_iters": [short, long_], "precision": a.precision,
           "nproc": a.nproc}
    write_json(path, res)
    return res


def run_one(a, c, name, method, frac, argv, budget, tok, heldout, counts):
    run_dir = os.path.join(a.runs_dir, name)
    os.makedirs(run_dir, exist_ok=True)
    t0 = time.time()
    clock = {}

    def timed(key, fn, *args):
        t = time.time()
        out = fn(*args)
        clock[key] = round(time.time() - t, 2)
        return out

    summary = timed("pretrain", stage_pretrain, a, run_dir, argv)
    ev = timed("eval", stage_eval, a, c, run_dir, tok, heldout, counts)["results"][0]
    hf = timed("export", stage_export, a, run_dir) if a.task_dirs else None
    tasks = {}
    for d in a.task_dirs:
        r = timed(f"finetune_{task_name(d)}", stage_finetune, a, c, run_dir, hf, d)
        tasks[task_name(d)] = {"per_seed": [x["accuracy"] for x in r["per_seed"]],
                               "mean": r["summary"]["accuracy"]["mean"], "std": r["summary"]["accuracy"]["std"],
                               "majority": r["majority_baseline"]["accuracy"]}
    result = {"run": name, "method": method, "budget_fraction": frac, "budget_flops": budget,
              "train_flops": summary["train_flops"], "train_seconds": summary["train_seconds"],
              "tokens_seen": summary["tokens_seen"], "iterations": summary["iterations"],
              "final_lr": summary["final_lr"], "min_lr": summary["min_lr"],
              "heldout_loss": ev["loss"], "unigram_loss": ev.get("unigram_loss"),
              "gap_to_unigram": ev.get("gap_to_unigram"), "heldout_per_source": ev.get("per_source"),
              "mask_sha1": ev["mask_sha1"], "source_versions": source_versions(a.heldout),
              "data_libraries": data_libraries(),
              "tasks": tasks, "seeds": list(a.seeds),
              "mean_accuracy": statistics.mean(t["mean"] for t in tasks.values()) if tasks else None,
              "mean_accuracy_std": _seed_spread(tasks), "pretrain_args": argv, "finetune_recipe": recipe(a, c),
              "seconds": round(time.time() - t0, 2),
              "stage_seconds": clock}
    write_json(os.path.join(run_dir, "result.json"), result)
    return result


def source_versions(heldout: str) -> dict:
    """Each corpus source's version from tools/build_corpus.py's manifest.json beside the held-out
    file ({} without one): a rebuilt corpus can differ (its Debian packages move)."""
    path = os.path.join(os.path.dirname(os.path.abspath(heldout)), "manifest.json")
    if not os.path.isfile(path):
        return {}
    return {name: src.get("version") for name, src in _load(path).get("sources", {}).items()}


def data_libraries() -> dict:
    """Versions of the libraries that shape the corpus text (docutils) and the vocabulary (tokenizers)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for lib in ("docutils", "tokenizers"):
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = None
    return out


def _seed_spread(tasks) -> float:
    """Spread over fine-tuning seeds of the task-averaged accuracy (population std)."""
    per_seed = list(zip(*(t["per_seed"] for t in tasks.values())))
    return statistics.pstdev(statistics.mean(s) for s in per_seed) if len(per_seed) > 1 else 0.0


# ----------------------------------------------------------------------------------------------
# The table and the plot


def crossing(points, target, lower_is_better):
    """Compute at which a method's (compute, quality) points reach `target`, interpolated
    linearly in log compute between budgets; (value, note) with note '' (interpolated),
    '<=' (already at the smallest budget) or '>' (not reached at the largest)."""
    pts = sorted(points)
    good = (lambda q: q <= target) if lower_is_better else (lambda q: q >= target)
    if not pts:
        return None, ""
    if good(pts[0][1]):
        return pts[0][0], "<="
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if good(y1):
            t = (target - y0) / (y1 - y0) if y1 != y0 else 1.0
            return math.exp(math.log(x0) + t * (math.log(x1) - math.log(x0))), ""
    return pts[-1][0], ">"


def aggregate(results, a):
    """Per method: points per budget (mean over its runs; one run per method and budget)."""
    by = {}
    for r in results:
        by.setdefault(r["method"], []).append(r)
    curves = {m: sorted(rs, key=lambda r: r["budget_fraction"]) for m, rs in by.items()}
    base = {r["budget_fraction"]: r for r in curves.get(BASELINE, [])}
    ref = base.get(1.0)
    table = []
    for m, rs in curves.items():
        if m == FLOOR or ref is None:
            continue
        row = {"method": m}
        for metric, lower in (("heldout_loss", True), ("mean_accuracy", False)):
            target = ref[metric]
            if target is None:  # no tasks
                continue
            for kind in ("train_flops", "timed_seconds"):
                val, note = crossing([(r[kind], r[metric]) for r in rs if r[kind]], target, lower)
                row[f"{metric}:{kind}"] = {"ratio": None if val is None or not ref[kind] else val / ref[kind],
                                           "note": note}
        table.append(row)
    return curves, table


def _ratio(cell):
    if cell["ratio"] is None:
        return "n/a"
    return f"{cell['note']}{cell['ratio']:.2f}" if cell["note"] != ">" else f"> {cell['ratio']:.2f}"


def write_outputs(a, c, results, b_flops, times=None):
    from benchlib import save_figure, write_tables  # bench/ is on the path when run as a script

    per_iter = (times or {}).get("seconds_per_iteration", {})
    for r in results:  # the time axis: iterations x the method's step time measured side by side
        r["timed_seconds"] = r["iterations"] * per_iter[r["method"]] if r["method"] in per_iter else None
    curves, table = aggregate(results, a)
    floor = next((r for r in results if r["method"] == FLOOR), None)
    tasks = sorted({t for r in results for t in r["tasks"]})
    res = {"config": a.config, "precision": a.precision, "settings": {k: v for k, v in c.items()}, "b_flops": b_flops,
           "vanilla_iters_at_b": a.vanilla_iters_at_b, "budgets": sorted(a.budgets), "seeds": list(a.seeds),
           "tasks": tasks, "methods": list(a.methods), "baseline": BASELINE, "runs": results,
           "compute_to_reach_vanilla_at_b": table,
           "majority": {t: next(iter(r["tasks"][t]["majority"] for r in results if t in r["tasks"])) for t in tasks},
           "no_pretraining": floor and {t: floor["tasks"][t] for t in tasks},
           "unigram_loss": next((r["unigram_loss"] for r in results if r.get("unigram_loss") is not None), None)}
    md = [f"# Method quality at equal compute ({a.config}, pre-training in {a.precision})", "",
          f"B = {b_flops:.3e} training FLOPs (FLOP model) = {a.vanilla_iters_at_b} vanilla iterations; budgets "
          f"{', '.join(f'{b:g} B' for b in sorted(a.budgets))}; "
          + (f"fine-tuning seeds {a.seeds}; tasks {', '.join(tasks)}. " if tasks else "no fine-tuning. ")
          + "Held-out loss: mean cross-entropy on the same 15% [MASK] positions for every model "
          + (f"(unigram baseline {res['unigram_loss']:.3f})." if res["unigram_loss"] is not None else "."), "",
          "Time: iterations x each method's step time measured side by side at this configuration "
          + (f"({', '.join(f'{m} {v * 1e3:.0f} ms' for m, v in per_iter.items())}); `run s` is the run's own "
             "wall-clock, which depends on whatever else the machine ran during its sitting."
             if per_iter else "(not measured in this configuration)." if not c["timing_rounds"]
             else "(not measured yet: the step-time pass runs when every run is done)."), "",
          "| run | FLOPs | time s | run s | iterations | held-out loss | gap to unigram | "
          + "".join(f"{t} acc | " for t in tasks) + "mean acc |",
          "|---|---|---|---|---|---|---|" + "---|" * len(tasks) + "---|"]
    for r in results:
        accs = "".join(f"{r['tasks'][t]['mean']:.3f} ± {r['tasks'][t]['std']:.3f} | " for t in tasks)
        mean = f"{r['mean_accuracy']:.3f} ± {r['mean_accuracy_std']:.3f}" if tasks else "n/a"
        gap = f"{r['gap_to_unigram']:+.3f}" if r.get("gap_to_unigram") is not None else "n/a"
        timed = f"{r['timed_seconds']:.0f}" if r["timed_seconds"] is not None else "n/a"
        md.append(f"| {r['run']} | {r['train_flops']:.3e} | {timed} | {r['train_seconds']:.0f} | {r['iterations']} | "
                  f"{r['heldout_loss']:.3f} | {gap} | {accs}{mean} |")
    md += ["", ("Majority class: " + ", ".join(f"{t} {res['majority'][t]:.3f}" for t in tasks) + "." if tasks
                else "No downstream tasks in this run."), ""]
    if len(a.budgets) < 2:
        md += ["One budget: no compute-to-reach table (it interpolates between budgets)."]
        table = res["compute_to_reach_vanilla_at_b"] = []
    else:
        md += [f"## Compute to reach {BASELINE} at B (fraction of its FLOPs / of its training time)", "",
               "`<=`: already reached at the smallest budget; `>`: not reached at the largest.", "",
               "| method | loss: FLOPs | loss: time | accuracy: FLOPs | accuracy: time |", "|---|---|---|---|---|"]
    for row in table:
        md.append(f"| {row['method']} | " + " | ".join(
            _ratio(row.get(k, {"ratio": None, "note": ""})) for k in (
                "heldout_loss:train_flops", "heldout_loss:timed_seconds", "mean_accuracy:train_flops",
                "mean_accuracy:timed_seconds")) + " |")
    stem, plt = write_tables(a.results_dir, f"method_quality_{a.tag}", res, "\n".join(md) + "\n")
    metrics = [("heldout_loss", "held-out MLM loss")] + ([("mean_accuracy", "mean dev accuracy")] if tasks else [])
    fig, axes = plt.subplots(len(metrics), 2, figsize=(12, 4 * len(metrics)), squeeze=False)
    for (metric, label), row in zip(metrics, axes):
        for kind, ax in zip(("train_flops", "timed_seconds" if per_iter else "train_seconds"), row):
            for m, rs in curves.items():
                if m == FLOOR:
                    continue
                xs = [r[kind] for r in rs]
                ys = [r[metric] for r in rs]
                err = [r["mean_accuracy_std"] for r in rs] if metric == "mean_accuracy" else None
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=m)
            if metric == "heldout_loss" and res["unigram_loss"] is not None:
                ax.axhline(res["unigram_loss"], color="gray", ls="--", lw=1, label="unigram")
            if metric == "mean_accuracy" and floor is not None:
                ax.axhline(floor["mean_accuracy"], color="gray", ls="--", lw=1, label="no pre-training")
            if metric == "mean_accuracy" and tasks:
                ax.axhline(statistics.mean(res["majority"].values()), color="black", ls=":", lw=1,
                           label="majority class")
            ax.set_xscale("log")
            ax.set_xlabel({"train_flops": "training FLOPs (FLOP model)", "train_seconds": "training wall-clock (s)",
                           "timed_seconds": "training time (s): iterations x measured step time"}[kind])
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    for row in axes:
        row[0].legend(fontsize=7)
    fig.suptitle(f"Method quality at equal compute ({a.config})")
    fig.tight_layout()
    save_figure(fig, stem)
    return stem


def check_same_plan(result_path, argv):
    """A finished run is reused only if it ran this plan's command line (another B, learning rate
    or flag would mix two studies in one table)."""
    # where the data cache lies is this machine's business, not the plan's
    done = _without(_load(result_path)["pretrain_args"], "--data-cache-path")
    argv = _without(argv, "--data-cache-path")
    if done != argv:
        diff = sorted(set(done) ^ set(argv))[:6]
        fail(f"{result_path} was run with other flags than this plan's (differing: {' '.join(diff)}); "
             "use another --runs-dir, or move that run away")


def check_same_heldout(result_path, digest, versions=None):
    """A finished run is reused only if it was scored on these held-out rows and masks: a corpus
    or tokenizer built again elsewhere can differ (tools/build_corpus.py's Debian packages move
    between releases; manifest.json names the versions), and losses over other tokens do not compare.
    versions: this corpus's source versions, to name the source that moved."""
    done = _load(result_path)
    if done.get("mask_sha1") and done["mask_sha1"] != digest:
        moved = [f"{k}: {v} there, {versions.get(k)} here" for k, v in done.get("source_versions", {}).items()
                 if versions is not None and versions.get(k) != v]
        hint = ("; ".join(moved) + "; tools/build_corpus.py --debian-version rebuilds a Debian source's version"
                if moved else "manifest.json gives the sources' versions")
        fail(f"{result_path} was scored on other held-out rows or masks (mask_sha1 {done['mask_sha1'][:12]}, here "
             f"{digest[:12]}): this corpus or tokenizer differs from the one it was trained on ({hint}); rebuild "
             "that data, or start a separate study (--results-dir and --runs-dir)")


def _hms(s):
    s = int(max(s, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def main(argv=None):
    a, c = parse_args(argv)
    if a.precision_error:
        fail(a.precision_error)
    tok = check_inputs(a)
    import warnings

    warnings.filterwarnings("ignore")
    import logging

    # Before any in-process stage: logging's handler then keeps the real stderr, not a stage log.
    logging.basicConfig(level=logging.WARNING, stream=sys.__stderr__)
    logging.getLogger("megatron").setLevel(logging.ERROR)
    from megatron_effmlm.eval.heldout import build_heldout, unigram_counts

    os.makedirs(a.runs_dir, exist_ok=True)
    seq = int(c["model"][c["model"].index("--seq-length") + 1])
    heldout = build_heldout(a.heldout, tok, seq, c["eval_sequences"])
    counts = unigram_counts(a.unigram_data, tok.vocab_size)
    runs, b_flops = plan_runs(a, c, tok.vocab_size)
    t_start = time.time()
    # ETA: each run costs a fixed part (evaluation, export, fine-tuning) plus pre-training in
    # proportion to its budget; both rates are measured on the runs of this sitting.
    overheads, pre_seconds, pre_budget = [], 0.0, 0.0
    # Each finished run's result also goes beside the results (committed with them): a later
    # sitting on another machine, without this one's runs folder, skips it too.
    kept_dir = os.path.join(a.results_dir, f"method_quality_{a.tag}_runs")
    os.makedirs(kept_dir, exist_ok=True)

    def result_path(name):
        """This machine's result of a run, else the kept copy, else None."""
        for path in (os.path.join(a.runs_dir, name, "result.json"), os.path.join(kept_dir, f"{name}.json")):
            if os.path.isfile(path):
                return path
        return None

    def finished(name):
        """The result of a run done with this plan and this fine-tuning recipe, else None."""
        path = result_path(name)
        if path is None:
            return None
        done = _load(path).get("finetune_recipe", FIRST_RECIPE if c is CONFIGS["cpu"] else None)
        return path if done is None or done == recipe(a, c) or not a.task_dirs else None

    digest, versions = heldout.digest(), source_versions(a.heldout)
    for name, _, _, argv_, _ in runs:  # before any compute
        path = result_path(name)
        if path:
            check_same_plan(path, argv_)
            check_same_heldout(path, digest, versions)
            if not finished(name) and not os.path.isdir(os.path.join(a.runs_dir, name, "ckpt")):
                fail(f"{path}: fine-tuned with another recipe, and its checkpoint is not in {a.runs_dir} "
                     "to fine-tune again (pre-train it again: move that result away)")
    names = [r[0] for r in runs]
    for name in a.only or []:
        if name not in names:
            fail(f"--only {name}: no such run in this plan ({', '.join(names)})")
    def done_so_far():
        """Every finished run of the plan, in its order: the tables written after each run of a
        sitting keep the runs it has not reached yet (finished in another sitting)."""
        return [_load(p) for p in map(finished, [r[0] for r in runs]) if p]

    todo = [r for r in runs if not finished(r[0]) and (a.only is None or r[0] in a.only)]
    todo_names = [r[0] for r in todo]
    for i, (name, method, frac, argv_, budget) in enumerate(runs, 1):
        if finished(name):
            print(f"[{i}/{len(runs)}] {name}: done before, skipped", flush=True)
            continue
        if name not in todo_names:
            print(f"[{i}/{len(runs)}] {name}: not in --only, left for another sitting", flush=True)
            continue
        left = todo[todo_names.index(name):]  # this run and the ones after it
        eta = "after the first run" if not overheads else "after the first pre-training run"
        if overheads and (pre_budget or not any(r[4] for r in left)):
            sec = len(left) * statistics.mean(overheads)
            sec += sum(r[4] for r in left) * (pre_seconds / pre_budget if pre_budget else 0.0)
            eta = _hms(sec)
        print(f"[{i}/{len(runs)}] {name}: running | elapsed {_hms(time.time() - t_start)} | ETA {eta}", flush=True)
        t0 = time.time()
        r = run_one(a, c, name, method, frac, argv_, budget, tok, heldout, counts)
        write_json(os.path.join(kept_dir, f"{name}.json"), r)
        so_far = done_so_far()
        write_outputs(a, c, so_far, b_flops)
        print(f"[{i}/{len(runs)}] table so far: {len(so_far)} of {len(runs)} runs", flush=True)
        pre = r["stage_seconds"]["pretrain"]
        overheads.append(r["seconds"] - pre)
        if budget:
            pre_seconds, pre_budget = pre_seconds + pre, pre_budget + budget
        acc = f", mean accuracy {r['mean_accuracy']:.3f}" if r["mean_accuracy"] is not None else ""
        print(f"[{i}/{len(runs)}] {name}: held-out loss {r['heldout_loss']:.3f}{acc}, {r['train_flops']:.2e} FLOPs, "
              f"{r['train_seconds']:.0f} s training, {time.time() - t0:.0f} s in all", flush=True)
    done, times = done_so_far(), None
    if c["timing_rounds"] and len(done) == len(runs):
        print("step times of every method, side by side (the time axis):", flush=True)
        times = stage_step_times(a, c, runs, kept_dir)
    elif c["timing_rounds"]:
        print(f"{len(runs) - len(done)} run(s) left: the time axis is measured once every run is done", flush=True)
    stem = write_outputs(a, c, done, b_flops, times)
    print(f"results: {stem}.md, .json, .png")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    for _sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(_sig, _on_signal)
    try:
        sys.exit(main())
    except (Stopped, KeyboardInterrupt) as e:
        signum = e.args[0] if isinstance(e, Stopped) else signal.SIGINT
        print(f"error: stopped by {signal.Signals(signum).name}; the run in progress resumes from its last "
              "checkpoint when the same command is run again", file=sys.stderr, flush=True)
        sys.exit(128 + signum)
