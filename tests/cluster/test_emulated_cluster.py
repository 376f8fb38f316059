"""The emulated cluster (``plt_train/runtime/emulated_cluster.py``): links hold their rate, nothing
is left behind, and training across namespaces through ``launch/torchrun.sh`` gives the numbers
of the same world size on loopback."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from plt_train.runtime import emulated_cluster as ec
from tests.helpers import DEBUG_ARGS, REPO, losses_by_step, read_metrics, run_train

REASON = ec.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no emulated cluster: {REASON}")


def ours() -> list[str]:
    """Namespaces made by this process (other test sessions may run beside us)."""
    return [ns for ns in ec._namespaces() if ns.startswith(f"{ec.PREFIX}-{os.getpid()}-")]


@pytest.mark.parametrize("rate_mbit", [40, 400])
def test_a_shaped_link_holds_its_rate(rate_mbit):
    nbytes = int(rate_mbit * 1e6 / 8 * 0.8)  # 0.8 s of traffic
    with ec.EmulatedCluster(3, ec.LinkShape(rate_mbit)) as cluster:
        for src, dst in ((0, 1), (2, 0)):
            measured = ec.measure_throughput(cluster, src, dst, nbytes) * 8 / 1e6
            assert measured == pytest.approx(rate_mbit, rel=0.2), (src, dst, measured)


def test_an_unshaped_link_is_much_faster_than_a_shaped_one():
    with ec.EmulatedCluster(2) as cluster:
        measured = ec.measure_throughput(cluster, 0, 1, 50_000_000) * 8 / 1e6
    assert measured > 2000, measured


def test_teardown_removes_everything_also_on_failure():
    with pytest.raises(RuntimeError, match="inside"):
        with ec.EmulatedCluster(3, ec.LinkShape(100)) as cluster:
            assert len(ours()) == 4  # three nodes and the switch
            cluster.popen(1, ["sleep", "600"])
            raise RuntimeError("a failure inside the cluster")
    assert ours() == []


def test_a_failed_build_removes_what_it_made(monkeypatch):
    def fail(ns, dev, tbf):
        raise ec.ClusterError("tc failed")

    monkeypatch.setattr(ec.EmulatedCluster, "_tc", staticmethod(fail))
    with pytest.raises(ec.ClusterError, match="tc failed"):
        ec.EmulatedCluster(2, ec.LinkShape(100)).start()
    assert ours() == []


def test_cleanup_removes_namespaces_of_dead_owners():
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{ec.PREFIX}-{dead.pid}-x-n0"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        out = subprocess.run([sys.executable, "-m", "plt_train.runtime.emulated_cluster",
                              "--cleanup"], capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 0 and stale in out.stdout
        assert stale not in ec._namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)


def test_bad_rate_is_one_clear_error():
    with pytest.raises(ec.ClusterError, match="rate_mbit must be > 0"):
        ec.EmulatedCluster(2, ec.LinkShape(-5)).start()
    assert ours() == []


def test_two_nodes_train_like_loopback(tmp_path, data_cache):
    """Two namespaces, one process each, the real launcher (NNODES=2, NODE_RANK, LOCAL_ADDR):
    the network must not change the numbers.  Without --local-addr the workers would be handed
    "localhost" and never reach each other; without is_host the second node could try to host
    the rendezvous store."""
    args = DEBUG_ARGS + ["moe=fine_grained", "parallel=ep2", "train.steps=4",
                         "sample.prompt=null"]
    loopback = tmp_path / "loopback"
    run_train(loopback, args, nproc=2)

    cluster_dir = tmp_path / "cluster"
    env = {"NPROC_PER_NODE": "1", "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true",
           "PYTHON": sys.executable, "PLT_TRAIN_CACHE": data_cache}
    with open(tmp_path / "nodes.log", "w") as log:
        codes = ec.run_on_cluster(2, ["bash", str(REPO / "launch" / "torchrun.sh"),
                                      f"run_dir={cluster_dir}", *args],
                                  ec.LinkShape(200), timeout=240, extra_env=env, log=log,
                                  cwd=str(REPO))
    assert codes == [0, 0], (tmp_path / "nodes.log").read_text()[-4000:]
    assert ours() == []

    want, got = losses_by_step(loopback), losses_by_step(cluster_dir)
    assert sorted(got) == [1, 2, 3, 4]
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
    # The MoE all-to-all crossed the shaped link: it sent bytes, and took time for them.
    rows = read_metrics(cluster_dir)
    assert all(r["a2a_MB"] > 0 for r in rows)
