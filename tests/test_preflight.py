"""`ms-ray preflight` on a real `ray start --head` cluster (token auth on)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def preflight(ray_head, *overrides):
    return subprocess.run([sys.executable, "-m", "ms_ray.cli", "preflight", "jobs/tiny.yaml", *overrides,
                           "--address", ray_head["gcs"]], cwd=ROOT, env=ray_head["env"] | {"WANDB_MODE": "offline"},
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_preflight_passes_on_the_cluster_and_names_what_fails(ray_head, tmp_path):
    ok = preflight(ray_head, f"run.storage={tmp_path}/runs")
    assert ok.returncode == 0, ok.stdout + ok.stderr[-3000:]
    lines = [line.split() for line in ok.stdout.splitlines() if line.startswith("  ")]
    assert [(w[0], w[1]) for w in lines] == [("ok", c) for c in ("storage", "versions", "gpus", "backend", "wandb")]
    assert "1 node(s)" in ok.stdout and (tmp_path / "runs" / ".preflight").is_dir()

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    bad = preflight(ray_head, f"run.storage={blocker}/runs", "scaling.use_gpu=true")
    assert bad.returncode == 1
    assert "FAIL  storage" in bad.stdout and f"cannot write {blocker}/runs" in bad.stdout
    assert "Mount shared storage" in bad.stdout
    assert "FAIL  gpus" in bad.stdout and "scaling.num_workers" in bad.stdout  # no GPU here: told what to change


def test_wandb_check_offline_reachable_unreachable_and_missing_key(monkeypatch):
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    import socket

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
        ok, why = check_wandb("auto")
        assert not ok and "WANDB_API_KEY" in why and "offline" in why
        monkeypatch.setenv("WANDB_API_KEY", "dummy")
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_port}")
        assert check_wandb("auto") == (True, f"http://127.0.0.1:{server.server_port} reachable")
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed}")
        ok, why = check_wandb("online")
        assert not ok and "unreachable" in why and "WANDB_MODE=offline" in why
    finally:
        server.shutdown()
