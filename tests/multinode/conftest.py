"""One 2-node cluster (network namespaces, tests/multinode/netns.py) for the multi-node module.

Node a (head: GCS, dashboard, 3 logical CPUs) and node b (2 CPUs). Every test starts with both
nodes alive (a test that kills or restarts b brings it back for the next); the cluster is torn
down, and checked to leave nothing behind, after the last test, also when tests fail.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from .netns import Cluster, leftovers, namespaces_available

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


@pytest.fixture(scope="package")
def cluster():
    why = namespaces_available()
    if why:
        pytest.skip(f"multi-node tests need network namespaces: {why}")
    nodes = Cluster(2, cpus={"a": 3, "b": 2})
    try:
        nodes.bring_up_s = nodes.up()
        time.sleep(2)  # as in two_nodes: the head's scheduler sees b's CPUs a moment after b is alive
        print(f"\n2-node cluster up in {nodes.bring_up_s:.1f} s", flush=True)
        yield nodes
    finally:
        started = time.perf_counter()
        nodes.down()
        print(f"\ncluster down in {time.perf_counter() - started:.1f} s", flush=True)
    assert not leftovers(), f"left behind: {leftovers()}"


@pytest.fixture
def two_nodes(cluster):
    """The cluster with both nodes alive (node b restarted plain if a test left it dead or changed)."""
    return restore(cluster)


def restore(cluster):
    """Both nodes alive, b without private mounts (restarted if a test left it dead or changed)."""
    if not cluster.pids("b") or cluster.private.get("b"):
        cluster.kill("b")
        cluster.wait_alive(1, 60)
        cluster.start_node("b")
        cluster.wait_alive(2, 90)
        # the head's scheduler learns b's free CPUs a moment after the GCS lists b alive; work
        # submitted before then (Ray Data's first tasks) would all stay on node a
        time.sleep(2)
    cluster.wait_alive(2, 90)
    return cluster


def cli(cluster, *args, timeout: float = 300, check: bool = True, node: str = "a"):
    """`ms-ray ARGS` run inside a node (the driver on the cluster), from the project root."""
    return cluster.run(node, [PY, "-m", "ms_ray.cli", *args], timeout=timeout, cwd=ROOT, check=check)


def cluster_python(cluster, code: str, timeout: float = 60) -> str:
    """Python code run as a driver on node a (joined to the cluster); its stdout."""
    return cluster.run("a", [PY, "-c", code], timeout=timeout, cwd=ROOT).stdout
