import os

# Offline and quiet, for every test (the Makefile sets the same for `make test`).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

# Ray reads part of its environment once, at import (loopback binding, token auth, Ray Data's
# progress bars), and collecting the tests imports modules that import Ray: set a local run's
# environment first, as `ms-ray` does before it imports a command.
from ms_ray.ray_env import set_environment  # noqa: E402  (stdlib only: imports no Ray)

set_environment()

# The Ctrl-C tests send SIGINT to the commands they start. A process started with SIGINT ignored
# (a background job of a non-interactive shell, nohup) hands that on to every child, and Python
# then never raises KeyboardInterrupt in them: give this run a normal Ctrl-C, so its children do.
import signal  # noqa: E402

if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest  # noqa: E402
import torch

from ms_ray.core.families import tiny_base_model
from ms_ray.core.model import MultiStreamLM
from ms_ray.core.streams import StreamSchema, StreamSpec
from ms_ray.data.tokenizer import word_tokenizer

torch.set_num_threads(2)
WORDS = "hello there how are you today yes no maybe one two three four five six seven eight nine".split()


@pytest.fixture
def schema():
    return StreamSchema((
        StreamSpec("user", "input"),
        StreamSpec("think", "output", loss_weight=0.5),
        StreamSpec("output", "output", end_token="<|end|>"),
    ))


@pytest.fixture
def tokenizer(schema):
    return word_tokenizer(WORDS, schema)


@pytest.fixture
def bound(schema, tokenizer):
    return schema.bind(tokenizer)


def make_model(schema, vocab_size, family="llama", seed=0, **sizes):
    """A tiny random multi-stream model whose stream embedding is random too (a zero one would
    hide bugs in how it is added)."""
    model = MultiStreamLM(tiny_base_model(family, vocab_size, seed=seed, **sizes), schema).eval()
    with torch.no_grad():
        model.stream_embed.weight.normal_(0, 0.5)
    return model


@pytest.fixture
def model(bound, tokenizer):
    return make_model(bound, len(tokenizer))


@pytest.fixture(scope="module")
def tok():
    """The skill tasks' word tokenizer (one token per task word)."""
    from ms_ray.data.tokenizer import skill_tokenizer

    return skill_tokenizer()


@pytest.fixture(scope="module")
def encode(tok):
    """Text -> token ids with `tok` (how the data pipeline encodes)."""
    return lambda text: tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def sch(tok):
    """The skill tasks' stream schema, bound to `tok`."""
    from ms_ray.data.skills import SKILL_STREAMS

    return SKILL_STREAMS.bind(tok)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray on 127.0.0.1 for the whole test session (started on first use)."""
    from ms_ray.ray_env import init_ray

    ray = init_ray(num_cpus=3)  # 2 training workers + Ray Data reading beside them
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def data_dir(ray_local, tmp_path_factory):
    """600 skill sessions (jobs/data-skills.yaml, one shard), prepared once on the in-process Ray for
    the tests that train on them: test_submit's cluster jobs (by path), test_train, test_lora_train.
    Each prepared its own before (~9 s apiece); the runs only read it."""
    from pathlib import Path

    # imported after ray_local has set Ray's environment, as the CLI does: the pipeline imports
    # Ray Data, which reads RAY_DATA_DISABLE_PROGRESS_BARS once, at import
    from ms_ray.config import PrepareConfig, load_config
    from ms_ray.data.pipeline import prepare

    out = tmp_path_factory.mktemp("data") / "skills"
    prepare(load_config(PrepareConfig, Path(__file__).resolve().parent.parent / "jobs/data-skills.yaml",
                        [f"output={out}", "sources=[{kind: skills, examples: 600, shards: 1}]"]))
    return out


TEST_TOKEN = "ms-ray-test-token-0123456789"  # token auth of the test cluster (not a secret)


def free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A real Ray head started with `ray start --head --block` on 127.0.0.1: dashboard on, token
    auth on, its own ports and temp dir (the in-process test Ray keeps running beside it). Ends by
    stopping that process group only (a plain `ray stop` would also stop the in-process Ray)."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx

    gcs, dashboard, client, agent, agent_grpc, metrics, runtime_env = free_ports(7)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # like an image: python has ms_ray
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TEST_TOKEN, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_USAGE_STATS_ENABLED="0", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2", RAY_TRAIN_ENABLE_PRINT_PATCH="0")
    temp = Path(f"/tmp/ms_ray_head_{os.getpid()}")  # short: Ray's unix sockets live under it
    log = tmp_path_factory.mktemp("ray_head") / "ray_start.log"
    ray_bin = Path(sys.executable).parent / "ray"
    proc = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={runtime_env}", "--num-cpus=3", f"--temp-dir={temp}", "--disable-usage-stats"],
        # no drain on SIGTERM (Ray's default waits up to 30 s for the node to drain, for Kubernetes
        # pod deletes): the teardown below stops the head at once instead of ~35-60 s
        env={**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}, stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            answer = httpx.get(f"{url}/api/version", headers={"Authorization": f"Bearer {TEST_TOKEN}"}, timeout=5)
            if answer.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "ray start --head: dashboard not up in 120 s\n" + log.read_text()[-3000:]
        time.sleep(1)
    yield {"dashboard": url, "gcs": f"127.0.0.1:{gcs}", "env": env, "token": TEST_TOKEN}
    # SIGTERM to `ray start` alone: it stops what it started in order, the raylet while the GCS still
    # answers. SIGTERM to the whole group reached the GCS first at times, and the raylet then waited
    # ~30 s to unregister from it (a teardown of 2.5 s or 32 s by that race).
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything of the group still there
    except ProcessLookupError:
        pass
    subprocess.run(["pkill", "-9", "-f", str(temp)], check=False)  # anything left of this head only


def check_report_outputs(out, labels: list[str], sessions: int) -> dict:
    """What `ms-ray eval` and `ms-ray compare` write after scoring `sessions` held-out sessions: summary,
    report, records (one per task, at least one per session), plots, one W&B run."""
    import json

    from ms_ray.data.skill_sessions import CONDITIONS
    from ms_ray.data.skills import TASKS

    summary = json.loads((out / "summary.json").read_text())
    report = (out / "report.md").read_text()
    for label in labels:
        per_key = summary["summaries"][label]
        n = per_key["all"]["n"]
        assert n >= sessions and set(TASKS) <= set(per_key)
        assert set(per_key) <= {*TASKS, "all", *(f"{t}@{c}" for t in [*TASKS, "all"] for c in CONDITIONS)}
        records = [json.loads(r) for r in (out / f"records-{label}.jsonl").read_text().splitlines()]
        assert len(records) == n and {r["task"] for r in records} == set(TASKS)
        assert {r["condition"] for r in records} <= set(CONDITIONS)
        assert f"| all | any | {n} |" in report
    assert " / ".join(labels) in report
    for plot in ("accuracy", "latency_rows", "latency_ms"):
        assert (out / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
    return summary


@pytest.fixture(scope="session")
def skills_export(ray_local, tmp_path_factory):
    """A short-trained skills model for the tests that talk to a live server like a person: jobs/tiny.yaml
    on sessions of the two quickest tasks (wait_k, and mostly tool_call; jobs/data-skills.yaml otherwise),
    1,200 steps of four packs (what `ms-ray train` on 2 workers x data.batch_size=2 sees per step). Returns
    the export (MS_RAY_TEST_SKILLS_EXPORT=FOLDER: that one instead, to iterate on these tests).

    Trained in this process with a plain torch loop (tests/skills_model.py: the project's own data
    pipeline, model, loss, schedule, parameter groups and export function), not with `ms-ray train`:
    the tests that use it need a model that has learned the tasks, and training itself is tested in
    tests/train/. That saves Ray Train's and DeepSpeed's start-up, the checkpoint and a Ray of its own
    (the data is prepared on the session's test Ray); the steps themselves are compute (~140 ms for
    four packs on 2 cores, about what one DeepSpeed step of two packs per worker cost).
    Steps: 800 were too few (validation loss ~7e-3, a product answered wrong live, 96 % of held-out
    tool_call sessions right); 1,200 pass the live tests (validation loss ~1e-5, all 611 held-out wait_k
    and tool_call sessions right; live seeds 404, 505, 606), as 1,500 (what `ms-ray train` ran here) did."""
    from pathlib import Path

    if os.environ.get("MS_RAY_TEST_SKILLS_EXPORT"):  # iterating on the live tests: reuse an export
        return Path(os.environ["MS_RAY_TEST_SKILLS_EXPORT"])
    from skills_model import train_skills_model  # tests/ (next to this file) is on sys.path, as for served_app

    return train_skills_model(
        tmp_path_factory.mktemp("skills_export"),
        ["data.batch_size=2", "optim.max_steps=1200", "optim.lr=3e-3", "optim.warmup_steps=50", "run.log_every=300"],
        {"examples": 8000, "tasks": ["wait_k", "tool_call"], "task_weights": {"wait_k": 1, "tool_call": 3}})


@pytest.fixture(scope="session")
def live_skills(skills_export, tmp_path_factory):
    """`ms-ray serve` (serve/local.yaml, its own process) with the skills model, started once for the
    tests that use it as a person would (test_live_skills, test_openai_live): nothing forces silence
    (`session.quiet_after_end=false`: staying quiet is the model's own). Yields its base URL."""
    from serve_process import start_serve, stop_serve

    log = tmp_path_factory.mktemp("live") / "serve.log"
    proc, url = start_serve(skills_export, ["session.row_interval_s=0.05", "session.quiet_after_end=false"], log)
    yield url
    stop_serve(proc)


@pytest.fixture(scope="session")
def served(ray_local, tmp_path_factory):
    """Two apps on one Serve instance (real sockets on 127.0.0.1, a tiny random model), started
    once for the serving tests (tests/served_app.py): main (16+ sessions per replica, the
    calculator and the session recorder, per-role keys) and small (one session per replica:
    "busy", a replica dying)."""
    from ray import serve
    from served_app import app_config, free_port, recording

    from ms_ray.core.families import tiny_base_model
    from ms_ray.core.model import MultiStreamLM
    from ms_ray.data.skills import SKILL_STREAMS
    from ms_ray.data.tokenizer import skill_tokenizer
    from ms_ray.serving.app import build
    from ms_ray.serving.client import wait_ready

    tok = skill_tokenizer()
    sch = SKILL_STREAMS.bind(tok)

    checkpoint = tmp_path_factory.mktemp("serve") / "tiny"
    MultiStreamLM(tiny_base_model("llama", len(tok), seed=0), sch).save_pretrained(checkpoint, tok)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    sessions = tmp_path_factory.mktemp("recorded")
    apps = {
        "main": app_config(checkpoint, port, "main", actors=recording(sessions)),
        "small": app_config(checkpoint, port, "small", model={"max_sessions_per_replica": 1}),
    }
    for cfg in apps.values():
        serve.run(build(cfg), name=cfg.name, route_prefix=cfg.route_prefix, blocking=False)
    base = f"http://127.0.0.1:{port}"
    for name in apps:
        wait_ready(f"{base}/{name}")
    yield {"http": base, "ws": f"ws://127.0.0.1:{port}", "checkpoint": checkpoint, "port": port, "apps": apps,
           "sessions": sessions}
    # both apps deleted together, then Serve: serve.shutdown() alone stops the deployments one tier at
    # a time (ingress, server, actors), 2 s each at least (Serve's graceful_shutdown_wait_loop_s)
    for name in apps:
        serve.delete(name, _blocking=False)
    for name in apps:
        serve.delete(name)  # waits until it is gone
    serve.shutdown()
