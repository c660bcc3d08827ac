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
