"""The sbatch launchers on a real Slurm cluster started on this machine (two node daemons,
n1 and n2, on one host; see slurm_cluster.py): a 2-node job trains with world size 2 across
both nodes, and a job preempted with SIGUSR1 saves, requeues itself, resumes from that
checkpoint and produces exactly the loss sequence of an uninterrupted run.

Tiny model on the CPU (gloo), demo data. Slurm and munge are installed by
scripts/install_slurm.sh where missing; the tests skip only when that is impossible, and
fail instead under EFFMLM_REQUIRE_SLURM=1 (CI sets it: a skip there would hide a regression)."""

import json
import os
import re
import subprocess
import time

import pytest

from conftest import PYTHON, REPO_ROOT, _free_port
from slurm_cluster import LocalSlurm, ensure_installed

ITERS = 60
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = ensure_installed()
    if why and os.environ.get("EFFMLM_REQUIRE_SLURM") == "1":
        pytest.fail(f"EFFMLM_REQUIRE_SLURM=1 but no Slurm cluster can be started: {why}")
    if why:
        pytest.skip(why)
    c = LocalSlurm(str(tmp_path_factory.mktemp("slurm")))
    with c:
        yield c


def _submit(cluster, tmp, launcher, out, demo_data_prefix, demo_tokenizer_dir):
    env = dict(cluster.env, DATA=demo_data_prefix, TOK=demo_tokenizer_dir, OUT=str(out), GPUS_PER_NODE="1",
               PYTHON=PYTHON, OMP_NUM_THREADS="1", MASTER_PORT=str(_free_port()), TRAIN_ITERS=str(ITERS),
               PYTHONWARNINGS="ignore")
    # The #SBATCH lines are a GPU cluster's; the command line overrides what this one lacks.
    r = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--partition=debug",
         f"--chdir={REPO_ROOT}", f"--output={tmp}/%x-%j.out", launcher, "examples/configs/tiny_cpu.sh",
         "--data-cache-path", str(tmp / "dc")],
        env=env, capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    return job, tmp / f"effmlm-{job}.out"


def _wait(cluster, job, log, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = cluster.job(job)
        if info.get("JobState") in DONE:
            return info
        if info.get("Reason") in ("PartitionConfig", "BadConstraints", "PartitionNodeLimit"):
            break
        time.sleep(0.5)
    text = log.read_text() if log.exists() else "(no output)"
    raise AssertionError(f"job {job} not done: {cluster.job(job)}\n{text[-5000:]}\n{cluster.logs()}")


def _losses(path):
    return [loss for _, loss in json.load(open(path))["train"]]


def _clock(line):
    h, m, s = map(int, re.search(r"\[effmlm (\d\d):(\d\d):(\d\d)\]", line).groups())
    return 3600 * h + 60 * m + s


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory, demo_data_prefix, demo_tokenizer_dir):
    """An uninterrupted 2-node job, one task per node started by srun (pretrain_srun.sbatch)."""
    tmp = tmp_path_factory.mktemp("srun_job")
    t = time.time()
    job, log = _submit(cluster, tmp, "slurm/pretrain_srun.sbatch", tmp / "out", demo_data_prefix, demo_tokenizer_dir)
    info = _wait(cluster, job, log)
    return {"info": info, "log": log.read_text(), "out": tmp / "out", "seconds": time.time() - t}


def test_two_node_job_trains_across_both_nodes(uninterrupted):
    info, text = uninterrupted["info"], uninterrupted["log"]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-5000:]
    assert "on 2 node(s): n1 n2" in text
    assert "layout: world 2 = 2 node(s) x 1 process(es); TP 1 x PP 1 x DP 2; rendezvous 127.0.0.1:" in text
    assert "command: srun --kill-on-bad-exit=1 bash -c" in text and "pretrain_effmlm.py --data-path" in text
    # the trainer's own view: one process group over both nodes' tasks
    assert "parallel layout: world size 2 = TP 1 x PP 1 x DP 2" in text
    assert f"iter     {ITERS}/{ITERS}" in text
    assert "training exited with code 0" in text
    losses = _losses(uninterrupted["out"] / "loss_restart0.json")
    assert len(losses) == ITERS and all(l == l for l in losses)
    print(f"2-node srun job: {uninterrupted['seconds']:.1f} s from sbatch to COMPLETED")


def test_preempted_job_saves_requeues_and_resumes_exactly(cluster, uninterrupted, tmp_path, demo_data_prefix,
                                                          demo_tokenizer_dir):
    out = tmp_path / "out"
    t0 = time.time()
    job, log = _submit(cluster, tmp_path, "slurm/pretrain_torchrun.sbatch", out, demo_data_prefix,
                       demo_tokenizer_dir)
    # Preempt once training runs: SIGUSR1 to the batch shell, as --signal=B:USR1@<s> does.
    deadline = time.time() + 180
    while not (log.exists() and "iter      2/" in log.read_text()):
        assert time.time() < deadline and cluster.job(job).get("JobState") not in DONE, \
            (log.read_text() if log.exists() else "") + cluster.logs()
        time.sleep(0.05)
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    info = _wait(cluster, job, log, timeout=300)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-6000:]
    assert info["Restarts"] == "1", info

    stop = re.search(r"stopping at iteration (\d+) on SIGUSR1: saving a checkpoint and exiting with code 75", text)
    assert stop, text[-6000:]
    k = int(stop.group(1))
    assert 2 <= k < ITERS
    assert "batch shell got SIGUSR1: forwarding it to the training processes" in text
    assert f"saved checkpoint {out}/ckpt/iter_{k:07d}" in text
    assert "training exited with code 75" in text  # past torchrun, through EFFMLM_EXIT_CODE_FILE
    requeue = [l for l in text.splitlines() if "requeueing job" in l]
    assert len(requeue) == 1, text[-6000:]
    restart = [l for l in text.splitlines() if re.search(rf"job {job} \(effmlm\) restart 1 on 2 node\(s\)", l)]
    assert len(restart) == 1, text[-6000:]
    assert f"loaded checkpoint {out}/ckpt/iter_{k:07d} (iteration {k})" in text
    assert text.count("parallel layout: world size 2 = TP 1 x PP 1 x DP 2") == 2

    first, second = _losses(out / "loss_restart0.json"), _losses(out / "loss_restart1.json")
    assert len(first) == k and len(second) == ITERS - k
    reference = _losses(uninterrupted["out"] / "loss_restart0.json")
    assert first + second == reference  # exact: weights, optimizer, LR, RNG (dropout on), data position
    print(f"preempted at iteration {k}; requeue to restart {_clock(restart[0]) - _clock(requeue[0])} s; "
          f"whole job {time.time() - t0:.1f} s")
