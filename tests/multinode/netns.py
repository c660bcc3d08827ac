"""A real multi-node Ray cluster on ONE Linux machine: every node is a network namespace.

Each node `a`, `b`, ... is a namespace `msrt-a`, ... with only `lo` and `eth0`, the latter a veth
into a bridge that lives in its own namespace (`msrt-br`). Node addresses are 10.201.0.11, .12, ...
and no node has a default route, so nothing inside can reach anything but the other nodes. To
Ray they are separate machines: killing every process of a namespace is a node death, taking
its link down is a partition. The file system is shared (shared storage for free); a node can
get private tmpfs mounts (storage the others do not see), because `ip netns exec` gives the node
its own mount namespace.

Safety: in the ROOT namespace the test subnet would follow the default route out of the machine,
so `up()` adds an `unreachable` route for it (a stray client there fails at once) and `down()`
removes it. That route is the only change to the root namespace's network. Drivers and clients
run inside a node (`run`, `popen`). Every wait is bounded. `down()` kills every process of our
namespaces by PID, deletes them, the route and the temp dirs, also after a failed test, and `up()`
first removes what a crashed earlier run left behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

PREFIX = "msrt"  # every namespace and temp dir of this harness (the shared experiment script uses msr)
SUBNET = "10.201.0"
NODES = "abcdef"
GCS_PORT = 6379
DASHBOARD_PORT = 8265
TOKEN = "ms-ray-multinode-test-token-0123456789abcdef"  # a test cluster's, on a private bridge: not a secret
VENV_BIN = Path(sys.executable).parent


class NamespacesUnavailable(RuntimeError):
    """This machine (or user) cannot create network namespaces: the tests skip with this reason."""


def sh(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    run = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and run.returncode:
        raise RuntimeError(f"{' '.join(argv)} -> {run.returncode}: {run.stderr.strip()[-500:]}")
    return run


def namespaces_available() -> str | None:
    """None if this process may create network namespaces and bridges, else why not."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    probe = f"{PREFIX}-probe"
    made = sh("ip", "netns", "add", probe, check=False)
    if made.returncode:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    try:
        bridge = sh("ip", "-n", probe, "link", "add", "br0", "type", "bridge", check=False)
        return f"no bridge in a namespace: {bridge.stderr.strip()}" if bridge.returncode else None
    finally:
        sh("ip", "netns", "del", probe, check=False)


class Cluster:
    """N Ray nodes in namespaces: `a` is the head (GCS, dashboard), the others join it.

    cpus: logical CPUs per node (e.g. {"a": 2, "b": 2}); fast_death: the GCS declares a silent
    node dead after ~3 s instead of ~15 s (killed) or ~60 s (cut)."""

    def __init__(self, nodes: int = 2, cpus: dict[str, int] | None = None, fast_death: bool = True,
                 object_store_mb: int = 128, extra_env: dict[str, str] | None = None):
        if not 2 <= nodes <= len(NODES):
            raise ValueError(f"nodes must be 2..{len(NODES)}")
        self.nodes = list(NODES[:nodes])
        self.cpus = {n: 1 for n in self.nodes} | (cpus or {})
        self.object_store_mb = object_store_mb
        self.env = {
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN, "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
            "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "WANDB_MODE": "offline", "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            # "auto" would scan the processes and see every Ray on the machine
            "RAY_ADDRESS": self.address,
        } | ({"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
              "RAY_health_check_failure_threshold": "3", "RAY_health_check_initial_delay_ms": "1000"}
             if fast_death else {}) | (extra_env or {})
        for k in ("TORCH_EXTENSIONS_DIR", "HOME", "LANG", "PYTHONPATH"):  # the DeepSpeedCPUAdam build is reused
            if k in os.environ:
                self.env.setdefault(k, os.environ[k])
        self.private: dict[str, list[str]] = {}

    # ---- names ---------------------------------------------------------------------------
    @staticmethod
    def ns(node: str) -> str:
        return f"{PREFIX}-{node}"

    @staticmethod
    def ip(node: str) -> str:
        return f"{SUBNET}.{11 + NODES.index(node)}"

    @staticmethod
    def temp_dir(node: str) -> Path:
        return Path(f"/tmp/{PREFIX}_{node}")  # short: Ray's unix sockets live under it

    @property
    def address(self) -> str:
        return f"{self.ip('a')}:{GCS_PORT}"

    @property
    def dashboard(self) -> str:
        return f"http://{self.ip('a')}:{DASHBOARD_PORT}"

    # ---- network -------------------------------------------------------------------------
    def up(self, wait_s: float = 120) -> float:
        """Network, head, workers; returns the seconds until every node was alive."""
        started = time.perf_counter()
        cleanup_leftovers()
        sh("ip", "route", "replace", "unreachable", f"{SUBNET}.0/24")
        br = self.ns("br")
        sh("ip", "netns", "add", br)
        sh("ip", "-n", br, "link", "set", "lo", "up")
        sh("ip", "-n", br, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", br, "link", "set", "br0", "up")
        for node in self.nodes:
            ns = self.ns(node)
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", br, "link", "add", f"v{node}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", br, "link", "set", f"v{node}", "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.ip(node)}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        self.start_node("a")
        for node in self.nodes[1:]:
            self.start_node(node)
        self.wait_alive(len(self.nodes), wait_s)
        return time.perf_counter() - started

    def down(self) -> None:
        for node in self.nodes:
            self.kill(node)
        cleanup_leftovers()

    # ---- nodes ---------------------------------------------------------------------------
    def start_node(self, node: str, private: list[str] | None = None, timeout: float = 90) -> None:
        """`ray start` in the node's namespace (head for `a`). private: folders that get a tmpfs
        only this node sees (storage the others do not share)."""
        if self.pids(node):
            raise RuntimeError(f"node {node} still has processes {self.pids(node)}")
        self.private[node] = private or []
        shutil.rmtree(self.temp_dir(node), ignore_errors=True)
        common = [f"--node-ip-address={self.ip(node)}", f"--num-cpus={self.cpus[node]}",
                  f"--object-store-memory={self.object_store_mb * 1024**2}", f"--temp-dir={self.temp_dir(node)}",
                  "--disable-usage-stats", f'--resources={{"node_{node}": 1}}']
        if node == "a":
            argv = ["ray", "start", "--head", f"--port={GCS_PORT}", "--include-dashboard=true",
                    f"--dashboard-host={self.ip('a')}", f"--dashboard-port={DASHBOARD_PORT}", *common]
        else:
            argv = ["ray", "start", f"--address={self.address}", *common]
        mounts = "".join(f'mkdir -p "{d}" && mount -t tmpfs {PREFIX}-private "{d}" && ' for d in self.private[node])
        self.run(node, ["bash", "-c", mounts + 'exec "$@"', "_", *argv], timeout=timeout)

    def kill(self, node: str, wait_s: float = 10) -> None:
        """Node death: SIGKILL every process in the node's namespace (by PID), bounded wait."""
        deadline = time.monotonic() + wait_s
        while pids := self.pids(node):
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes left in node {node}: {pids}")
            time.sleep(0.1)

    def cut(self, node: str) -> None:
        sh("ip", "-n", self.ns(node), "link", "set", "eth0", "down")

    def heal(self, node: str) -> None:
        sh("ip", "-n", self.ns(node), "link", "set", "eth0", "up")

    def pids(self, node: str) -> list[int]:
        out = sh("ip", "netns", "pids", self.ns(node), check=False).stdout
        return [int(p) for p in out.split()]

    def alive_nodes(self, timeout: float = 30) -> list[str]:
        """The node addresses the GCS lists alive (asked from inside node a)."""
        code = ("import ray; ray.init(logging_level='ERROR', log_to_driver=False); "
                "print('ALIVE', *sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))")
        run = self.run("a", [sys.executable, "-c", code], timeout=timeout, check=False)
        return _alive_line(run.stdout) if run.returncode == 0 else []

    def wait_alive(self, n: int, wait_s: float = 120) -> list[str]:
        """Until exactly n nodes are alive (a node killed moments ago still counts until the
        GCS's health checks give up on it)."""
        code = f"""
import sys, time, ray
ray.init(logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + {wait_s}
while (alive := sorted(x["NodeManagerAddress"] for x in ray.nodes() if x["Alive"])) and len(alive) != {n}:
    if time.monotonic() > deadline:
        sys.exit(f"{{len(alive)}} nodes alive after {wait_s} s, not {n}: {{alive}}")
    time.sleep(0.3)
print("ALIVE", *alive)
"""
        run = self.run("a", [sys.executable, "-c", code], timeout=wait_s + 30, check=False)
        if run.returncode:
            raise TimeoutError(f"cluster: {run.stderr.strip()[-800:]}")
        return _alive_line(run.stdout)

    # ---- running things inside a node ----------------------------------------------------
    def argv(self, node: str, argv: list[str], env: dict[str, str] | None = None) -> list[str]:
        merged = self.env | (env or {})
        # env -i: nothing of this (local-run) process's environment leaks in, e.g. its loopback-only
        # Ray settings or its gloo interface
        return ["ip", "netns", "exec", self.ns(node), "env", "-i", *(f"{k}={v}" for k, v in merged.items()), *argv]

    def run(self, node: str, argv: list[str], timeout: float, env: dict[str, str] | None = None,
            cwd: str | Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
        run = subprocess.run(self.argv(node, argv, env), capture_output=True, text=True, timeout=timeout, cwd=cwd)
        if check and run.returncode:
            raise RuntimeError(f"node {node}: {' '.join(argv[:4])} -> {run.returncode}\n"
                               f"{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
        return run

    def popen(self, node: str, argv: list[str], log: Path, env: dict[str, str] | None = None,
              cwd: str | Path | None = None) -> subprocess.Popen:
        """A background process inside the node, stdout+stderr to `log` (killed with the node)."""
        out = open(log, "w")  # noqa: SIM115  (closed when the process is reaped by the caller's wait)
        return subprocess.Popen(self.argv(node, argv, env), stdout=out, stderr=subprocess.STDOUT, cwd=cwd)


def _alive_line(stdout: str) -> list[str]:
    """The addresses on the driver's ALIVE line (Ray prints its own lines to stdout too)."""
    return next((line.split()[1:] for line in stdout.splitlines() if line.startswith("ALIVE")), [])


def cleanup_leftovers() -> None:
    """Remove every namespace of this harness (killing its processes), the guard route and the
    temp dirs: what a previous run (or this one) left."""
    listed = sh("ip", "netns", "list", check=False).stdout.split("\n")
    ours = [line.split()[0] for line in listed if line.startswith(f"{PREFIX}-")]
    for ns in ours:
        for _ in range(50):
            pids = [int(p) for p in sh("ip", "netns", "pids", ns, check=False).stdout.split()]
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        sh("ip", "netns", "del", ns, check=False)
    sh("ip", "route", "del", "unreachable", f"{SUBNET}.0/24", check=False)
    for node in NODES:
        shutil.rmtree(Cluster.temp_dir(node), ignore_errors=True)


def leftovers() -> list[str]:
    """What of this harness still exists on the machine (empty after down())."""
    found = [line.split()[0] for line in sh("ip", "netns", "list", check=False).stdout.splitlines()
             if line.startswith(f"{PREFIX}-")]
    if f"unreachable {SUBNET}.0/24" in sh("ip", "route", "show", check=False).stdout:
        found.append(f"route unreachable {SUBNET}.0/24")
    found += [str(Cluster.temp_dir(n)) for n in NODES if Cluster.temp_dir(n).exists()]
    return found
