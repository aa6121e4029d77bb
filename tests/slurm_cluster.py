"""A real, throw-away Slurm cluster on this machine: munged, slurmctld and two slurmd node
daemons (n1, n2) on one host, all with their own files under one temporary folder.

    with LocalSlurm(workdir) as cluster:
        subprocess.run(["sbatch", ...], env=cluster.env)

Debian's Slurm 22.05 (`scripts/install_slurm.sh` installs it). Runs as root without systemd;
every daemon is started in the foreground as a child of this process and killed (with the
processes of any job still running) on exit, even when the test failed. Only loopback.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

SLURM_BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel")
INSTALLER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "install_slurm.sh")


def missing_binaries():
    return [b for b in SLURM_BINARIES if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]


def ensure_installed() -> str | None:
    """Install Slurm and munge where missing; None when ready, else why it cannot be."""
    if not missing_binaries():
        return None
    r = subprocess.run(["bash", INSTALLER], capture_output=True, text=True, timeout=900)
    if missing_binaries():
        return f"Slurm/munge not installed and {INSTALLER} failed: {(r.stderr or r.stdout).strip()[-500:]}"
    return None


def _free_ports(n: int):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _bin(name):
    return shutil.which(name) or f"/usr/sbin/{name}"


class LocalSlurm:
    CRED_EXPIRE = 5  # the smallest Slurm accepts: a requeued job may start again after it

    def __init__(self, workdir: str, nodes: int = 2, cpus_per_node: int = 2):
        self.dir = os.path.abspath(workdir)
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.cpus = cpus_per_node
        self.procs = []
        self.env = None

    # ----- set-up -----
    def _write_config(self):
        d = self.dir
        host = socket.gethostname().split(".")[0]
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        self.munge_socket = os.path.join(d, "munge", "munge.socket")
        lines = [
            "ClusterName=effmlmtest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire={self.CRED_EXPIRE}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={d}/state",
            f"SlurmdSpoolDir={d}/spool/%n",
            f"SlurmctldPidFile={d}/slurmctld.pid",
            f"SlurmdPidFile={d}/slurmd.%n.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log",
            f"SlurmdLogFile={d}/log/slurmd.%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=1",
            "SlurmdParameters=config_overrides",
            "MpiDefault=none",
            "ReturnToService=2",
            "KillWait=5",
            "MinJobAge=300",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "JobRequeue=1",
        ]
        for name, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf = os.path.join(d, "slurm.conf")
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        # Leftover job variables of an enclosing allocation would confuse sbatch/srun.
        for k in list(self.env):
            if k.startswith("SLURM_") and k != "SLURM_CONF":
                del self.env[k]

    def _spawn(self, name, cmd):
        log = open(os.path.join(self.dir, "log", f"{name}.out"), "w")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append((name, p))
        return p

    def start(self, timeout: float = 60.0):
        d = self.dir
        for sub in ("munge", "state", "log", "spool"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        for n in self.nodes:
            os.makedirs(os.path.join(d, "spool", n), exist_ok=True)
        os.chmod(os.path.join(d, "munge"), 0o700)
        self._write_config()
        key = os.path.join(d, "munge", "munge.key")
        subprocess.run([_bin("mungekey"), "--create", "--force", f"--keyfile={key}"], check=True, capture_output=True)
        os.chmod(key, 0o600)
        self._spawn("munged", [_bin("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={d}/munge/munged.pid",
                               f"--log-file={d}/log/munged.log", f"--seed-file={d}/munge/munged.seed"])
        self._wait(lambda: os.path.exists(self.munge_socket), 10, "munged socket")
        self._spawn("slurmctld", [_bin("slurmctld"), "-D", "-i", "-f", self.conf])
        for n in self.nodes:
            self._spawn(f"slurmd-{n}", [_bin("slurmd"), "-D", "-N", n, "-f", self.conf])
        self._wait(self._nodes_idle, timeout, "nodes idle")
        return self

    def _nodes_idle(self) -> bool:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, env=self.env)
        states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
        return r.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes)

    def _wait(self, cond, timeout, what):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited ({p.returncode}) while waiting for {what}:\n{self.logs()}")
            if cond():
                return
            time.sleep(0.2)
        raise TimeoutError(f"Slurm: no {what} after {timeout} s:\n{self.logs()}")

    def logs(self) -> str:
        out = []
        log = os.path.join(self.dir, "log")
        for f in sorted(os.listdir(log)) if os.path.isdir(log) else []:
            text = open(os.path.join(log, f), errors="replace").read()
            out.append(f"--- {f}\n{text[-3000:]}")
        return "\n".join(out)

    # ----- use -----
    def run(self, *cmd, check=True, timeout=60):
        r = subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and r.returncode:
            raise RuntimeError(f"{' '.join(cmd)} -> {r.returncode}: {r.stderr}")
        return r

    def job(self, job_id) -> dict:
        """`scontrol show job` as a dict (JobState, RunTime, Restarts, ...)."""
        r = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        out = {}
        for tok in r.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                out.setdefault(k, v)
        return out

    # ----- tear-down -----
    def stop(self):
        if self.env is not None:
            subprocess.run(["scancel", "--full", "--signal=KILL", "--user=root"], env=self.env,
                           capture_output=True, timeout=30)
            subprocess.run(["scancel", "--user=root"], env=self.env, capture_output=True, timeout=30)
        # Job processes and slurmstepd's left behind: every process started with this cluster's
        # SLURM_CONF in its environment (the folder is unique), killed one by one by pid.
        own = {p.pid for _, p in self.procs}
        for pid in self._cluster_pids() - own:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for name, p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except OSError:
                    pass
        for name, p in reversed(self.procs):
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs = []

    def _cluster_pids(self):
        pids = set()
        if self.env is None:
            return pids
        tag = f"SLURM_CONF={self.conf}".encode()
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                env = open(f"/proc/{pid}/environ", "rb").read()
            except OSError:
                continue
            if tag in env.split(b"\0"):
                pids.add(int(pid))
        return pids

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()
