"""`ms-ray preflight [CONFIG] [--address]`: what a long run needs, checked on every node first.

  storage   each node writes a probe file under the run's storage and reads it back, then every
            node must see every other node's probe (checkpoints need ONE shared storage);
  versions  torch, ray, deepspeed, transformers and Python agree across nodes;
  gpus      what each node sees; with scaling.use_gpu every worker node needs GPUs;
  backend   the collective backend the run uses (nccl with GPUs, gloo without) is available;
  wandb     offline/disabled, or a key and a reachable server.
A failed check says what to fix. Exit code 0 only if every check passed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PACKAGES = ("torch", "ray", "deepspeed", "transformers")


def node_probe(storage: str, node: str, phase: str) -> dict:
    """Runs ON a node: write/read a probe (phase "write") or list the probes (phase "read")."""
    import importlib.metadata as md
    import platform

    out = {"node": node, "host": platform.node()}
    folder = Path(storage) / ".preflight"
    try:
        if phase == "write":
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f"{node}.probe"
            probe.write_text(node)
            out["storage"] = probe.read_text() == node
        else:
            out["seen"] = sorted(p.stem for p in folder.glob("*.probe"))
    except OSError as e:
        out["error"] = f"{type(e).__name__}: {e}"
    if phase == "write":
        out["versions"] = {p: _version(md, p) for p in PACKAGES} | {"python": platform.python_version()}
        try:
            import torch
            import torch.distributed as dist

            out["gpus"] = torch.cuda.device_count()
            out["nccl"] = dist.is_nccl_available() and out["gpus"] > 0
            out["gloo"] = dist.is_gloo_available()
        except Exception as e:  # torch missing or broken on that node
            out["gpus"], out["nccl"], out["gloo"] = 0, False, False
            out["torch_error"] = repr(e)
    return out


def _version(md, package: str) -> str:
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return "missing"


def on_every_node(ray, nodes: list[str], storage: str, phase: str) -> list[dict]:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0)(node_probe)
    return ray.get([task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False))
                    .remote(storage, n[:12], phase) for n in nodes], timeout=120)


def check_wandb(mode: str) -> tuple[bool, str]:
    env_mode = os.environ.get("WANDB_MODE")
    if mode in ("offline", "disabled") or env_mode in ("offline", "disabled", "dryrun"):
        return True, f"offline mode ({mode if mode != 'auto' else 'WANDB_MODE=' + str(env_mode)}): runs sync later"
    if not os.environ.get("WANDB_API_KEY"):
        return False, "no WANDB_API_KEY and W&B is not offline: set the key, or WANDB_MODE=offline / wandb.mode=offline"
    import httpx

    url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    try:
        httpx.get(url, timeout=5)
        return True, f"{url} reachable"
    except httpx.HTTPError as e:
        return False, f"{url} unreachable ({type(e).__name__}): fix the network or use WANDB_MODE=offline"


def preflight(cfg, address: str | None = None) -> int:
    from .ray_env import init_ray

    storage = str(Path(cfg.run.storage).absolute())  # every node gets the same path
    ray = init_ray(address)
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    started = time.perf_counter()
    wrote = {r["node"]: r for r in on_every_node(ray, nodes, storage, "write")}
    seen = {r["node"]: r for r in on_every_node(ray, nodes, storage, "read")}
    checks = []

    failed = {n: r.get("error", "probe read back wrong") for n, r in wrote.items() if not r.get("storage")}
    blind = {n: sorted(set(wrote) - set(r.get("seen", []))) for n, r in seen.items() if set(wrote) - set(r.get("seen", []))}
    if failed:
        detail = "; ".join(f"node {n} ({wrote[n]['host']}): {e}" for n, e in failed.items())
        checks.append(("storage", False, f"cannot write {storage}: {detail}. Mount shared storage there on every "
                                         "node, or set run.storage to a path every node can write"))
    elif blind:
        detail = "; ".join(f"node {n} does not see {m}" for n, m in blind.items())
        checks.append(("storage", False, f"{storage} is not shared: {detail}. Checkpoints need one storage "
                                         "all nodes mount (NFS, EFS, a ReadWriteMany volume)"))
    else:
        checks.append(("storage", True, f"{len(nodes)} node(s) wrote, read and see each other's probes in {storage}"))

    versions = {n: r["versions"] for n, r in wrote.items()}
    differ = [p for p in (*PACKAGES, "python") if len({v[p] for v in versions.values()}) > 1]
    if differ or any("missing" in v.values() for v in versions.values()):
        detail = "; ".join(f"{p}: " + ", ".join(f"{n}={v[p]}" for n, v in versions.items()) for p in differ or PACKAGES)
        checks.append(("versions", False, f"{detail}. Install the same versions on every node (one image)"))
    else:
        one = next(iter(versions.values()))
        checks.append(("versions", True, ", ".join(f"{p} {one[p]}" for p in (*PACKAGES, "python"))))

    gpus = {n: r["gpus"] for n, r in wrote.items()}
    if cfg.scaling.use_gpu and sum(gpus.values()) < cfg.scaling.num_workers:
        checks.append(("gpus", False, f"scaling.use_gpu with {cfg.scaling.num_workers} workers, but the nodes see "
                                      f"{gpus}: check drivers / the GPU worker group, or lower scaling.num_workers"))
    else:
        checks.append(("gpus", True, f"{sum(gpus.values())} GPU(s): " + ", ".join(f"{n}={g}" for n, g in gpus.items())))

    backend = "nccl" if cfg.scaling.use_gpu else "gloo"
    missing = [n for n, r in wrote.items() if not r[backend] and (backend == "gloo" or r["gpus"])]
    checks.append(("backend", not missing, f"{backend} available on every node" if not missing else
                   f"{backend} unavailable on {missing}: install a torch build with {backend}"))

    checks.append(("wandb", *check_wandb(cfg.wandb.mode)))

    print(f"ms-ray preflight: {len(nodes)} node(s), storage {storage}, {time.perf_counter() - started:.1f} s")
    for name, ok, detail in checks:
        print(f"  {'ok  ' if ok else 'FAIL'}  {name:<9} {detail}")
    return 0 if all(ok for _, ok, _ in checks) else 1
