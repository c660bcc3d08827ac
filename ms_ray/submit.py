"""Ray Jobs: `ms-ray submit CONFIG [key=value ...] --address http://HEAD:8265 [--follow]` and
`ms-ray jobs list|logs|stop`.

`ms-ray submit` runs a train, prepare, tokenizer, eval or compare config as a Ray Job: the
command that config belongs to (`command_for`) runs on the cluster as `python -m ms_ray.cli
COMMAND CONFIG key=value ...` in the working directory Ray uploads, so a cluster without ms_ray
installed runs this checkout. The config is validated here first, and the upload is listed and sized here first with
Ray's own walk and matcher (`package_files`): a package over Ray's limit is refused before
anything leaves this machine, naming the biggest files.

EXCLUDES are Ray `excludes` patterns: gitignore-style, matched against the path relative to the
working directory. A leading "/" anchors a pattern at the working-directory root ("/data" is the
top-level data folder only, never `ms_ray/data/`); a pattern without a "/" matches a name at any
depth. Ray adds its default excludes (.git, .venv, venv, __pycache__) and .gitignore / .rayignore.

The dashboard is probed first with short timeouts (a GCS address with ray_env's TCP probe): an
address where nothing answers fails in seconds, naming the address. Token auth (Ray >= 2.52):
the token comes from --token, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, the
places Ray itself reads.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from pathlib import Path

from .config import (
    CompareConfig,
    ConfigError,
    EvalJobConfig,
    PrepareConfig,
    TokenizerTrainConfig,
    TrainConfig,
    load_config,
)
from .ray_env import RayAddressError, check_reachable

EXCLUDES = [  # never uploaded. "/x": the top-level x only (ms_ray/data/ is code); "x": x at any depth
    "/runs", "/wandb", "/checkpoints", "/data",  # outputs and data at the root (the configs' defaults)
    ".git", ".venv", "venv", ".cache", "__pycache__", "*.pyc", ".pytest_cache", "node_modules",
    "*.safetensors", "*.pt", "*.bin", "*.parquet",  # weights and shards, wherever they are
]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
PROBE_TIMEOUT_S = 10  # connecting to the dashboard (or the GCS of a host:port address)
JOBS_FIX = "Ray Jobs go to the dashboard: --address http://HEAD:8265"
# the configs a job can run, tried in this order: (the command, its config); `ms-ray CMD CONFIG key=value ...`
SUBMITTABLE = (("train", TrainConfig), ("prepare", PrepareConfig), ("tokenizer", TokenizerTrainConfig),
               ("compare", CompareConfig), ("eval", EvalJobConfig))


class SubmitError(RuntimeError):
    """Refused before submission; the message says what to change."""


def package_limit_bytes() -> int:
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    return GCS_STORAGE_MAX_SIZE


def ray_excludes(patterns=EXCLUDES) -> list[str]:
    """The patterns Ray applies to a working_dir uploaded with `excludes=patterns`: its default
    excludes first (RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES changes them), as
    ray._private.runtime_env.working_dir.upload_working_dir_if_needed combines them."""
    from ray._private import ray_constants

    return ray_constants.get_runtime_env_default_excludes() + list(patterns)


def include_gitignore() -> bool:
    """Whether Ray's job client honours .gitignore files (as JobSubmissionClient decides it)."""
    from ray._private.ray_constants import RAY_RUNTIME_ENV_IGNORE_GITIGNORE

    return os.environ.get(RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"


def package_files(root: Path, patterns=EXCLUDES) -> list[tuple[int, str]]:
    """(size, relative path) of every file Ray uploads for working_dir=root with
    excludes=patterns, biggest first. Ray's own walk and matcher (packaging._dir_travel and
    _get_excludes: gitwildmatch patterns against the path relative to root, its default excludes,
    .gitignore and .rayignore at every level), so this is the zip's file list, not a guess."""
    from ray._private.runtime_env import packaging

    root = Path(root).absolute()
    files = []

    def handler(path: Path):
        if path.is_file():  # what packaging._zip_files writes (plus empty folders, 0 bytes)
            files.append((path.stat().st_size, path.relative_to(root).as_posix()))

    packaging._dir_travel(root, [packaging._get_excludes(root, ray_excludes(patterns))], handler,
                          include_gitignore=include_gitignore(), logger=logging.getLogger(__name__))
    return sorted(files, reverse=True)


def check_package(root: Path, limit: int, patterns=EXCLUDES) -> int:
    """The upload's size in bytes; refused over `limit`, or when it would leave out part of the
    ms_ray package in root (the job runs `python -m ms_ray.cli` from it)."""
    files = package_files(root, patterns)
    total = sum(size for size, _ in files)
    if (Path(root) / "ms_ray" / "__init__.py").is_file():
        code = {p.relative_to(root).as_posix() for p in Path(root, "ms_ray").rglob("*.py")
                if "__pycache__" not in p.parts}
        if left_out := sorted(code - {rel for _, rel in files}):
            raise SubmitError(f"the upload of {root} would leave out {len(left_out)} ms_ray source file(s), e.g. "
                              f"{', '.join(left_out[:3])}: a pattern in the excludes, .gitignore or .rayignore "
                              "matches them (anchor it at the root with a leading /)")
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


def probe(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Fail in seconds, naming the address, where nothing answers: Ray's job client sends its
    first request without a timeout (a port that accepts but never answers hangs it for good)
    and resolves a host:port address through the GCS with ~40 s of retries. RAY_API_SERVER_ADDRESS
    and RAY_ADDRESS replace `address`, as they do for Ray's client."""
    import httpx

    effective = os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or address
    named = address if effective == address else f"{effective} (from the environment; --address {address})"
    if effective.startswith(("http://", "https://")):
        try:  # any HTTP answer will do (401 included): the token is checked by Ray's own client
            httpx.get(effective.rstrip("/") + "/api/version", timeout=timeout_s)
        except httpx.HTTPError as e:
            raise SubmitError(f"cannot reach the Ray dashboard at {named}: {type(e).__name__}: {e or 'no answer'} "
                              f"(within {timeout_s:.0f} s). Is the head up and the URL http://HEAD:8265?") from None
        return
    if "://" in effective:  # ray://...: Ray's client resolves it
        return
    from ray._private import services

    try:
        host_port = services.canonicalize_bootstrap_address_or_die(effective)  # "auto": the local cluster's
    except (ValueError, ConnectionError) as e:
        raise SubmitError(f"cannot reach the Ray cluster at {named}: {type(e).__name__}: {e}. {JOBS_FIX}") from None
    try:
        check_reachable(host_port, timeout_s, JOBS_FIX, named if host_port == effective else f"{named} = {host_port}")
    except RayAddressError as e:
        raise SubmitError(str(e)) from None


def client(address: str, token: str | None = None):
    from ray.job_submission import JobSubmissionClient

    use_token(token)
    probe(address)
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # connection refused, 401, wrong URL
        hint = " (token auth: pass --token or set RAY_AUTH_TOKEN)" if "401" in str(e) or "nauthor" in str(e) else ""
        raise SubmitError(f"cannot reach the Ray dashboard at {address}: {e}{hint}") from None


def command_for(config: str, overrides: list[str]) -> str:
    """The ms-ray command a config file belongs to, as `python -m ms_ray.cli COMMAND CONFIG
    key=value ...` (validated here, without input paths that only exist on the cluster)."""
    errors = []
    for name, cls in SUBMITTABLE:
        try:
            load_config(cls, config, overrides, check_paths=False)
            # python -m runs the uploaded ms_ray (the job's working directory), not an older install
            return " ".join(["python -m ms_ray.cli", name, shlex.quote(config), *map(shlex.quote, overrides)])
        except ConfigError as e:
            errors.append(str(e))
    if any("does not exist" in e for e in errors):
        raise SubmitError(errors[0])
    shortest = min(errors, key=len)
    *names, last = (name for name, _ in SUBMITTABLE)
    raise SubmitError(f"{config} is not a {', '.join(names)} or {last} config; as the closest fit:\n{shortest}")


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
