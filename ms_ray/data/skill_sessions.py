"""Skill sessions: the built-in tasks as a person meets them, asked at any time, several per session.

A session is one table of at most `shape.rows` rows: leading silence (none with probability
`shape.lead_zero`), then 1-4 tasks drawn by `weights`, each asked a silent gap after the previous
answer ended or, while a count is still running, in the middle of it; a few silent rows close it.
After every answer each output stream is silent until the next question: the model learns to be
quiet, nothing forces it.

A question while an answer is being written (decided per task):
  count_stop   the count is the one answer that runs on long after its question; a new question
               ends it as `stop` does: <|end|> two rows after the question's first token, and the
               new answer follows with its own timing.
  wait_k, running_sum, tool_call
               end at most three rows after their last input (the tool's result included): the
               next question comes after their end. A question while the tool works is not
               trained, so its outcome is undefined.
  A wait_k question never interrupts a count: its first translated word is due at the very row the
  count has to end.

Every task of a session is described in meta["tasks"] (what the evaluation scores): its task,
condition (CONDITIONS: row0 = first task at row 0, after_silence = first task after leading
silence, later = asked after the previous answer ended, mid_answer = asked while a count ran),
start (first row of the question), user_end (its last user token), window [lo, hi) (the rows
whose output cells are its answer: later questions cannot change a row before their start + 2),
answer (the reference output tokens, end included), parts (text per stream, as in skills.generate),
stopped (the user said `stop`), interrupted (a later question ended it).
"""

from __future__ import annotations

import copy
import random

from ..config import SkillSessionConfig
from ..core.streams import StreamSchema
from .skills import _TASK_FNS, REACTION, TASKS, sequential_turn, word_encoder
from .tables import Example, Timeline

CONDITIONS = ("row0", "after_silence", "later", "mid_answer")


def generate_session(rng: random.Random, schema: StreamSchema, encode, shape: SkillSessionConfig, *,
                     tasks=TASKS, weights=None, uid: str, target: tuple[str, str] | None = None) -> Example:
    """One session drawn from `rng` (schema bound, encode as for skills.generate). target=(task,
    condition) makes the session hold that task in that condition (the evaluation's layout);
    the other tasks stay random. id f"skills/session/{uid}"."""
    end_id = schema.end_ids()["output"]
    end_token = schema.streams[schema.index("output")].end_token
    enc = word_encoder(encode)
    tasks, weights = list(tasks), list(weights) if weights else None
    want_cond = target[1] if target else None
    if want_cond is not None and want_cond not in CONDITIONS:
        raise ValueError(f"unknown condition {want_cond!r}; choose from {CONDITIONS}")
    if target == ("wait_k", "mid_answer"):
        raise ValueError("a wait_k question never comes mid-answer (its first word is due where the count ends)")
    tl = Timeline(schema)
    lead_zero = want_cond == "row0" or (want_cond != "after_silence" and rng.random() < shape.lead_zero)
    row = 0 if lead_zero else rng.randint(*shape.lead_silence)
    items: list[dict] = []
    count = rng.randint(*shape.tasks)
    for k in range(max(count, 2) if want_cond in ("later", "mid_answer") else count):
        prev = items[-1] if items else None
        task, interrupt = _plan(rng, k, prev, target, tasks, weights, shape.mid_answer)
        start = rng.randint(prev["first_output"], prev["end_row"] - REACTION - 1) if interrupt else row
        saved = (dict(tl.cells), dict(tl.end), copy.deepcopy(prev))
        if interrupt:
            _interrupt(tl, prev, start, end_id, enc, schema)
        condition = ("mid_answer" if interrupt else "later") if k else ("row0" if start == 0 else "after_silence")
        unstopped = k == 0 and want_cond == "mid_answer"  # the count the target question cuts into
        item = _place(rng, tl, task, start, enc, end_id, schema, condition, stop=not unstopped,
                      long_sums=shape.long_sums)
        if tl.num_rows + 1 > shape.rows:  # it does not fit (with a silent row after it): undo, stop here
            tl.cells, tl.end = saved[0], saved[1]
            if prev is not None:
                items[-1] = saved[2]
            break
        items.append(item)
        row = item["end_row"] + 1 + rng.randint(*shape.gap)
    if not items or (target is not None and not any((t["task"], t["condition"]) == target for t in items)):
        raise ValueError(f"session {uid}: session.rows={shape.rows} is too short for "
                         f"{target or 'one task'} after session.lead_silence={list(shape.lead_silence)}")
    last_end = items[-1]["end_row"]
    rows = tl.to_rows(min(shape.rows, last_end + 1 + rng.randint(max(2, shape.gap[0]), max(2, shape.gap[1]))))
    return Example(f"skills/session/{uid}", "skills/session", f"session-{uid.replace('/', '-')}", "session", rows,
                   _session_meta(rows, schema, items, end_token, encode))


def _plan(rng, k: int, prev: dict | None, target, tasks, weights, mid_answer: float) -> tuple[str, bool]:
    """Task k of a session, and whether it is asked while the count before it still runs."""
    want_task, want_cond = target or (None, None)
    if k == 0 and want_cond == "mid_answer":
        return "count_stop", False
    targeted = (k == 0 and want_cond in ("row0", "after_silence")) or (k == 1 and want_cond in ("later", "mid_answer"))
    task = want_task if targeted else rng.choices(tasks, weights=weights)[0]
    running = prev is not None and prev["task"] == "count_stop" and not prev["stopped"]
    if not running or task == "wait_k":
        return task, False
    if k == 1 and want_cond in ("later", "mid_answer"):
        return task, want_cond == "mid_answer"
    return task, rng.random() < mid_answer


def _place(rng, tl: Timeline, task: str, start: int, enc, end_id: int, schema, condition: str,
           stop: bool, long_sums: float) -> dict:
    """Write one task whose question begins at `start`; returns its description."""
    out = schema.index("output")
    before = {key for key in tl.cells}
    options = {}
    if task == "count_stop" and not stop:  # the count a mid-answer question will interrupt: never stopped
        options["stop"] = False
    if task == "running_sum" and long_sums > 0:  # no draw at 0: sessions stay as they were
        options["long"] = rng.random() < long_sums
    parts = _TASK_FNS[task](rng, tl, enc, end_id, at=start, **options)
    new = {key: tok for key, tok in tl.cells.items() if key not in before}
    user = schema.index("user")
    out_rows = sorted(r for (r, s) in new if s == out)
    return {
        "task": task, "condition": condition, "start": start,
        "user_end": max(r for (r, s) in new if s == user),
        "first_output": out_rows[0], "end_row": out_rows[-1],
        "stopped": "stop" in parts["user"].split(), "interrupted": False, "parts": parts,
    }


def _interrupt(tl: Timeline, count: dict, start: int, end_id: int, enc, schema) -> None:
    """A question at `start` ends a running count: the numbers written by start + 1 stay (whole words),
    <|end|> at start + 2."""
    out = schema.index("output")
    cut = start + REACTION
    words, row, kept_rows = count["parts"]["output"].split(), count["first_output"], 0
    kept = 0
    for i, word in enumerate(words):
        row += len(enc(word, first=(i == 0)))
        if row > cut:  # this word would still be written at the cut
            break
        kept, kept_rows = i + 1, row
    for key in [key for key in tl.cells if key[1] == out and key[0] >= max(kept_rows, count["first_output"])]:
        del tl.cells[key]
    tl.cells[(cut, out)] = end_id
    tl.end["output"] = cut + 1
    count["parts"]["output"] = " ".join(words[:kept])
    count.update(end_row=cut, interrupted=True)


def _session_meta(rows, schema, items: list[dict], end_token: str, encode) -> dict:
    silence, out = schema.silence_id, schema.index("output")
    inputs = {s.name: [[r, int(t)] for r, t in enumerate(rows[:, i]) if t != silence]
              for i, s in enumerate(schema.streams) if s.role == "input"}
    described = []
    for k, item in enumerate(items):
        nxt = items[k + 1] if k + 1 < len(items) else None
        lo = 0 if k == 0 else described[-1]["window"][1]
        hi = len(rows) if nxt is None else nxt["start"] + REACTION + (nxt["condition"] == "mid_answer")
        parts = {**item["parts"], "output": f"{item['parts']['output']} {end_token}".strip()}
        described.append({
            "task": item["task"], "condition": item["condition"], "start": item["start"],
            "user_end": item["user_end"], "window": [lo, hi],
            "answer": [int(t) for t in rows[lo:hi, out] if t != silence],
            "end_row": item["end_row"], "stopped": item["stopped"], "interrupted": item["interrupted"],
            "parts": parts,
        })
    turns = [sequential_turn(t) for t in described]
    return {"kind": "session", "tasks": described, "inputs": inputs,
            "sequential": [int(t) for t in encode(" ".join(turns))]}


def generate_sessions(n: int, seed, schema: StreamSchema, encode, shape: SkillSessionConfig, tasks=TASKS,
                      weights=None) -> list[Example]:
    """`n` sessions; session i draws from its own generator seeded by (seed, i)."""
    return [generate_session(random.Random(f"sessions/{seed}/{i}"), schema, encode, shape, tasks=tasks,
                             weights=weights, uid=f"{seed}/{i}") for i in range(n)]


def targeted_sessions(per_cell: int, seed, schema: StreamSchema, encode, shape: SkillSessionConfig,
                      tasks=TASKS) -> list[Example]:
    """The evaluation's sessions: `per_cell` sessions for every (task, condition) that exists
    (a wait_k question never comes mid-answer; a question comes mid-answer only into a count, so
    only when count_stop is among `tasks`), tasks mixed equally elsewhere."""
    cells = [(t, c) for c in CONDITIONS for t in tasks
             if c != "mid_answer" or (t != "wait_k" and "count_stop" in tasks)]
    return [generate_session(random.Random(f"eval-sessions/{seed}/{t}/{c}/{i}"), schema, encode, shape,
                             tasks=tasks, uid=f"{seed}/{t}/{c}/{i}", target=(t, c))
            for t, c in cells for i in range(per_cell)]
