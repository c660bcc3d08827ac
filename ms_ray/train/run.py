"""`ms-ray train` and `ms-ray export`: the driver side of training.

Everything that can be checked before a worker starts is checked here (config, data folder,
schema against the data's manifest), so a mistake costs seconds, not a cluster start.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import ray
import torch
from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ..config import ConfigError, PrepareConfig, load_config
from ..core.families import build_model
from ..core.loading import load_tokenizer
from ..data.pipeline import pack_dataset, prepare
from ..evaluation.report import skill_table
from ..manifest import MANIFEST, load_manifest
from ..ray_env import NodesLost, alive_nodes, init_ray
from ..tracking import DIVERGED, read_divergence
from .checkpoint import export_checkpoint
from .loop import train_worker
from .process_group import PreparedTorchConfig, bind_store_to_its_address, use_node_interface


def run_dir_of(cfg) -> Path:
    return Path(cfg.run.storage).resolve() / cfg.run.name


def check_data(cfg) -> dict | None:
    """The data's manifest, checked against the config's schema and the batch the workers
    need; None when it is still to be prepared (data.prepare). Needs no Ray: mistakes surface
    before anything starts."""
    if cfg.data.prepare and not (Path(cfg.data.path) / MANIFEST).exists():
        return None
    manifest = load_manifest(cfg.data.path, cfg.schema_.build(), f"train config {cfg.run.name}")
    packs, workers, batch = manifest["splits"]["train"]["packs"], cfg.scaling.num_workers, cfg.data.batch_size
    if packs < workers * batch:
        raise ConfigError(f"data.batch_size: {cfg.data.path} has {packs} training packs, fewer than "
                          f"scaling.num_workers x data.batch_size = {workers} x {batch}: "
                          "prepare more data or lower them")
    return manifest


def check_resources(cfg) -> None:
    """A local run must fit this machine: workers beyond its CPUs (or GPUs) would start, fight
    for memory and fail after a minute."""
    if cfg.address or os.environ.get("RAY_ADDRESS"):
        return  # a cluster: Ray Train waits for (or autoscales to) the resources
    want, have = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker, os.cpu_count() or 1
    if want > have:
        raise ConfigError(f"scaling.num_workers: {cfg.scaling.num_workers} workers x {cfg.scaling.cpus_per_worker} CPU "
                          f"need {want} CPUs, this machine has {have}: lower scaling.num_workers, or join a cluster "
                          f"with --address")
    if cfg.scaling.use_gpu:
        if torch.cuda.device_count() < cfg.scaling.num_workers:
            raise ConfigError(f"scaling.use_gpu: {cfg.scaling.num_workers} workers need as many GPUs, this machine "
                              f"has {torch.cuda.device_count()}: set scaling.use_gpu=false or join a GPU cluster "
                              "with --address")


def latest_checkpoint(cfg) -> tuple[Path, int] | None:
    """(folder, step) of the run's newest registered checkpoint (the one a re-run resumes
    from: Ray Train's own record, written once every rank has reported), or None."""
    run_dir = run_dir_of(cfg)
    try:
        latest = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
        return run_dir / latest["checkpoint_dir_name"], int(latest["metrics"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prepare_data(cfg) -> dict:
    print(f"data: {cfg.data.path} has no manifest; preparing it with {cfg.data.prepare}", flush=True)
    prepare(load_config(PrepareConfig, cfg.data.prepare, [f"output={cfg.data.path}"]))
    return check_data(cfg)


def fit(trainer, run_dir: Path):
    """`trainer.fit()`, raising TrainingDiverged when the run diverged (the workers returned
    normally after writing {run_dir}/diverged.json, or one failed after writing it; a file left
    by an earlier session is removed first, so a resume with a lower lr starts clean).

    It runs in a thread: Ray Train installs its own Ctrl-C handler when fit() is called from
    the main thread, and that handler ends the process with status 1 and no word. Off the main
    thread Ctrl-C stays a KeyboardInterrupt here, and the command says what was kept."""
    (run_dir / DIVERGED).unlink(missing_ok=True)
    outcome = {}

    def run():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # handed to the main thread
            outcome["error"] = e

    thread = threading.Thread(target=run, name="ms-ray-fit", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.5)  # a bounded wait, so the main thread takes Ctrl-C at once
    except KeyboardInterrupt:
        ray.shutdown()  # the run's workers stop now (they go with the driver), so no checkpoint comes after
        raise
    diverged = read_divergence(run_dir)
    if diverged is not None:
        raise diverged from None
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def train(cfg) -> dict:
    """Run a TorchTrainer over `train_worker`; re-running the same config resumes the run."""
    started = time.perf_counter()
    check_resources(cfg)
    manifest = check_data(cfg)
    # A local cluster gets one logical CPU beyond the workers' so Ray Data can read the shards
    # while every worker holds its CPU (otherwise the read waits forever on a 2-core machine).
    workers_cpus = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    init_ray(cfg.address, num_cpus=max(os.cpu_count() or 1, workers_cpus + 1))
    # Ray Train reads it in its controller, to which the driver's value is handed on
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(cfg.run.startup_timeout_s)
    nodes_at_start = alive_nodes()
    manifest = manifest or prepare_data(cfg)
    run_dir = run_dir_of(cfg)
    try:
        result = fit(trainer_of(cfg, datasets_of(cfg, manifest), run_dir), run_dir)
    except ray.train.TrainingFailedError as e:
        lost = [f"{ip} (node {node_id[:12]})" for node_id, ip in nodes_at_start.items() if node_id not in alive_nodes()]
        if not lost:
            raise
        resume = latest_checkpoint(cfg)
        raise NodesLost(
            f"training stopped: node(s) {', '.join(lost)} died during the run and did not come back; the "
            f"workers could not start again within run.startup_timeout_s={cfg.run.startup_timeout_s:g} s "
            f"({cfg.run.startup_retries + 1} tries). Bring the node(s) back or add others, then re-run the same "
            f"command: it resumes from " + (f"the checkpoint of step {resume[1]} ({resume[0]})" if resume else
                                            "the start (no checkpoint was kept yet)")) from e
    metrics = dict(result.metrics or {})
    metrics["wall_s"] = time.perf_counter() - started
    print_summary(cfg, metrics, run_dir)
    return metrics


def datasets_of(cfg, manifest: dict) -> dict:
    """The Ray Datasets of the packs: "train", and "validation" (empty when the data has none)."""
    data_dir = Path(cfg.data.path).resolve()
    datasets = {s: ds for s in ("train", "validation") if (ds := pack_dataset(data_dir, s, manifest)) is not None}
    if "train" not in datasets:
        raise FileNotFoundError(f"data.path: {data_dir} has no training shards")
    if "validation" not in datasets:
        datasets["validation"] = datasets["train"].limit(0)
    return datasets


def trainer_of(cfg, datasets: dict, run_dir: Path) -> TorchTrainer:
    scaling = cfg.scaling
    remote = bool(cfg.address or os.environ.get("RAY_ADDRESS"))
    if cfg.model.pretrained and Path(cfg.model.pretrained).exists():  # workers run in another folder
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(
            update={"pretrained": str(Path(cfg.model.pretrained).resolve())})})
    loop_config = {"cfg": cfg.model_dump_json(by_alias=True), "run_dir": str(run_dir),
                   "data_dir": str(Path(cfg.data.path).resolve()),
                   "tty": sys.stdout.isatty() and sys.stderr.isatty()}  # rank 0 draws a progress bar
    return TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker={"CPU": scaling.cpus_per_worker},
                                     placement_strategy=scaling.placement_strategy),
        torch_config=PreparedTorchConfig(backend="nccl" if scaling.use_gpu else "gloo",
                                         prepare=use_node_interface if remote else bind_store_to_its_address),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=str(run_dir.parent),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            # a worker group that cannot start (a dead node) is a "controller failure" to Ray Train,
            # retried without end by default: bounded here (run.startup_timeout_s, startup_retries)
            failure_config=FailureConfig(max_failures=cfg.run.max_failures,
                                         controller_failure_limit=cfg.run.startup_retries),
            # Ray Train's INFO lines (worker group, process group, every checkpoint) stay in its log files
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),  # each rank picks its packs (see packs.rank_packs)
    )


def print_summary(cfg, metrics: dict, run_dir: Path) -> None:
    """The lines after training: steps and times, the skill table, validation loss, the export."""
    loop_s = metrics.get("time/train_loop_s", float("nan"))
    print(f"\n## {cfg.run.name}: {metrics.get('step', '?')} steps; training loop {loop_s:.0f} s, "
          f"wall time {metrics['wall_s']:.0f} s with start-up ({cfg.scaling.num_workers} workers, "
          f"ZeRO-{cfg.deepspeed.zero_stage}, {cfg.deepspeed.precision})")
    if any(k.startswith("skills/") for k in metrics):
        print(skill_table(metrics))
    val = f"validation loss {metrics['val/loss']:.4f}; " if "val/loss" in metrics else ""
    print(f"{val}export: {run_dir / 'export'}")


def export(cfg) -> Path:
    """`ms-ray export` (an ExportConfig): consolidate the run's latest checkpoint, or
    cfg.checkpoint, into a MultiStreamLM folder (cfg.out, default {run}/export)."""
    run_dir, checkpoint = run_dir_of(cfg), cfg.checkpoint
    if checkpoint is None:
        found = latest_checkpoint(cfg)
        if found is None:
            raise FileNotFoundError(f"no checkpoint under {run_dir}; train first or give checkpoint=PATH")
        checkpoint = str(found[0])
    manifest = load_manifest(cfg.data.path)
    schema = cfg.schema_.build()
    tokenizer = load_tokenizer(Path(cfg.data.path) / manifest["tokenizer"]["path"], schema)

    def make_model():
        return build_model(cfg.model, schema, tokenizer)[0]

    path = export_checkpoint(checkpoint, cfg.out or run_dir / "export", make_model, tokenizer)
    print(f"exported {checkpoint} -> {path}")
    return path
