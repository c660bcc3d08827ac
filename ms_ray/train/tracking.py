"""Rank-0 reporting in one place: the console step line, metrics.jsonl and Weights & Biases.

Every rank may call these; only rank 0 writes. W&B runs offline unless an API key is set
(mode auto), never touches the network offline, and a resumed run continues the same W&B run
(the id is kept in the checkpoint and in {run_dir}/wandb_run_id).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path


class Tracker:
    def __init__(self, rank: int, run_dir: Path, cfg, run_id: str | None = None):
        self.active = rank == 0
        self.run_dir = Path(run_dir)
        self.wandb = None
        self.run_id = run_id
        self.started = time.perf_counter()
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

    def log(self, step: int, metrics: dict, echo: bool = True) -> None:
        if not self.active:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if echo:
            print(step_line(step, metrics, time.perf_counter() - self.started), flush=True)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


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


def step_line(step: int, m: dict, elapsed: float) -> str:
    """One human line per log step: what a progress bar would show, and greppable."""
    parts = [f"step {step}"]
    for key, fmt in (("train/loss", "loss {:.4f}"), ("train/lr", "lr {:.2e}"), ("train/grad_norm", "gn {:.3f}"),
                     ("train/tokens_per_s", "{:,.0f} tok/s"), ("val/loss", "val {:.4f}"),
                     ("skills/all/accuracy", "skills {:.1%}")):
        if key in m:
            parts.append(fmt.format(m[key]))
    parts.append(f"{elapsed:.0f}s")
    return " | ".join(parts)


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl by step; a step logged again after a resume keeps its last record."""
    out: dict[int, dict] = {}
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rec["step"], {}).update(rec)
    return out
