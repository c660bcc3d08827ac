"""The skill evaluation, in one place: held-out sessions decoded live, scored, summarised.

`ms-ray eval`, `ms-ray compare` and the training loop all call `evaluate` and `summarize`
(scoring.py holds the metrics and their definitions).

What is decoded: held-out skill sessions (data/skill_sessions.py; eval.session) with every task in
every condition (row 0, after leading silence, later in a session, asked while a count runs), or,
with eval.session null, single tasks from row 0. Two layouts of the same sessions, one harness:
  streams     the multi-stream model: user cells are injected at their rows (one token per row, as a
              user types), the output streams are generated, all in parallel, for the session's rows
              plus slack_rows. Nothing is forced after an answer's end: staying quiet is the model's.
  sequential  the single-stream baseline: the session as a chat transcript that grows turn by turn
              (`user: what is 6 times 7 tool_call: mul 6 7 tool: 42 output: let me check 42 <|end|>
              user: ...`). Each turn's `user:` part is injected one token per row, everything after
              it is generated until the model's end token (or the reference turn's length plus
              slack_rows), then the next turn's question follows. A transcript cannot hear a
              question while it writes: a count a later question cut short reads `... stop`.
Both run on the same RowDecoder (a one-stream model is a plain causal LM: one token per row), greedily.

The tool (`tool=`):
  live      the REAL tool (ms_ray.tools.run_call) answers the call the model wrote: the streams
            model gets the result on its tool stream TOOL_DELAY rows after the call's last token,
            as in training; the baseline right after it writes `tool:` (two rows after its call's
            last token: one row sooner than the streams model, in the baseline's favour);
  scripted  the reference's result: on the streams model's tool stream at the reference's rows
            whatever the model called; after the baseline's `tool:`.
force_outputs=True pushes the reference's output cells too (teacher forcing, silence included):
it reproduces the reference, a check of the machinery, not of the model.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..core.decode import RowDecoder, StopRules
from ..core.streams import SchemaError
from ..data.skill_sessions import targeted_sessions
from ..data.skills import SEQUENTIAL_STREAMS, SKILL_STREAMS, TASKS, TOOL_DELAY, generate_examples, sequential_turn
from ..data.tables import Example
from ..data.tokenizer import encoder
from ..tools import run_call
from ..tracking import Progress
from .scoring import score_session, summarize

__all__ = ["evaluate", "summarize", "held_out_examples", "is_skills_model", "layout_of", "Layout", "Episode",
           "run_episodes"]
TOOLS = ("live", "scripted")

Pushes = dict[int, list[tuple[str, list[int]]]]  # row -> (stream, tokens) to push before building it


@dataclass
class Episode:
    """One session being decoded."""

    key: str
    max_rows: int
    pushes: Pushes
    turns: list[dict]  # per task: user_end (row of its last user token) and, sequential, its turn's rows
    on_row: Callable[["Episode", int, list[int]], None] | None = None  # may schedule pushes or end it
    rows: list[list[int]] = field(default_factory=list)  # [R][C] tokens as decoded
    times: list[float] = field(default_factory=list)  # perf_counter after the step of each row
    tool: list[dict] = field(default_factory=list)  # calls made: call/result text, rows
    done: bool = False  # the sequential transcript finished its last turn
    current: int = 0  # sequential: the turn being answered
    reference_tool: Callable[[dict], tuple[str, int | None]] | None = None  # scripted tool: a call's result, row


def run_episodes(model, episodes: list[Episode], batch_sessions: int,
                 progress: Callable[[int], None] | None = None, sampling=None, offset_rows: int = 0) -> None:
    """Decode every episode (at most `batch_sessions` at once, one batched forward per row;
    greedy unless `sampling`, as RowDecoder.open takes it); fills each episode's rows and times in
    place. `progress(done)` is told the number of finished episodes after every step.
    offset_rows: every episode starts at this row of a session that had no input before (the
    model's own outputs decoded meanwhile): decoded once, then each episode continues a copy of it."""
    if batch_sessions < 1:
        raise ValueError(f"batch_sessions must be >= 1, got {batch_sessions}")
    decoder = RowDecoder(model, max_sessions=batch_sessions)
    start = lead_in(model, offset_rows, sampling) if offset_rows else None
    waiting, open_ = deque(episodes), {}
    with torch.no_grad():
        while waiting or decoder.sessions:
            while waiting and len(decoder.sessions) < batch_sessions:
                ep = waiting.popleft()
                decoder.open(ep.key, sampling=sampling, stop=StopRules(max_new_rows=ep.max_rows, end_streams=()),
                             start=start)
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
                if ep.done and row.session in decoder.sessions:
                    decoder.close(row.session)
            if progress is not None:
                progress(len(episodes) - len(waiting) - len(decoder.sessions))


@torch.no_grad()
def lead_in(model, rows: int, sampling=None):
    """The state of a session after `rows` rows without input (a windowed model holds only its
    last rows; an unwindowed one all of them)."""
    decoder = RowDecoder(model, max_sessions=1)
    decoder.open("lead", sampling=sampling, stop=StopRules(max_new_rows=None, end_streams=()))
    for _ in range(rows):
        decoder.step()
    return decoder.snapshot("lead")


# ---- the held-out sessions and the two layouts ---------------------------------------------
def held_out_examples(cfg, tokenizer) -> list[Example]:
    """The same sessions for every model (SkillEvalConfig or EvalConfig): `cfg.examples_per_task`
    sessions per task of `cfg.tasks` (default all) and condition, drawn with `cfg.seed` and
    `cfg.session`; with `cfg.session` null, `cfg.examples_per_task` single tasks from row 0."""
    tasks = tuple(cfg.tasks or TASKS)
    schema, encode = SKILL_STREAMS.bind(tokenizer), encoder(tokenizer)
    if cfg.session is None:
        return generate_examples(cfg.examples_per_task * len(tasks), cfg.seed, schema, encode, tasks)
    return targeted_sessions(cfg.examples_per_task, cfg.seed, schema, encode, cfg.session, tasks)


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
    """What differs between the two layouts: building an episode, the tool, reading the answers."""

    def __init__(self, schema, tokenizer, tool: str = "live", force_outputs: bool = False):
        if tool not in TOOLS:
            raise ValueError(f"tool must be one of {TOOLS}, got {tool!r}")
        self.schema, self.tokenizer, self.tool, self.force_outputs = schema, tokenizer, tool, force_outputs
        self.encode = encoder(tokenizer)
        self.kind = layout_of(schema)
        self.silence = schema.silence_id
        self.end_id = schema.end_ids()["output" if self.kind == "streams" else schema.names[0]]
        self.outputs = [i for i, s in enumerate(schema.streams) if s.role == "output"]
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
            ep = self._streams_episode(key, example, slack_rows)
        else:
            ep = self._sequential_episode(key, example, slack_rows)
        ep.reference_tool = reference_tool(example, self)
        return ep

    def _streams_episode(self, key: str, example: Example, slack_rows: int) -> Episode:
        pushes: Pushes = {}
        for stream, cells in example.meta["inputs"].items():
            if stream != "tool" or self.tool == "scripted":  # a live tool answers what the model calls
                for row, tok in cells:
                    pushes.setdefault(int(row), []).append((stream, [int(tok)]))
        if self.force_outputs:  # the reference, then silence for the slack rows
            for s in self.outputs:
                for row in range(example.num_rows + slack_rows):
                    tok = int(example.rows[row, s]) if row < example.num_rows else self.silence
                    pushes.setdefault(row, []).append((self.schema.names[s], [tok]))
        turns = [{"user_end": t["user_end"]} for t in example.meta["tasks"]]
        return Episode(key, example.num_rows + slack_rows, pushes, turns, self._stream_tool)

    def _sequential_episode(self, key: str, example: Example, slack_rows: int) -> Episode:
        """Turn k's question is pushed once turn k-1 ended (teacher forcing: the whole transcript at row 0)."""
        turns = []
        for k, task in enumerate(example.meta["tasks"]):
            space = " " if k else ""
            full = self.encode(space + sequential_turn(task))
            prompt = self.encode(space + sequential_turn({**task, "parts": {"user": task["parts"]["user"]}}))
            turns.append({"prompt": prompt, "full": full, "budget": len(full) + slack_rows})
        text = self.schema.names[0]
        if self.force_outputs:
            start, pushed = 0, []
            for turn in turns:
                turn["start"], turn["user_end"] = start, start + len(turn["prompt"]) - 1
                start += len(turn["full"])
                pushed += turn["full"]
            turns[0]["pushed"] = pushed
        else:
            turns[0]["start"], turns[0]["user_end"] = 0, len(turns[0]["prompt"]) - 1
        max_rows = sum(t["budget"] for t in turns)
        return Episode(key, max_rows, {0: [(text, turns[0].get("pushed", turns[0]["prompt"]))]}, turns,
                       self._sequence_row)

    # ---- sequential turns and the tool ------------------------------------------------------
    def _sequence_row(self, ep: Episode, row: int, tokens: list[int]) -> None:
        turn = ep.turns[ep.current]
        if row <= turn["user_end"]:
            return
        self._sequence_tool(ep, row, tokens)
        if tokens[0] != self.end_id and row - turn["start"] + 1 < turn["budget"]:
            return
        turn["closed_row"] = row
        if ep.current + 1 == len(ep.turns):
            ep.done = True
            return
        ep.current += 1
        nxt = ep.turns[ep.current]
        if self.force_outputs:
            return
        nxt["start"], nxt["user_end"] = row + 1, row + len(nxt["prompt"])
        ep.pushes.setdefault(row + 1, []).append((self.schema.names[0], nxt["prompt"]))

    def _sequence_tool(self, ep: Episode, row: int, tokens: list[int]) -> None:
        """A call is the text between the model's `tool_call:` and its `tool:`."""
        if tokens[0] != self.label["tool"]:
            return
        col = [r[0] for r in ep.rows]
        begin = ep.turns[ep.current]["user_end"] + 1
        starts = [i for i in range(begin, row) if col[i] == self.label["tool_call"]]
        first = starts[-1] + 1 if starts else row
        call = {"first_row": first, "last_row": row - 1, "ids": col[first:row], "turn": ep.current}
        ep.tool.append(call)
        self._answer(ep, call, self.schema.names[0], row + 1)

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

    def _answer(self, ep: Episode, call: dict, stream: str, at_row: int) -> None:
        """Answer a finished call: live, the tool's result at `at_row`; scripted, the reference's
        (streams: already scheduled at its own rows). Teacher-forced sequential text holds it."""
        call["call"] = self.text(call.pop("ids"))
        if self.tool == "live":
            call["result"], call["result_row"] = run_call(call["call"]), at_row
        else:
            call["result"], call["result_row"] = ep.reference_tool(call)
        scheduled = (self.kind == "streams" and self.tool == "scripted") or (
            self.kind == "sequential" and self.force_outputs)
        if not scheduled:
            ep.pushes.setdefault(at_row, []).append((stream, self.encode(call["result"])))


def reference_tool(example: Example, layout: Layout) -> Callable[[dict], tuple[str, int | None]]:
    """Scripted tool: the reference result of the task the call belongs to, and (streams) its row."""
    tasks = example.meta["tasks"]
    tool_rows = [int(r) for r, _ in example.meta["inputs"].get("tool", [])] if layout.kind == "streams" else []

    def lookup(call: dict) -> tuple[str, int | None]:
        if layout.kind == "sequential":
            return tasks[call["turn"]]["parts"].get("tool", ""), call["last_row"] + 2
        k = max([i for i, t in enumerate(tasks) if t["window"][0] <= call["first_row"]], default=0)
        lo, hi = tasks[k]["window"]
        rows = [r for r in tool_rows if lo <= r < hi]
        return tasks[k]["parts"].get("tool", ""), min(rows) if rows else None
    return lookup


def evaluate(model, tokenizer, examples: list[Example], *, batch_sessions: int = 1, slack_rows: int = 8,
             tool: str = "live", force_outputs: bool = False, progress: bool = False, offset_rows: int = 0
             ) -> list[dict]:
    """Decode and score sessions (or single tasks) with a streams or a sequential skills model; one
    record per task (plain values: the training loop all_gathers them across ranks). No examples:
    no records. progress: show sessions done / total, rate and ETA on stderr (a bar on a terminal,
    else a line every 30 s and one at the end). offset_rows: the sessions begin at this row of a
    live session (run_episodes). The model's training mode is restored."""
    layout = Layout(model.schema, tokenizer, tool, force_outputs)
    if not examples:
        return []
    episodes = [layout.episode(str(i), ex, slack_rows) for i, ex in enumerate(examples)]
    was_training = model.training
    shown = Progress(len(episodes), f"eval ({layout.kind})") if progress else None
    try:
        run_episodes(model, episodes, batch_sessions, shown.update if shown else None, offset_rows=offset_rows)
    finally:
        model.train(was_training)
        if shown:
            shown.close()
    return [record for ep, ex in zip(episodes, examples) for record in score_session(layout, ep, ex)]
