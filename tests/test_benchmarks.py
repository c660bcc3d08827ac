"""The benchmark scripts keep running (their own equality checks included); timings are not
asserted here: the scripts print them as tables."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_core_benchmark_quick_run():
    run = subprocess.run([sys.executable, "benchmarks/bench_core.py", "--quick"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "## (a) Mask building" in run.stdout and "## (b) Decoding" in run.stdout
    assert "naive loop (release)" in run.stdout


@pytest.mark.slow
def test_serve_benchmark_quick_run():
    run = subprocess.run([sys.executable, "benchmarks/bench_serve.py", "--quick"], cwd=ROOT,
                         capture_output=True, text=True, timeout=420)
    assert run.returncode == 0, run.stderr[-3000:]
    for title in ("## (a) One replica, as fast", "## (b) One replica, real-time", "## (c) The decoder alone",
                  "protocol v1", "protocol v2", "## (p) Where the CPU goes"):
        assert title in run.stdout
    assert "| 16 |" in run.stdout and "| session server |" in run.stdout and "| proxy |" in run.stdout


@pytest.mark.slow
def test_window_benchmark_quick_run():
    run = subprocess.run([sys.executable, "benchmarks/bench_window.py", "--rows", "1500"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "## One session, 1,500 rows: window 256 rows" in run.stdout
    assert "| 1,000 |" in run.stdout and "(flat: met)" in run.stdout  # the slot never grows: not a timing


@pytest.mark.slow
def test_chat_decode_benchmark_tiny_run():
    run = subprocess.run([sys.executable, "benchmarks/bench_chat_decode.py", "--tiny", "--rows", "16"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "## Chat decoding: tiny random model" in run.stdout and "| 4 | 64 |" in run.stdout
    assert "| 1 | 16 |" in run.stdout and "| 1.00x |" in run.stdout


@pytest.mark.slow
def test_gpu_benchmark_quick_run_on_cpu():
    """bench_gpu.py --quick: the GPU session's script, its code paths on CPU at tiny sizes, so it cannot rot."""
    run = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--quick"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for title in ("## (a) Training step", "## (b) Row decoding", "## (c) Training-step memory"):
        assert title in run.stdout
    assert "| sdpa | 128 |" in run.stdout and "| 4 |" in run.stdout and "| 1,000 | 256 |" in run.stdout
    assert "Largest N at >= 20 rows/s per session" in run.stdout
