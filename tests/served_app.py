"""The Serve app the serving tests share (tests/serving/conftest.py starts it once per package):
its roles and keys, its config, and helpers to read frames of either protocol version.
Import it as `from served_app import ...` (tests/ is on sys.path)."""

import asyncio
import socket
import time

from ms_ray.config import ServeConfig
from ms_ray.serving.client import rows_of

KEYS = {"user": "user-key", "tool": "tool-key", "operator": "operator-key", "monitor": "monitor-key",
        "limited": "limited-key"}
ROLES = {
    "user": {"keys": [KEYS["user"]], "write": ["user"], "hidden": ["think"]},
    "tool": {"keys": [KEYS["tool"]], "open": False, "write": ["tool"], "read": ["tool_call", "tool"],
             "any_session": True},
    "operator": {"keys": [KEYS["operator"]], "write": ["user"], "force": ["tool_call"], "hidden": ["think"],
                 "any_session": True},
    "monitor": {"keys": [KEYS["monitor"]], "open": False},
    "limited": {"keys": [KEYS["limited"]], "write": ["user"], "max_sessions": 1, "max_watchers": 1,
                "appends_per_s": 2, "append_burst": 3},
}
NUMBERS = [str(n) for n in range(145)]  # one word-level token each in the skill tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_config(checkpoint, port, name, actors=None, **sections) -> ServeConfig:
    data = {
        "checkpoint": str(checkpoint), "name": name, "log_level": "WARNING", "route_prefix": f"/{name}", "port": port,
        "roles": ROLES,
        "ingress": {"anonymous_role": None, "call_timeout_s": 10, "max_frame_bytes": 4096, "heartbeat_s": 0.3},
        "session": {
            "row_interval_s": 0.01, "idle_timeout_s": 30,
            # the random model's tool_call stays silent unless forced; its output and think never are
            "sampling": {"tool_call": {"silence_penalty": -1e4}, "output": {"silence_penalty": 1e4},
                         "think": {"silence_penalty": 1e4}},
        },
        "model": {"num_cpus": 0, "max_sessions_per_replica": 24},
    }
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v}
    if actors is not None:
        data["actors"] = actors
    return ServeConfig.model_validate(data)


def recording(path) -> list[dict]:
    """The calculator and the session recorder, writing to `path`."""
    return [{"name": "calculator", "import_path": "ms_ray.serving.stream_actors:Calculator", "reads": ["tool_call"],
             "writes": ["tool"]},
            {"name": "recorder", "import_path": "ms_ray.serving.stream_actors:Recorder", "reads": ["*"],
             "args": {"path": str(path), "source": "served"}}]


def ws_url(served, app="main"):
    return f"{served['ws']}/{app}"


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def words_of(rows, stream):
    return "".join(r["cells"].get(stream, "") for r in rows).split()


async def read_until(session, predicate, timeout=30):
    """Frames until predicate(rows) holds; returns (rows, other frames). Rows of `rows` frames
    (protocol v2) count one by one; their heartbeats are left out."""
    rows, others = [], []
    deadline = time.monotonic() + timeout
    while not predicate(rows):
        assert time.monotonic() < deadline, f"timed out; last rows {rows[-3:]}, other frames {others}"
        frame = await session.recv(timeout)
        assert frame is not None, \
            f"connection closed early ({session.close_code} {session.close_reason}); frames {others}"
        if frame["type"] in ("row", "rows"):
            rows += rows_of(frame)
        else:
            others.append(frame)
    return rows, others


async def next_error(session, timeout=10) -> dict:
    """Skip rows (they keep coming) up to the next error frame."""
    while (frame := await session.recv(timeout))["type"] != "error":
        assert frame["type"] in ("row", "rows"), frame
    return frame


async def collect(session, into: list) -> None:
    async for frame in session.frames(60):
        into.append(frame)
