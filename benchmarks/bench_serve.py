"""Serving benchmark: N concurrent WebSocket sessions against ONE session-server replica.

Run:  .venv/bin/python benchmarks/bench_serve.py           (~3 min)
      .venv/bin/python benchmarks/bench_serve.py --quick   (smoke run, < 1.5 min)

Everything on this machine: a local Ray on 127.0.0.1, Ray Serve (proxy -> FastAPI ingress ->
SessionServer with one replica, 1 CPU), the client (one asyncio process, N WebSockets) beside it.
Model: the tiny Llama of `make demo` (hidden 128, 2 layers, 4 heads), random weights, the five
skill streams; every output stream is sampled greedily and kept talking (silence penalty), so
every row carries text in every stream.

For each N = 1, 4, 16, 64: N sessions open at once, each appends a few words, then the client
counts row frames for `--seconds` after a warm-up.
  rows/s        aggregate row frames per second over all N sessions
  vs 1          rows/s divided by the single-session rows/s
  p50/p99 ms    time between consecutive row frames of a session, pooled over sessions
Table (a) steps as fast as the model goes (row_interval_s = 0): the batching limit. Table (b) runs
the real-time row clock (row_interval_s = 0.05, 20 rows/s per session): does one replica keep
every session on time? Goals (issue 5): 16 sessions >= 8x the rows/s of one; p99 row interval of
16 sessions < 3x the single-session p50.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ms_ray.config import ServeConfig  # noqa: E402
from ms_ray.serving.client import connect_session, wait_ready  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_checkpoint(folder: Path) -> Path:
    from ms_ray.core.families import tiny_base_model
    from ms_ray.core.model import MultiStreamLM
    from ms_ray.data.skills import SKILL_STREAMS
    from ms_ray.data.tokenizer import skill_tokenizer

    tok = skill_tokenizer()
    base = tiny_base_model("llama", len(tok), hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512)
    MultiStreamLM(base, SKILL_STREAMS.bind(tok)).save_pretrained(folder, tok)
    return folder


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def measure(url: str, n: int, warmup: float, seconds: float) -> dict:
    """Open n sessions, keep them talking, count row frames in [warmup, warmup + seconds)."""
    stamps: list[list[float]] = [[] for _ in range(n)]
    started = asyncio.Event()
    t0 = {}

    async def one(i: int):
        async with connect_session(url, max_queue=None) as s:
            assert s.first["type"] == "session", s.first
            await s.append("user", " 1 2 3 4 5 6 7 8")
            await started.wait()
            end = t0["t"] + warmup + seconds
            while (now := time.perf_counter()) < end:
                frame = await s.recv(30)
                if frame is None or frame["type"] != "row":
                    raise RuntimeError(f"session {i}: {frame}")
                if now >= t0["t"] + warmup:
                    stamps[i].append(time.perf_counter())
            await s.close()

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    await asyncio.sleep(0.5 + 0.02 * n)  # let every session open before the clock starts
    t0["t"] = time.perf_counter()
    started.set()
    await asyncio.gather(*tasks)
    intervals = [b - a for s in stamps for a, b in zip(s, s[1:])]
    return {"n": n, "rows_per_s": sum(len(s) for s in stamps) / seconds,
            "p50_ms": 1000 * percentile(intervals, 0.5), "p99_ms": 1000 * percentile(intervals, 0.99)}


def table(results: list[dict]) -> str:
    base = results[0]["rows_per_s"]
    lines = ["| sessions | rows/s | vs 1 | p50 ms | p99 ms |", "|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['n']} | {r['rows_per_s']:.0f} | {r['rows_per_s'] / base:.1f}x | "
                     f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")
    return "\n".join(lines)


def goals(results: list[dict]) -> str:
    one = results[0]
    sixteen = next((r for r in results if r["n"] == 16), None)
    if sixteen is None:
        return ""
    ratio = sixteen["rows_per_s"] / one["rows_per_s"]
    spread = sixteen["p99_ms"] / one["p50_ms"]
    return (f"- 16 sessions = {ratio:.1f}x the rows/s of one (goal >= 8x): {'met' if ratio >= 8 else 'MISSED'}\n"
            f"- p99 interval at 16 = {spread:.1f}x the single-session p50 (goal < 3x): "
            f"{'met' if spread < 3 else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=float, default=None)
    args = parser.parse_args()
    seconds = args.seconds or (2.0 if args.quick else 6.0)
    counts = (1, 4, 16) if args.quick else (1, 4, 16, 64)
    start = time.perf_counter()

    from ray import serve

    from ms_ray.ray_env import init_ray
    from ms_ray.serving.app import build

    init_ray(num_cpus=2)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save_checkpoint(Path(tmp) / "tiny")
        for label, interval in (("a", 0.0), ("b", 0.05)):
            cfg = ServeConfig.model_validate({
                "checkpoint": str(checkpoint), "name": f"bench{label}", "route_prefix": f"/bench{label}",
                "log_level": "WARNING", "tools": {"enabled": False},
                "model": {"num_cpus": 1, "max_sessions_per_replica": 80},
                "session": {"row_interval_s": interval, "max_rows": 100000,
                            "sampling": {s: {"silence_penalty": 1e4} for s in ("think", "output", "tool_call")}},
            })
            serve.run(build(cfg), name=cfg.name, route_prefix=cfg.route_prefix, blocking=False)
            wait_ready(f"http://127.0.0.1:{port}/bench{label}")
            url = f"ws://127.0.0.1:{port}/bench{label}"
            asyncio.run(measure(url, 1, 0.5, 1.0))  # warm the whole path once
            results = [asyncio.run(measure(url, n, 1.0, seconds)) for n in counts]
            what = "as fast as the model goes (row_interval_s = 0)" if interval == 0 else \
                f"real-time row clock (row_interval_s = {interval}, {1 / interval:.0f} rows/s per session)"
            print(f"## ({label}) One replica, {what}, {seconds:g} s per point\n")
            print(table(results))
            print()
            print(goals(results))
            print()
            serve.delete(cfg.name)
        serve.shutdown()
        print("## (c) The decoder alone, in this process (no Serve, no sockets), same model, 1 thread\n")
        print(decoder_alone(checkpoint, counts, seconds))
    print(f"\nTotal run time: {time.perf_counter() - start:.1f} s")


def decoder_alone(checkpoint: Path, counts, seconds: float) -> str:
    """What batching gives before any serving cost: RowDecoder.step() rows/s for n sessions."""
    import torch

    from ms_ray.core.decode import RowDecoder, Sampling, StopRules
    from ms_ray.core.model import MultiStreamLM

    torch.set_num_threads(1)
    model = MultiStreamLM.from_pretrained(checkpoint).eval()
    talk = {s: Sampling(silence_penalty=1e4) for s in ("think", "output", "tool_call")}
    results = []
    for n in counts:
        decoder = RowDecoder(model)
        for i in range(n):
            decoder.open(str(i), sampling=talk, stop=StopRules(None, ()))
        for _ in range(10):
            decoder.step()
        steps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 2:
            decoder.step()
            steps += 1
        elapsed = time.perf_counter() - t0
        results.append({"n": n, "rows_per_s": n * steps / elapsed, "p50_ms": 1000 * elapsed / steps,
                        "p99_ms": float("nan")})
    return table(results).replace("| p99 ms |", "| |").replace("| nan |", "| |").replace("p50 ms", "ms per step")


if __name__ == "__main__":
    main()
