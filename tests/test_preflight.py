"""`ms-ray preflight` on a real `ray start --head` cluster (token auth on)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def preflight(ray_head, *overrides, config="jobs/tiny.yaml", env=None):
    env = env if env is not None else ray_head["env"] | {"WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "ms_ray.cli", "preflight", config, *overrides,
                           "--address", ray_head["gcs"]], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_preflight_passes_on_the_cluster_and_names_what_fails(ray_head, tmp_path):
    ok = preflight(ray_head, f"run.storage={tmp_path}/runs")
    assert ok.returncode == 0, ok.stdout + ok.stderr[-3000:]
    lines = [line.split() for line in ok.stdout.splitlines() if line.startswith("  ")]
    checks = ("nodes", "storage", "versions", "gpus", "backend", "network", "wandb")
    assert [(w[0], w[1]) for w in lines] == [("ok", c) for c in checks]
    assert "1 node(s)" in ok.stdout and (tmp_path / "runs" / ".preflight").is_dir()

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    bad = preflight(ray_head, f"run.storage={blocker}/runs", "scaling.use_gpu=true")
    assert bad.returncode == 1
    assert "FAIL  storage" in bad.stdout and f"cannot write {blocker}/runs" in bad.stdout
    assert "Mount shared storage" in bad.stdout
    assert "FAIL  gpus" in bad.stdout and "scaling.num_workers" in bad.stdout  # no GPU here: told what to change


def test_wandb_check_offline_reachable_unreachable_and_missing_key(monkeypatch):
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from ms_ray.preflight import check_wandb

    class Ok(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("WANDB_MODE", "offline")
        assert check_wandb("auto")[0] is True
        monkeypatch.delenv("WANDB_MODE")
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
        ok, why = check_wandb("auto")  # a plain local setup: auto without a key runs offline (tracking.wandb_mode)
        assert ok and "offline" in why and "no WANDB_API_KEY" in why
        assert check_wandb("disabled")[0] is True
        ok, why = check_wandb("online")  # asked for online without a key: the run would fail
        assert not ok and "WANDB_API_KEY" in why and "wandb.mode=auto/offline" in why
        monkeypatch.setenv("WANDB_API_KEY", "dummy")
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_port}")
        assert check_wandb("auto") == (True, "wandb.mode=auto -> online (WANDB_API_KEY set): "
                                             f"http://127.0.0.1:{server.server_port} reachable")
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed}")
        ok, why = check_wandb("online")
        assert not ok and "unreachable" in why and "wandb.mode=offline" in why
        monkeypatch.setenv("WANDB_MODE", "offline")  # ignored by the run when it resolves to online (an explicit
        assert check_wandb("auto")[0] is False      # mode= wins over WANDB_MODE in wandb.init): not a pass either
    finally:
        server.shutdown()


def test_a_node_gone_before_its_probe_runs_is_reported_not_raised(ray_local, tmp_path):
    """A node the GCS still lists alive may be dead when its probe is scheduled (seconds after a
    node's death): the probe of a node that does not exist fails the same way."""
    from ms_ray.preflight import on_every_node

    alive = {n["NodeID"]: n["NodeManagerAddress"] for n in ray_local.nodes() if n["Alive"]}
    gone = "ab" * 28
    answers, silent = on_every_node(ray_local, alive | {gone: "10.9.9.9"}, str(tmp_path / "runs"), "write")
    assert [a["node"] for a in answers] == [n[:12] for n in alive] and answers[0]["storage"]
    assert list(silent) == [f"{gone[:12]} (10.9.9.9)"] and "Error" in silent[f"{gone[:12]} (10.9.9.9)"]


def test_collective_interface_is_the_one_holding_the_node_address_or_the_one_set(monkeypatch):
    from ms_ray.preflight import check_network
    from ms_ray.ray_env import collective_interface

    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    assert collective_interface("127.0.0.1") == ("lo", "lo holds the node's address 127.0.0.1")
    name, why = collective_interface("203.0.113.9")  # an address no interface here holds
    assert name is None and "set GLOO_SOCKET_IFNAME" in why
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "nosuch0")
    name, why = collective_interface("127.0.0.1")
    assert name is None and "GLOO_SOCKET_IFNAME=nosuch0" in why and "'lo'" in why and "unset it" in why
    wrote = {"n1": {"ip": "10.0.0.1", "interface": "eth0", "interface_why": "eth0 holds ..."},
             "n2": {"ip": "10.0.0.2", "interface": None, "interface_why": why}}
    ok, detail = check_network(False, wrote)
    assert not ok and "node n2 (10.0.0.2)" in detail and "nosuch0" in detail
    assert check_network(False, {"n1": wrote["n1"]}) == (True, "gloo on eth0 (10.0.0.1) on n1")


def test_backend_needs_nccl_on_gpu_nodes_and_at_least_one_gpu():
    from ms_ray.preflight import check_backend

    cpu = {"gpus": 0, "nccl": False, "gloo": True}
    gpu = {"gpus": 8, "nccl": True, "gloo": True}
    assert check_backend(False, {"a": cpu}) == (True, "gloo available on every node")
    ok, why = check_backend(True, {"a": cpu})  # no GPU anywhere: nccl cannot work
    assert not ok and "nccl unavailable" in why and "a=0" in why and "scaling.use_gpu=false" in why
    ok, why = check_backend(True, {"head": cpu, "w1": gpu})  # a CPU-only head runs no GPU worker
    assert ok and "1 GPU node(s)" in why and "head" in why
    ok, why = check_backend(True, {"head": cpu, "w1": gpu | {"nccl": False}})
    assert not ok and "['w1']" in why
    assert check_backend(False, {"a": cpu | {"gloo": False}})[0] is False


@pytest.mark.slow
def test_gpu_preset_on_a_cpu_cluster_creates_nothing_and_fails_storage_gpus_and_nccl(ray_head, tmp_path):
    """The GPU preset where /mnt/shared is not mounted (here: a deep storage path under tmp whose
    top folder does not exist) and no node has a GPU; W&B as on a plain local setup (auto, no key)."""
    storage = tmp_path / "mnt" / "shared" / "runs"
    env = {k: v for k, v in ray_head["env"].items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    run = preflight(ray_head, f"run.storage={storage}", config="jobs/qwen3-0.6b-zero2.yaml", env=env)
    assert run.returncode == 1, run.stdout + run.stderr[-3000:]
    assert not (tmp_path / "mnt").exists()  # nothing created above the storage's existing ancestor
    status = {w[1]: w[0] for w in (line.split() for line in run.stdout.splitlines() if line.startswith("  "))}
    assert status == {"nodes": "ok", "storage": "FAIL", "versions": "ok", "gpus": "FAIL", "backend": "FAIL",
                      "network": "ok", "wandb": "ok"}, run.stdout
    assert f"{tmp_path / 'mnt'} does not exist on node" in run.stdout and "Mount the shared storage" in run.stdout
    assert "nccl unavailable: no node has a GPU" in run.stdout
    assert "wandb.mode=auto -> offline (no WANDB_API_KEY)" in run.stdout
