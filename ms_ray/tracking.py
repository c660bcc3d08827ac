"""Rank-0 reporting in one place: the console step line, metrics.jsonl and Weights & Biases;
progress (done / total, rate, ETA) and how a diverged run is reported.

Every rank may call these; only rank 0 writes. W&B runs offline unless an API key is set
(mode auto), never touches the network offline, and a resumed run continues the same W&B run
(the id is kept in the checkpoint and in {run_dir}/wandb_run_id).

Divergence: the workers stop together on a non-finite loss or gradient norm, rank 0 writes
{run_dir}/diverged.json, and every worker returns normally, so Ray Train never retries a
deterministic failure; the driver (`run.fit`) turns the file into `TrainingDiverged`, whose
message is the one line to show. Standard library only: the CLI imports this module cheaply.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from pathlib import Path

DIVERGED = "diverged.json"  # in the run folder; written by rank 0 when the run diverged


class TrainingDiverged(RuntimeError):
    """The run stopped on a non-finite loss, gradient norm or weights; str() is one line for the
    user. Not worth retrying: the same data and learning rate diverge the same way again."""

    def __init__(self, record: dict):
        self.record = record
        super().__init__(divergence_message(record))

    def __reduce__(self):
        return type(self), (self.record,)


def divergence_message(r: dict) -> str:
    """training diverged at step N: loss nan (lr ...); last good checkpoint at step M kept; lower optim.lr"""
    what = f"{r['what']} {r['value']}" if "value" in r else r["what"]
    lr = f" (lr {r['lr']:.2e}, optim.lr {r['base_lr']:g})" if r.get("lr") is not None else ""
    kept = (f"last good checkpoint at step {r['checkpoint']} kept" if r.get("checkpoint") is not None
            else "no checkpoint was saved before it")
    return f"training diverged at step {r['step']}: {what}{lr}; {kept}; lower optim.lr"


def write_divergence(run_dir: Path, record: dict) -> None:
    """Rank 0: record why and where the run diverged (read back by `read_divergence`)."""
    path = Path(run_dir) / DIVERGED
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(path)


def read_divergence(run_dir: Path) -> TrainingDiverged | None:
    path = Path(run_dir) / DIVERGED
    return TrainingDiverged(json.loads(path.read_text())) if path.exists() else None


def non_finite(value) -> str | None:
    """'nan' / 'inf' / '-inf' for a non-finite number, else None."""
    value = float(value)
    return None if math.isfinite(value) else str(value)


class Tracker:
    def __init__(self, rank: int, run_dir: Path, cfg, run_id: str | None = None):
        self.active = rank == 0
        self.run_dir = Path(run_dir)
        self.wandb = None
        self.run_id = run_id
        self.total = cfg.optim.max_steps
        self.begin(0)
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        mode = wandb_mode(cfg.wandb)
        if mode == "disabled":
            return
        import wandb

        id_file = self.run_dir / "wandb_run_id"
        if self.run_id is None and id_file.exists():
            self.run_id = id_file.read_text().strip()
        self.run_id = self.run_id or uuid.uuid4().hex[:12]
        id_file.write_text(self.run_id + "\n")
        self.wandb = wandb.init(
            project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.run.name, id=self.run_id,
            resume="allow", mode=mode, dir=str(self.run_dir), config=cfg.model_dump(by_alias=True),
            settings=wandb.Settings(silent=True, console="off"),
        )

    def begin(self, step: int) -> None:
        """The training loop starts (or resumes) at `step`: the origin of rate and ETA."""
        self.started, self.first_step = time.perf_counter(), step

    def rate(self, step: int) -> float | None:
        """Steps per second since `begin` (evaluations and checkpoints included)."""
        elapsed = time.perf_counter() - self.started
        return (step - self.first_step) / elapsed if step > self.first_step and elapsed > 0 else None

    def log(self, step: int, metrics: dict, echo: bool = True) -> None:
        if not self.active:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if echo:
            rate = self.rate(step)
            eta = (self.total - step) / rate if rate else None
            print(step_line(step, metrics, time.perf_counter() - self.started, self.total, rate, eta), flush=True)

    def finish(self, exit_code: int = 0) -> None:
        """exit_code 1 marks the W&B run failed (a diverged run)."""
        if self.wandb is not None:
            self.wandb.finish(exit_code=exit_code)


def wandb_mode(settings) -> str:
    """auto: online iff WANDB_API_KEY is set, else offline (never the network)."""
    if settings.mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return settings.mode


def log_report(settings, name: str, run_dir: Path, config: dict, metrics: dict,
               tables: dict[str, tuple[list[str], list[list]]], images: list[Path]) -> str | None:
    """One W&B run for an evaluation or a comparison: metrics (also as the run summary),
    tables {name: (columns, rows)} and plots. Returns the run's folder, or None when disabled."""
    mode = wandb_mode(settings)
    if mode == "disabled":
        return None
    import wandb

    run = wandb.init(project=settings.project, entity=settings.entity, name=name, mode=mode, dir=str(run_dir),
                     config=config, settings=wandb.Settings(silent=True, console="off"))
    run.log({**metrics, **{f"plots/{p.stem}": wandb.Image(str(p)) for p in images},
             **{f"tables/{k}": wandb.Table(columns=cols, data=rows) for k, (cols, rows) in tables.items()}})
    run.summary.update(metrics)
    run.finish()
    return str(Path(run.dir).parent)


def step_line(step: int, m: dict, elapsed: float, total: int | None = None, rate: float | None = None,
              eta: float | None = None) -> str:
    """One human line per log step: what a progress bar would show, and greppable:
    step 300/2200 | loss 0.1234 | lr 2.00e-03 | gn 0.123 | 10,432 tok/s | 4.1 step/s | eta 7m43s | 73s"""
    parts = [f"step {step}/{total}" if total else f"step {step}"]
    for key, fmt in (("train/loss", "loss {:.4f}"), ("train/lr", "lr {:.2e}"), ("train/grad_norm", "gn {:.3f}"),
                     ("train/tokens_per_s", "{:,.0f} tok/s"), ("val/loss", "val {:.4f}"),
                     ("skills/all/accuracy", "skills {:.1%}")):
        if key in m:
            parts.append(fmt.format(m[key]))
    if rate:
        parts.append(f"{rate:.2f} step/s" if rate < 10 else f"{rate:.1f} step/s")
    if eta is not None and total and step < total:
        parts.append(f"eta {duration(eta)}")
    parts.append(f"{elapsed:.0f}s")
    return " | ".join(parts)


def duration(seconds: float) -> str:
    """45s, 8m10s, 2h05m."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Done / total with rate and ETA, for work that runs in this process (`ms-ray eval`):
    a tqdm bar when `file` (stderr) is a terminal, else one plain line every `every_s` seconds
    and one at the end, readable in a log:
      eval: 120/800 examples | 2.1 examples/s | eta 5m24s
    """

    def __init__(self, total: int, desc: str, unit: str = "examples", every_s: float = 30.0, file=None,
                 tty: bool | None = None):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.file = file or sys.stderr
        self.done, self.started = 0, time.perf_counter()
        self.printed = self.started
        self.bar = None
        if self.file.isatty() if tty is None else tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=" " + unit.rstrip("s"), file=self.file, dynamic_ncols=True)

    def update(self, done: int) -> None:
        """`done` items finished so far (absolute)."""
        if done == self.done:
            return
        if self.bar is not None:
            self.bar.update(done - self.done)
        self.done = done
        now = time.perf_counter()
        if self.bar is None and now - self.printed >= self.every_s and done < self.total:
            self.printed = now
            print(self.line(), file=self.file, flush=True)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.done}/{self.total} {self.unit}", f"{rate:.1f} {self.unit}/s"]
        if self.done >= self.total:
            parts.append(f"done in {duration(elapsed)}")
        elif rate > 0:
            parts.append(f"eta {duration((self.total - self.done) / rate)}")
        return " | ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            print(self.line(), file=self.file, flush=True)


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl by step; a step logged again after a resume keeps its last record."""
    out: dict[int, dict] = {}
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rec["step"], {}).update(rec)
    return out
