"""What the benchmark scripts share: the device's name, the git state, the demo-corpus
batches, one timed training step (the trainer's, training/step.py), the FLOP model's
prediction per method, the logger and the atomic result writer. Each script in bench/
imports it (bench/ is on the path when a script runs)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
import warnings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402

from megatron_effmlm import atomic  # noqa: E402
from megatron_effmlm.atomic import write_json, write_text  # noqa: E402,F401  (the benchmarks import them from here)
from megatron_effmlm.plans import POLICIES  # noqa: E402

BASELINE = "megatron-bert"  # megatron-core's BertModel, Megatron-LM's pretrain_bert step


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def device_tag() -> str:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0).lower()
        for key in ("h200", "h100", "a100", "l40", "a10", "v100", "t4"):
            if key in name:
                return key
        return "cuda"
    return "cpu"


def git_state():
    """The commit the library was imported from, and its uncommitted library changes (if any)."""
    def git(*args):
        try:
            return subprocess.run(["git", "-C", REPO_ROOT, *args], capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "HEAD")
    if not commit:  # not a checkout (e.g. a `git archive` export): say which commit it was, if told
        return {"commit": os.environ.get("BENCH_SOURCE_COMMIT", "unknown (not a git checkout)"), "dirty_library_files": []}
    dirty = [line.split(maxsplit=1)[-1] for line in git("status", "--porcelain", "--", "megatron_effmlm").splitlines()]
    return {"commit": commit, "dirty_library_files": dirty}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def corpus_and_tokenizer(a, log):
    """The demo corpus JSONL and a WordPiece tokenizer trained on it, under a.data_dir (reused)."""
    from megatron_effmlm.data.demo_corpus import DUMP_NAME, get_demo_corpus
    from megatron_effmlm.data.jsonl import iter_jsonl
    from megatron_effmlm.data.tokenizer import META_FILE, train_tokenizer

    os.makedirs(a.data_dir, exist_ok=True)
    # Reuse the demo dump the project may already hold (data/cache) instead of downloading it again.
    shared_dump = os.path.join(REPO_ROOT, "data", "cache", DUMP_NAME)
    own_dump = os.path.join(a.data_dir, "cache", DUMP_NAME)
    if not os.path.isfile(own_dump) and os.path.isfile(shared_dump):
        os.makedirs(os.path.dirname(own_dump), exist_ok=True)
        with atomic.atomic_path(own_dump) as tmp:
            shutil.copyfile(shared_dump, tmp)
    jsonl = get_demo_corpus(a.data_dir)

    tok_dir = os.path.join(a.data_dir, f"tokenizer_wordpiece_{a.tokenizer_vocab}")
    if not os.path.isfile(os.path.join(tok_dir, META_FILE)):
        log(f"training a WordPiece tokenizer ({a.tokenizer_vocab}) on {jsonl}")
        tmp = f"{tok_dir}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        texts = (values[0] for _, _, values in iter_jsonl([jsonl], ["text"]))
        train_tokenizer(texts, "wordpiece", a.tokenizer_vocab, tmp, lowercase=True)
        shutil.rmtree(tok_dir, ignore_errors=True)
        os.replace(tmp, tok_dir)
    return jsonl, tok_dir


def policy_of(name: str):
    """The policy class of a table row ("sctd-consistency": ScTD's; the baseline: vanilla's)."""
    return POLICIES[{"sctd-consistency": "sctd", BASELINE: "vanilla"}.get(name, name)]


def masking_of(name: str):
    """(masking rate, 80/10/10) of a row's batches: its method's defaults."""
    p = policy_of(name)
    return (p.default_mask_prob, p.default_mask_80_10_10)


def build_data(a, log, maskings=((0.15, True), (0.5, False))):
    """Tokenizer + .bin/.idx of the demo corpus under data/bench (reused when present), and the
    real batches of each masking (rate, 80/10/10), the same samples; also under the names
    "vanilla" (0.15, 80/10/10) and "3ml" (0.5, all [MASK]) where built."""
    from megatron_effmlm.data.batches import make_data_iterator
    from megatron_effmlm.data.dataset import build_train_valid_test_datasets
    from megatron_effmlm.data.preprocess import output_prefix_for, preprocess
    from megatron_effmlm.data.tokenizer import EffMLMTokenizer

    jsonl, tok_dir = corpus_and_tokenizer(a, log)
    tok = EffMLMTokenizer.from_dir(tok_dir)

    base = os.path.join(a.data_dir, f"wiki_wp{a.tokenizer_vocab}")
    prefix = output_prefix_for(base, "text", split_sentences=True)
    if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
        log(f"preprocessing {jsonl} -> {prefix}.bin/.idx")
        preprocess(jsonl, base, tok_dir, split_sentences=True, workers=2, log_interval=0,
                   punkt_cache=os.path.join(a.data_dir, "punkt.json"))

    n = a.micro_batch_size * a.num_batches
    batches = {}
    for key in dict.fromkeys(maskings):
        prob, m8 = key
        train, _, _ = build_train_valid_test_datasets(
            [prefix], tokenizer=tok, seq_length=a.seq_length, split="100,0,0", seed=a.seed,
            train_samples=n, valid_samples=None, test_samples=None, masking_probability=prob,
            mask_80_10_10=m8, cache_dir=os.path.join(a.data_dir, "index_cache"),
        )
        it = make_data_iterator(train, 0, a.micro_batch_size)
        batches[key] = [next(it) for _ in range(a.num_batches)]
    first = next(iter(batches.values()))
    for v in batches.values():  # same samples, different masking
        for b1, b2 in zip(first, v):
            assert torch.equal(b1["padding_mask"], b2["padding_mask"])
    for name, key in (("vanilla", (0.15, True)), ("3ml", (0.5, False))):
        if key in batches:
            batches[name] = batches[key]
    return tok, batches


class MegatronBertInputs:
    """megatron-core's BertModel seen as a policy: Megatron-LM's pretrain_bert inputs and loss
    (the head on every position, the loss masked to the predicted ones)."""

    def model_inputs(self, batch, step):
        self.loss_mask = batch["loss_mask"]
        return dict(input_ids=batch["text"], attention_mask=batch["padding_mask"], lm_labels=batch["labels"])

    def loss(self, output):
        lm_loss, _ = output
        mask = self.loss_mask.reshape(-1).float()
        n = self.loss_mask.sum().to(torch.int)
        total = (lm_loss.float().reshape(-1) * mask).sum()
        return total, n, {"lm loss": torch.stack([total.detach(), n.float()])}


class Runner:
    """One method: its model (DDP-wrapped), optimizer, policy, batches and step index; a step
    is the trainer's (training/step.py), timed."""

    def __init__(self, name, model, optimizer, batches, tconfig, policy=None, step_index=None, precision="fp32"):
        from megatron_effmlm.training.step import Step

        self.name, self.model, self.optimizer, self.batches, self.policy = name, model, optimizer, batches, policy
        self.precision = precision
        self.label = name if precision == "fp32" else f"{name} ({precision})"
        self.step_index = step_index  # fixed step number handed to the policy, or None: the running count
        self.calls = 0
        self.times = []
        self.opt_times = []  # the optimizer step (+ after_step) part of each timed step
        self.last_loss = float("nan")
        self.forward_flops = []  # the engine's FLOP count of each forward (our models only)
        b, T = batches[0]["text"].shape
        self.train_step = Step([model], policy if policy is not None else MegatronBertInputs(), tconfig, b, T)

    def policy_step(self):
        return self.calls if self.step_index is None else self.step_index

    def next_batch(self):
        return self.batches[self.calls % len(self.batches)]

    def step(self):
        from megatron_effmlm.model.builder import unwrap

        batch = self.next_batch()
        inner = unwrap(self.model)
        sync()
        t0 = time.perf_counter()
        self.train_step.zero_grads(self.optimizer)
        reports = self.train_step.forward_backward(iter([batch]), 1, self.policy_step())
        sync()
        t1 = time.perf_counter()
        with torch.profiler.record_function("effmlm/optimizer"):  # bench/profile_step.py's scope
            self.optimizer.step()
            if self.policy is not None:
                self.policy.after_step(self.calls + 1)
            sync()
        dt = time.perf_counter() - t0
        self.last_opt = time.perf_counter() - t1
        if hasattr(inner, "forward_flops"):
            self.forward_flops.append(inner.forward_flops)
        r = reports[0]["lm loss"]
        self.last_loss = float(r[0] / r[1])
        self.calls += 1
        return dt


def predicted_flops(a, name):
    """Training FLOPs per sequence by the FLOP model (docs/methods.md), the method's own parameters."""
    from megatron_effmlm.model.flops import Shape
    from megatron_effmlm.plans.flops import step_flops

    def shape(mask_prob):
        return Shape(a.num_layers, a.seq_length, a.hidden_size, 4 * a.hidden_size, a.model_vocab_padded, mask_prob)

    cls = policy_of(name)
    opts = dict(cls.options(vars(a)), ltd_len=a.ltd_len)
    if name == "sctd-consistency":  # the dropped pass + the full pass, each with its head
        return step_flops("sctd", shape(0.15), **opts) + step_flops("vanilla", shape(0.15))
    return step_flops(name, shape(cls.default_mask_prob), **opts)  # BASELINE ("megatron-bert"): the head on all T


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def bench_logger():
    """Quiet megatron-core's warnings; return log(msg), which prints with seconds since now."""
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("megatron").setLevel(logging.ERROR)
    start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", flush=True)

    return log


def save_figure(fig, stem: str, dpi: int = 110) -> str:
    """<stem>.png, written atomically; closes the figure."""
    return atomic.save_figure(fig, stem + ".png", dpi)


def write_tables(results_dir: str, name: str, res: dict, md: str):
    """<name>.json and <name>.md in results_dir, each written atomically; returns the path stem
    (for the PNG beside them, save_figure) and pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(results_dir, exist_ok=True)
    stem = os.path.join(results_dir, name)
    write_json(stem + ".json", res, indent=2)
    write_text(stem + ".md", md)
    return stem, plt
