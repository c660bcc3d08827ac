"""`ms-ray serve` across two nodes: a SessionServer replica on each, a node killed and re-added.

The proxy and the ingress run on node a (the ingress pinned by a custom resource only the head
has); the model deployment has one replica per node (model.max_replicas_per_node=1). Clients
inside node a open sessions, which land on both replicas; node b is killed: its sessions get
`session_lost` within seconds, node a's sessions lose no row, new sessions go to a's replica,
and Serve starts the second replica again once node b is back.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import yaml

from .conftest import PY, ROOT, cluster_python

pytestmark = pytest.mark.slow
PORT = 8000
SESSIONS = 8


def tiny_checkpoint(folder: Path) -> Path:
    from ms_ray.core.families import tiny_base_model
    from ms_ray.core.model import MultiStreamLM
    from ms_ray.data.skills import SKILL_STREAMS
    from ms_ray.data.tokenizer import skill_tokenizer

    tok = skill_tokenizer()
    base = tiny_base_model("llama", len(tok), hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
    MultiStreamLM(base, SKILL_STREAMS.bind(tok)).save_pretrained(folder, tok)
    return folder


def serve_config(tmp_path: Path) -> Path:
    args = {
        "checkpoint": str(tiny_checkpoint(tmp_path / "model")), "actors": [], "log_level": "WARNING",
        "model": {"min_replicas": 2, "max_replicas": 2, "max_replicas_per_node": 1, "num_cpus": 1,
                  "graceful_shutdown_timeout_s": 1},
        "ingress": {"resources": {"node_a": 0.01}},  # with the proxy clients reach, on the head
        "session": {"row_interval_s": 0.05, "max_rows": 100000, "idle_timeout_s": 300},
    }
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"http_options": {"host": "127.0.0.1", "port": PORT},
                                    "applications": [{"name": "ms_ray", "route_prefix": "/",
                                                      "import_path": "ms_ray.serving.app:build", "args": args}]}))
    return path


REPLICAS = """
import json, ray
from ray.util.state import list_actors
ray.init(logging_level="ERROR", log_to_driver=False)
ip = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
found = {a.name.rsplit("#", 1)[1]: ip.get(a.node_id) for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
         if a.name and "#SessionServer#" in a.name}
print("REPLICAS", json.dumps(found))
"""

RUNNING = """
import sys, time, ray
from ray import serve
ray.init(logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + float(sys.argv[1])
while time.monotonic() < deadline:
    states = serve.status().applications["ms_ray"].deployments["SessionServer"].replica_states
    if states.get("RUNNING", 0) == 2:
        print("RUNNING 2")
        break
    time.sleep(0.5)
else:
    sys.exit(f"SessionServer replicas: {states}")
"""


def wait_ready(cluster, seconds: float) -> None:
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from ms_ray.serving.client import wait_ready; "
            f"wait_ready('http://127.0.0.1:{PORT}', {seconds})")
    cluster.run("a", [PY, "-c", code], timeout=seconds + 30, cwd=ROOT)


def test_sessions_pinned_across_nodes_survive_the_other_node_death(two_nodes, tmp_path):
    config = serve_config(tmp_path)
    server = two_nodes.popen("a", [PY, "-m", "ms_ray.cli", "serve", str(config)], tmp_path / "serve.log", cwd=ROOT)
    clients = None
    try:
        wait_ready(two_nodes, 180)
        replicas = {}
        for _ in range(60):  # both replicas placed (the second may still be starting when /readyz says yes)
            line = cluster_python(two_nodes, REPLICAS).split("REPLICAS ", 1)[1]
            replicas = json.loads(line.splitlines()[0])
            if sorted(replicas.values()) == ["10.201.0.11", "10.201.0.12"]:
                break
            time.sleep(1)
        assert sorted(replicas.values()) == ["10.201.0.11", "10.201.0.12"], replicas
        on_b = next(r for r, ip in replicas.items() if ip == "10.201.0.12")

        out = tmp_path / "clients"
        out.mkdir()
        clients = two_nodes.popen("a", [PY, str(Path(__file__).with_name("serve_clients.py")),
                                        f"ws://127.0.0.1:{PORT}", str(out), str(SESSIONS)], tmp_path / "clients.log")
        deadline = time.monotonic() + 120
        while not (out / "opened.json").exists():
            assert clients.poll() is None and time.monotonic() < deadline, (tmp_path / "clients.log").read_text()
            time.sleep(0.2)
        opened = json.loads((out / "opened.json").read_text())
        assert set(opened.values()) == set(replicas), f"sessions on {opened}, replicas {replicas}"
        time.sleep(2)  # rows flowing on every session
        killed = time.time()
        two_nodes.kill("b")
        (out / "killed").write_text(str(killed))
        assert clients.wait(timeout=120) == 0, (tmp_path / "clients.log").read_text()[-3000:]
        results = json.loads((out / "results.json").read_text())

        for s in results["sessions"]:
            rows = [r for r, _ in s["rows"]]
            assert rows == list(range(rows[0], rows[0] + len(rows))), f"session {s['id']}: rows with gaps"
            if s["replica"] == on_b:  # its replica died with the node: told within seconds
                assert s["error"] and s["error"][0] == "session_lost", s
                assert s["error"][2] - killed < 15, f"session_lost {s['error'][2] - killed:.1f} s after the kill"
            else:  # node a's sessions: not a row lost, and rows kept coming after the kill
                assert s["error"] is None, s["error"]
                after = [t for _, t in s["rows"] if t > killed]
                assert len(after) >= 0.8 * 20 * 12, f"{len(after)} rows in the 12 s after the kill"
        survivor = next(r for r in replicas if r != on_b)
        assert [s["replica"] for s in results["late"]] == [survivor] * len(results["late"])
        assert all(len(s["rows"]) >= 20 and s["error"] is None for s in results["late"])
        lost_after = [s["error"][2] - killed for s in results["sessions"] if s["replica"] == on_b]
        print(f"\nsessions on node b: session_lost after {min(lost_after):.1f}-{max(lost_after):.1f} s")

        started = time.monotonic()
        two_nodes.wait_alive(1, 60)
        two_nodes.start_node("b")  # Serve puts the second replica back on it
        run = two_nodes.run("a", [PY, "-c", RUNNING, "120"], timeout=180, cwd=ROOT, check=False)
        assert "RUNNING 2" in run.stdout, run.stderr[-2000:]
        print(f"replica restored {time.monotonic() - started:.1f} s after node b was re-added")
    finally:
        if clients is not None:
            clients.kill()
        server.send_signal(signal.SIGINT)  # `ms-ray serve` shuts Serve down on Ctrl-C
        try:
            server.wait(timeout=60)
        except Exception:
            server.kill()
