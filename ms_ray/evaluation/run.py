"""`ms-ray eval CHECKPOINT` and `ms-ray compare`: the driver side of evaluation.

compare = train both arms (Ray Train + DeepSpeed, the same budget: refused otherwise) -> score
both exports with one harness on the same held-out examples -> report.md, plots, W&B.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..config import ConfigError, TrainConfig, load_config
from .harness import SUMMARY, evaluate, layout_of, summarize
from .report import flat_metrics, write_report

ARMS = ("streams", "sequential")
# What must be equal for "the same budget": everything but the layout (schema, data).
BUDGET = ("model", "deepspeed", "optim", "scaling", "seed")


def held_out_examples(cfg, tokenizer) -> list:
    """The same examples for every model: drawn as stream tables with the eval seed."""
    from ..data.pipeline import encoder
    from ..data.skills import SKILL_STREAMS, TASKS, generate_examples

    tasks = tuple(cfg.tasks or TASKS)
    return generate_examples(cfg.examples_per_task * len(tasks), cfg.seed, SKILL_STREAMS.bind(tokenizer),
                             encoder(tokenizer), tasks)


def score_checkpoint(checkpoint, cfg) -> tuple[list[dict], dict]:
    from ..train.checkpoint import load_export

    model, tokenizer = load_export(checkpoint, dtype="float32")  # scored in fp32 on any device
    started = time.perf_counter()
    records = evaluate(model, tokenizer, held_out_examples(cfg, tokenizer), cfg.batch_sessions, cfg.slack_rows,
                       progress=True)
    info = {"checkpoint": str(checkpoint), "layout": layout_of(model.schema), "streams": model.schema.names,
            "parameters": sum(p.numel() for p in model.parameters()), "eval_seconds": time.perf_counter() - started}
    return records, info


def _table(summaries: dict) -> tuple[list[str], list[list]]:
    columns = ["model", "task", *SUMMARY]
    return columns, [[label, task, *(m[k] for k in SUMMARY)] for label, per_task in summaries.items()
                     for task, m in per_task.items()]


def _publish(cfg, out: Path, title: str, summaries: dict, records: dict, notes: str, extra: dict) -> str:
    from ..train.tracking import log_report

    markdown, plots = write_report(out, title, summaries, records, notes, extra)
    wandb_dir = log_report(cfg.wandb, cfg.name, out, cfg.model_dump(by_alias=True),
                           {**flat_metrics(summaries), **{k: v for k, v in extra.items() if isinstance(v, (int, float))}},
                           {"summary": _table(summaries)}, plots)
    print(markdown)
    print(f"written to {out}: report.md, summary.json, records-*.jsonl, {', '.join(p.name for p in plots)}"
          + (f"; W&B run in {wandb_dir}" if wandb_dir else ""))
    return markdown


def eval_checkpoint(cfg) -> dict:
    """`ms-ray eval`: score one checkpoint; returns {task: {metric: value}}."""
    out = Path(cfg.output or Path(cfg.checkpoint).resolve().parent / "eval")
    records, info = score_checkpoint(cfg.checkpoint, cfg.eval)
    label = info["layout"]
    summaries = {label: summarize(records)}
    notes = (f"{info['checkpoint']}: {info['parameters']:,} parameters, streams {info['streams']}; "
             f"{len(records)} held-out examples (seed {cfg.eval.seed}), decoded in {info['eval_seconds']:.0f} s "
             f"with {cfg.eval.batch_sessions} session(s) at a time.")
    _publish(cfg, out, f"ms-ray eval: {label} model", summaries, {label: records}, notes, info)
    return summaries[label]


# ---- compare ------------------------------------------------------------------------------
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
    differ = [k for k in BUDGET if a[k] != b[k]] + (["data.batch_size"] if a["data"]["batch_size"] != b["data"]["batch_size"] else [])
    if differ:
        raise ConfigError(f"compare: the arms do not have the same budget: {', '.join(differ)} differ")
    if len(arms["sequential"].schema_.streams) != 1:
        raise ConfigError(f"compare: sequential.train must have one stream, got {[s.name for s in arms['sequential'].schema_.streams]}")
    return arms


def tokens_per_pack(train_cfg) -> int:
    from ..data.pipeline import load_manifest

    manifest = load_manifest(train_cfg.data.path)
    return manifest["max_rows"] * len(manifest["schema"]["streams"])


def compare(cfg) -> dict:
    """`ms-ray compare`: train both arms, score both, write and log the comparison."""
    from ..train.run import run_dir_of, train

    started = time.perf_counter()
    arms = arm_configs(cfg)
    budget = {}
    for arm, train_cfg in arms.items():
        print(f"\n# compare: training the {arm} model ({train_cfg.run.name}, {train_cfg.optim.max_steps} steps)", flush=True)
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
        "", f"{len(records['streams'])} held-out examples (seed {cfg.eval.seed}) per model, "
            f"{cfg.eval.batch_sessions} session(s) at a time; whole comparison {total / 60:.1f} min.",
    ])
    extra = {"budget": budget, "models": info, "total_s": total}
    _publish(cfg, Path(cfg.output), "ms-ray compare: multi-stream vs single-stream", summaries, records, notes, extra)
    return summaries
