"""`ms-ray serve` as a person starts it: its own process (serve/local.yaml, embedded Ray on 127.0.0.1),
for the tests that drive it over real sockets (the web page, live sessions with a trained model)."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from ms_ray.serving.client import wait_ready

ROOT = Path(__file__).resolve().parent.parent
MONITOR_KEY = "web-test-monitor-key"  # serve/local.yaml reads it from MS_RAY_MONITOR_KEY


def start_serve(checkpoint, overrides: list[str], log: Path, config: str | None = None):
    """`ms-ray serve [CONFIG] checkpoint=PATH` (default serve/local.yaml) on a free port of
    127.0.0.1, in its own process group; returns (process, base URL) once it is ready."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(MS_RAY_MONITOR_KEY=MONITOR_KEY, MS_RAY_OPERATOR_KEY="", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ms_ray.cli", "serve", *([config] if config else []), f"checkpoint={checkpoint}",
         f"port={port}", "log_level=WARNING", "model.num_cpus=0", *overrides],
        cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 240)
    except TimeoutError:
        stop_serve(proc)
        raise AssertionError(f"ms-ray serve was not ready in 240 s:\n{log.read_text()[-3000:]}") from None
    return proc, url


def stop_serve(proc) -> None:
    """Ctrl-C (a clean Serve shutdown), then SIGKILL to its process group if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
