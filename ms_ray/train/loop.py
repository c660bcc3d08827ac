"""The training loop every Ray Train worker runs: DeepSpeed ZeRO over a MultiStreamLM.

`train_worker` (Ray Train's entry point) builds a TrainRecipe, sets it up and runs it:
  setup()       distributed init, tokenizer, model + DeepSpeed engine, this rank's packs, resume
  run()         step() until optim.max_steps; log, evaluate() and checkpoint() on their
                schedules; then finish() (the export)
  step()        one optimizer step: grad_accum micro-batches and the divergence checks

Data (packs.py): every rank reads the prepared packs through Ray Data (`get_dataset_shard`),
sorts them by pack id and keeps every world-th one, so the packs of a rank and their order per
epoch (a seeded permutation) are the same on every run: a resumed run replays exactly the
batches an uninterrupted run would have seen. The loss of a micro-batch is normalised by the
number of supervised cells over ALL ranks (an all-reduce before the forward), so data-parallel
averaging gives the exact global mean.

Divergence: the same all-reduce also carries the previous micro-batch's loss, and DeepSpeed's
global gradient norm is the same on every rank, so all ranks see a NaN / infinite loss or
gradient norm at the same point, with no extra synchronisation per micro-batch (one extra
all-reduce before each log, evaluation or checkpoint step covers the last micro-batch). They
stop there together: no checkpoint, no export; rank 0 writes {run_dir}/diverged.json and every
worker returns normally, so Ray Train does not retry (run.fit raises it on the driver).

Evaluation: validation loss per stream, and the held-out skill tasks decoded by the one
evaluation (ms_ray/evaluation/harness.py): each rank decodes every world-th example, the
records are gathered and every rank summarises all of them.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint

from ..config import TrainConfig
from ..core.families import build_model
from ..core.loading import load_tokenizer
from ..core.lora import trainable_share
from ..core.model import IGNORE
from ..core.streams import next_row_labels
from ..evaluation.harness import evaluate, held_out_examples, is_skills_model, summarize
from ..evaluation.report import skill_metrics
from ..manifest import load_manifest
from ..tracking import Tracker, non_finite, write_divergence
from .checkpoint import NonFiniteWeights, export_model, full_state_dict, load_state, save_state
from .optim import deepspeed_config, lr_lambda, param_groups
from .packs import batches, micro_batches, rank_packs
from .quiet import NOISY_PRINTS, dropping_prints, quiet_worker


def all_sum(values: list[float] | torch.Tensor) -> torch.Tensor:
    """Sum over all ranks, as a CPU float64 tensor (NCCL reduces on the GPU)."""
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    t = torch.as_tensor(values, dtype=torch.float64).to(device, copy=True)
    dist.all_reduce(t)
    return t.cpu()


# ---- the worker ----------------------------------------------------------------------------
def train_worker(config: dict) -> None:
    """Ray Train's entry point on every worker: config holds the TrainConfig as JSON ("cfg"),
    "run_dir", "data_dir" and "tty" (the driver's console is a terminal: a progress bar)."""
    quiet_worker()
    context = ray.train.get_context()
    recipe = TrainRecipe(config, context.get_world_rank(), context.get_world_size())
    recipe.setup()
    recipe.run()


class Diverged(Exception):
    """A non-finite loss or gradient norm: raised on every rank at the same point."""

    def __init__(self, step: int, what: str, value):
        super().__init__(f"{what} {value} at step {step}")
        self.step, self.what, self.value = step, what, value


class LossWindow:
    """The training loss since the last log line: sums [loss, loss per stream, supervised cells
    per stream] of this rank, and the cells all ranks read."""

    def __init__(self, num_streams: int):
        self.num_streams = num_streams
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(1 + 2 * self.num_streams, dtype=torch.float64)
        self.cells = 0
        self.started = time.perf_counter()

    def add(self, sums: torch.Tensor, cells: int) -> None:
        self.sums += sums
        self.cells += cells

    def metrics(self, schema, world: int) -> dict:
        """Collective: the global loss per supervised cell, and per stream; starts a new window."""
        C = schema.num_streams
        sums = all_sum(self.sums)
        stream_sum, stream_count = sums[1 : 1 + C], sums[1 + C :]
        weights = torch.tensor(schema.loss_weights, dtype=torch.float64)
        supervised = (stream_count * (weights > 0)).sum()
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        metrics = {
            "train/loss": float(sums[0] / supervised.clamp(min=1)),
            "train/tokens_per_s": self.cells / elapsed,
            "train/tokens_per_s_per_worker": self.cells / world / elapsed,
        }
        metrics.update({f"train/loss_{name}": s / c for name, s, c in
                        zip(schema.names, stream_sum.tolist(), stream_count.tolist()) if c})
        self.reset()
        return metrics


class TrainRecipe:
    """One worker's training run. Every rank calls the same methods in the same order, so
    their collectives match."""

    def __init__(self, config: dict, rank: int, world: int):
        self.cfg = TrainConfig.model_validate_json(config["cfg"], context={"check_paths": False})
        self.run_dir, self.data_dir = Path(config["run_dir"]), Path(config["data_dir"])
        self.tty = bool(config.get("tty", False))
        self.rank, self.world = rank, world
        self.max_steps = self.cfg.optim.max_steps
        self.micro_batch = self.cfg.data.batch_size
        self.bar = None  # rank 0's progress bar, on a terminal

    # ---- setup ---------------------------------------------------------------------------
    def setup(self) -> None:
        """Distributed init, tokenizer, model and DeepSpeed engine, this rank's packs, resume."""
        import deepspeed  # inside the worker: the driver never imports DeepSpeed

        cfg = self.cfg
        torch.set_num_threads(cfg.scaling.cpus_per_worker)
        with dropping_prints(NOISY_PRINTS):
            deepspeed.init_distributed(dist_backend="nccl" if cfg.scaling.use_gpu else "gloo")
        where = [None] * self.world  # which node each rank runs on: scaling.placement made visible
        torch.distributed.all_gather_object(where, ray.util.get_node_ip_address())
        if self.rank == 0:
            print(f"{self.world} workers on {len(set(where))} node(s): "
                  + ", ".join(f"rank {r} on {ip}" for r, ip in enumerate(where)), flush=True)
        manifest = load_manifest(self.data_dir)
        self.schema = cfg.schema_.build()  # bound to the tokenizer once the model is built
        self.tokenizer = load_tokenizer(self.data_dir / manifest["tokenizer"]["path"], self.schema)
        self.build_engine(deepspeed)
        self.train_tokens, self.train_docs = rank_packs(ray.train.get_dataset_shard("train"), self.rank, self.world,
                                                        self.schema, self.engine.module.vocab_size)
        self.val_tokens, self.val_docs = rank_packs(ray.train.get_dataset_shard("validation"), self.rank, self.world,
                                                    self.schema, self.engine.module.vocab_size)
        if len(self.train_tokens) < self.micro_batch:
            raise RuntimeError(f"rank {self.rank} has {len(self.train_tokens)} training packs, fewer than "
                               f"data.batch_size={self.micro_batch}")
        wandb_id = self.resume()
        self.tracker = Tracker(self.rank, self.run_dir, cfg, wandb_id)
        if self.rank == 0 and self.last_checkpoint is not None:
            print(f"resumed from step {self.global_step} (W&B run {self.tracker.run_id})", flush=True)
        self.loss_weights = torch.tensor(self.schema.loss_weights)  # on the host, beside the batches
        enabled = cfg.eval.examples_per_task > 0 and is_skills_model(self.schema)
        self.held_out = held_out_examples(cfg.eval, self.tokenizer) if enabled else []
        self.data = micro_batches(self.train_tokens, self.train_docs, self.micro_batch, self.cfg.seed, self.epoch,
                                  self.batch)

    def make_model(self):
        """A fresh model, the same on every rank (also the frame of the export)."""
        torch.manual_seed(self.cfg.seed)
        return build_model(self.cfg.model, self.schema, self.tokenizer)[0]

    def build_engine(self, deepspeed) -> None:
        cfg = self.cfg
        model = self.make_model()
        if cfg.model.gradient_checkpointing:
            model.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.model.compile:
            model.compile()  # in place: DeepSpeed wraps the compiled module; checkpoints keep plain names
        self.schema = model.schema
        if cfg.model.lora is not None and self.rank == 0:
            trainable, total = trainable_share(model)  # before ZeRO-3 partitions (empties) the tensors
            print(f"LoRA rank {cfg.model.lora.rank}: {trainable:,} of {total:,} weights train "
                  f"({100 * trainable / total:.2f} %)", flush=True)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.optim),
            config=deepspeed_config(cfg, self.micro_batch),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, cfg.optim)),
            dist_init_required=False,
        )
        self.device = self.engine.device

    def resume(self) -> str | None:
        """Collective: restore the latest checkpoint if there is one (weights, optimizer,
        scheduler, RNG, data position); returns its W&B run id."""
        position = {"step": 0, "epoch": 0, "batch": 0, "wandb_id": None}
        checkpoint = ray.train.get_checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as folder:
                position = load_state(Path(folder), self.engine, self.rank)
        # the next micro-batch is batch `batch` of epoch `epoch` (see micro_batches)
        self.global_step, self.epoch, self.batch = position["step"], position["epoch"], position["batch"]
        self.start_step = self.global_step
        self.last_checkpoint = self.global_step if checkpoint else None  # the latest good one, for a divergence
        return position["wandb_id"]

    # ---- the loop ------------------------------------------------------------------------
    def run(self) -> None:
        """Train to optim.max_steps, then export; on a divergence every rank stops at once."""
        self.window = LossWindow(self.schema.num_streams)
        self.bar = self.progress_bar()
        # this rank's loss of the last micro-batch not yet checked on all ranks, and its step
        self.unchecked_loss, self.unchecked_step = 0.0, self.global_step
        self.engine.train()
        self.loop_started = time.perf_counter()
        self.tracker.begin(self.global_step)
        try:
            while self.global_step < self.max_steps:
                lr = self.step()
                self.after_step(lr)
        except Diverged as diverged:
            return self.stop(diverged)
        self.close_bar()
        if self.start_step >= self.max_steps:
            # re-run of a finished run: nothing to train; report the final evaluation once more
            metrics = self.evaluate()
            self.tracker.log(self.global_step, metrics)
            self.checkpoint({"step": self.global_step, **metrics})
        self.finish()

    def step(self) -> float:
        """One optimizer step of grad_accum micro-batches (each an engine.step: DeepSpeed
        updates on the last); raises Diverged. Returns the learning rate of the step."""
        lr = self.scheduler.get_last_lr()[0]  # this step's (the scheduler moves on inside its last engine.step)
        for _ in range(self.cfg.deepspeed.grad_accum):
            self.micro_step()
        self.global_step += 1
        grad_norm = self.engine.get_global_grad_norm()  # global: the same on every rank
        if grad_norm is not None and non_finite(grad_norm):  # DeepSpeed skipped this update (overflow)
            self.check_last_loss()  # every rank is here: name the loss when it is the cause
            raise Diverged(self.global_step, "grad norm", grad_norm)
        if self.bar is not None:
            self.bar.update(1)
        self.inject_fault()
        return lr

    def micro_step(self) -> None:
        """Forward, backward and engine.step of the next micro-batch; raises Diverged when the
        previous one's loss was not finite on some rank."""
        epoch, b, tokens, docs = next(self.data)  # on the host: labels and counts need no device sync
        labels = next_row_labels(tokens, docs, IGNORE)
        # one all-reduce: this micro-batch's supervised cells, and the previous one's loss
        supervised_here = int(((labels != IGNORE) & (self.loss_weights > 0)).sum())
        supervised, previous = all_sum([supervised_here, self.unchecked_loss]).tolist()
        if non_finite(previous):
            raise Diverged(self.unchecked_step, "loss", previous)
        layout = docs.numpy().tobytes()  # FlexAttention's BlockMask is reused when a layout repeats
        tokens, docs, labels = (t.to(self.device, non_blocking=True) for t in (tokens, docs, labels))
        # check=False: every pack was checked once where it entered (rank_packs), not at each forward
        out = self.engine(tokens, docs, labels=labels, normaliser=supervised / self.world, check=False,
                          layout_key=layout)
        self.engine.backward(out.loss)
        self.engine.step()
        sums = torch.cat([out.loss_sum.detach().double().view(1), out.stream_loss_sum.double(),
                          out.stream_count.double()]).cpu()
        self.window.add(sums, tokens.numel() * self.world)
        self.unchecked_loss, self.unchecked_step = float(sums[0]), self.global_step + 1
        self.epoch, self.batch = epoch, b + 1

    def check_last_loss(self) -> None:
        """Collective: raises Diverged when the last micro-batch's loss is not finite on any rank."""
        (loss,) = all_sum([self.unchecked_loss]).tolist()
        if non_finite(loss):
            raise Diverged(self.unchecked_step, "loss", loss)
        self.unchecked_loss, self.unchecked_step = 0.0, self.global_step

    def inject_fault(self) -> None:
        """run.fail_at_step (tests): the last rank raises once at that step."""
        if self.cfg.run.fail_at_step == self.global_step and self.rank == self.world - 1:
            marker = self.run_dir / ".fault_injected"
            if not marker.exists():
                marker.write_text(f"step {self.global_step}\n")
                raise RuntimeError(f"injected fault at step {self.global_step} (run.fail_at_step)")

    def after_step(self, lr: float) -> None:
        """Log, evaluate and checkpoint on their schedules, and all three at the last step."""
        cfg, step = self.cfg, self.global_step
        log = step % cfg.run.log_every == 0 or step == self.max_steps
        run_eval = step % cfg.eval.every == 0 or step == self.max_steps
        save = step % cfg.checkpoint.every == 0 or step == self.max_steps
        if log or run_eval or save:  # nothing is logged, evaluated or saved after a non-finite loss
            self.check_last_loss()
        metrics = {}
        if log:
            metrics.update(self.train_metrics(lr))
            if self.bar is not None:
                self.bar.set_description(f"train | loss {metrics['train/loss']:.4f}")
        if run_eval:
            metrics.update(self.evaluate())
            metrics["time/train_loop_s"] = time.perf_counter() - self.loop_started  # this session, evals included
        if metrics:
            self.tracker.log(step, metrics)
        if save:
            self.checkpoint({"step": step, **metrics})

    def train_metrics(self, lr: float) -> dict:
        """Collective: the training loss since the last log, the learning rate of the step just
        taken, the gradient norm and the rate."""
        window = self.window.metrics(self.schema, self.world)
        metrics = {"train/loss": window.pop("train/loss"), "train/lr": lr,
                   "train/grad_norm": float(self.engine.get_global_grad_norm() or 0.0)}
        return {**metrics, **window}

    # ---- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Collective: validation loss per stream, and the held-out skill tasks."""
        self.engine.eval()
        metrics = {**self.validation_loss(), **self.skills()}
        self.engine.train()
        return metrics

    def validation_loss(self) -> dict:
        C = self.schema.num_streams
        sums = torch.zeros(2 * C, dtype=torch.float64)
        n_batches = len(self.val_tokens) // self.micro_batch
        if self.cfg.eval.max_val_batches:
            n_batches = min(n_batches, self.cfg.eval.max_val_batches)
        for b, tokens, docs in batches(self.val_tokens, self.val_docs, self.micro_batch, 0, 0):
            if b >= n_batches:
                break
            out = self.engine(tokens.to(self.device), docs.to(self.device), loss=True, check=False)
            sums += torch.cat([out.stream_loss_sum.double(), out.stream_count.double()]).cpu()
        sums = all_sum(sums)
        metrics = {f"val/loss_{n}": float(s / c) for n, s, c in zip(self.schema.names, sums[:C], sums[C:]) if c}
        weights = torch.tensor(self.schema.loss_weights, dtype=torch.float64)
        supervised = (sums[C:] * (weights > 0)).sum()
        if supervised:
            metrics["val/loss"] = float((sums[:C] * (weights > 0)).sum() / supervised)
        return metrics

    def skills(self) -> dict:
        """Collective: each rank decodes every world-th held-out example (evaluation.harness);
        every rank summarises the records of all ranks."""
        if not self.held_out:
            return {}
        started = time.perf_counter()
        model = self.whole_model()
        e = self.cfg.eval
        records = evaluate(model, self.tokenizer, self.held_out[self.rank :: self.world],
                           batch_sessions=e.batch_sessions, slack_rows=e.slack_rows, tool=e.tool,
                           offset_rows=e.offset_rows)
        gathered = [None] * self.world
        dist.all_gather_object(gathered, records)
        summary = summarize([record for part in gathered for record in part])
        return {**skill_metrics(summary), "skills/eval_seconds": time.perf_counter() - started}

    def whole_model(self):
        """Collective under ZeRO-3: a model with whole weights that decodes without collectives.
        ZeRO-3 partitions the parameters and its hooks gather them on every forward: ranks
        decoding different numbers of rows would then run mismatched collectives. So all ranks
        gather once into a plain copy."""
        if self.cfg.deepspeed.zero_stage < 3:
            return self.engine.module
        import deepspeed

        plain = self.make_model()
        params = list(self.engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params), torch.no_grad():
            for mine, whole in zip(plain.parameters(), params):
                mine.copy_(whole.data)
        return plain.to(self.device)

    # ---- checkpoints, the end ------------------------------------------------------------
    def checkpoint(self, metrics: dict) -> None:
        """Collective: every rank saves its ZeRO shard and position, and reports them; Ray
        registers the checkpoint once every rank has reported."""
        folder = Path(tempfile.mkdtemp(prefix="ms_ckpt_"))
        position = {"step": self.global_step, "epoch": self.epoch, "batch": self.batch,
                    "wandb_id": self.tracker.run_id}
        save_state(folder, self.engine, self.rank, position)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(folder)))
        shutil.rmtree(folder, ignore_errors=True)
        self.last_checkpoint = self.global_step

    def finish(self) -> None:
        """Collective: the export (rank 0); weights that are not finite are not exported and
        end the run as diverged."""
        if self.export():
            self.tracker.finish()
            return
        self.record_divergence(self.global_step, "non-finite weights at export")
        self.tracker.finish(exit_code=1)

    def export(self) -> bool:
        """Consolidated HF export (ZeRO-3: gathered from every rank, frozen weights included) and a
        logits probe that the tests compare the export against: the probe comes from the engine's
        model, so with LoRA it checks the merged export against the unmerged adapters. False on
        rank 0 when the weights are not finite (nothing is exported); a last guard, as the loop
        stops on a non-finite loss first."""
        state_dict = full_state_dict(self.engine, self.cfg.deepspeed.zero_stage)
        self.engine.eval()
        with torch.no_grad():
            tokens = torch.from_numpy(self.train_tokens[:1]).long()
            docs = torch.from_numpy(self.train_docs[:1]).long()
            logits = self.engine(tokens.to(self.device), docs.to(self.device)).logits
        if self.rank == 0:
            try:
                export_model({k: v.float() for k, v in state_dict.items()}, self.make_model, self.tokenizer,
                             self.run_dir / "export")
            except NonFiniteWeights:
                return False
            torch.save({"tokens": tokens, "doc_ids": docs, "logits": logits.float().cpu()},
                       self.run_dir / "export_probe.pt")
        return True  # the driver prints where the export is

    def stop(self, diverged: Diverged) -> None:
        """Every rank calls this at the same point: rank 0 records why; nobody saves or exports."""
        self.record_divergence(diverged.step, diverged.what, non_finite(diverged.value) or diverged.value)
        self.close_bar()
        self.tracker.finish(exit_code=1)

    def record_divergence(self, step: int, what: str, value: float | str | None = None) -> None:
        """Rank 0 writes {run_dir}/diverged.json (the driver raises it), with the lr of that step."""
        if self.rank != 0:
            return
        record = {"step": step, "what": what} | ({"value": value} if value is not None else {})
        lr = self.cfg.optim.lr * lr_lambda(max(step - 1, 0), self.cfg.optim)
        write_divergence(self.run_dir, {**record, "lr": lr, "base_lr": self.cfg.optim.lr,
                                        "checkpoint": self.last_checkpoint})

    # ---- the progress bar ----------------------------------------------------------------
    def progress_bar(self):
        """Rank 0 draws a bar when the driver's console is a terminal (Ray's tqdm draws it there)."""
        if self.rank != 0 or not self.tty or self.global_step >= self.max_steps:
            return None
        try:
            from ray.experimental.tqdm_ray import tqdm  # experimental in Ray: plain step lines without it
        except ImportError:
            return None
        desc = "train" if self.global_step == 0 else f"train from step {self.global_step}"
        return tqdm(total=self.max_steps - self.global_step, desc=desc, unit="step")

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
