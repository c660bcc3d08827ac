"""`ms-ray compare`: the multi-stream model against a single-stream baseline, same budget.

Train both arms (Ray Train + DeepSpeed; arms whose budgets differ are refused) -> score both
exports with one evaluation on the same held-out examples -> report.md, plots, W&B.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..config import ConfigError, TrainConfig, load_config
from ..evaluation.harness import summarize
from ..evaluation.run import publish, score_checkpoint
from ..manifest import load_manifest
from ..train.run import run_dir_of, train

ARMS = ("streams", "sequential")
# What must be equal for "the same budget": everything but the layout (schema, data).
BUDGET = ("model", "deepspeed", "optim", "scaling", "seed")


def arm_configs(cfg) -> dict[str, TrainConfig]:
    """Both train configs, each run under {output}/train/{arm}; refused unless the budgets match."""
    arms = {}
    for arm in ARMS:
        spec = getattr(cfg, arm)
        overrides = [*spec.overrides, *cfg.overrides, f"run.storage={Path(cfg.output) / 'train'}", f"run.name={arm}"]
        arms[arm] = load_config(TrainConfig, spec.train, overrides)
        if cfg.address:
            arms[arm] = arms[arm].model_copy(update={"address": cfg.address})
    a, b = (arms[arm].model_dump() for arm in ARMS)
    differ = [k for k in BUDGET if a[k] != b[k]]
    differ += ["data.batch_size"] if a["data"]["batch_size"] != b["data"]["batch_size"] else []
    if differ:
        raise ConfigError(f"compare: the arms do not have the same budget: {', '.join(differ)} differ")
    if len(arms["sequential"].schema_.streams) != 1:
        names = [s.name for s in arms["sequential"].schema_.streams]
        raise ConfigError(f"compare: sequential.train must have one stream, got {names}")
    return arms


def tokens_per_pack(train_cfg) -> int:

    manifest = load_manifest(train_cfg.data.path)
    return manifest["max_rows"] * len(manifest["schema"]["streams"])


def compare(cfg) -> dict:
    """`ms-ray compare`: train both arms, score both, write and log the comparison."""
    started = time.perf_counter()
    arms = arm_configs(cfg)
    budget = {}
    for arm, train_cfg in arms.items():
        print(f"\n# compare: training the {arm} model ({train_cfg.run.name}, {train_cfg.optim.max_steps} steps)",
              flush=True)
        metrics = train(train_cfg)
        budget[arm] = {"steps": metrics.get("step"), "train_loop_s": metrics.get("time/train_loop_s", float("nan")),
                       "train_wall_s": metrics.get("wall_s"), "tokens_per_pack": tokens_per_pack(train_cfg),
                       "final_train_loss": metrics.get("train/loss", float("nan"))}
    if budget["streams"]["tokens_per_pack"] != budget["sequential"]["tokens_per_pack"]:
        raise ConfigError(f"compare: tokens per pack differ ({budget['streams']['tokens_per_pack']} vs "
                          f"{budget['sequential']['tokens_per_pack']}): set packing.max_rows so rows x streams match")
    summaries, records, info = {}, {}, {}
    for arm, train_cfg in arms.items():
        print(f"\n# compare: scoring the {arm} model", flush=True)
        records[arm], info[arm] = score_checkpoint(run_dir_of(train_cfg) / "export", cfg.eval)
        summaries[arm] = summarize(records[arm])
    total = time.perf_counter() - started
    lines = ["| model | parameters | steps | tokens per step | training loop s | final train loss |",
             "|---|---:|---:|---:|---:|---:|"]
    for arm in ARMS:
        b, workers = budget[arm], arms[arm].scaling.num_workers
        lines.append(f"| {arm} | {info[arm]['parameters']:,} | {b['steps']} | "
                     f"{b['tokens_per_pack'] * arms[arm].data.batch_size * workers:,} | {b['train_loop_s']:.0f} | "
                     f"{b['final_train_loss']:.4f} |")
    notes = "\n".join([
        "Budget: the same examples, model, optimizer, steps and tokens per step.", "", *lines, "",
        "Read with care: the sequential model packs more examples into its tokens (no silence cells) and "
        "is trained on every token, the user's too (its loss includes unpredictable user words); it "
        "gets the tool's answer one row sooner than the streams model. A streams row holds one token per "
        "stream, so it costs more than a sequential row: compare rows for the rule, ms for this machine.",
        "", f"{len(records['streams'])} held-out tasks in {info['streams']['sessions']} sessions (seed "
            f"{cfg.eval.seed}) per model, "
            f"{cfg.eval.batch_sessions} session(s) at a time; whole comparison {total / 60:.1f} min.",
    ])
    extra = {"budget": budget, "models": info, "total_s": total}
    publish(cfg, Path(cfg.output), "ms-ray compare: multi-stream vs single-stream", summaries, records, notes, extra)
    return summaries
