"""Skill evaluation: greedy multi-stream decoding of held-out skill examples, scored on timing.

Every example is one session of a single RowDecoder (evaluation.harness.run_episodes): open
sessions advance together, one batched forward pass per row, at most `batch_sessions` at once.
Sessions start empty (no prefill); before the step that builds row r, the example's input
cells of row r (meta["inputs"]) are pushed, so each is consumed at exactly row r and input
streams are silent elsewhere (the tool's answers too: scripted, unlike `ms-ray eval`). Output
streams are sampled greedily. A session ends on the answer stream's end token, or after
len(table) + slack_rows rows.
With force_outputs=True the reference output columns are pushed too (teacher forcing, silence
included), which reproduces the reference table: a check of the machinery, not of the model.

Metrics, per task and over all examples ("all"), as flat keys "skills/<task>/<metric>":
  accuracy      share of examples whose answer stream's non-silent tokens equal meta["answer"]
                exactly (end token included: an answer that never ends is wrong)
  ttft_rows     mean of (row of the first non-silent token on the answer stream) -
                meta["input_end_row"], over examples that emitted one: rows from the end of the
                input to the first answer token; negative = answering while still reading
                (think and tool_call streams do not count: they are not the answer)
  no_output     share of examples whose answer stream stayed silent (left out of ttft_rows)
  latency_rows  mean of (row of the end token) - meta["input_end_row"] over exact matches
  n             number of examples
plus "skills/eval_seconds", the wall time of decoding. A mean over nothing is NaN.
"""

from __future__ import annotations

import time

import numpy as np

from ..core.model import MultiStreamLM
from ..data.tables import Example
from ..evaluation.harness import Episode, Pushes, mean, run_episodes
from ..evaluation.report import number

METRICS = ("n", "accuracy", "ttft_rows", "no_output", "latency_rows")


def _plan(example: Example, schema, force_outputs: bool) -> Pushes:
    """Row -> the (stream, tokens) pushes to make just before the step that builds that row."""
    plan: Pushes = {}
    for stream, cells in example.meta["inputs"].items():
        for row, tok in cells:
            plan.setdefault(int(row), []).append((stream, [int(tok)]))
    if force_outputs:
        for s, spec in enumerate(schema.streams):
            if spec.role == "output":
                for row, tok in enumerate(example.rows[:, s]):
                    plan.setdefault(row, []).append((spec.name, [int(tok)]))
    return plan


def _score(example: Example, rows: np.ndarray, schema) -> dict:
    meta, silence = example.meta, schema.silence_id
    answer_col = rows[:, schema.index(meta["answer_stream"])]
    exact = [int(t) for t in answer_col if t != silence] == [int(t) for t in meta["answer"]]
    emitted = answer_col != silence
    ttft = int(np.argmax(emitted)) - meta["input_end_row"] if emitted.any() else None
    end_rows = np.flatnonzero(answer_col == schema.end_ids()[meta["answer_stream"]])
    latency = int(end_rows[0]) - meta["input_end_row"] if exact and len(end_rows) else None
    return {"id": example.id, "task": meta["task"], "rows": rows, "exact": exact, "ttft_rows": ttft,
            "latency_rows": latency}


def _summary(records: list[dict]) -> dict:
    return {
        "n": len(records),
        "accuracy": mean([float(r["exact"]) for r in records]),
        "ttft_rows": mean([r["ttft_rows"] for r in records]),
        "no_output": mean([float(r["ttft_rows"] is None) for r in records]),
        "latency_rows": mean([r["latency_rows"] for r in records]),
    }


def evaluate_skills(
    model: MultiStreamLM,
    examples: list[Example],
    slack_rows: int = 4,
    batch_sessions: int = 256,
    force_outputs: bool = False,
    return_records: bool = False,
):
    """Decode `examples` greedily and score them (see the module docstring for the metrics).

    Returns a flat dict {"skills/<task>/<metric>": value, ..., "skills/all/...", "skills/eval_seconds"};
    with return_records=True, (metrics, records): one record per example, in order, with id,
    task, rows (the generated table [R, C], every stream), exact, ttft_rows, latency_rows."""
    if not examples:
        raise ValueError("evaluate_skills needs at least one example")
    schema = model.schema
    episodes = [Episode(str(i), ex.num_rows + slack_rows, ex.meta["answer_stream"], ex.meta["input_end_row"],
                        _plan(ex, schema, force_outputs)) for i, ex in enumerate(examples)]
    was_training = model.training
    start = time.perf_counter()
    try:
        run_episodes(model, episodes, batch_sessions)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    generated = [ep.rows for ep in episodes]

    C = schema.num_streams
    records = [_score(ex, np.asarray(rows, dtype=np.int64).reshape(-1, C), schema)
               for ex, rows in zip(examples, generated)]
    tasks = list(dict.fromkeys(r["task"] for r in records))
    metrics = {}
    for task in [*tasks, "all"]:
        group = [r for r in records if task in ("all", r["task"])]
        metrics.update({f"skills/{task}/{k}": v for k, v in _summary(group).items()})
    metrics["skills/eval_seconds"] = seconds
    return (metrics, records) if return_records else metrics


def format_skill_table(metrics: dict) -> str:
    """Markdown table of evaluate_skills' metrics: one line per task, "all" last."""
    tasks = [k.split("/")[1] for k in metrics if k.startswith("skills/") and k.endswith("/n")]
    tasks = [t for t in tasks if t != "all"] + [t for t in tasks if t == "all"]

    lines = ["| task | n | accuracy % | ttft rows | latency rows | no output % |",
             "|---|---:|---:|---:|---:|---:|"]
    for t in tasks:
        m = {k: metrics.get(f"skills/{t}/{k}") for k in METRICS}
        lines.append(f"| {t} | {m['n']} | {number(m['accuracy'], '.1f', 100)} | {number(m['ttft_rows'], '+.2f')} "
                     f"| {number(m['latency_rows'], '+.2f')} | {number(m['no_output'], '.1f', 100)} |")
    return "\n".join(lines)
