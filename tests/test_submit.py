"""`ms-ray submit` and `ms-ray jobs` against a real `ray start --head` cluster with token auth."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ms_ray.cli import old_form
from ms_ray.submit import EXCLUDES, SubmitError, check_package, command_for, package_files, probe

ROOT = Path(__file__).resolve().parents[1]


def ms_ray(*args, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "ms_ray.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_package_excludes_and_size(tmp_path):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "a.yaml").write_text("x: 1\n")
    for skipped in (".git/objects/pack", ".venv/lib", "runs/train", "wandb/run", "ms_ray/__pycache__"):
        (tmp_path / skipped).mkdir(parents=True)
        (tmp_path / skipped / "blob").write_bytes(b"0" * 1000)
    (tmp_path / "model.safetensors").write_bytes(b"0" * 1000)
    with open(tmp_path / "big.dat", "wb") as f:  # sparse: sized, not written
        f.truncate(3 * 2**20)
    files = package_files(tmp_path, EXCLUDES)
    assert [rel for _, rel in files] == ["big.dat", "jobs/a.yaml"]
    assert check_package(tmp_path, 4 * 2**20) == 3 * 2**20 + 5
    with pytest.raises(SubmitError, match=r"3\.0 MiB  big\.dat") as e:
        check_package(tmp_path, 2**20)
    assert "over Ray's limit of 1 MiB" in str(e.value)


def test_each_config_kind_becomes_its_own_command():
    """`python -m ms_ray.cli COMMAND CONFIG key=value ...`: the one form of every job command."""
    expected = {
        ("jobs/tiny.yaml", "optim.max_steps=500"): "train jobs/tiny.yaml optim.max_steps=500",
        ("jobs/data-skills.yaml",): "prepare jobs/data-skills.yaml",
        ("jobs/tokenizer.yaml", "vocab_size=600"): "tokenizer jobs/tokenizer.yaml vocab_size=600",
        ("jobs/compare-tiny.yaml",): "compare jobs/compare-tiny.yaml",
        ("jobs/eval.yaml", "checkpoint=/mnt/shared/x"): "eval jobs/eval.yaml checkpoint=/mnt/shared/x",
    }
    for (config, *overrides), command in expected.items():
        entrypoint = command_for(config, overrides)
        assert entrypoint == f"python -m ms_ray.cli {command}"
        name, *words = command.split()
        assert old_form(name, words) is None, entrypoint  # what the job runs, the CLI takes
    with pytest.raises(SubmitError, match="not a train, prepare, tokenizer, compare or eval config"):
        command_for("serve/local.yaml", [])


def closed_port() -> int:
    import socket

    with socket.socket() as s:  # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_address_fails_in_seconds_naming_it(monkeypatch):
    import socket
    import time

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    port = closed_port()
    with pytest.raises(SubmitError, match=f"cannot reach the Ray dashboard at http://127.0.0.1:{port}: ConnectError"):
        probe(f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(SubmitError, match=f"no Ray cluster answers at 127.0.0.1:{port}.*http://HEAD:8265"):
        probe(f"127.0.0.1:{port}")  # a GCS address (ray_env's TCP probe): Ray's client retried it for ~40 s
    assert time.monotonic() - started < 5
    with socket.socket() as silent:  # accepts connections (backlog) but never answers: Ray's client hangs for good
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(SubmitError, match=f"at {url}: ReadTimeout.*within 1 s"):
            probe(url, timeout_s=1)
        assert time.monotonic() - started < 5
    monkeypatch.setenv("RAY_ADDRESS", f"http://127.0.0.1:{port}")  # Ray's client lets the environment win: say so
    env_named = f"127.0.0.1:{port} \\(from the environment; --address http://elsewhere:8265\\)"
    with pytest.raises(SubmitError, match=env_named):
        probe("http://elsewhere:8265")


def test_submit_and_jobs_against_nothing_exit_2_naming_the_address():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    port = closed_port()
    for args, named in ((["submit", "jobs/tiny.yaml", "--address", f"http://127.0.0.1:{port}"],
                         f"http://127.0.0.1:{port}"),
                        (["jobs", "list", "--address", f"127.0.0.1:{port}"], f"127.0.0.1:{port}")):
        run = ms_ray(*args, env=env, timeout=120)  # ~1 s each on an idle machine (jobs list: 42 s before)
        assert run.returncode == 2 and named in run.stderr, run.stderr[-2000:]


@pytest.mark.slow
def test_submit_follow_logs_stop_list_on_a_token_cluster(ray_head, data_dir, tmp_path):
    env, address = ray_head["env"], ray_head["dashboard"]
    # data_dir: made on the in-process test Ray (shared with the training tests); the cluster reads it by path
    short = [f"data.path={data_dir}", "data.prepare=null", "optim.max_steps=6", "optim.warmup_steps=1",
             "eval.examples_per_task=0", "eval.max_val_batches=1", "run.log_every=2", f"run.storage={tmp_path}/runs",
             "wandb.mode=offline"]
    first, second = f"tiny-{uuid.uuid4().hex[:6]}", f"long-{uuid.uuid4().hex[:6]}"

    run = ms_ray("submit", "jobs/tiny.yaml", *short, "run.name=short", "--address", address, "--follow",
                 "--name", first, "--token", ray_head["token"], env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"job {first}" in run.stdout and f"job {first} SUCCEEDED" in run.stdout
    assert "step" in run.stdout  # the training's own log lines, followed live
    assert (tmp_path / "runs" / "short" / "export").exists()  # the job trained and exported on the cluster

    logs = ms_ray("jobs", "logs", first, "--address", address, env=env)
    assert logs.returncode == 0 and "step" in logs.stdout

    started = ms_ray("submit", "jobs/tiny.yaml", *short, "optim.max_steps=100000", "run.name=long", "--address",
                     address, "--name", second, env=env)
    assert started.returncode == 0 and f"job {second}" in started.stdout, started.stderr[-3000:]
    stopped = ms_ray("jobs", "stop", second, "--address", address, env=env)
    assert stopped.returncode == 0 and f"job {second} STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr

    listed = ms_ray("jobs", "list", "--address", address, env=env)
    lines = {line.split()[0]: line.split()[1] for line in listed.stdout.splitlines()[1:] if line.strip()}
    assert lines[first] == "SUCCEEDED" and lines[second] == "STOPPED"

    # refused before upload: nothing new reaches the cluster
    big = tmp_path / "workdir"
    (big / "jobs").mkdir(parents=True)
    (big / "jobs" / "tiny.yaml").write_text((ROOT / "jobs" / "tiny.yaml").read_text())
    with open(big / "dataset.dat", "wb") as f:
        f.truncate(600 * 2**20)  # sparse, over Ray's 512 MiB package limit
    refused = ms_ray("submit", "jobs/tiny.yaml", *short, "--working-dir", str(big), "--address", address, env=env)
    assert refused.returncode == 2 and "over Ray's limit" in refused.stderr and "dataset.dat" in refused.stderr
    after = ms_ray("jobs", "list", "--address", address, env=env)
    assert len(after.stdout.splitlines()) == len(listed.stdout.splitlines())

    no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")} | {"HOME": str(tmp_path)}
    denied = ms_ray("jobs", "list", "--address", address, env=no_token)
    assert denied.returncode == 2 and "token" in denied.stderr.lower(), denied.stderr[-2000:]
    missing = ms_ray("jobs", "logs", "no-such-job", "--address", address, env=env)
    assert missing.returncode == 2 and "no-such-job" in missing.stderr
