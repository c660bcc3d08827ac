"""`ms-ray train` and `ms-ray export`: the driver side of training.

Everything that can be checked before a worker starts is checked here (config, data folder,
schema against the data's manifest), so a mistake costs seconds, not a cluster start.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def run_dir_of(cfg) -> Path:
    return Path(cfg.run.storage).resolve() / cfg.run.name


def check_data(cfg) -> dict | None:
    """The data's manifest, checked against the config's schema; None when it is still to be
    prepared (data.prepare). Needs no Ray: mistakes surface before anything starts."""
    from ..data.pipeline import MANIFEST, load_manifest

    if cfg.data.prepare and not (Path(cfg.data.path) / MANIFEST).exists():
        return None
    return load_manifest(cfg.data.path, cfg.schema_.build(), f"train config {cfg.run.name}")


def prepare_data(cfg) -> dict:
    from ..config import PrepareConfig, load_config
    from ..data.pipeline import prepare

    print(f"data: {cfg.data.path} has no manifest; preparing it with {cfg.data.prepare}", flush=True)
    prepare(load_config(PrepareConfig, cfg.data.prepare, [f"output={cfg.data.path}"]))
    return check_data(cfg)


def train(cfg) -> dict:
    """Run a TorchTrainer over `train_worker`; re-running the same config resumes the run."""
    from ..ray_env import init_ray

    started = time.perf_counter()
    manifest = check_data(cfg)
    # A local cluster gets one logical CPU beyond the workers' so Ray Data can read the shards
    # while every worker holds its CPU (otherwise the read waits forever on a 2-core machine).
    workers_cpus = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    init_ray(cfg.address, num_cpus=max(os.cpu_count() or 1, workers_cpus + 1))
    manifest = manifest or prepare_data(cfg)
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .evaluate import format_skill_table
    from .loop import train_worker

    from ..data.pipeline import pack_dataset

    data_dir = Path(cfg.data.path).resolve()
    datasets = {s: ds for s in ("train", "validation") if (ds := pack_dataset(data_dir, s, manifest)) is not None}
    if "train" not in datasets:
        raise FileNotFoundError(f"data.path: {data_dir} has no training shards")
    if "validation" not in datasets:
        datasets["validation"] = datasets["train"].limit(0)
    run_dir = run_dir_of(cfg)
    scaling = cfg.scaling
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg.model_dump_json(by_alias=True), "run_dir": str(run_dir), "data_dir": str(data_dir)},
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker={"CPU": scaling.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=str(run_dir.parent),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),  # each rank picks its packs (see loop.rank_packs)
    )
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    wall = time.perf_counter() - started
    loop_s = metrics.get("time/train_loop_s", float("nan"))
    print(f"\n## {cfg.run.name}: {metrics.get('step', '?')} steps; training loop {loop_s:.0f} s, wall time {wall:.0f} s "
          f"with start-up ({scaling.num_workers} workers, ZeRO-{cfg.deepspeed.zero_stage}, {cfg.deepspeed.precision})")
    if any(k.startswith("skills/") for k in metrics):
        print(format_skill_table(metrics))
    if "val/loss" in metrics:
        print(f"validation loss {metrics['val/loss']:.4f}; export: {run_dir / 'export'}")
    metrics["wall_s"] = wall
    return metrics


def export(cfg, checkpoint: str | None, out: str | None) -> Path:
    """Consolidate the latest (or a given) checkpoint of a run into a MultiStreamLM folder."""
    from ..core.families import build_model
    from ..data.pipeline import load_manifest
    from ..data.tokenizer import load_tokenizer
    from .checkpoint import export_checkpoint

    run_dir = run_dir_of(cfg)
    if checkpoint is None:
        found = sorted((p for p in run_dir.glob("checkpoint_*") if (p / "ds").is_dir()), key=os.path.getmtime)
        if not found:
            raise FileNotFoundError(f"no checkpoint under {run_dir}; train first or pass --checkpoint")
        checkpoint = str(found[-1])
    manifest = load_manifest(cfg.data.path)
    schema = cfg.schema_.build()
    tokenizer = load_tokenizer(Path(cfg.data.path) / manifest["tokenizer"]["path"], schema)
    path = export_checkpoint(checkpoint, out or run_dir / "export", lambda: build_model(cfg.model, schema, tokenizer)[0], tokenizer)
    print(f"exported {checkpoint} -> {path}")
    return path
