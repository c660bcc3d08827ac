"""Every local command binds every process it starts to loopback, and its Ray takes no strangers.

Each command runs as a user would run it (`python -m ms_ray.cli ...` in its own process) while
a sampler lists the listening sockets of that process and all its descendants (gcs_server,
raylet, agents, Ray Train / Serve workers, gloo, the HTTP proxy) every 0.2 s.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def listening(root: psutil.Process) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every listening socket of `root` and its descendants."""
    found = set()
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return found
    for proc in procs:
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((proc.name(), conn.laddr.ip, conn.laddr.port))
        except psutil.Error:
            continue  # ended meanwhile
    return found


class Sampler:
    """Samples `listening` of one process tree in the background until stopped."""

    def __init__(self, pid: int):
        self.root, self.seen, self.stop = psutil.Process(pid), set(), threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.is_set():
            self.seen |= listening(self.root)
            time.sleep(0.2)

    def finish(self) -> set:
        self.stop.set()
        self.thread.join(10)
        return self.seen


def env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}


def run_sampled(args: list[str], timeout: float = 600) -> tuple[str, set]:
    proc = subprocess.Popen([sys.executable, "-m", "ms_ray.cli", *args], cwd=ROOT, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    sampler = Sampler(proc.pid)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        seen = sampler.finish()
    assert proc.returncode == 0, out[-3000:]
    return out, seen


def assert_loopback(command: str, seen: set, at_least: int) -> None:
    exposed = sorted(s for s in seen if s[1] not in LOOPBACK)
    assert not exposed, f"{command}: listening beyond loopback: {exposed}"
    assert len(seen) >= at_least, f"{command}: expected Ray's processes listening, saw {sorted(seen)}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """prepare, then train a few steps: both sampled; returns (export folder, what each showed)."""
    tmp = tmp_path_factory.mktemp("ports")
    data, shown = tmp / "data", {}
    _, shown["prepare"] = run_sampled(["prepare", "jobs/data-skills.yaml", f"output={data}",
                                       "sources=[{kind: skills, examples: 200, shards: 1}]"])
    _, shown["train"] = run_sampled(["train", "jobs/tiny.yaml", f"data.path={data}", "data.prepare=null",
                                     "data.batch_size=1", "optim.max_steps=4", "optim.warmup_steps=1",
                                     "checkpoint.every=4", "eval.every=1000", "eval.examples_per_task=0",
                                     f"run.storage={tmp / 'runs'}", "run.name=ports", "wandb.mode=disabled"])
    return tmp / "runs" / "ports" / "export", shown


@pytest.mark.parametrize("command", ["prepare", "train"])
def test_ray_commands_listen_on_loopback_only(trained, command):
    # Ray's gcs_server, raylet and agents at least; train adds its workers and gloo
    assert_loopback(command, trained[1][command], at_least=5)


def test_eval_opens_no_port_beyond_loopback(trained, tmp_path):
    _, seen = run_sampled(["eval", f"checkpoint={trained[0]}", "eval.examples_per_task=2", f"output={tmp_path}",
                           "wandb.mode=disabled"])
    assert_loopback("eval", seen, at_least=0)  # eval decodes in-process: no Ray, no ports


def test_serve_listens_on_loopback_only_and_its_ray_refuses_strangers(trained):
    import socket

    from ms_ray.serving.client import wait_ready

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ms_ray.cli", "serve", f"checkpoint={trained[0]}", f"port={port}", "log_level=WARNING",
         "model.num_cpus=0", "session.row_interval_s=0.05"],
        cwd=ROOT, env=env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    sampler = Sampler(proc.pid)
    try:
        wait_ready(f"http://127.0.0.1:{port}", 240)
        time.sleep(2)  # two sampler rounds with every deployment up
        seen = set(sampler.seen)
        assert ("127.0.0.1", port) in {(ip, p) for _, ip, p in seen}, "the HTTP proxy was not seen"
        assert_loopback("serve", seen, at_least=6)
        # A process of this machine without the run's token cannot join its Ray. It keeps 127.0.0.1
        # as ms-ray's own processes do (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0): by default Ray rewrites
        # 127.0.0.1 to the machine's address, where nothing listens, so the stranger would only retry
        # until killed (90 s) without ever reaching the GCS. Here it reaches it and is refused (~5-20 s).
        gcs = next(f"127.0.0.1:{p}" for name, _, p in seen if name == "gcs_server")
        stranger = subprocess.Popen(
            [sys.executable, "-c", f"import ray; ray.init(address='{gcs}'); print('JOINED', ray.get(ray.put(1)))"],
            env={**env(), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )
        try:
            said, _ = stranger.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(stranger.pid, signal.SIGKILL)
            said = stranger.communicate()[0] + "\n(still trying after 120 s: never refused)"
        assert "JOINED" not in said
        assert stranger.returncode != 0 and "AuthenticationError" in said, said[-2000:]  # refused by the GCS
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, out[-3000:]
    finally:
        sampler.finish()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
