"""Serving benchmark: N concurrent WebSocket sessions against ONE session-server replica.

Run:  .venv/bin/python benchmarks/bench_serve.py           (~6 min)
      .venv/bin/python benchmarks/bench_serve.py --quick   (smoke run: 1 and 16 sessions, v2 unpaced, v1 paced, ~1 min)

Everything on this machine: a local Ray on 127.0.0.1, Ray Serve (proxy -> FastAPI ingress ->
SessionServer with one replica, 1 CPU), the client (one asyncio process, N WebSockets) beside it.
Model: the tiny Llama of `make demo` (hidden 128, 2 layers, 4 heads), random weights, the five
skill streams; every output stream is sampled greedily and kept talking (silence penalty), so
every row carries text in every stream.

For each N = 1, 4, 16, 64: N sessions open at once, each appends a few words, then the client
counts rows for `--seconds` after a warm-up.
  rows/s        aggregate rows received per second over all N sessions
  vs 1          rows/s divided by the single-session rows/s
  p50/p99 ms    time between consecutive frames of a session that carry rows, pooled over sessions
  rows/frame    rows per such frame (protocol v2 puts every row ready at once in one frame)
Table (a) steps as fast as the model goes (row_interval_s = 0): the batching limit; (b) runs the
real-time row clock (row_interval_s = 0.05, 20 rows/s per session): does one replica keep every
session on time? Each is run with protocol v1 (a frame per row) and v2 (`rows` frames). Table (p)
is where the CPU goes: CPU seconds of each process per 1,000 rows delivered, at 16 unpaced
sessions. Goals (issue 16): unpaced, 16 sessions >= 8x the rows/s of one and p99 gap < 3x the
single-session p50; paced, 64 sessions >= 95 % of 1,280 rows/s with p99 gap < 3x p50.
Connections use `websockets` directly (not ms_ray's client), so the script also measures older
code: copy it into a checkout and run it there (the "before" of a change).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ms_ray.config import ServeConfig  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(app_url: str, seconds: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{app_url}/readyz", timeout=30).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{app_url} was not ready within {seconds:g} s")


def tiny_skills_model(window: int | None = None):
    """The benchmarks' model: a random tiny Llama (hidden 128, 2 layers) on the skill streams."""
    from ms_ray.core.families import tiny_base_model
    from ms_ray.core.model import MultiStreamLM
    from ms_ray.data.skills import SKILL_STREAMS
    from ms_ray.data.tokenizer import skill_tokenizer

    tok = skill_tokenizer()
    base = tiny_base_model("llama", len(tok), hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512)
    return MultiStreamLM(base, SKILL_STREAMS.bind(tok), window=window), tok


def save_checkpoint(folder: Path) -> Path:
    model, tok = tiny_skills_model()
    model.save_pretrained(folder, tok)
    return folder


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def rows_in(frame: dict) -> int:
    if frame["type"] == "row":
        return 1
    if frame["type"] == "rows":
        return len(frame["rows"])
    raise RuntimeError(f"unexpected frame {frame}")


async def measure(url: str, n: int, warmup: float, seconds: float, version: int) -> dict:
    """Open n sessions, keep them talking, count rows in [warmup, warmup + seconds)."""
    from websockets.asyncio.client import connect

    stamps: list[list[tuple[float, int]]] = [[] for _ in range(n)]  # (arrival, rows) of frames with rows
    started = asyncio.Event()
    t0 = {}

    async def one(i: int):
        async with connect(f"{url}/v1/sessions" + ("?v=2" if version == 2 else ""), max_size=None,
                           open_timeout=60, max_queue=None) as ws:
            first = json.loads(await ws.recv())
            assert first["type"] == "session", first
            await ws.send(json.dumps({"type": "append", "stream": "user", "text": " 1 2 3 4 5 6 7 8"}))
            await started.wait()
            end = t0["t"] + warmup + seconds
            while (now := time.perf_counter()) < end:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
                rows = rows_in(frame)
                if now >= t0["t"] + warmup and rows:
                    stamps[i].append((time.perf_counter(), rows))
            await ws.send(json.dumps({"type": "close"}))
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            except Exception:
                pass

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    await asyncio.sleep(0.5 + 0.03 * n)  # let every session open before the clock starts
    t0["t"] = time.perf_counter()
    started.set()
    await asyncio.gather(*tasks)
    gaps = [b[0] - a[0] for s in stamps for a, b in zip(s, s[1:])]
    rows = sum(r for s in stamps for _, r in s)
    frames = sum(len(s) for s in stamps)
    return {"n": n, "rows_per_s": rows / seconds, "p50_ms": 1000 * percentile(gaps, 0.5),
            "p99_ms": 1000 * percentile(gaps, 0.99), "rows_per_frame": rows / max(1, frames), "rows": rows}


def table(results: list[dict]) -> str:
    base = results[0]["rows_per_s"]
    lines = ["| sessions | rows/s | vs 1 | p50 ms | p99 ms | rows/frame |", "|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['n']} | {r['rows_per_s']:.0f} | {r['rows_per_s'] / base:.1f}x | "
                     f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r.get('rows_per_frame', 1):.1f} |")
    return "\n".join(lines)


def goals(results: list[dict], paced: bool) -> str:
    one = results[0]
    if paced:
        top = max(results, key=lambda r: r["n"])
        want = 0.95 * top["n"] * 20
        spread = top["p99_ms"] / one["p50_ms"]
        return (f"- {top['n']} paced sessions: {top['rows_per_s']:.0f} rows/s of {top['n'] * 20} "
                f"(goal >= {want:.0f}): {'met' if top['rows_per_s'] >= want else 'MISSED'}\n"
                f"- p99 gap at {top['n']} = {spread:.1f}x the single-session p50 (goal < 3x): "
                f"{'met' if spread < 3 else 'MISSED'}")
    sixteen = next((r for r in results if r["n"] == 16), None)
    if sixteen is None:
        return ""
    ratio = sixteen["rows_per_s"] / one["rows_per_s"]
    spread = sixteen["p99_ms"] / one["p50_ms"]
    return (f"- 16 sessions = {ratio:.1f}x the rows/s of one (goal >= 8x): {'met' if ratio >= 8 else 'MISSED'}\n"
            f"- p99 gap at 16 = {spread:.1f}x the single-session p50 (goal < 3x): "
            f"{'met' if spread < 3 else 'MISSED'}")


def serve_processes(app: str) -> dict[str, int]:
    """Role -> pid of the Serve processes of `app` (proxy, ingress, session server; Ray names its
    workers `ray::ServeReplica:APP:DEPLOYMENT`), Ray's own, and this client."""
    import psutil

    parts = {"proxy": "ray::ProxyActor", "ingress": f"ServeReplica:{app}:Ingress",
             "session server": f"ServeReplica:{app}:SessionServer", "serve controller": "ray::ServeController"}
    roles = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        program = (proc.info["cmdline"] or [""])[0]
        for role, part in parts.items():
            if line.startswith("ray::") and part in line[:120]:
                roles[role] = proc.info["pid"]
        for role in ("gcs_server", "raylet"):
            if program.endswith(role):
                roles[role] = proc.info["pid"]
    roles["client (this process)"] = os.getpid()
    return roles


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    import psutil

    out = {}
    for role, pid in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
            out[role] = t.user + t.system
        except psutil.Error:
            out[role] = float("nan")
    return out


def profile(url: str, app: str, n: int, seconds: float, version: int) -> tuple[dict[str, float], int]:
    """CPU seconds per process over one measurement, and the rows it delivered."""
    pids = serve_processes(app)
    before = cpu_seconds(pids)
    result = asyncio.run(measure(url, n, 0.0, seconds, version))
    after = cpu_seconds(pids)
    return {role: after[role] - before[role] for role in pids}, result["rows"]


def profile_table(profiles: dict[str, tuple[dict[str, float], int]]) -> str:
    labels = list(profiles)
    roles = list(next(iter(profiles.values()))[0])
    lines = ["| process | " + " | ".join(f"{label}: CPU s per 1,000 rows" for label in labels) + " |",
             "|---|" + "---:|" * len(labels)]
    for role in roles + ["total"]:
        cells = []
        for label in labels:
            cpu, rows = profiles[label]
            value = sum(cpu.values()) if role == "total" else cpu[role]
            cells.append(f"{1000 * value / max(rows, 1):.2f}")
        lines.append(f"| {role} | " + " | ".join(cells) + " |")
    lines.append("| rows delivered | " + " | ".join(str(profiles[label][1]) for label in labels) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--versions", default="1,2", help="protocol versions to run (the code before v2: 1)")
    args = parser.parse_args()
    seconds = args.seconds or (1.0 if args.quick else 6.0)
    counts = (1, 16) if args.quick else (1, 4, 16, 64)
    versions = [int(v) for v in args.versions.split(",")]
    start = time.perf_counter()

    from ray import serve

    from ms_ray.ray_env import init_ray
    from ms_ray.serving.app import build

    init_ray(num_cpus=2)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    # no tool runner: `actors: []` (before stream actors: `tools: {enabled: false}`, for the "before" run)
    no_tools = {"actors": []} if "actors" in ServeConfig.model_fields else {"tools": {"enabled": False}}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save_checkpoint(Path(tmp) / "tiny")
        profiles = {}
        for label, interval in (("a", 0.0), ("b", 0.05)):
            cfg = ServeConfig.model_validate({
                "checkpoint": str(checkpoint), "name": f"bench{label}", "route_prefix": f"/bench{label}",
                "log_level": "WARNING", **no_tools,
                "model": {"num_cpus": 1, "max_sessions_per_replica": 80},
                "session": {"row_interval_s": interval, "max_rows": 100000,
                            "sampling": {s: {"silence_penalty": 1e4} for s in ("think", "output", "tool_call")}},
            })
            serve.run(build(cfg), name=cfg.name, route_prefix=cfg.route_prefix, blocking=False)
            wait_ready(f"http://127.0.0.1:{port}/bench{label}")
            url = f"ws://127.0.0.1:{port}/bench{label}"
            what = "as fast as the model goes (row_interval_s = 0)" if interval == 0 else \
                f"real-time row clock (row_interval_s = {interval}, {1 / interval:.0f} rows/s per session)"
            # --quick is a smoke run (tests/test_benchmarks.py checks the tables, not the numbers):
            # each protocol version once, the newest unpaced (and profiled), the oldest paced
            for version in [max(versions) if interval == 0 else min(versions)] if args.quick else versions:
                asyncio.run(measure(url, 1, 0.5, 1.0, version))  # warm the whole path once
                results = [asyncio.run(measure(url, n, 1.0, seconds, version)) for n in counts]
                print(f"## ({label}) One replica, {what}, protocol v{version}, {seconds:g} s per point\n")
                print(table(results))
                print()
                print(goals(results, paced=interval > 0))
                print(flush=True)
                if interval == 0:
                    profiles[f"v{version}"] = profile(url, cfg.name, 16, seconds, version)
            if not args.quick:  # --quick: serve.shutdown() below removes both apps (a delete alone waits ~10 s)
                serve.delete(cfg.name)
        serve.shutdown()
        print("## (p) Where the CPU goes: 16 unpaced sessions, CPU seconds per 1,000 rows delivered\n")
        print(profile_table(profiles))
        print()
        print("## (c) The decoder alone, in this process (no Serve, no sockets), same model, 1 thread, "
              "every session at the same context length\n")
        print(decoder_alone(checkpoint, counts, (64,) if args.quick else (64, 256, 1024)))
    print(f"\nTotal run time: {time.perf_counter() - start:.1f} s")


def decoder_alone(checkpoint: Path, counts, contexts) -> str:
    """What batching gives before any serving cost: RowDecoder.step() rows/s for n sessions, all at
    the same context length (an unpaced served run lets one session grow its cache ~4x faster than
    each of 16, which would mix two effects): every step reads each session's whole KV cache."""
    import torch

    from ms_ray.core.decode import RowDecoder, Sampling, StopRules
    from ms_ray.core.model import MultiStreamLM

    torch.set_num_threads(1)
    model = MultiStreamLM.from_pretrained(checkpoint).eval()
    talk = {s: Sampling(silence_penalty=1e4) for s in ("think", "output", "tool_call")}
    lines = ["| context rows | sessions | rows/s | vs 1 | ms per step |", "|---:|---:|---:|---:|---:|"]
    for context in contexts:
        single = None
        for n in counts:
            decoder = RowDecoder(model)
            for i in range(n):
                decoder.open(str(i), sampling=talk, stop=StopRules(None, ()))
            while decoder.by_slot[0].rows < context:
                decoder.step()
            steps, t0 = 64, time.perf_counter()
            for _ in range(steps):
                decoder.step()
            ms = 1000 * (time.perf_counter() - t0) / steps
            rows_per_s = n * 1000 / ms
            single = single or rows_per_s
            lines.append(f"| {context}-{context + steps} | {n} | {rows_per_s:.0f} | {rows_per_s / single:.1f}x "
                         f"| {ms:.1f} |")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
