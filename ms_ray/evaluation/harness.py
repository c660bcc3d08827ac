"""The skill evaluation, in one place: held-out examples decoded as live sessions, scored, summarised.

`ms-ray eval`, `ms-ray compare` and the training loop all call `evaluate` and `summarize`.

Two layouts of the same examples, one harness:
  streams     the multi-stream model: user cells are injected at their rows (one token per
              row, as a user types), the output streams are generated, all in parallel;
  sequential  the single-stream baseline: the same content as one labelled sequence
              (`user: what is 6 times 7 tool_call: mul 6 7 tool: 42 output: let me check 42
              <|end|>`); the user part is injected one token per row (it reads as the user
              types, like the other), everything after it is generated.
Both run on the same RowDecoder (a one-stream model is a plain causal LM: one token per row),
greedily; a session ends on the answer's end token or after the reference's rows + slack_rows.

The tool (`tool=`):
  live      the REAL tool (ms_ray.tools.run_call) answers the call the model wrote: the streams
            model gets the result on its tool stream TOOL_DELAY rows after the call's last token,
            as in training; the baseline right after it writes `tool:` (two rows after its call's
            last token: one row sooner than the streams model, in the baseline's favour);
  scripted  the reference's result: on the streams model's tool stream at the reference's rows
            whatever the model called; after the baseline's `tool:`.
force_outputs=True pushes the reference's output cells too (teacher forcing, silence included):
it reproduces the reference, a check of the machinery, not of the model.

Metrics, per task and over all examples ("all"). Every row and ms count is taken from the row
of the user's LAST input token (`user_end`); negative = before the user had finished. ms are the
wall time between the decoder steps that built those rows: with batch_sessions=1 one session's
latency on this machine, with more a batch's. A mean over nothing is NaN.
  n                       examples
  accuracy                share whose answer equals the reference exactly, end token included
  no_answer               share with no answer token at all
  start_rows_after_user   rows from user_end to the first answer token (examples with one)
  start_ms_after_user     the same in ms
  end_rows_after_user     rows from user_end to the answer's end token (exact answers only)
  end_ms_after_user       the same in ms
  reaction_exact          count_stop with a mid-answer `stop`: share that ended exactly where it had to
  reaction_rows           count_stop with a mid-answer `stop` (the user's last token): rows to the end token
  tool_used               tool_call: share whose answer repeats the result of the model's own call
  talk_while_tool         tool_call: share with an answer token written while the tool worked
The answer is the output stream's non-silent cells (streams) / what follows the model's first
`output:` after the user's part (sequential); think and tool_call are not the answer.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..core.decode import RowDecoder, StopRules
from ..core.streams import SchemaError
from ..data.skills import SEQUENTIAL_STREAMS, SKILL_STREAMS, TASKS, TOOL_DELAY, generate_examples, sequential_text
from ..data.tables import Example
from ..data.tokenizer import encoder
from ..tools import run_call
from ..tracking import Progress

SUMMARY = ("n", "accuracy", "no_answer", "start_rows_after_user", "start_ms_after_user", "end_rows_after_user",
           "end_ms_after_user", "reaction_exact", "reaction_rows", "tool_used", "talk_while_tool")
TOOLS = ("live", "scripted")

Pushes = dict[int, list[tuple[str, list[int]]]]  # row -> (stream, tokens) to push before building it


@dataclass
class Episode:
    """One example being decoded."""

    key: str
    max_rows: int
    end_stream: str
    user_end: int  # row of the user's last input token
    pushes: Pushes
    on_row: Callable[["Episode", int, list[int]], None] | None = None  # may schedule pushes
    rows: list[list[int]] = field(default_factory=list)  # [R][C] tokens as decoded
    times: list[float] = field(default_factory=list)  # perf_counter after the step of each row
    tool: list[dict] = field(default_factory=list)  # calls made: call/result text, rows
    reference_tool: tuple[str, int | None] = ("", None)  # the reference's tool result and its first row


def run_episodes(model, episodes: list[Episode], batch_sessions: int,
                 progress: Callable[[int], None] | None = None) -> None:
    """Greedy-decode every episode (at most `batch_sessions` at once, one batched forward per
    row); fills each episode's rows and times in place. `progress(done)` is told the number of
    finished episodes after every step."""
    if batch_sessions < 1:
        raise ValueError(f"batch_sessions must be >= 1, got {batch_sessions}")
    decoder = RowDecoder(model, max_sessions=batch_sessions)
    waiting, open_ = deque(episodes), {}
    with torch.no_grad():
        while waiting or decoder.sessions:
            while waiting and len(decoder.sessions) < batch_sessions:
                ep = waiting.popleft()
                decoder.open(ep.key, stop=StopRules(max_new_rows=ep.max_rows, end_streams=(ep.end_stream,)))
                open_[ep.key] = ep
            for key in decoder.sessions:
                ep = open_[key]
                for stream, tokens in ep.pushes.pop(len(ep.rows), ()):
                    decoder.push(key, stream, tokens)
            built = decoder.step()
            now = time.perf_counter()
            for row in built:
                ep = open_[row.session]
                ep.rows.append(row.tokens)
                ep.times.append(now)
                if ep.on_row is not None:
                    ep.on_row(ep, len(ep.rows) - 1, row.tokens)
            if progress is not None:
                progress(len(episodes) - len(waiting) - len(decoder.sessions))


# ---- the held-out examples and the two layouts ---------------------------------------------
def held_out_examples(cfg, tokenizer) -> list[Example]:
    """The same examples for every model: `cfg.examples_per_task` per task of `cfg.tasks` (default
    all), drawn as stream tables with `cfg.seed` (SkillEvalConfig or EvalConfig)."""
    tasks = tuple(cfg.tasks or TASKS)
    return generate_examples(cfg.examples_per_task * len(tasks), cfg.seed, SKILL_STREAMS.bind(tokenizer),
                             encoder(tokenizer), tasks)


def is_skills_model(schema) -> bool:
    """A streams skills model (SKILL_STREAMS' streams) or a sequential baseline (SEQUENTIAL_STREAMS':
    one output stream `text` with an end token); False for any other schema, e.g. a chat model's."""
    if schema.names == SKILL_STREAMS.names:
        return True
    return schema.names == SEQUENTIAL_STREAMS.names and schema.streams[0].role == "output" and (
        schema.streams[0].end_token is not None)


def layout_of(schema) -> str:
    if schema.names == SKILL_STREAMS.names:
        return "streams"
    if is_skills_model(schema):
        return "sequential"
    raise SchemaError(f"not a skills model: streams {schema.names}; the skill evaluation needs the streams "
                      f"{SKILL_STREAMS.names} or a sequential baseline's one output stream {SEQUENTIAL_STREAMS.names} "
                      "with an end token")


class Layout:
    """What differs between the two layouts: building an episode, the tool, reading the answer."""

    def __init__(self, schema, tokenizer, tool: str = "live", force_outputs: bool = False):
        if tool not in TOOLS:
            raise ValueError(f"tool must be one of {TOOLS}, got {tool!r}")
        self.schema, self.tokenizer, self.tool, self.force_outputs = schema, tokenizer, tool, force_outputs
        self.encode = encoder(tokenizer)
        self.kind = layout_of(schema)
        self.silence = schema.silence_id
        self.end_id = schema.end_ids()["output" if self.kind == "streams" else schema.names[0]]
        if self.kind == "sequential":
            self.label = {s: self._one_token(f"{s}:") for s in ("tool_call", "tool", "output")}

    def _one_token(self, word: str) -> int:
        ids = self.encode(word)
        if len(ids) != 1:
            raise ValueError(f"the sequential layout needs {word!r} to be one token of the tokenizer, got {ids}")
        return ids[0]

    def text(self, ids) -> str:
        return self.tokenizer.decode([int(t) for t in ids if t != self.silence], skip_special_tokens=False).strip()

    # ---- episodes ----------------------------------------------------------------------
    def episode(self, key: str, example: Example, slack_rows: int) -> Episode:
        if self.kind == "streams":
            return self._streams_episode(key, example, slack_rows)
        text = self.schema.names[0]
        prompt = self.encode(sequential_text({"user": example.meta["parts"]["user"]}))
        full = self.encode(sequential_text(example))
        pushed = full if self.force_outputs else prompt
        ep = Episode(key, len(full) + slack_rows, text, len(prompt) - 1, {0: [(text, pushed)]}, self._sequence_tool)
        ep.reference_tool = (example.meta["parts"].get("tool", ""), None)
        return ep

    def _streams_episode(self, key: str, example: Example, slack_rows: int) -> Episode:
        inputs, pushes = example.meta["inputs"], {}
        for stream, cells in inputs.items():
            if stream != "tool" or self.tool == "scripted":  # a live tool answers what the model calls
                for row, tok in cells:
                    pushes.setdefault(int(row), []).append((stream, [int(tok)]))
        if self.force_outputs:
            for s, spec in enumerate(self.schema.streams):
                if spec.role == "output":
                    for row, tok in enumerate(example.rows[:, s]):
                        pushes.setdefault(row, []).append((spec.name, [int(tok)]))
        user_end = max(int(r) for r, _ in inputs["user"])
        ep = Episode(key, example.num_rows + slack_rows, "output", user_end, pushes, self._stream_tool)
        tool_rows = [int(r) for r, _ in inputs.get("tool", [])]
        ep.reference_tool = (example.meta["parts"].get("tool", ""), min(tool_rows) if tool_rows else None)
        return ep

    # ---- the tool ----------------------------------------------------------------------
    def _stream_tool(self, ep: Episode, row: int, tokens: list[int]) -> None:
        """A call is the tool_call stream's text up to its first silent cell after it."""
        tok = tokens[self.schema.index("tool_call")]
        pending = ep.tool[-1] if ep.tool and "result" not in ep.tool[-1] else None
        if tok != self.silence:
            if pending is None:
                ep.tool.append(pending := {"first_row": row, "ids": []})
            pending["ids"].append(tok)
            pending["last_row"] = row
        elif pending is not None:
            self._answer(ep, pending, "tool", pending["last_row"] + TOOL_DELAY)

    def _sequence_tool(self, ep: Episode, row: int, tokens: list[int]) -> None:
        """A call is the text between the model's `tool_call:` and its `tool:`."""
        if tokens[0] != self.label["tool"] or row <= ep.user_end:
            return
        col = [r[0] for r in ep.rows]
        starts = [i for i, t in enumerate(col[:row]) if t == self.label["tool_call"]]
        first = starts[-1] + 1 if starts else row
        call = {"first_row": first, "last_row": row - 1, "ids": col[first:row]}
        ep.tool.append(call)
        self._answer(ep, call, self.schema.names[0], row + 1)

    def _answer(self, ep: Episode, call: dict, stream: str, at_row: int) -> None:
        """Answer a finished call: live, the tool's result at `at_row`; scripted, the reference's
        (streams: at its own rows, already scheduled). Teacher-forced sequential text holds it."""
        call["call"] = self.text(call.pop("ids"))
        if self.tool == "live":
            call["result"], call["result_row"] = run_call(call["call"]), at_row
        else:
            result, row = ep.reference_tool
            call["result"], call["result_row"] = result, row if self.kind == "streams" else at_row
        scheduled = (self.kind == "streams" and self.tool == "scripted") or (
            self.kind == "sequential" and self.force_outputs)
        if not scheduled:
            ep.pushes.setdefault(at_row, []).append((stream, self.encode(call["result"])))

    # ---- reading the answer ------------------------------------------------------------
    def answer(self, ep: Episode, example: Example) -> tuple[list[int], list[int], list[int]]:
        """(answer tokens, the row of each, reference answer tokens): the output stream's
        non-silent cells / what follows the model's first `output:` label; end token included."""
        rows = np.asarray(ep.rows, dtype=np.int64).reshape(len(ep.rows), -1)
        if self.kind == "streams":
            col = rows[:, self.schema.index("output")]
            at = [int(i) for i in np.flatnonzero(col != self.silence)]
            return [int(col[i]) for i in at], at, [int(t) for t in example.meta["answer"]]
        col = [int(t) for t in rows[:, 0]]
        ref = self.encode(sequential_text(example))
        reference = ref[ref.index(self.label["output"]) + 1:]
        labels = [i for i in range(ep.user_end + 1, len(col)) if col[i] == self.label["output"]]
        at = list(range(labels[0] + 1, len(col))) if labels else []
        return [col[i] for i in at], at, reference


# ---- scoring ------------------------------------------------------------------------------
def score(layout: Layout, ep: Episode, example: Example) -> dict:
    """One record (plain values: JSON and pickle): exactness, timings from the user's last
    token (rows, ms), the tool calls made, and the behaviours only streams can show."""
    meta, user_end = example.meta, ep.user_end
    got, at, reference = layout.answer(ep, example)
    exact = got == reference
    first = at[0] if at else None
    end_row = at[got.index(layout.end_id)] if layout.end_id in got else None

    def ms(row):
        if row is None or user_end >= len(ep.times):  # ended before the user finished: rows only
            return None
        return 1000 * (ep.times[row] - ep.times[user_end])

    rec = {
        "id": example.id, "task": meta["task"], "layout": layout.kind, "tool": layout.tool, "exact": exact,
        "answer": layout.text(got), "reference": layout.text(reference),
        "start_rows_after_user": None if first is None else first - user_end, "start_ms_after_user": ms(first),
        "end_rows_after_user": end_row - user_end if exact else None,
        "end_ms_after_user": ms(end_row) if exact else None,
        "rows": len(ep.rows), "tool_calls": [tool_call(layout, c) for c in ep.tool],
    }
    if meta["task"] == "count_stop" and "stop" in meta["parts"]["user"].split():
        # `stop` is the user's last word: rows from it to the end of the answer, and whether
        # the count stopped exactly where it had to
        rec["reaction_exact"] = exact
        rec["reaction_rows"] = None if end_row is None else end_row - user_end
    if meta["task"] == "tool_call":
        calls = [c for c in rec["tool_calls"] if "result" in c]  # finished calls
        call = calls[0] if calls else None
        words = rec["answer"].split()
        rec["tool_used"] = bool(call) and len(words) >= 2 and words[-2] == call["result"]
        # an answer token written while the tool worked (from the call's first token until the
        # result arrives): talking while acting
        rec["talk_while_tool"] = call is not None and call["result_row"] is not None and any(
            call["first_row"] <= r <= call["result_row"] for r in at)
    return rec


def tool_call(layout: Layout, call: dict) -> dict:
    """A call as recorded: text, result, rows; one still being written when the session ended
    has its text so far and no result."""
    call = dict(call)
    if "ids" in call:
        call["call"] = layout.text(call.pop("ids"))
    return call


def evaluate(model, tokenizer, examples: list[Example], *, batch_sessions: int = 1, slack_rows: int = 8,
             tool: str = "live", force_outputs: bool = False, progress: bool = False) -> list[dict]:
    """Decode and score `examples` with a streams or a sequential skills model; one record each
    (plain values: the training loop all_gathers them across ranks). No examples: no records.
    progress: show examples done / total, rate and ETA on stderr (a bar on a terminal, else a
    line every 30 s and one at the end). The model's training mode is restored."""
    layout = Layout(model.schema, tokenizer, tool, force_outputs)
    if not examples:
        return []
    episodes = [layout.episode(str(i), ex, slack_rows) for i, ex in enumerate(examples)]
    was_training = model.training
    shown = Progress(len(episodes), f"eval ({layout.kind})") if progress else None
    try:
        run_episodes(model, episodes, batch_sessions, shown.update if shown else None)
    finally:
        model.train(was_training)
        if shown:
            shown.close()
    return [score(layout, ep, ex) for ep, ex in zip(episodes, examples)]


# ---- summaries ----------------------------------------------------------------------------
def mean(values) -> float:
    """The mean of the values that are not None (exactly rounded: the same in any order); NaN for none."""
    values = [float(v) for v in values if v is not None]
    return math.fsum(values) / len(values) if values else math.nan


def task_order(tasks) -> list[str]:
    """The built-in tasks in their own order, then any others as they came; "all" left out."""
    seen = [t for t in dict.fromkeys(tasks) if t != "all"]
    return [t for t in TASKS if t in seen] + [t for t in seen if t not in TASKS]


def summarize(records: list[dict]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} plus "all" (metrics: SUMMARY, defined in the module docstring);
    a behaviour's mean is over the records that have it. Records in any order (e.g. gathered
    from several ranks) give the same summary."""
    out = {}
    for task in [*task_order(r["task"] for r in records), "all"]:
        group = [r for r in records if task in ("all", r["task"])]
        m = {"n": len(group), "accuracy": mean(r["exact"] for r in group),
             "no_answer": mean(r["start_rows_after_user"] is None for r in group)}
        for key in SUMMARY[3:]:
            m[key] = mean(r.get(key) for r in group)
        out[task] = m
    return out
