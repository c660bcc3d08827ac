"""`ms-ray preflight [CONFIG] [key=value ...] [--address A]`: what a long run needs, checked on
every node first. CONFIG is the training config (default jobs/tiny.yaml); --address, else the
config's `address`, else RAY_ADDRESS, else a local Ray.

  storage   each node writes a probe file under the run's storage and reads it back, then every
            node must see every other node's probe (checkpoints need ONE shared storage). Only
            the run.storage folder itself is ever created, and only where its parent exists: a
            missing parent (/mnt/shared not mounted) fails the check and creates nothing;
  versions  torch, ray, deepspeed, transformers and Python agree across nodes;
  gpus      what each node sees; with scaling.use_gpu every worker node needs GPUs;
  backend   the collective backend the run uses is available: gloo on every node, or nccl on
            every node with GPUs (and there must be one; CPU-only nodes run no GPU worker);
  network   the interface gloo will use on each node (GLOO_SOCKET_IFNAME where the cluster sets
            it, else the one holding the node's Ray address): it must exist there;
  nodes     every node listed alive answered; one that dies during the checks fails this check
            (named), and the other checks report on the nodes that answered.
  wandb     the mode the run will use (ms_ray.tracking.wandb_mode: auto is online only with
            WANDB_API_KEY): offline/disabled pass; online needs the key and a reachable server.
A failed check says what to fix. Exit code 0 only if every check passed. Every wait is bounded:
the probes get 120 s (PROBE_TIMEOUT_S), the W&B server 5 s.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

from .config import TrainConfig, load_config
from .ray_env import alive_nodes, collective_interface, init_ray, set_environment
from .submit import SubmitError, use_token
from .tracking import wandb_mode

PACKAGES = ("torch", "ray", "deepspeed", "transformers")
PROBE_TIMEOUT_S = 120


class PreflightError(SubmitError):
    """The check itself could not run (a node did not answer): exit code 2, like a refused submit."""


def node_probe(storage: str, node: str, phase: str) -> dict:
    """Runs ON a node: write/read a probe (phase "write") or list the probes (phase "read")."""
    import importlib.metadata as md
    import platform

    import ray

    out = {"node": node, "host": platform.node(), "ip": ray.util.get_node_ip_address()}
    out["interface"], out["interface_why"] = collective_interface(out["ip"])
    root = Path(storage)
    folder = root / ".preflight"
    try:
        if phase == "write":
            if not root.parent.exists():  # never create the mount point (or anything above the storage)
                out["missing"] = str(next(p for p in root.parents if p.parent.exists()))  # topmost missing folder
                return out | _node_facts(md, platform)
            root.mkdir(exist_ok=True)
            folder.mkdir(exist_ok=True)
            probe = folder / f"{node}.probe"
            probe.write_text(node)
            out["storage"] = probe.read_text() == node
        else:
            out["seen"] = sorted(p.stem for p in folder.glob("*.probe"))
    except OSError as e:
        out["error"] = f"{type(e).__name__}: {e}"
    return out | _node_facts(md, platform) if phase == "write" else out


def _node_facts(md, platform) -> dict:
    out = {"versions": {p: _version(md, p) for p in PACKAGES} | {"python": platform.python_version()}}
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


def on_every_node(ray, nodes: dict[str, str], storage: str, phase: str) -> tuple[list[dict], dict[str, str]]:
    """Run the probe on each node ({node id: address}): (the answers, {node: why it gave none}).
    A node that dies meanwhile is one of the second (a node listed alive may be gone by the
    time its probe is scheduled: the GCS notices a death only after its health checks)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(node_probe)
    refs = {task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False))
            .remote(storage, n[:12], phase): n for n in nodes}
    _, pending = ray.wait(list(refs), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
    answers, silent = [], {}
    for ref, node in refs.items():
        name = f"{node[:12]} ({nodes[node]})"
        if ref in pending:
            ray.cancel(ref, force=True)
            silent[name] = (f"no answer in {PROBE_TIMEOUT_S} s: check that it is alive (`ray status`) "
                            "and not out of memory")
            continue
        try:
            answers.append(ray.get(ref))
        except ray.exceptions.RayError as e:  # the node died, or the probe could not run there
            silent[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
    return answers, silent


def check_wandb(mode: str) -> tuple[bool, str]:
    """The W&B mode the run will use, by the run's own rule (tracking.wandb_mode), and whether it
    can work: offline/disabled always can; online needs WANDB_API_KEY and a reachable server."""
    effective = wandb_mode(SimpleNamespace(mode=mode))
    key = "WANDB_API_KEY set" if effective == "online" else "no WANDB_API_KEY"
    how = f"wandb.mode={mode}" + (f" -> {effective} ({key})" if mode == "auto" else "")
    if effective == "disabled":
        return True, f"{how}: no W&B logging"
    if effective == "offline":
        return True, f"{how}: runs are written offline under the run folder (wandb sync later)"
    if not os.environ.get("WANDB_API_KEY"):
        return False, f"{how} but no WANDB_API_KEY: set the key, or wandb.mode=auto/offline"
    import httpx

    url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    try:
        httpx.get(url, timeout=5)
        return True, f"{how}: {url} reachable"
    except httpx.HTTPError as e:
        return False, f"{how}: {url} unreachable ({type(e).__name__}): fix the network or use wandb.mode=offline"


def check_backend(use_gpu: bool, wrote: dict[str, dict]) -> tuple[bool, str]:
    """gloo must work on every node; nccl on every node with GPUs, and at least one node must have
    them (a CPU-only head runs no GPU worker, so it is not asked for nccl)."""
    if not use_gpu:
        missing = [n for n, r in wrote.items() if not r["gloo"]]
        return (not missing, "gloo available on every node" if not missing else
                f"gloo unavailable on {missing}: install a torch build with gloo")
    gpu_nodes = [n for n, r in wrote.items() if r["gpus"] > 0]
    if not gpu_nodes:
        return False, (f"nccl unavailable: no node has a GPU ({', '.join(f'{n}=0' for n in wrote)}); nccl needs "
                       "CUDA GPUs: start GPU workers, or scaling.use_gpu=false for gloo on CPUs")
    missing = [n for n in gpu_nodes if not wrote[n]["nccl"]]
    cpu_only = sorted(set(wrote) - set(gpu_nodes))
    if missing:
        return False, f"nccl unavailable on {missing} (GPU nodes): install a CUDA torch build with nccl"
    return True, (f"nccl available on the {len(gpu_nodes)} GPU node(s)"
                  + (f"; CPU-only {cpu_only} run no GPU worker" if cpu_only else ""))


def preflight_command(config: str, overrides: list[str], address: str | None = None, token: str | None = None) -> int:
    """`ms-ray preflight`: the checks for a training config (its input paths are the cluster's:
    not checked here), on the cluster at `address` (default: the config's own `address`)."""
    use_token(token)
    cfg = load_config(TrainConfig, config, overrides, check_paths=False)
    address = address or cfg.address
    set_environment(address)
    return preflight(cfg, address)


def preflight(cfg, address: str | None = None) -> int:
    storage = str(Path(cfg.run.storage).absolute())  # every node gets the same path
    try:
        ray = init_ray(address)
    except ConnectionError as e:  # nothing answers at --address (ray_env's bounded check, or Ray's own)
        raise PreflightError(str(e)) from None
    nodes = alive_nodes()
    started = time.perf_counter()
    answers, silent = on_every_node(ray, nodes, storage, "write")
    wrote = {r["node"]: r for r in answers}
    answers, silent_read = on_every_node(ray, {n: ip for n, ip in nodes.items() if n[:12] in wrote}, storage, "read")
    seen = {r["node"]: r for r in answers}
    silent |= silent_read
    if not wrote:
        raise PreflightError(f"no node answered the probes: {silent}")
    wrote = {n: r for n, r in wrote.items() if n in seen}  # the nodes that answered both
    checks = [("nodes", not silent, f"{len(wrote)} of {len(nodes)} listed alive answered" + (
                   "" if not silent else "; " + "; ".join(f"node {n}: {why}" for n, why in silent.items())
                   + ". A node that died is reported here; the other checks cover the nodes that answered")),
              ("storage", *check_storage(storage, wrote, seen)), ("versions", *check_versions(wrote))]

    gpus = {n: r["gpus"] for n, r in wrote.items()}
    if cfg.scaling.use_gpu and sum(gpus.values()) < cfg.scaling.num_workers:
        checks.append(("gpus", False, f"scaling.use_gpu with {cfg.scaling.num_workers} workers, but the nodes see "
                                      f"{gpus}: check drivers / the GPU worker group, or lower scaling.num_workers"))
    else:
        checks.append(("gpus", True, f"{sum(gpus.values())} GPU(s): " + ", ".join(f"{n}={g}" for n, g in gpus.items())))
    checks.append(("backend", *check_backend(cfg.scaling.use_gpu, wrote)))
    checks.append(("network", *check_network(cfg.scaling.use_gpu, wrote)))
    checks.append(("wandb", *check_wandb(cfg.wandb.mode)))

    print(f"ms-ray preflight: {len(nodes)} node(s), storage {storage}, {time.perf_counter() - started:.1f} s")
    for name, ok, detail in checks:
        print(f"  {'ok  ' if ok else 'FAIL'}  {name:<9} {detail}")
    return 0 if all(ok for _, ok, _ in checks) else 1


def check_network(use_gpu: bool, wrote: dict[str, dict]) -> tuple[bool, str]:
    """The interface gloo will use on every node (ms_ray.ray_env.collective_interface: what the
    training workers themselves pick), which must exist; nccl picks its own."""
    if use_gpu:
        return True, "nccl chooses its interfaces (NCCL_SOCKET_IFNAME to override)"
    failed = {n: r["interface_why"] for n, r in wrote.items() if r["interface"] is None}
    if failed:
        return False, "; ".join(f"node {n} ({wrote[n]['ip']}): {why}" for n, why in failed.items())
    return True, "gloo on " + ", ".join(f"{r['interface']} ({r['ip']}) on {n}" for n, r in wrote.items())


def check_storage(storage: str, wrote: dict[str, dict], seen: dict[str, dict]) -> tuple[bool, str]:
    """Every node wrote and read its probe under `storage`, and sees every other node's."""
    absent = {n: r["missing"] for n, r in wrote.items() if "missing" in r}
    failed = {n: r.get("error", "probe read back wrong") for n, r in wrote.items() if not r.get("storage")}
    blind = {n: missing for n, r in seen.items() if (missing := sorted(set(wrote) - set(r.get("seen", []))))}
    if absent:
        detail = "; ".join(f"{m} does not exist on node {n} ({wrote[n]['host']})" for n, m in absent.items())
        return False, (f"run.storage {storage}: {detail}. Mount the shared storage there on every node (preflight "
                       "creates only the run.storage folder itself, inside an existing one), or set run.storage "
                       "to a path every node can write")
    if failed:
        detail = "; ".join(f"node {n} ({wrote[n]['host']}): {e}" for n, e in failed.items())
        return False, (f"cannot write {storage}: {detail}. Mount shared storage there on every node, or set "
                       "run.storage to a path every node can write")
    if blind:
        detail = "; ".join(f"node {n} does not see {m}" for n, m in blind.items())
        return False, (f"{storage} is not shared: {detail}. Checkpoints need one storage all nodes mount (NFS, "
                       "EFS, a ReadWriteMany volume)")
    return True, f"{len(wrote)} node(s) wrote, read and see each other's probes in {storage}"


def check_versions(wrote: dict[str, dict]) -> tuple[bool, str]:
    """torch, ray, deepspeed, transformers and Python: the same on every node, none missing."""
    versions = {n: r["versions"] for n, r in wrote.items()}
    differ = [p for p in (*PACKAGES, "python") if len({v[p] for v in versions.values()}) > 1]
    if differ or any("missing" in v.values() for v in versions.values()):
        detail = "; ".join(f"{p}: " + ", ".join(f"{n}={v[p]}" for n, v in versions.items()) for p in differ or PACKAGES)
        return False, f"{detail}. Install the same versions on every node (one image)"
    one = next(iter(versions.values()))
    return True, ", ".join(f"{p} {one[p]}" for p in (*PACKAGES, "python"))
