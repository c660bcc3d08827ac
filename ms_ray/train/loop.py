"""The training loop every Ray Train worker runs: DeepSpeed ZeRO over a MultiStreamLM.

Data: every rank reads the prepared packs through Ray Data (`get_dataset_shard`), sorts them by
pack id and keeps every world-th one, so the packs of a rank and their order per epoch
(a seeded permutation) are the same on every run: a resumed run replays exactly the batches
an uninterrupted run would have seen. The loss of a micro-batch is normalised by the number
of supervised cells over ALL ranks (an all-reduce before the forward), so data-parallel
averaging gives the exact global mean.

Divergence: the same all-reduce also carries the previous micro-batch's loss, and DeepSpeed's
global gradient norm is the same on every rank, so all ranks see a NaN / infinite loss or
gradient norm at the same point, with no extra synchronisation per micro-batch (one extra
all-reduce before each log, evaluation or checkpoint step covers the last micro-batch). They
stop there together: no checkpoint, no export; rank 0 writes {run_dir}/diverged.json and every
worker returns normally, so Ray Train does not retry (run.fit raises it on the
driver).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..core.model import IGNORE
from ..core.streams import next_row_labels
from .checkpoint import NonFiniteWeights, export_model, full_state_dict, load_state, save_state
from ..tracking import Tracker, non_finite, write_divergence


# ---- pieces the loop is made of ----------------------------------------------------------
def lr_lambda(step: int, optim) -> float:
    """Multiplier of the base learning rate: linear warmup, then cosine / constant / WSD."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    floor = optim.min_lr_ratio
    if optim.schedule == "constant":
        return 1.0
    if optim.schedule == "wsd":  # warmup, stable, then a linear cooldown to the floor
        cool_start = optim.max_steps - optim.cooldown_steps
        if step < cool_start:
            return 1.0
        return 1.0 - (1.0 - floor) * (step - cool_start) / max(optim.cooldown_steps, 1)
    progress = min(1.0, (step - optim.warmup_steps) / max(optim.max_steps - optim.warmup_steps, 1))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def deepspeed_config(cfg, micro_batch: int) -> dict:
    ds, opt = cfg.deepspeed, cfg.optim
    zero = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    params = {"lr": opt.lr, "betas": list(opt.betas), "eps": 1e-8, "weight_decay": opt.weight_decay}
    if not ds.offload_optimizer:
        params["torch_adam"] = True  # inside params, or DeepSpeed JIT-builds FusedAdam (~70 s)
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": ds.grad_accum,
        "gradient_clipping": ds.clip or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "optimizer": {"type": "AdamW", "params": params},
        "steps_per_print": 10**9,
    }


def param_groups(model, optim) -> list[dict]:
    """The stream embedding gets its own learning rate and no weight decay."""
    stream = [model.stream_embed.weight]
    rest = [p for n, p in model.named_parameters() if not n.startswith("stream_embed")]
    return [{"params": rest}, {"params": stream, "lr": optim.stream_embed_lr or optim.lr, "weight_decay": 0.0}]


def rank_packs(dataset, rank: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    """This rank's packs: tokens [N, R, C] and doc_ids [N, R], the same on every run."""
    ids, tokens, docs = [], [], []
    for batch in dataset.iter_batches(batch_size=1024, batch_format="numpy"):
        ids += list(batch["pack_id"])
        tokens += list(batch["tokens"])
        docs += list(batch["doc_ids"])
    order = np.argsort(np.array(ids, dtype=object).astype(str), kind="stable")
    usable = len(order) // world * world  # equal counts keep the ranks' steps in lockstep
    mine = order[:usable][rank::world]
    R = len(docs[0]) if docs else 0
    return (np.stack([tokens[i] for i in mine]).reshape(len(mine), R, -1) if len(mine) else np.zeros((0, R, 1), np.int32),
            np.stack([docs[i] for i in mine]) if len(mine) else np.zeros((0, R), np.int32))


def batches(tokens, docs, batch_size: int, seed: int, epoch: int):
    """The batches of one epoch, in a seeded order: yields (index, tokens, doc_ids)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(tokens))
    for b in range(len(order) // batch_size):
        idx = order[b * batch_size : (b + 1) * batch_size]
        yield b, torch.from_numpy(tokens[idx]).long(), torch.from_numpy(docs[idx]).long()


def all_sum(values: list[float] | torch.Tensor) -> torch.Tensor:
    """Sum over all ranks, as a CPU float64 tensor (NCCL reduces on the GPU)."""
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    t = torch.as_tensor(values, dtype=torch.float64).to(device, copy=True)
    dist.all_reduce(t)
    return t.cpu()


# ---- a quiet console ---------------------------------------------------------------------
# What Ray, Ray Data, DeepSpeed and torch print inside a worker that nobody can act on. Ray
# Train's own `ray.train.*` INFO lines (worker group start, process group, "Checkpoint
# successfully created") are the driver's to silence: RunConfig(logging_config=LoggingConfig(
# log_level="WARNING")) keeps them in Ray Train's log files and off the console.
NOISY_WARNINGS = (  # (message regex, category): deprecations inside libraries, not in our code
    (r"`torch\.distributed\.all_gather_into_tensor` is deprecated", FutureWarning),  # DeepSpeed ZeRO, torch 2.13
)
NOISY_PRINTS = re.compile(r"^DeepSpeed \S+ built successfully$")  # a print() per process in init_distributed


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


_RAY_DATA_PROGRESS_OFF = _DropMessages("Progress bars disabled")


def quiet_worker() -> None:
    """Called first in every worker: silences known noise, keeps real warnings and errors."""
    for message, category in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    # Ray Train logs every ray.train.report of every rank ("Reporting training result N:
    # TrainingReport(...every metric...)", ~1,000 characters) at INFO on a logger named after
    # its source file, outside the `ray.train` tree that LoggingConfig governs.
    context = sys.modules.get("ray.train.v2._internal.execution.context")
    if context is not None:
        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    # Ray Data reads each rank's packs here: "Dataset ... execution finished" at INFO, and a
    # warning that progress bars are off (on purpose: RAY_DATA_DISABLE_PROGRESS_BARS).
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    progress = logging.getLogger("ray.data._internal.progress")
    if _RAY_DATA_PROGRESS_OFF not in progress.filters:
        progress.addFilter(_RAY_DATA_PROGRESS_OFF)


@contextlib.contextmanager
def dropping_prints(pattern: re.Pattern):
    """Run a block with its stdout captured; lines matching `pattern` are dropped, the rest
    printed after it."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        kept = [line for line in captured.getvalue().splitlines() if not pattern.match(line)]
        if kept:
            print("\n".join(kept), flush=True)


# ---- the worker function -----------------------------------------------------------------
def train_worker(config: dict) -> None:
    quiet_worker()
    import deepspeed
    import ray.train
    from ray.train import Checkpoint

    from ..config import TrainConfig
    from ..core.families import build_model
    from ..manifest import load_manifest
    from ..core.loading import load_tokenizer

    cfg = TrainConfig.model_validate_json(config["cfg"], context={"check_paths": False})
    run_dir, data_dir = Path(config["run_dir"]), Path(config["data_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    with dropping_prints(NOISY_PRINTS):
        deepspeed.init_distributed(dist_backend="nccl" if cfg.scaling.use_gpu else "gloo")

    manifest = load_manifest(data_dir)
    schema = cfg.schema_.build()
    tokenizer = load_tokenizer(data_dir / manifest["tokenizer"]["path"], schema)

    def make_model():
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        return build_model(cfg.model, schema, tokenizer)[0]

    model = make_model()
    if cfg.model.gradient_checkpointing:
        model.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    schema = model.schema
    micro = cfg.data.batch_size
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optim), config=deepspeed_config(cfg, micro),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, cfg.optim)),
        dist_init_required=False,
    )
    device = engine.device

    train_tokens, train_docs = rank_packs(ray.train.get_dataset_shard("train"), rank, world)
    val_tokens, val_docs = rank_packs(ray.train.get_dataset_shard("validation"), rank, world)
    if len(train_tokens) < micro:
        raise RuntimeError(f"rank {rank} has {len(train_tokens)} training packs, fewer than data.batch_size={micro}")

    state = {"step": 0, "epoch": 0, "batch": 0, "wandb_id": None}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = load_state(Path(folder), engine, rank)
    last_checkpoint = state["step"] if checkpoint else None  # the latest good one, for the divergence message
    tracker = Tracker(rank, run_dir, cfg, state["wandb_id"])
    if rank == 0 and checkpoint:
        print(f"resumed from step {state['step']} (W&B run {tracker.run_id})", flush=True)

    weights = torch.tensor(schema.loss_weights, device=device)

    def micro_batches():
        """Endless (epoch, batch index, tokens, doc_ids), resuming at the saved position."""
        epoch, skip = state["epoch"], state["batch"]
        while True:
            for b, tok, doc in batches(train_tokens, train_docs, micro, cfg.seed, epoch):
                if b >= skip:
                    yield epoch, b, tok.to(device), doc.to(device)
            epoch, skip = epoch + 1, 0

    def report(metrics: dict) -> None:
        """Checkpoint and report: Ray registers the checkpoint once every rank has reported."""
        nonlocal last_checkpoint
        folder = Path(tempfile.mkdtemp(prefix="ms_ckpt_"))
        save_state(folder, engine, rank, {**state, "wandb_id": tracker.run_id})
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(folder)))
        shutil.rmtree(folder, ignore_errors=True)
        last_checkpoint = state["step"]

    def stop(at_step: int, what: str, value) -> None:
        """Every rank calls this at the same point: rank 0 records why; nobody saves or exports."""
        if rank == 0:
            write_divergence(run_dir, {"step": at_step, "what": what, "value": non_finite(value) or value,
                                       "lr": cfg.optim.lr * lr_lambda(at_step - 1, cfg.optim),  # the lr of that step
                                       "base_lr": cfg.optim.lr, "checkpoint": last_checkpoint})
        if bar is not None:
            bar.close()
        tracker.finish(exit_code=1)

    data = micro_batches()
    step = start_step = state["step"]
    max_steps = cfg.optim.max_steps
    window = {"cells": 0, "start": time.perf_counter(), "sums": torch.zeros(1 + 2 * schema.num_streams, dtype=torch.float64)}
    # a progress bar (rank 0) when the driver's console is a terminal: Ray's tqdm draws it there
    bar = None
    if rank == 0 and config.get("tty", False) and step < max_steps:
        try:
            from ray.experimental.tqdm_ray import tqdm  # experimental in Ray: plain step lines without it
        except ImportError:
            tqdm = None
        if tqdm is not None:
            bar = tqdm(total=max_steps - step, desc="train" if step == 0 else f"train from step {step}", unit="step")
    pending = (0.0, step)  # this rank's loss sum of the last micro-batch not yet checked on all ranks, its step
    engine.train()
    loop_started = time.perf_counter()
    tracker.begin(step)
    while step < max_steps:
        lr = scheduler.get_last_lr()[0]  # this step's (the scheduler moves on inside its last engine.step)
        for _ in range(cfg.deepspeed.grad_accum):
            epoch, b, tokens, docs = next(data)
            labels = next_row_labels(tokens, docs, IGNORE)
            # one all-reduce: this micro-batch's supervised cells, and the previous one's loss
            supervised, previous = all_sum([((labels != IGNORE) & (weights > 0)).sum().item(), pending[0]]).tolist()
            if non_finite(previous):
                return stop(pending[1], "loss", previous)
            out = engine(tokens, docs, labels=labels, normaliser=supervised / world)
            engine.backward(out.loss)
            engine.step()
            sums = torch.cat([out.loss_sum.detach().double().view(1), out.stream_loss_sum.double(),
                              out.stream_count.double()]).cpu()
            window["sums"] += sums
            pending = (float(sums[0]), step + 1)
            window["cells"] += tokens.numel() * world
            state.update(epoch=epoch, batch=b + 1)
        step += 1
        state["step"] = step
        grad_norm = engine.get_global_grad_norm()  # global: the same on every rank
        if grad_norm is not None and non_finite(grad_norm):  # DeepSpeed skipped this update (overflow)
            (previous,) = all_sum([pending[0]]).tolist()  # every rank is here: name the loss when it is the cause
            return stop(step, "loss", previous) if non_finite(previous) else stop(step, "grad norm", grad_norm)
        if bar is not None:
            bar.update(1)
        if cfg.run.fail_at_step == step and rank == world - 1:
            marker = run_dir / ".fault_injected"
            if not marker.exists():
                marker.write_text(f"step {step}\n")
                raise RuntimeError(f"injected fault at step {step} (run.fail_at_step)")

        log = step % cfg.run.log_every == 0 or step == max_steps
        run_eval = step % cfg.eval.every == 0 or step == max_steps
        save = step % cfg.checkpoint.every == 0 or step == max_steps
        if log or run_eval or save:  # nothing is logged, evaluated or saved after a non-finite loss
            (previous,) = all_sum([pending[0]]).tolist()
            if non_finite(previous):
                return stop(pending[1], "loss", previous)
            pending = (0.0, step)
        metrics = {}
        if log:
            metrics.update(train_metrics(window, engine, lr, schema, world))
            if bar is not None:
                bar.set_description(f"train | loss {metrics['train/loss']:.4f}")
        if run_eval:
            metrics.update(evaluate(engine, cfg, schema, tokenizer, make_model, val_tokens, val_docs, rank, world))
            metrics["time/train_loop_s"] = time.perf_counter() - loop_started  # this session, evals included
        if metrics:
            tracker.log(step, metrics)
        if save:
            report({"step": step, **metrics})
    if bar is not None:
        bar.close()

    if start_step >= max_steps:
        # re-run of a finished run: nothing to train; report the final evaluation once more
        metrics = evaluate(engine, cfg, schema, tokenizer, make_model, val_tokens, val_docs, rank, world)
        tracker.log(step, metrics)
        report({"step": step, **metrics})
    if not finish(engine, cfg, make_model, tokenizer, run_dir, train_tokens, train_docs, rank):
        write_divergence(run_dir, {"step": step, "what": "non-finite weights at export", "base_lr": cfg.optim.lr,
                                   "lr": cfg.optim.lr * lr_lambda(max(step - 1, 0), cfg.optim), "checkpoint": last_checkpoint})
        tracker.finish(exit_code=1)
        return
    tracker.finish()


def train_metrics(window: dict, engine, lr: float, schema, world: int) -> dict:
    """Global train loss (per supervised cell) and per stream since the last log, and the
    learning rate of the step just taken; resets the window."""
    C = schema.num_streams
    sums = all_sum(window["sums"])
    stream_sum, stream_count = sums[1 : 1 + C], sums[1 + C :]
    weights = torch.tensor(schema.loss_weights, dtype=torch.float64)
    supervised = (stream_count * (weights > 0)).sum()
    elapsed = time.perf_counter() - window["start"]
    metrics = {
        "train/loss": float(sums[0] / supervised.clamp(min=1)),
        "train/lr": lr,
        "train/grad_norm": float(engine.get_global_grad_norm() or 0.0),
        "train/tokens_per_s": window["cells"] / max(elapsed, 1e-9),
        "train/tokens_per_s_per_worker": window["cells"] / world / max(elapsed, 1e-9),
    }
    for name, s, c in zip(schema.names, stream_sum.tolist(), stream_count.tolist()):
        if c:
            metrics[f"train/loss_{name}"] = s / c
    window.update(cells=0, start=time.perf_counter(), sums=torch.zeros_like(window["sums"]))
    return metrics


@torch.no_grad()
def evaluate(engine, cfg, schema, tokenizer, make_model, val_tokens, val_docs, rank: int, world: int) -> dict:
    """Validation loss per stream, and exact-match / time-to-first-token on held-out skill tasks."""
    engine.eval()
    C = schema.num_streams
    sums = torch.zeros(2 * C, dtype=torch.float64)
    n_batches = len(val_tokens) // cfg.data.batch_size
    if cfg.eval.max_val_batches:
        n_batches = min(n_batches, cfg.eval.max_val_batches)
    for b, tok, doc in batches(val_tokens, val_docs, cfg.data.batch_size, 0, 0):
        if b >= n_batches:
            break
        out = engine(tok.to(engine.device), doc.to(engine.device), loss=True)
        sums += torch.cat([out.stream_loss_sum.double(), out.stream_count.double()]).cpu()
    sums = all_sum(sums)
    metrics = {f"val/loss_{n}": float(s / c) for n, s, c in zip(schema.names, sums[:C], sums[C:]) if c}
    weights = torch.tensor(schema.loss_weights, dtype=torch.float64)
    supervised = (sums[C:] * (weights > 0)).sum()
    if supervised:
        metrics["val/loss"] = float((sums[:C] * (weights > 0)).sum() / supervised)
    metrics.update(skill_metrics(engine, cfg, schema, tokenizer, make_model, rank, world))
    engine.train()
    return metrics


def whole_model(engine, cfg, make_model):
    """A model with whole weights that decodes without collectives. ZeRO-3 partitions the
    parameters and its hooks gather them on every forward: ranks decoding different numbers of
    rows would then run mismatched collectives. So all ranks gather once into a plain copy."""
    if cfg.deepspeed.zero_stage < 3:
        return engine.module
    import deepspeed

    plain = make_model()
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params), torch.no_grad():
        for mine, whole in zip(plain.parameters(), params):
            mine.copy_(whole.data)
    return plain.to(engine.device)


def skill_metrics(engine, cfg, schema, tokenizer, make_model, rank: int, world: int) -> dict:
    """Held-out skill tasks (a seed of their own), decoded with the row decoder; each rank
    takes every world-th example and the counts are combined."""
    from ..data.skills import SKILL_STREAMS, TASKS, generate_examples
    from ..data.pipeline import encoder
    from .evaluate import evaluate_skills

    if cfg.eval.skills_per_task == 0 or schema.names != SKILL_STREAMS.names:
        return {}
    examples = generate_examples(cfg.eval.skills_per_task * len(TASKS), cfg.eval.seed, schema, encoder(tokenizer))
    mine = examples[rank::world]
    local = evaluate_skills(whole_model(engine, cfg, make_model), mine)
    gathered = [None] * world
    dist.all_gather_object(gathered, local)
    return combine_skill_metrics(gathered)


def combine_skill_metrics(parts: list[dict]) -> dict:
    """Merge per-rank skill metrics (a rank may lack some tasks), weighting each task's means
    by its example count on that rank."""
    out = {}
    keys = {k for p in parts for k in p if k.startswith("skills/") and k.count("/") == 2}
    for key in sorted(keys):
        task = key.split("/")[1]
        if key.endswith("/n"):
            out[key] = sum(p.get(key, 0) for p in parts)
            continue
        pairs = [(p[key], p[f"skills/{task}/n"]) for p in parts if key in p and not math.isnan(p[key])]
        n = sum(w for _, w in pairs)
        out[key] = sum(v * w for v, w in pairs) / n if n else float("nan")
    return out


def finish(engine, cfg, make_model, tokenizer, run_dir: Path, tokens, docs, rank: int) -> bool:
    """Consolidated HF export (ZeRO-3: gathered from every rank) and a logits probe that the
    tests compare the export against. False on rank 0 when the weights are not finite (nothing
    is exported); a last guard, as the loop stops on a non-finite loss first."""
    state_dict = full_state_dict(engine, cfg.deepspeed.zero_stage)
    engine.eval()
    with torch.no_grad():
        probe_tokens, probe_docs = torch.from_numpy(tokens[:1]).long(), torch.from_numpy(docs[:1]).long()
        logits = engine(probe_tokens.to(engine.device), probe_docs.to(engine.device)).logits
    if rank == 0:
        try:
            export_model({k: v.float() for k, v in state_dict.items()}, make_model, tokenizer, run_dir / "export")
        except NonFiniteWeights:
            return False
        torch.save({"tokens": probe_tokens, "doc_ids": probe_docs, "logits": logits.float().cpu()}, run_dir / "export_probe.pt")
    return True  # the driver prints where the export is
