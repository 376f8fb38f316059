"""An emulated multi-node cluster on one Linux machine: network namespaces, a bridge, shaped links.

    python -m plt_train.runtime.emulated_cluster --nodes 2 --rate-mbit 200 -- \\
        launch/torchrun.sh model=small moe=fine_grained parallel=ep2 train.steps=20
    python -m plt_train.runtime.emulated_cluster --cleanup   # namespaces left by a killed run

Each "node" is a network namespace with one interface (``eth0``, address ``10.77.0.<i+1>``)
whose veth peer sits on a bridge in a separate "switch" namespace, like one NIC per node on a
top-of-rack switch.  Every link is shaped in both directions with a token bucket (``tc tbf``):
on the node's ``eth0`` (what the node sends) and on its port of the switch (what it receives),
so a node's traffic in and out is each capped at ``rate_mbit``, as with a NIC of that speed.
Nothing is created in the caller's namespace: clusters cannot collide with the host's network
or with each other, and deleting the namespaces removes every link.

The command runs once per node, inside its namespace, with the environment that
``launch/torchrun.sh`` reads for a multi-node launch: ``NNODES``, ``NODE_RANK``,
``MASTER_ADDR`` (node 0), ``MASTER_PORT``, ``LOCAL_ADDR`` (this node's address, for torchrun's
``--local-addr``: the host name resolves to localhost in every namespace) and
``GLOO_SOCKET_IFNAME=eth0``, so gloo's traffic crosses the shaped links.

What it does not emulate, and why: latency.  ``netem`` (the qdisc that adds delay) is not
built into these machines' kernels; ``tbf``'s ``latency`` is only the longest a packet may wait
in its queue.  Links therefore have the bandwidth of the setting and the round-trip of a local
veth (tens of microseconds), a lower latency than any real fabric.  The frames are 9000-byte
jumbo frames by default (``mtu``), as on cluster fabrics: fewer packets per byte keep the CPU
cost of the emulation itself small next to the training it shares the cores with.

Each node's TCP is set up for a fabric-like transport (``_tcp_like_a_fabric``): reno instead of
the host's BBR, no slow start after idle, and socket buffers of up to ``socket_buffer_mib``.

Needs root, ``ip`` and ``tc`` (iproute2).  ``unavailable_reason()`` says why a cluster cannot be
made here (tests skip with it).  Tear-down (``close``, the context manager's exit, or the CLI on
any exit, also on failure or Ctrl-C) kills what it started and deletes every namespace it made.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

# Every namespace this module makes starts with this, then the owner's pid: ``--cleanup`` removes
# the ones whose owner is gone.
PREFIX = "pltc"
SUBNET = "10.77.0"
NODE_IFACE = "eth0"


class ClusterError(RuntimeError):
    """Setting up or using the emulated cluster failed (the message names the command)."""


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ClusterError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")


def _namespaces() -> List[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@dataclass
class LinkShape:
    """A token-bucket link: ``rate_mbit`` (None = unshaped), ``burst_kib`` and ``queue_ms``.

    The bucket (``burst_kib``) is what may leave at once, above the rate, after an idle moment.
    A real NIC has none, and a large one lets a good part of each all-to-all message (hundreds of
    KiB here) skip the shaping: the default is the smallest that still holds the rate (measured
    here: a 32 KiB bucket keeps 50-2000 Mbit/s within 5 %), 0.5 ms of rate, at least 32 KiB.
    ``queue_ms`` (tbf's ``latency``) is how long a packet may wait before it is dropped: a deep
    queue avoids drops and TCP retransmits, which fabrics with flow control do not have."""

    rate_mbit: Optional[float] = None
    burst_kib: Optional[float] = None
    queue_ms: float = 200.0

    def tbf_args(self) -> Optional[List[str]]:
        if self.rate_mbit is None:
            return None
        if self.rate_mbit <= 0:
            raise ClusterError(f"rate_mbit must be > 0 (None = unshaped), got {self.rate_mbit}")
        burst = self.burst_kib
        if burst is None:
            burst = max(32.0, self.rate_mbit * 1e6 / 8 * 0.0005 / 1024)
        return ["tbf", "rate", f"{self.rate_mbit:g}mbit", "burst", f"{int(burst)}kb",
                "latency", f"{self.queue_ms:g}ms"]


@dataclass
class EmulatedCluster:
    """``nodes`` namespaces on one bridge, each link shaped by ``shape``.  Use as a context
    manager (or call ``start`` / ``close``); ``popen(i, argv)`` runs a process on node ``i``."""

    nodes: int
    shape: LinkShape = field(default_factory=LinkShape)
    mtu: int = 9000
    # The largest TCP send/receive buffer the kernel may autotune to (``tcp_wmem``/``tcp_rmem``
    # max), in MiB; None keeps the kernel's (4 and 6 MiB).  See ``_tcp_like_a_fabric``.
    socket_buffer_mib: Optional[int] = 64
    tag: str = ""  # part of the namespace names; default: a counter per process
    _made: List[str] = field(default_factory=list, init=False, repr=False)
    _procs: List[subprocess.Popen] = field(default_factory=list, init=False, repr=False)

    _counter = 0

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.nodes > 250:
            raise ClusterError(f"nodes must be in 1..250, got {self.nodes}")
        if not self.tag:
            EmulatedCluster._counter += 1
            self.tag = str(EmulatedCluster._counter)
        self.name = f"{PREFIX}-{os.getpid()}-{self.tag}"

    # -- names and addresses ------------------------------------------------------------------
    @property
    def switch(self) -> str:
        return f"{self.name}-sw"

    def namespace(self, node: int) -> str:
        return f"{self.name}-n{node}"

    def address(self, node: int) -> str:
        return f"{SUBNET}.{node + 1}"

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> "EmulatedCluster":
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        tbf = self.shape.tbf_args()
        sw = self.switch
        _ip("netns", "add", sw)
        self._made.append(sw)
        _ip("-n", sw, "link", "set", "lo", "up")
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("-n", sw, "link", "set", "br0", "mtu", str(self.mtu), "up")
        for i in range(self.nodes):
            ns, port = self.namespace(i), f"p{i}"
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            self._tcp_like_a_fabric(ns, self.socket_buffer_mib)
            _ip("-n", sw, "link", "add", port, "mtu", str(self.mtu), "type", "veth",
                "peer", "name", NODE_IFACE, "netns", ns)
            _ip("-n", sw, "link", "set", port, "master", "br0", "up")
            _ip("-n", ns, "link", "set", NODE_IFACE, "mtu", str(self.mtu))
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", NODE_IFACE)
            _ip("-n", ns, "link", "set", NODE_IFACE, "up")
            if tbf is not None:  # what the node sends, and what the switch sends to it
                self._tc(ns, NODE_IFACE, tbf)
                self._tc(sw, port, tbf)

    @staticmethod
    def _tcp_like_a_fabric(ns: str, socket_buffer_mib: Optional[int]) -> None:
        """TCP settings of each node, closer to a fabric's transport (RDMA has neither):

        * ``tcp_congestion_control=reno``: the host default here is BBR, which, when both
          directions of ONE connection are saturated (gloo keeps one socket per peer, and an
          all-to-all sends and receives at once), reaches only 0.55-0.6 of the link rate for
          messages of 2 MiB and more (measured at 180 Mbit/s: 8 MiB each way took 650 ms
          against 373 ms ideal; with reno 379 ms);
        * ``tcp_slow_start_after_idle=0``: keep the congestion window across the idle gaps
          between collectives instead of restarting from slow start at every message;
        * ``tcp_wmem`` / ``tcp_rmem`` max = ``socket_buffer_mib``: with the kernel's 4 / 6 MiB
          a message of a few MiB sent each way at once over gloo's one socket per peer often
          took twice the ideal time (the two directions took turns); buffers that hold the
          whole message let both directions run at once (docs/design/stack.md)."""
        settings = ["net.ipv4.tcp_congestion_control=reno",
                    "net.ipv4.tcp_slow_start_after_idle=0"]
        if socket_buffer_mib is not None:
            top = int(socket_buffer_mib) << 20
            settings += [f"net.ipv4.tcp_wmem=4096 16384 {top}",
                         f"net.ipv4.tcp_rmem=4096 131072 {top}"]
        for setting in settings:
            proc = subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", setting],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise ClusterError(f"`sysctl -w {setting}` in {ns} failed: "
                                   f"{proc.stderr.strip()}")

    @staticmethod
    def _tc(ns: str, dev: str, tbf: List[str]) -> None:
        proc = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev,
                               "root", *tbf], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ClusterError(f"`tc qdisc replace dev {dev} root {' '.join(tbf)}` in {ns} "
                               f"failed: {proc.stderr.strip()}")

    def close(self) -> None:
        """Kill every process started here (their whole process groups), then delete every
        namespace made here.  Safe to call twice and after a failed start."""
        for p in self._procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for p in self._procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()
        errors = []
        for ns in reversed(self._made):
            proc = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
            if proc.returncode != 0 and ns in _namespaces():
                errors.append(f"{ns}: {proc.stderr.strip()}")
        self._made.clear()
        if errors:
            raise ClusterError("could not delete namespaces: " + "; ".join(errors))

    def __enter__(self) -> "EmulatedCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- running things -----------------------------------------------------------------------
    def node_env(self, node: int, master_port: int = 29500) -> Dict[str, str]:
        """What ``launch/torchrun.sh`` reads for node ``node`` of this cluster."""
        return {"NNODES": str(self.nodes), "NODE_RANK": str(node),
                "MASTER_ADDR": self.address(0), "MASTER_PORT": str(master_port),
                "LOCAL_ADDR": self.address(node), "GLOO_SOCKET_IFNAME": NODE_IFACE}

    def popen(self, node: int, argv: Sequence[str], env: Optional[Dict[str, str]] = None,
              **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside node ``node``'s namespace, in a new session (``close`` kills
        the whole group).  ``env`` is the full environment."""
        p = subprocess.Popen(["ip", "netns", "exec", self.namespace(node), *argv],
                             env=env, start_new_session=True, **kwargs)
        self._procs.append(p)
        return p

    def run(self, node: int, argv: Sequence[str], timeout: float = 60,
            **kwargs) -> subprocess.CompletedProcess:
        """Run a short command on node ``node`` and wait for it."""
        return subprocess.run(["ip", "netns", "exec", self.namespace(node), *argv],
                              timeout=timeout, **kwargs)


_RECEIVER = r"""
import socket, sys, time
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2]))); srv.listen(1)
print("ready", flush=True)
conn, _ = srv.accept()
got, first = 0, None
while True:
    chunk = conn.recv(1 << 20)
    if not chunk:
        break
    if first is None:
        first = time.perf_counter()
    got += len(chunk)
print(got, time.perf_counter() - first, flush=True)
"""

_SENDER = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
block, left = b"\0" * (1 << 20), int(sys.argv[3])
while left > 0:
    left -= s.send(block[:min(left, len(block))])
s.close()
"""


def measure_throughput(cluster: EmulatedCluster, src: int, dst: int, nbytes: int,
                       port: int = 5201) -> float:
    """Bytes per second of one TCP stream from node ``src`` to node ``dst`` (``nbytes`` sent,
    timed at the receiver from the first byte to the last)."""
    recv = cluster.popen(dst, [sys.executable, "-c", _RECEIVER, cluster.address(dst),
                               str(port)], stdout=subprocess.PIPE, text=True)
    if recv.stdout.readline().strip() != "ready":
        raise ClusterError("the throughput receiver did not start")
    cluster.run(src, [sys.executable, "-c", _SENDER, cluster.address(dst), str(port),
                      str(nbytes)], check=True, timeout=600)
    got, seconds = recv.stdout.readline().split()
    recv.wait(timeout=30)
    if int(got) != nbytes:
        raise ClusterError(f"sent {nbytes} bytes, received {got}")
    return nbytes / float(seconds)


def unavailable_reason() -> Optional[str]:
    """Why an emulated cluster cannot be made on this machine (None: it can).  Tries the real
    thing: a two-node shaped cluster, made and deleted."""
    if sys.platform != "linux":
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    try:
        with EmulatedCluster(2, LinkShape(rate_mbit=100), tag="probe"):
            pass
    except (ClusterError, OSError) as exc:
        return f"cannot make a shaped two-node cluster here: {exc}"
    return None


def remove_stale() -> List[str]:
    """Delete the namespaces of clusters whose owning process is gone (a ``kill -9``'d run);
    returns their names."""
    removed = []
    for ns in _namespaces():
        parts = ns.split("-")
        if parts[0] != PREFIX or len(parts) < 3 or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue  # owner alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        removed.append(ns)
    return removed


def run_on_cluster(nodes: int, argv: Sequence[str], shape: LinkShape, mtu: int = 9000,
                   master_port: int = 29500, timeout: Optional[float] = None,
                   extra_env: Optional[Dict[str, str]] = None, log=None,
                   cwd: Optional[str] = None,
                   socket_buffer_mib: Optional[int] = 64) -> List[int]:
    """Run ``argv`` on every node of a fresh cluster, wait for all, tear down; return the exit
    codes by node (-9: killed at ``timeout``).  ``log``: an open file for every node's output
    (default: ours).  When one node fails, the others are given 60 s, then killed (a
    distributed job whose peer died would otherwise wait for its collective timeout)."""
    codes: List[Optional[int]] = [None] * nodes
    with EmulatedCluster(nodes, shape, mtu=mtu, socket_buffer_mib=socket_buffer_mib) as cluster:
        procs = [cluster.popen(i, list(argv), env={**os.environ, **(extra_env or {}),
                                                    **cluster.node_env(i, master_port)},
                               stdout=log, stderr=subprocess.STDOUT if log else None, cwd=cwd)
                 for i in range(nodes)]
        start, failed_at = time.monotonic(), None
        while any(c is None for c in codes):
            for i, p in enumerate(procs):
                if codes[i] is None and p.poll() is not None:
                    codes[i] = p.returncode
                    if p.returncode != 0 and failed_at is None:
                        failed_at = time.monotonic()
            now = time.monotonic()
            if (failed_at is not None and now - failed_at > 60) or \
                    (timeout is not None and now - start > timeout):
                break
            time.sleep(0.2)
    return [-9 if c is None else c for c in codes]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m plt_train.runtime.emulated_cluster",
        description="Run a command on every node of an emulated cluster (network namespaces "
                    "on one bridge, links shaped with tc tbf); tear it down after.",
        epilog="The command sees NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, LOCAL_ADDR and "
               "GLOO_SOCKET_IFNAME, which launch/torchrun.sh reads.")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rate-mbit", type=float, default=None,
                        help="link rate per node and direction (default: unshaped)")
    parser.add_argument("--burst-kib", type=float, default=None)
    parser.add_argument("--mtu", type=int, default=9000)
    parser.add_argument("--socket-buffer-mib", type=int, default=64,
                        help="largest TCP send/receive buffer per socket (0: the kernel's)")
    parser.add_argument("--master-port", type=int, default=29500)
    parser.add_argument("--timeout", type=float, default=None, help="seconds, then kill all")
    parser.add_argument("--cleanup", action="store_true",
                        help="only delete namespaces left by clusters whose owner is gone")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="after `--`: the command to run on each node")
    args = parser.parse_args(argv)
    if args.cleanup:
        for ns in remove_stale():
            print(f"[emulated_cluster] deleted stale namespace {ns}")
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run on each node after `--`")
    reason = unavailable_reason()
    if reason:
        print(f"[emulated_cluster] error: {reason}", file=sys.stderr)
        return 2
    shape = LinkShape(args.rate_mbit, args.burst_kib)
    # Ctrl-C / SIGTERM unwind through the context manager, which tears everything down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        codes = run_on_cluster(args.nodes, command, shape, args.mtu, args.master_port,
                               args.timeout, socket_buffer_mib=args.socket_buffer_mib or None)
    except ClusterError as exc:
        print(f"[emulated_cluster] error: {exc}", file=sys.stderr)
        return 2
    print(f"[emulated_cluster] exit codes by node: {codes}")
    bad = next((c for c in codes if c != 0), 0)
    return bad if bad >= 0 else 128 - bad  # killed by signal N: 128 + N, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
