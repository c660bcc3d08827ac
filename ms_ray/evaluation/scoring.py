"""Scoring the decoded sessions: one record per task, and the summaries every report shows.

Metrics, per task, per task and condition ("count_stop@mid_answer") and over all tasks ("all").
Every row and ms count is taken from the row of the task's user's LAST input token (`user_end`);
negative = before the user had finished. ms are the wall time between the decoder steps that built
those rows: with batch_sessions=1 one session's latency on this machine, with more a batch's. A mean
over nothing is NaN.
  n                       tasks scored
  accuracy                share whose answer equals the reference exactly, end token included
  no_answer               share with no answer token at all
  start_rows_after_user   rows from user_end to the first answer token (tasks with one)
  start_ms_after_user     the same in ms
  end_rows_after_user     rows from user_end to the answer's end token (exact answers only)
  end_ms_after_user       the same in ms
  quiet_after_end         streams: share of answers with an end token after which every output stream
                          stays silent until the next question can be heard (its row + 1) or, for a
                          session's last task, until the session's end (slack rows included)
  reaction_exact          count_stop with a mid-answer `stop`: share that ended exactly where it had to
  reaction_rows           count_stop with a mid-answer `stop` (the user's last token): rows to the end token
  tool_used               tool_call: share whose answer repeats the result of the model's own call
  talk_while_tool         tool_call: share with an answer token written while the tool worked
A task's answer: streams, the output stream's non-silent cells in the task's window (its rows until a
later question could change the output, data/skill_sessions.py); sequential, what follows the model's
first `output:` in the task's turn. think and tool_call are not the answer.
"""

from __future__ import annotations

import math

import numpy as np

from ..data.skill_sessions import CONDITIONS
from ..data.skills import TASKS

SUMMARY = ("n", "accuracy", "no_answer", "start_rows_after_user", "start_ms_after_user", "end_rows_after_user",
           "end_ms_after_user", "quiet_after_end", "reaction_exact", "reaction_rows", "tool_used", "talk_while_tool")


def score_session(layout, ep, example) -> list[dict]:
    """One record per task of the session (plain values: JSON and pickle)."""
    rows = np.asarray(ep.rows, dtype=np.int64).reshape(len(ep.rows), -1)
    records = []
    for k, task in enumerate(example.meta["tasks"]):
        if layout.kind == "streams":
            lo, hi = task["window"]
            hi = len(rows) if k + 1 == len(example.meta["tasks"]) else hi
            got, at, reference, quiet, calls = _streams_answer(layout, ep, rows, task, lo, hi)
        else:
            got, at, reference, calls = _turn_answer(layout, ep, rows, k)
            quiet = None
        records.append(_record(layout, ep, example, k, got, at, reference, quiet, calls))
    return records


def _streams_answer(layout, ep, rows, task, lo: int, hi: int):
    col = rows[:, layout.schema.index("output")]
    at = [lo + int(i) for i in np.flatnonzero(col[lo:hi] != layout.silence)]
    got = [int(col[i]) for i in at]
    quiet = None
    if layout.end_id in got:
        after = rows[at[got.index(layout.end_id)] + 1: hi][:, layout.outputs]
        quiet = bool((after == layout.silence).all())
    calls = [c for c in ep.tool if lo <= c["first_row"] < hi]
    return got, at, [int(t) for t in task["answer"]], quiet, calls


def _turn_answer(layout, ep, rows, k: int):
    turn = ep.turns[k]
    full = turn["full"]
    reference = full[full.index(layout.label["output"]) + 1:]
    if "user_end" not in turn or turn["user_end"] >= len(rows):  # never reached: no answer
        return [], [], reference, []
    col = [int(t) for t in rows[:, 0]]
    last = turn.get("closed_row", len(col) - 1)
    labels = [i for i in range(turn["user_end"] + 1, last + 1) if col[i] == layout.label["output"]]
    at = list(range(labels[0] + 1, last + 1)) if labels else []
    return [col[i] for i in at], at, reference, [c for c in ep.tool if c.get("turn") == k]


def _record(layout, ep, example, k: int, got, at, reference, quiet, calls) -> dict:
    task = example.meta["tasks"][k]
    user_end = ep.turns[k].get("user_end", task["user_end"])
    exact = got == reference
    first = at[0] if at else None
    end_row = at[got.index(layout.end_id)] if layout.end_id in got else None

    def ms(row):
        if row is None or user_end >= len(ep.times):  # ended before the user finished: rows only
            return None
        return 1000 * (ep.times[row] - ep.times[user_end])

    rec = {
        "id": f"{example.id}#{k}", "task": task["task"], "condition": task["condition"], "layout": layout.kind,
        "tool": layout.tool, "exact": exact, "answer": layout.text(got), "reference": layout.text(reference),
        "start_rows_after_user": None if first is None else first - user_end, "start_ms_after_user": ms(first),
        "end_rows_after_user": end_row - user_end if exact else None,
        "end_ms_after_user": ms(end_row) if exact else None, "quiet_after_end": quiet,
        "rows": len(ep.rows), "tool_calls": [tool_call(layout, c) for c in calls],
    }
    if task["task"] == "count_stop" and task["stopped"]:
        # `stop` is the user's last word: rows from it to the end of the answer, and whether
        # the count stopped exactly where it had to
        rec["reaction_exact"] = exact
        rec["reaction_rows"] = None if end_row is None else end_row - user_end
    if task["task"] == "tool_call":
        finished = [c for c in rec["tool_calls"] if "result" in c]
        call = finished[0] if finished else None
        words = rec["answer"].split()
        rec["tool_used"] = bool(call) and len(words) >= 2 and words[-2] == call["result"]
        # an answer token written while the tool worked (from the call's first token until the
        # result arrives): talking while acting
        rec["talk_while_tool"] = call is not None and call["result_row"] is not None and any(
            call["first_row"] <= r <= call["result_row"] for r in at)
    return rec


def tool_call(layout, call: dict) -> dict:
    """A call as recorded: text, result, rows; one still being written when the session ended
    has its text so far and no result."""
    call = dict(call)
    if "ids" in call:
        call["call"] = layout.text(call.pop("ids"))
    return call


# ---- summaries ----------------------------------------------------------------------------
def mean(values) -> float:
    """The mean of the values that are not None (exactly rounded: the same in any order); NaN for none."""
    values = [float(v) for v in values if v is not None]
    return math.fsum(values) / len(values) if values else math.nan


def task_order(keys) -> list[str]:
    """Tasks in their own order (the built-in ones first), each followed by its conditions
    ("task@condition", CONDITIONS order); "all" and "all@..." left out."""
    seen = [t for t in dict.fromkeys(keys) if t.split("@")[0] != "all"]
    tasks = list(dict.fromkeys(t.split("@")[0] for t in seen))
    tasks = [t for t in TASKS if t in tasks] + [t for t in tasks if t not in TASKS]
    order = []
    for task in tasks:
        conds = [t for t in seen if t.startswith(task + "@")]
        rank = {c: i for i, c in enumerate(CONDITIONS)}
        conds.sort(key=lambda t: rank.get(t.split("@", 1)[1], len(rank)))
        order += ([task] if task in seen else []) + conds
    return order


def summary_order(keys) -> list[str]:
    """The order of a summary's keys: task_order, then "all" and "all@condition" (CONDITIONS order)."""
    keys = list(keys)
    return [*task_order(keys), *(k for k in ("all", *(f"all@{c}" for c in CONDITIONS)) if k in keys)]


def summarize(records: list[dict]) -> dict[str, dict[str, float]]:
    """{key: {metric: value}} for every task, every "task@condition" present, "all" and "all@condition" (metrics:
    SUMMARY, defined in the module docstring); a behaviour's mean is over the records that have it.
    Records in any order (e.g. gathered from several ranks) give the same summary."""
    groups: dict[str, list[dict]] = {"all": records}
    for r in records:
        condition = r.get("condition", "row0")
        for key in (r["task"], f"{r['task']}@{condition}", f"all@{condition}"):
            groups.setdefault(key, []).append(r)
    out = {}
    for key in summary_order(groups):
        group = groups[key]
        m = {"n": len(group), "accuracy": mean(r["exact"] for r in group),
             "no_answer": mean(r["start_rows_after_user"] is None for r in group)}
        for metric in SUMMARY[3:]:
            m[metric] = mean(r.get(metric) for r in group)
        out[key] = m
    return out
