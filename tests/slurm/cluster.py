"""A real two-node Slurm cluster on this machine, for tests.

Debian's ``slurmctld``/``slurmd``/``munge`` (installed on demand with apt when running as
root), one ``slurmd -N n1`` and one ``slurmd -N n2`` on distinct ports emulate two nodes
(``NodeAddr=127.0.0.1``).  No systemd: every daemon is started here in the foreground as our
child, with its own config, key, sockets and logs under a temporary directory, and stopped by
PID when the cluster is closed.  No accounting (``sacct`` is unavailable); job states come from
``squeue``/``scontrol``.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


class SlurmUnavailable(RuntimeError):
    pass


def ensure_installed() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and apt-get as root is not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed: {proc.stderr[-500:]}")


def _pids_of(name: str) -> set[int]:
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/comm"):
        try:
            if stat.read_text().strip() == name:
                pids.add(int(stat.parent.name))
        except OSError:
            pass
    return pids


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    return kids


def _kill_tree(pid: int) -> None:
    for child in _children(pid):
        _kill_tree(child)
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass


_LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                     "MASTER_PORT", "NODE_RANK", "LOCAL_ADDR", "GLOO_SOCKET_IFNAME")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class SlurmCluster:
    def __init__(self, root: Path, nodes=("n1", "n2"), cpus: int | None = None):
        self.root = Path(root)
        self.nodes = list(nodes)
        self.cpus = cpus or os.cpu_count() or 2
        self.procs: list[subprocess.Popen] = []
        self._stepds_before: set[int] = set()
        self.conf = self.root / "slurm.conf"
        # A login shell's environment: not the launch variables that in-process tests leave in
        # pytest's (init_distributed sets MASTER_PORT to ITS store's port; sbatch exports the
        # environment, and node 0 would then be told to host a store on a port in use).
        self.env = {**{k: v for k, v in os.environ.items() if k not in _LAUNCH_VARIABLES},
                    "SLURM_CONF": str(self.conf)}

    # ---------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 60) -> "SlurmCluster":
        ensure_installed()
        self._stepds_before = _pids_of("slurmstepd")
        self.root.mkdir(parents=True, exist_ok=True)
        for d in ("state", "log", "munge", *(f"spool/{n}" for n in self.nodes)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = self.root / "munge" / "munge.socket"
        self._spawn(["munged", "-F", "--force", f"--key-file={key}", f"--socket={sock}",
                     f"--pid-file={self.root}/munge/munged.pid",
                     f"--log-file={self.root}/log/munged.log",
                     f"--seed-file={self.root}/munge/munged.seed"], "munged")
        self._wait_for(sock.exists, 10, "munged socket")
        ctl_port, *node_ports = _free_ports(1 + len(self.nodes))
        self.conf.write_text(self._slurm_conf(sock, ctl_port, node_ports))
        self._spawn(["slurmctld", "-D", "-f", str(self.conf)], "slurmctld")
        for node in self.nodes:
            self._spawn(["slurmd", "-D", "-N", node, "-f", str(self.conf)], f"slurmd-{node}")
        self._wait_for(self._nodes_idle, timeout, "nodes to become idle")
        return self

    def stop(self) -> None:
        """Cancel every job, stop the daemons, then kill job processes they left behind:
        ``slurmstepd`` detaches from ``slurmd``, and a step whose controller vanished mid-way
        (an ``srun`` waiting for it) would otherwise run on forever."""
        try:
            for job in self.run("squeue", "-h", "-o", "%i", check=False).stdout.split():
                self.run("scancel", job, check=False)
            self._wait_for(lambda: not self.run("squeue", "-h", check=False).stdout.strip(),
                           30, "the queue to drain")
        except (TimeoutError, RuntimeError, subprocess.SubprocessError):
            pass
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 15
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        for pid in _pids_of("slurmstepd") - self._stepds_before:
            _kill_tree(pid)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- jobs
    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), env=self.env, capture_output=True, text=True,
                              timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{args}: {proc.stderr}\n{self.logs()}")
        return proc

    def sbatch(self, script: str, *args: str, env: dict | None = None, cwd=None) -> int:
        proc = subprocess.run(["sbatch", "--parsable", script, *args],
                              env={**self.env, **(env or {})}, cwd=cwd, capture_output=True,
                              text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed: {proc.stderr}\n{self.logs()}")
        return int(proc.stdout.strip().split(";")[0])

    def job_state(self, job_id: int) -> str | None:
        out = self.run("squeue", "-h", "-j", str(job_id), "-o", "%T", check=False).stdout.strip()
        return out or None  # None: left the queue (finished, and no accounting to ask)

    def wait_gone(self, job_id: int, timeout: float) -> None:
        self._wait_for(lambda: self.job_state(job_id) is None, timeout, f"job {job_id} to end")

    def logs(self) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*.log")):
            parts.append(f"--- {f.name}\n{f.read_text()[-1500:]}")
        return "\n".join(parts)

    # ---------------------------------------------------------------- internals
    def _spawn(self, cmd: list[str], name: str) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log,
                                           stderr=subprocess.STDOUT))

    def _nodes_idle(self) -> bool:
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"daemon {p.args[0]} exited ({p.returncode})\n{self.logs()}")
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        return all(states.get(n) == "idle" for n in self.nodes)

    @staticmethod
    def _wait_for(predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.5)
        raise TimeoutError(f"timed out waiting for {what}")

    def _slurm_conf(self, munge_socket: Path, ctl_port: int, node_ports: list[int]) -> str:
        """``cred_expire=30``: a requeued job waits out its old credential's lifetime (120 s by
        default) before it can start again; 30 s is still ample for a step to launch here."""
        r = self.root
        nodes = "\n".join(
            f"NodeName={n} NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus} State=UNKNOWN"
            for n, p in zip(self.nodes, node_ports))
        return f"""\
ClusterName=plt_test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctl_port}
AuthType=auth/munge
AuthInfo=socket={munge_socket},cred_expire=30
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
MinJobAge=2
MailProg=/bin/true
JobRequeue=1
KillWait=60
Waittime=0
{nodes}
PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
"""
