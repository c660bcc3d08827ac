"""What `ms-ray eval`, `ms-ray compare` and `ms-ray train` show: one Markdown table (format_tables),
PNG plots, JSON records, flat metrics for W&B and Ray Train.

Every function takes `summaries`: {model label: harness.summarize(...)}; with two labels each
cell reads "first / second", so one table serves one model or a comparison. The metrics are
defined once, in ms_ray/evaluation/harness.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..data.skill_sessions import CONDITIONS
from .chat import METRICS as CHAT_METRICS
from .scoring import summary_order, task_order

# (metric, column title, format, scale)
COLUMNS = (
    ("accuracy", "exact match %", ".1f", 100),
    ("start_rows_after_user", "first answer token, rows", "+.1f", 1),
    ("start_ms_after_user", "first answer token, ms", "+.1f", 1),
    ("end_rows_after_user", "end of answer, rows", "+.1f", 1),
    ("end_ms_after_user", "end of answer, ms", "+.1f", 1),
    ("no_answer", "no answer %", ".1f", 100),
    ("quiet_after_end", "silent after end %", ".1f", 100),
)
BEHAVIOURS = (  # (task, metric, what it shows, format, scale)
    ("count_stop", "reaction_exact", "count ends exactly where the mid-answer `stop` fell, % (stopped examples)",
     ".1f", 100),
    ("count_stop", "reaction_rows", "rows from the user's `stop` to the end of the answer", ".1f", 1),
    ("tool_call", "tool_used", "answer repeats the result of the model's own tool call, %", ".1f", 100),
    ("tool_call", "talk_while_tool", "answer words written while the tool was working, % of examples", ".1f", 100),
)
TIMING = ("Rows and ms are counted from the row of the user's last input token (negative: before the user "
          "finished); end of answer: exact answers only. Conditions: row0 = the session's first question at row 0, "
          "after_silence = first question after silent rows, later = asked after an earlier answer ended, "
          "mid_answer = asked while a count was still running.")
PREFIX = "skills"  # flat keys of one model: skills/<task>/<metric>


def number(value, fmt: str, scale: float = 1) -> str:
    """A table cell: `value * scale` formatted, "–" for a missing or NaN value; a value that
    rounds to zero prints as zero ("+0.0", never "-0.0")."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    text = format(value * scale, fmt)
    return format(0.0, fmt) if float(text) == 0 else text


def condition_table(summaries: dict[str, dict]) -> list[str]:
    """Markdown lines: exact match % per task (rows) and condition (columns), "any" last; none when
    the summaries hold no conditions."""
    labels = list(summaries)
    first = summaries[labels[0]]
    conditions = [c for c in CONDITIONS if any(key.endswith("@" + c) for key in first)]
    if not conditions:
        return []
    lines = ["| exact match % | " + " | ".join(conditions) + " | any |", "|---|" + "---:|" * (len(conditions) + 1)]
    for task in [t for t in task_order(first) if "@" not in t] + ["all"]:
        keys = [f"{task}@{c}" for c in conditions] + [task]
        cells = [" / ".join(number(summaries[lb].get(key, {}).get("accuracy"), ".1f", 100) for lb in labels)
                 for key in keys]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def format_tables(summaries: dict[str, dict]) -> str:
    """Markdown: exact match per task and condition, then one line per task and per task and condition
    ("all" last), then the behaviours table."""
    labels = list(summaries)
    first = summaries[labels[0]]
    tasks = summary_order(first)
    lines = [("" if len(labels) == 1 else f"Cells read {' / '.join(labels)}. ") + TIMING, "",
             *condition_table(summaries),
             f"| task | condition | n | {' | '.join(title for _, title, _, _ in COLUMNS)} |",
             "|---|---|---:|" + "---:|" * len(COLUMNS)]
    for task in tasks:
        cells = [" / ".join(number(summaries[lb].get(task, {}).get(key), fmt, scale) for lb in labels)
                 for key, _, fmt, scale in COLUMNS]
        name, _, condition = task.partition("@")
        lines.append(f"| {name} | {condition or 'any'} | {first[task]['n']:.0f} | " + " | ".join(cells) + " |")
    behaviours = [(task, key, what, fmt, scale) for task, key, what, fmt, scale in BEHAVIOURS if task in first]
    if behaviours:
        lines += ["", f"| behaviour | {' | '.join(labels)} |", "|---|" + "---:|" * len(labels)]
    for task, key, what, fmt, scale in behaviours:
        cells = [number(summaries[lb].get(task, {}).get(key), fmt, scale) for lb in labels]
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def skill_metrics(summary: dict[str, dict], prefix: str = PREFIX) -> dict[str, float]:
    """{"skills/<task>/<metric>": value} of one harness.summarize(...), NaNs left out: flat keys
    for W&B and Ray Train reports. skill_table turns them back into the report's table."""
    return {f"{prefix}/{task}/{key}": float(v) for task, m in summary.items() for key, v in m.items()
            if not math.isnan(v)}


def skill_table(metrics: dict, label: str = "model", prefix: str = PREFIX) -> str:
    """The Markdown table of skill_metrics' flat keys (other keys are ignored): format_tables
    of one model labelled `label`; a metric left out (NaN) shows as "–"."""
    summary: dict[str, dict] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == prefix:
            summary.setdefault(parts[1], {})[parts[2]] = value
    tasks = [t for t in summary_order(summary) if "n" in summary[t]]
    if not tasks:
        return ""
    return format_tables({label: {t: summary[t] for t in tasks}})


def plot(summaries: dict[str, dict], out_dir: Path) -> list[Path]:
    """Grouped bars per task: exact match; first/last answer token in rows; the same in ms."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(summaries)
    tasks = [t for t in summaries[labels[0]] if t != "all" and "@" not in t]
    x, width = np.arange(len(tasks)), 0.8 / len(labels)
    figures = {
        "accuracy.png": ("Exact match on held-out examples", [("accuracy", "exact match %", 100, ".0f")]),
        "latency_rows.png": ("Rows from the user's last token",
                             [("start_rows_after_user", "first answer token", 1, ".1f"),
                              ("end_rows_after_user", "end of answer", 1, ".1f")]),
        "latency_ms.png": ("Milliseconds from the user's last token (this machine)",
                           [("start_ms_after_user", "first answer token", 1, ".0f"),
                            ("end_ms_after_user", "end of answer", 1, ".0f")]),
    }
    paths = []
    for name, (title, panels) in figures.items():
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
        for ax, (key, ylabel, scale, fmt) in zip(axes[0], panels):
            for i, label in enumerate(labels):
                values = [summaries[label][t].get(key, math.nan) * scale for t in tasks]
                bars = ax.bar(x + (i - (len(labels) - 1) / 2) * width, np.nan_to_num(values), width, label=label)
                ax.bar_label(bars, labels=[number(v, fmt, 1) for v in values], fontsize=7)
            ax.axhline(0, color="black", linewidth=0.6)
            ax.set_xticks(x, tasks)
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def flat_metrics(summaries: dict[str, dict]) -> dict[str, float]:
    """{"<label>/<task>/<metric>": value} without NaNs, for W&B and JSON."""
    return {k: v for label, summary in summaries.items() for k, v in skill_metrics(summary, label).items()}


def write_records(records: list[dict], path: Path) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def write_report(out_dir: Path, title: str, summaries: dict[str, dict], records: dict[str, list[dict]],
                 notes: str = "", extra: dict | None = None) -> tuple[str, list[Path]]:
    """report.md, summary.json, records-<label>.jsonl and the plots; returns (markdown, plots)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot(summaries, out_dir)
    markdown = f"# {title}\n\n{format_tables(summaries)}\n" + (f"\n{notes}\n" if notes else "")
    (out_dir / "report.md").write_text(markdown)
    clean = {label: {t: {k: None if math.isnan(v) else v for k, v in m.items()} for t, m in per_task.items()}
             for label, per_task in summaries.items()}  # JSON has no NaN
    (out_dir / "summary.json").write_text(json.dumps({"summaries": clean, **(extra or {})}, indent=1) + "\n")
    for label, recs in records.items():
        write_records(recs, out_dir / f"records-{label}.jsonl")
    return markdown, plots


# ---- the chat evaluation (evaluation/chat.py) ----------------------------------------------
def chat_markdown(title: str, summary: dict, samples: list[dict], notes: str = "") -> str:
    """The chat report: every number of chat.METRICS with its definition, then the sample sessions
    (the first held-out conversations, in order: the user's text, the data's reply, what the model wrote)."""
    lines = [f"# {title}", "", "| metric | value | what it is |", "|---|---:|---|"]
    lines += [f"| {key} | {number(summary.get(key), fmt, scale)} | {what} |" for key, fmt, scale, what in CHAT_METRICS]
    lines += ["", notes, ""] if notes else [""]
    if samples:
        lines += [f"## Sample sessions: the first {len(samples)} held-out conversations", ""]
    for i, s in enumerate(samples, 1):
        start = "no reply" if s["start_rows"] is None else f"reply starts {s['start_rows']:+d} rows after the user"
        lines += [f"{i}. `{s['id']}`: {start}; {'ends cleanly' if s['ends_cleanly'] else 'does not end cleanly'}", "",
                  "```text", f"user:  {s['user']}", f"data:  {s['data_written']}", f"model: {s['written']}", "```", ""]
    return "\n".join(lines)


def write_chat_report(out_dir: Path, markdown: str, summary: dict, records: list[dict], samples: int) -> None:
    """report.md, summary.json (the numbers, NaN as null, and the samples) and records-chat.jsonl."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(markdown + "\n")
    clean = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in summary.items()}
    (out_dir / "summary.json").write_text(json.dumps({"chat": clean, "samples": records[:samples]}, indent=1) + "\n")
    write_records(records, out_dir / "records-chat.jsonl")
