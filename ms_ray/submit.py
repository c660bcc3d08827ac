"""Ray Jobs: `ms-ray submit CONFIG --address http://HEAD:8265 [--follow]` and `ms-ray jobs ...`.

The job runs the same `ms-ray` command on the cluster, with the working directory uploaded by
Ray (minus EXCLUDES). The config is validated here first, and the upload is sized here first: a
package over Ray's limit is refused before anything leaves this machine, naming the biggest files.
Token auth (Ray >= 2.52): the token comes from --token, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token, the places Ray itself reads.
"""

from __future__ import annotations

import fnmatch
import os
import shlex
import time
from pathlib import Path

EXCLUDES = [  # never uploaded: history, environments, outputs, caches, data
    ".git", ".venv", "venv", "runs", "wandb", ".cache", "checkpoints", "data", "__pycache__", "*.pyc",
    ".pytest_cache", "node_modules", "*.safetensors", "*.pt", "*.bin", "*.parquet",
]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(RuntimeError):
    """Refused before submission; the message says what to change."""


def package_limit_bytes() -> int:
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    return GCS_STORAGE_MAX_SIZE


def excluded(rel: str, name: str, patterns) -> bool:
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(rel, p) for p in patterns)


def package_files(root: Path, patterns=EXCLUDES) -> list[tuple[int, str]]:
    """(size, relative path) of every file Ray would upload, biggest first (an upper bound:
    Ray also skips what .gitignore lists)."""
    files = []
    for folder, dirs, names in os.walk(root):
        rel_folder = os.path.relpath(folder, root)
        dirs[:] = [d for d in dirs if not excluded(os.path.normpath(os.path.join(rel_folder, d)), d, patterns)]
        for name in names:
            rel = os.path.normpath(os.path.join(rel_folder, name))
            path = os.path.join(folder, name)
            if not excluded(rel, name, patterns) and os.path.isfile(path):
                files.append((os.path.getsize(path), rel))
    return sorted(files, reverse=True)


def check_package(root: Path, limit: int, patterns=EXCLUDES) -> int:
    files = package_files(root, patterns)
    total = sum(size for size, _ in files)
    if total > limit:
        biggest = "\n".join(f"  {size / 2**20:9.1f} MiB  {rel}" for size, rel in files[:5])
        raise SubmitError(
            f"the working directory {root} would upload {total / 2**20:.1f} MiB, over Ray's limit of "
            f"{limit / 2**20:.0f} MiB. Largest files:\n{biggest}\n"
            "Move data and checkpoints to cluster storage (and point the config there), or exclude them.")
    return total


def use_token(token: str | None) -> None:
    """Make Ray's client send the cluster token (its own sources, or the one given)."""
    if token:
        os.environ["RAY_AUTH_TOKEN"] = token
    has_token = (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                 or (Path.home() / ".ray" / "auth_token").exists())
    if has_token and os.environ.get("RAY_AUTH_MODE", "disabled") == "disabled":
        os.environ["RAY_AUTH_MODE"] = "token"


def client(address: str, token: str | None = None):
    from ray.job_submission import JobSubmissionClient

    use_token(token)
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # connection refused, 401, wrong URL
        hint = " (token auth: pass --token or set RAY_AUTH_TOKEN)" if "401" in str(e) or "nauthor" in str(e) else ""
        raise SubmitError(f"cannot reach the Ray dashboard at {address}: {e}{hint}") from None


def command_for(config: str, overrides: list[str]) -> str:
    """The ms-ray command a config file belongs to (validated here, without input paths that
    only exist on the cluster)."""
    from .config import (CompareConfig, ConfigError, EvalJobConfig, PrepareConfig, TokenizerTrainConfig, TrainConfig,
                         load_config)

    errors = []
    for name, cls in (("train", TrainConfig), ("prepare", PrepareConfig), ("tokenizer train", TokenizerTrainConfig),
                      ("compare", CompareConfig), ("eval --config", EvalJobConfig)):
        try:
            load_config(cls, config, overrides, check_paths=False)
            # python -m runs the uploaded ms_ray (the job's working directory), not an older install
            return " ".join(["python -m ms_ray.cli", name, shlex.quote(config), *map(shlex.quote, overrides)])
        except ConfigError as e:
            errors.append(str(e))
    if any("does not exist" in e for e in errors):
        raise SubmitError(errors[0])
    shortest = min(errors, key=len)
    raise SubmitError(f"{config} is not a train, prepare, tokenizer, compare or eval config; as the closest fit:\n{shortest}")


def submit(config: str, overrides: list[str], address: str, follow: bool = False, token: str | None = None,
           working_dir: str = ".", name: str | None = None, env: list[str] = ()) -> int:
    entrypoint = command_for(config, overrides)
    root = Path(working_dir).resolve()
    if not (root / config).exists() and not Path(config).is_absolute():
        raise SubmitError(f"{config} is not inside the working directory {root}: the job would not find it")
    size = check_package(root, package_limit_bytes())
    env_vars = dict(e.split("=", 1) for e in env)
    for key in ("WANDB_API_KEY", "WANDB_MODE", "DS_ACCELERATOR", "HF_HUB_OFFLINE"):
        if key in os.environ:
            env_vars.setdefault(key, os.environ[key])
    jobs = client(address, token)
    job_id = jobs.submit_job(
        entrypoint=entrypoint, submission_id=name,
        runtime_env={"working_dir": str(root), "excludes": EXCLUDES, "env_vars": env_vars},
        metadata={"ms_ray_config": config},
    )
    print(f"ms-ray submit: job {job_id} ({size / 2**20:.1f} MiB uploaded): {entrypoint}", flush=True)
    if not follow:
        return 0
    return follow_job(jobs, job_id)


def follow_job(jobs, job_id: str) -> int:
    """Print the job's logs as they come; the exit code is 0 only if it SUCCEEDED."""
    import asyncio

    async def tail():
        async for lines in jobs.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    status = wait(jobs, job_id, timeout_s=60)
    print(f"ms-ray: job {job_id} {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1


def wait(jobs, job_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while (status := str(jobs.get_job_status(job_id).value)) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
    return status


def jobs_command(action: str, address: str, job_id: str | None = None, follow: bool = False,
                 token: str | None = None) -> int:
    jobs = client(address, token)
    try:
        return _jobs_action(jobs, action, job_id, follow)
    except RuntimeError as e:  # the dashboard's answer, e.g. an unknown job id
        raise SubmitError(f"{action} {job_id or ''}: {e}") from None


def _jobs_action(jobs, action: str, job_id: str | None, follow: bool) -> int:
    if action == "list":
        rows = sorted(jobs.list_jobs(), key=lambda j: j.start_time or 0)
        print(f"{'job':<28} {'status':<10} {'started':<19} entrypoint")
        for j in rows:
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else "-"
            print(f"{j.submission_id or j.job_id:<28} {str(j.status.value):<10} {started:<19} {j.entrypoint}")
        return 0
    if job_id is None:
        raise SubmitError(f"ms-ray jobs {action} needs a job id (see `ms-ray jobs list`)")
    if action == "logs":
        if follow:
            return follow_job(jobs, job_id)
        print(jobs.get_job_logs(job_id), end="")
        return 0
    if action == "stop":
        jobs.stop_job(job_id)
        status = wait(jobs, job_id, timeout_s=60)
        print(f"ms-ray: job {job_id} {status}")
        return 0 if status in TERMINAL else 1
    raise SubmitError(f"unknown action {action!r}: list, logs or stop")
