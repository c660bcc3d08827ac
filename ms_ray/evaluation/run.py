"""`ms-ray eval`: score an exported skills model on held-out examples, or a chat model on held-out
conversations (a `chat:` section); write and log the report."""

from __future__ import annotations

import time
from pathlib import Path

from ..core.loading import load_export
from ..tracking import log_report
from .chat import METRICS as CHAT_METRICS
from .chat import evaluate_chat
from .harness import evaluate, held_out_examples, layout_of
from .report import chat_markdown, flat_metrics, write_chat_report, write_report
from .scoring import SUMMARY, summarize

__all__ = ["held_out_examples", "score_checkpoint", "publish", "eval_checkpoint", "eval_chat"]


def score_checkpoint(checkpoint, cfg) -> tuple[list[dict], dict]:
    """Records of one exported model on the held-out examples of `cfg` (SkillEvalConfig), and
    what to say about it (layout, streams, parameters, tool, seconds)."""
    model, tokenizer = load_export(checkpoint, dtype="float32")  # scored in fp32 on any device
    started = time.perf_counter()
    examples = held_out_examples(cfg, tokenizer)
    records = evaluate(model, tokenizer, examples, batch_sessions=cfg.batch_sessions, slack_rows=cfg.slack_rows,
                       tool=cfg.tool, progress=True, offset_rows=cfg.offset_rows)
    info = {"checkpoint": str(checkpoint), "layout": layout_of(model.schema), "streams": model.schema.names,
            "sessions": len(examples),
            "parameters": sum(p.numel() for p in model.parameters()), "tool": cfg.tool,
            "offset_rows": cfg.offset_rows, "window_rows": model.window,
            "eval_seconds": time.perf_counter() - started}
    return records, info


def _table(summaries: dict) -> tuple[list[str], list[list]]:
    columns = ["model", "task", *SUMMARY]
    return columns, [[label, task, *(m[k] for k in SUMMARY)] for label, per_task in summaries.items()
                     for task, m in per_task.items()]


def publish(cfg, out: Path, title: str, summaries: dict, records: dict, notes: str, extra: dict) -> str:
    markdown, plots = write_report(out, title, summaries, records, notes, extra)
    numbers = {k: v for k, v in extra.items() if isinstance(v, (int, float))}
    wandb_dir = log_report(cfg.wandb, cfg.name, out, cfg.model_dump(by_alias=True),
                           {**flat_metrics(summaries), **numbers}, {"summary": _table(summaries)}, plots)
    print(markdown)
    print(f"written to {out}: report.md, summary.json, records-*.jsonl, {', '.join(p.name for p in plots)}"
          + (f"; W&B run in {wandb_dir}" if wandb_dir else ""))
    return markdown


def eval_checkpoint(cfg) -> dict:
    """`ms-ray eval`: score one checkpoint; returns {task: {metric: value}} (chat: {metric: value})."""
    out = Path(cfg.output or Path(cfg.checkpoint).resolve().parent / "eval")
    if cfg.chat is not None:
        return eval_chat(cfg, out)
    records, info = score_checkpoint(cfg.checkpoint, cfg.eval)
    label = info["layout"]
    summaries = {label: summarize(records)}
    notes = (f"{info['checkpoint']}: {info['parameters']:,} parameters, streams {info['streams']}; "
             f"{len(records)} held-out tasks in {info['sessions']} sessions (seed {cfg.eval.seed}), {cfg.eval.tool} "
             "tool, decoded in "
             f"{info['eval_seconds']:.0f} s with {cfg.eval.batch_sessions} session(s) at a time.")
    publish(cfg, out, f"ms-ray eval: {label} model", summaries, {label: records}, notes, info)
    return summaries[label]


def how_sampled(sampling) -> str:
    """`greedily`, or the reply stream's sampling settings that differ from greedy."""
    changed = {k: v for k, v in sampling.model_dump().items() if v != type(sampling)().model_dump()[k]}
    return "greedily" if not changed else "with " + ", ".join(f"{k} {v:g}" for k, v in changed.items())


def eval_chat(cfg, out: Path) -> dict:
    """`ms-ray eval` with a `chat:` section (evaluation/chat.py): report.md, summary.json,
    records-chat.jsonl in `out`, one W&B run; returns the summary."""
    chat = cfg.chat
    records, summary = evaluate_chat(cfg.checkpoint, chat)
    notes = (f"{summary['checkpoint']}: {summary['parameters']:,} parameters, streams {summary['streams']}; the first "
             f"{summary['conversations']} held-out conversations of {chat.data} (validation split, file order"
             + (f"; {summary['skipped']} examples that are not one turn pair skipped" if summary["skipped"] else "")
             + f"), decoded {how_sampled(chat.sampling)} with {chat.batch_sessions} session(s) at a time, "
             f"{chat.slack_rows} rows past "
             f"each conversation's end: {summary['decoded_rows']} rows in {summary['decode_seconds']:.0f} s. "
             + (f"Reference: {chat.reference}." if chat.reference else "No reference: loss_before and "
                "loss_sequential not measured."))
    markdown = chat_markdown(f"ms-ray eval: chat model, {summary['conversations']} held-out conversations",
                             summary, records[: chat.samples], notes)
    write_chat_report(out, markdown, summary, records, chat.samples)
    numbers = {f"chat/{k}": float(summary[k]) for k, *_ in CHAT_METRICS if summary[k] == summary[k]}  # no NaN
    samples = (["id", "user", "data", "model"], [[r["id"], r["user"], r["data_written"], r["written"]]
                                                 for r in records[: chat.samples]])
    wandb_dir = log_report(cfg.wandb, cfg.name, out, cfg.model_dump(by_alias=True), numbers, {"samples": samples}, [])
    print(markdown)
    print(f"written to {out}: report.md, summary.json, records-chat.jsonl"
          + (f"; W&B run in {wandb_dir}" if wandb_dir else ""))
    return summary
