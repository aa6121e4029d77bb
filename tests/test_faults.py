"""Faults: kill -9 during a checkpoint save, a corrupt or partial latest checkpoint, non-finite
steps, a rank that dies mid-run, checkpoints that would unpickle arbitrary objects.

Each resume is checked against an uninterrupted run's exact loss sequence (DP=2, dropout on)."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import time

import psutil
import pytest
import torch

from conftest import PYTHON, REPO_ROOT, _free_port, run_torchrun, tiny_model_args

TRACKER = "latest_checkpointed_iteration.txt"


def _losses(png):
    return {int(i): loss for i, loss in json.load(open(os.path.splitext(png)[0] + ".json"))["train"]}


@pytest.fixture(scope="module")
def common(demo_data_prefix, demo_tokenizer_dir, test_cache_dir):
    return tiny_model_args(demo_data_prefix, demo_tokenizer_dir, os.path.join(test_cache_dir, "dc"), **{
        "--train-iters": 6, "--hidden-dropout": 0.1, "--attention-dropout": 0.1, "--save-interval": 3})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, common):
    """Uninterrupted: 6 steps on 2 ranks, checkpoints at 3 and 6."""
    tmp = tmp_path_factory.mktemp("reference")
    ck, png = str(tmp / "ck"), str(tmp / "loss.png")
    r = run_torchrun(2, ["pretrain_effmlm.py", *common, "--save", ck, "--loss-curve", png])
    assert r.returncode == 0, r.stderr[-4000:]
    assert open(os.path.join(ck, TRACKER)).read().strip() == "6"
    return {"ck": ck, "losses": _losses(png)}


def test_kill9_during_save_keeps_previous_checkpoint_and_resume_is_exact(tmp_path, common, reference):
    ck = str(tmp_path / "ck")
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "pretrain_effmlm.py", *common, "--save", ck]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    partial = os.path.join(ck, "iter_0000006.tmp")
    deadline = time.time() + 240
    while not os.path.isdir(partial):  # the save at step 6 has begun
        assert proc.poll() is None and time.time() < deadline, open(tmp_path / "run.log").read()[-4000:]
        time.sleep(0.01)
    workers = sorted(psutil.Process(proc.pid).children(), key=lambda p: p.pid)
    assert len(workers) == 2
    os.kill(workers[-1].pid, signal.SIGKILL)  # one rank dies mid-save
    assert proc.wait(timeout=120) != 0
    assert os.path.isdir(partial) and not os.path.exists(os.path.join(ck, "iter_0000006"))
    assert open(os.path.join(ck, TRACKER)).read().strip() == "3"

    png = str(tmp_path / "resumed.png")
    r = run_torchrun(2, ["pretrain_effmlm.py", *common, "--load", ck, "--save", ck, "--loss-curve", png])
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"loaded checkpoint {ck}/iter_0000003 (iteration 3)" in r.stderr
    resumed = _losses(png)
    assert sorted(resumed) == [4, 5, 6]
    assert [resumed[i] for i in (4, 5, 6)] == [reference["losses"][i] for i in (4, 5, 6)]
    assert open(os.path.join(ck, TRACKER)).read().strip() == "6"
    assert not os.path.exists(partial)  # the next save cleared the leftover


def test_corrupt_and_partial_latest_checkpoints_fall_back_to_previous(tmp_path, common, reference):
    ck = str(tmp_path / "ck")
    shutil.copytree(reference["ck"], ck)
    # iteration 6: a shard cut in half (a torn write); iteration 9: named by the tracker, but
    # only its common state made it to disk (no dist_checkpointing metadata).
    shard = sorted(f for f in os.listdir(os.path.join(ck, "iter_0000006")) if f.endswith(".distcp"))[0]
    path = os.path.join(ck, "iter_0000006", shard)
    os.truncate(path, os.path.getsize(path) // 2)
    os.makedirs(os.path.join(ck, "iter_0000009"))
    shutil.copy(os.path.join(ck, "iter_0000006", "common.pt"), os.path.join(ck, "iter_0000009"))
    open(os.path.join(ck, TRACKER), "w").write("9\n")

    png = str(tmp_path / "resumed.png")
    r = run_torchrun(2, ["pretrain_effmlm.py", *common, "--load", ck, "--loss-curve", png])
    assert r.returncode == 0, r.stderr[-4000:]
    err = r.stderr
    assert f"skipping checkpoint {ck}/iter_0000009: partial or missing (no dist_checkpointing metadata); " \
           "falling back to the previous one" in err
    assert f"skipping checkpoint {ck}/iter_0000006: corrupt or unreadable (" in err
    assert f"loaded checkpoint {ck}/iter_0000003 instead of the latest {ck}/iter_0000009" in err
    resumed = _losses(png)
    assert [resumed[i] for i in (4, 5, 6)] == [reference["losses"][i] for i in (4, 5, 6)]


def test_non_finite_steps_are_skipped_then_stop_with_last_good_state(tmp_path, demo_data_prefix,
                                                                     demo_tokenizer_dir, test_cache_dir):
    # lr 1e30: step 1 is fine and throws the weights to ~1e30, every later step overflows.
    ck = str(tmp_path / "ck")
    args = tiny_model_args(demo_data_prefix, demo_tokenizer_dir, os.path.join(test_cache_dir, "dc"), **{
        "--lr": "1e30", "--clip-grad": 0, "--train-iters": 20, "--max-skipped-iterations": 3, "--global-batch-size": 4})
    r = subprocess.run([PYTHON, "pretrain_effmlm.py", *args, "--save", ck], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert r.returncode == 3, r.stderr[-3000:]
    for k in (1, 2, 3, 4):
        assert (f"iteration {k + 1}: non-finite loss or gradient, update skipped ({k} in a row, "
                f"--max-skipped-iterations 3; {k} skipped in all)") in r.stdout
    assert "iteration 6:" not in r.stdout
    assert "iter      1/20 | loss 8." in r.stdout and "iter      4/20 | loss nan" in r.stdout
    errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
    assert errors == [
        "error: 4 iterations in a row (up to iteration 5) had a non-finite loss or gradient, more than "
        f"--max-skipped-iterations 3; the last good state is saved in {ck}/iter_0000005"]
    assert open(os.path.join(ck, TRACKER)).read().strip() == "5"
    assert os.path.isfile(os.path.join(ck, "iter_0000005", "metadata.json"))


def _two_ranks_at_iteration_3(tmp_path, args):
    """Two trainer processes as `srun` starts them (no torchrun to clean up), returned once rank 0
    has logged iteration 3; their logs are tmp_path/rank{0,1}.log."""
    port = _free_port()
    procs, logs = [], []
    for rank in (0, 1):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
        logs.append(open(tmp_path / f"rank{rank}.log", "w+"))
        procs.append(subprocess.Popen([PYTHON, "pretrain_effmlm.py", *args], cwd=REPO_ROOT, stdout=logs[-1],
                                      stderr=subprocess.STDOUT, env=env))
    deadline = time.time() + 180
    while "iter      3/" not in open(tmp_path / "rank0.log").read():
        if time.time() > deadline or procs[0].poll() is not None:
            for p in procs:
                p.kill()
            raise AssertionError(open(tmp_path / "rank0.log").read()[-3000:])
        time.sleep(0.1)
    return procs, logs


def _stop_rank_1_and_wait(procs, stop, timeout):
    """Stop rank 1 (`stop()`), then wait for rank 0: (its exit code or None, seconds waited).
    Both are killed afterwards, whatever happened."""
    try:
        stop()
        t = time.time()
        try:
            code = procs[0].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        return code, time.time() - t
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _assert_one_lost_rank_error(text):
    errors = [l for l in text.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: lost another rank (it died, or a collective passed --distributed-timeout-minutes): "), text[-3000:]


def test_a_rank_that_dies_ends_the_others_without_hanging(tmp_path, demo_data_prefix, demo_tokenizer_dir,
                                                          test_cache_dir):
    """Two processes as `srun` starts them (no torchrun to clean up): kill -9 one mid-run."""
    args = tiny_model_args(demo_data_prefix, demo_tokenizer_dir, os.path.join(test_cache_dir, "dc"), **{
        "--train-iters": 100000, "--distributed-timeout-minutes": 0.5})
    procs, logs = _two_ranks_at_iteration_3(tmp_path, args)
    code, took = _stop_rank_1_and_wait(procs, procs[1].kill, 60)  # --distributed-timeout-minutes 0.5 bounds a hang
    text = open(tmp_path / "rank0.log").read()
    assert code == 1, text[-3000:]
    _assert_one_lost_rank_error(text)
    assert took < 45
    print(f"surviving rank exited {took:.1f} s after its peer was killed")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", [".metadata", "common.pt"])
def test_loading_never_unpickles_arbitrary_objects(tmp_path, reference, common, where):
    ck, marker = str(tmp_path / "ck"), str(tmp_path / "PWNED")
    shutil.copytree(reference["ck"], ck)
    target = os.path.join(ck, "iter_0000006", where)
    if where == ".metadata":  # torch DCP reads this one with plain pickle
        open(target, "wb").write(pickle.dumps(_Evil(marker), protocol=2))
    else:
        torch.save({"iteration": 6, "payload": _Evil(marker)}, target)
    r = subprocess.run([PYTHON, "tests/cli_error_runner.py", "-", "-"], input=json.dumps(
        {"evil": [*common, "--load", ck, "--train-iters", "7"]}), cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    code, err = json.loads(r.stdout.splitlines()[-1])["evil"]
    assert not os.path.exists(marker)
    assert code == 2, err
    lines = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(f"error: refusing to load {target}: it would unpickle "), err


def test_exit_duration_saves_and_exits_75(tmp_path, demo_data_prefix, demo_tokenizer_dir, test_cache_dir):
    ck = str(tmp_path / "ck")
    args = tiny_model_args(demo_data_prefix, demo_tokenizer_dir, os.path.join(test_cache_dir, "dc"), **{
        "--train-iters": 1000, "--exit-duration-in-mins": 0.0001, "--save": ck})
    r = subprocess.run([PYTHON, "pretrain_effmlm.py", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert r.returncode == 75, r.stderr[-3000:]
    assert ("stopping at iteration 1 on time limit: saving a checkpoint and exiting with code 75 (resumable)"
            in r.stdout)
    assert open(os.path.join(ck, TRACKER)).read().strip() == "1"


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path, common):
    """SIGUSR1 reaches only rank 1: the all-reduced flag stops both after one step, one
    checkpoint is saved, and torchrun's caller learns code 75 from EFFMLM_EXIT_CODE_FILE."""
    ck, code_file = str(tmp_path / "ck"), str(tmp_path / "exit_code")
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "pretrain_effmlm.py", *common, "--train-iters", "100000", "--save", ck, "--exit-signal-handler"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", EFFMLM_EXIT_CODE_FILE=code_file)
    log = tmp_path / "run.log"
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 180
    while "iter      2/" not in log.read_text():
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    workers = sorted(psutil.Process(proc.pid).children(), key=lambda p: p.pid)
    os.kill(workers[-1].pid, signal.SIGUSR1)
    proc.wait(timeout=180)
    text = log.read_text()
    stops = [l for l in text.splitlines() if l.startswith("stopping at iteration ")]
    assert len(stops) == 1 and stops[0].endswith(" on SIGUSR1: saving a checkpoint and exiting with code 75 "
                                                  "(resumable)"), text[-3000:]
    k = int(stops[0].split()[3])
    assert open(os.path.join(ck, TRACKER)).read().strip() == str(k)
    assert sorted(os.listdir(ck)) == [f"iter_{k:07d}", TRACKER]  # one checkpoint, nothing half-written
    assert open(code_file).read().strip() == "75"


def test_kill9_of_the_trainer_during_a_save_leaves_no_writer_process(tmp_path, demo_data_prefix, demo_tokenizer_dir,
                                                                     test_cache_dir):
    """dist_checkpointing's writer processes (forked per write bucket, and a spawned
    multiprocessing Manager with its resource tracker) die with the trainer."""
    ck = str(tmp_path / "ck")
    args = tiny_model_args(demo_data_prefix, demo_tokenizer_dir, os.path.join(test_cache_dir, "dc"), **{
        "--train-iters": 100000, "--save-interval": 1, "--log-interval": 1000})
    proc = subprocess.Popen([PYTHON, "pretrain_effmlm.py", *args, "--save", ck], cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    seen = set()
    try:
        deadline = time.time() + 240
        while not (os.path.isdir(os.path.join(ck, "iter_0000003.tmp")) and len(seen) >= 2):  # the third save
            assert proc.poll() is None and time.time() < deadline
            try:
                seen |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.005)
        proc.kill()
        proc.wait()
        deadline = time.time() + 5
        alive = seen
        while alive and time.time() < deadline:
            alive = {p for p in seen if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}
            time.sleep(0.1)
    finally:
        for pid in seen:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
    assert not alive, [" ".join(psutil.Process(p).cmdline())[:200] for p in alive if psutil.pid_exists(p)]


def test_a_stopped_rank_ends_the_others_after_the_distributed_timeout(tmp_path, demo_data_prefix, demo_tokenizer_dir,
                                                                     test_cache_dir):
    """SIGSTOP one of two ranks (a hung node): the live one leaves its data-parallel all-reduce
    (a megatron-core group) after --distributed-timeout-minutes, with one clear error."""
    args = tiny_model_args(demo_data_prefix, demo_tokenizer_dir, os.path.join(test_cache_dir, "dc"), **{
        "--train-iters": 100000, "--distributed-timeout-minutes": 0.25})
    procs, logs = _two_ranks_at_iteration_3(tmp_path, args)
    # megatron-core's groups default to 30 minutes
    code, took = _stop_rank_1_and_wait(procs, lambda: os.kill(procs[1].pid, signal.SIGSTOP), 120)
    text = open(tmp_path / "rank0.log").read()
    assert code == 1, f"the live rank still waits {took:.0f} s after its peer stopped: " + text[-2000:]
    _assert_one_lost_rank_error(text)
    assert 10 < took < 60, took
    print(f"live rank exited {took:.1f} s after its peer was stopped")


def test_the_checkpoint_writers_queue_survives_the_stop_signals():
    """Slurm signals every process of a step and torchrun's shutdown is a killpg, so a stop signal
    also reaches dist_checkpointing's results-queue server; killed by it, the save the signal asks
    for failed with EOFError (seen on CI: a preempted Slurm job). It must ignore them, and still
    die with the trainer."""
    code = (
        "import os, signal, time\n"
        "from megatron.core.dist_checkpointing.strategies import filesystem_async as fa\n"
        "from megatron_effmlm.checkpoint import dist_ckpt\n"
        "dist_ckpt._guard_writer_processes()\n"
        "server = fa._effmlm_manager._process.pid\n"
        "for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR2):\n"
        "    os.kill(server, sig)\n"
        "time.sleep(1)\n"
        "fa._results_queue.put('answered')\n"
        "print(fa._results_queue.get(timeout=10), server, flush=True)\n"
        "os._exit(0)\n"  # like a SIGKILLed trainer: no finalizer stops the server
    )
    r = subprocess.run([PYTHON, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split()[0] == "answered", r.stderr[-3000:]
    server = int(r.stdout.split()[1])
    deadline = time.time() + 10
    while psutil.pid_exists(server) and psutil.Process(server).status() != psutil.STATUS_ZOMBIE:
        assert time.time() < deadline, "the queue server outlived the trainer"
        time.sleep(0.05)
