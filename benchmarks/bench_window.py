"""Sessions without an end: one session decoding 100,000 rows with a windowed model.

    python benchmarks/bench_window.py            # 100,000 rows (~4 min on 2 cores)
    python benchmarks/bench_window.py --quick    # 4,000 rows (a smoke run)

One tiny Llama (hidden 128, 2 layers, 5 streams), one session, every output stream kept talking,
inputs injected now and then, one thread. The windowed model (model.window_rows = W) keeps its
session in a slot of W + W/8 rows; the same model without a window (baseline, same run) keeps
every row. Printed: the curve of step time (mean and p99 over 200 steps at each mark) and the
KV-cache memory, for both; and the goals: cache flat after W rows, step time at the last mark
within 10 % of the step time at row 1,000 (the two measured side by side, in alternating blocks:
a snapshot of the session at row 1,000 runs beside it at the end).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_serve import tiny_skills_model  # noqa: E402  (beside this script: the same model)

WINDOW = 256
BASELINE_ROWS = 20_000  # the unwindowed cache grows with every row: its curve stops here


def cache_mib(decoder) -> float:
    bufs = [*decoder.cache.keys.values(), *decoder.cache.values.values()]
    return sum(b.numel() * b.element_size() for b in bufs) / 2**20


TALK = ("think", "output", "tool_call")


def timed(decoder, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        decoder.step()
        times.append(time.perf_counter() - t0)
    return times


def run(window: int | None, marks: list[int], span: int = 200) -> tuple[list[dict], dict]:
    """Decode one session to the last mark; at each mark, time `span` steps. Also returns the
    step time of the session at row ~1,000 against the same session at the last mark, measured
    in alternating blocks in the same minute (a snapshot taken at row 1,000 continues beside it),
    so that the machine's load, which drifts over minutes, weighs on both alike."""
    from ms_ray.core.decode import RowDecoder, Sampling, StopRules

    model, tok = tiny_skills_model(window)
    model.eval()
    decoder = RowDecoder(model)
    talk = {s: Sampling(silence_penalty=1e4) for s in TALK}
    decoder.open("s", sampling=talk, stop=StopRules(None, ()))
    user = tok("what is 6 times 7", add_special_tokens=False)["input_ids"]
    curve, row, early = [], 0, None
    for mark in marks:
        while row < mark:
            if row % 500 == 0:
                decoder.push("s", "user", user)  # input arrives now and then, as in a live session
            decoder.step()
            row += 1
        if mark == 1_000:
            early = decoder.snapshot("s")
        times = sorted(timed(decoder, span))
        row += span
        curve.append({"row": mark, "mean_ms": 1000 * sum(times) / span, "p99_ms": 1000 * times[int(0.99 * span)],
                      "cache_mib": cache_mib(decoder)})
    paired = {}
    if early is not None:
        at_1000 = RowDecoder(model)
        at_1000.open("s", sampling=talk, stop=StopRules(None, ()), start=early)
        blocks = {"early": [], "late": []}
        for _ in range(10):  # 10 x 100 steps each, alternating
            blocks["early"] += timed(at_1000, 100)
            blocks["late"] += timed(decoder, 100)
        paired = {k: 1000 * sum(v) / len(v) for k, v in blocks.items()}
    return curve, paired


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int, default=None)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    last = args.rows or (4_000 if args.quick else 100_000)
    marks = [m for m in (100, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000) if m < last] + [last]
    started = time.perf_counter()
    windowed, paired = run(WINDOW, marks)
    baseline, _ = run(None, [m for m in marks if m <= min(last, BASELINE_ROWS)])
    by_row = {c["row"]: c for c in baseline}
    print(f"## One session, {last:,} rows: window {WINDOW} rows (slot {WINDOW + WINDOW // 8}) vs no window\n")
    print("| row | windowed ms/step | p99 ms | cache MiB | no window ms/step | p99 ms | cache MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for c in windowed:
        b = by_row.get(c["row"])
        rest = f"{b['mean_ms']:.2f} | {b['p99_ms']:.2f} | {b['cache_mib']:.1f}" if b else "- | - | -"
        print(f"| {c['row']:,} | {c['mean_ms']:.2f} | {c['p99_ms']:.2f} | {c['cache_mib']:.2f} | {rest} |")
    flat = {c["cache_mib"] for c in windowed if c["row"] >= WINDOW}
    ratio = paired["late"] / paired["early"]
    print(f"\n- cache after {WINDOW} rows: {sorted(flat)} MiB "
          f"({'flat: met' if len(flat) == 1 else 'NOT flat: missed'})")
    print(f"- step time at row {last:,}: {paired['late']:.2f} ms = {ratio:.2f}x the step time at row 1,000 "
          f"({paired['early']:.2f} ms; 1,000 steps each, alternating blocks of 100) "
          f"(goal within 10 %: {'met' if abs(ratio - 1) <= 0.10 else 'MISSED'})")
    print(f"\nTotal run time: {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
