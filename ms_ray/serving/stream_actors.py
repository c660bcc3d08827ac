"""Stream actors: Ray Serve deployments attached to streams (the `actors:` of a serve config).

An actor reads the cells of the streams it `reads` and may append to the input streams it
`writes`, concurrently with the row clock. After every step the session engine hands each actor
ONE batch with every row of every session of that replica since its last call, and the sessions
that ended; calls to one actor are made one at a time, in order (rows queue up while a call is
in flight, so a slow actor gets bigger batches, never a skipped row). Write your own as a plain
class (the deployment is made by `ms_ray.serving.app.build`):

    class Echo:
        def __init__(self, checkpoint: str, **args):    # args: the `args:` of its config entry
            ...
        async def __call__(self, batch: dict) -> list[dict]:
            # batch = {"silence": ID, "rows": [ROW, ...], "ended": [{"session": ID, "reason": "closed"}]}
            # ROW   = {"session": ID, "row": 7, "tokens": {stream: id, ...},   # every stream it reads
            #          "cells": {stream: text, ...}}                            # the ones not silent
            return [{"session": ID, "stream": "tool", "text": " 42", "at_row": 10}]   # appends, if any

    actors:
      - {name: echo, import_path: my_module:Echo, reads: [tool_call], writes: [tool], args: {}}

An append goes in from `at_row` (default: at once), one token per row like a client's, cut to
`session.max_append_chars`; an append to a stream the actor does not write, or to a session that
has ended, is dropped and logged. Two actors ship: `Calculator` (the tool runner: answers each
call the model finishes on `tool_call` in the `tool` stream) and `Recorder` (writes every finished
session, all streams, as table JSONL that `ms-ray prepare` reads with `format: table`).
"""

from __future__ import annotations

import asyncio
import datetime
import inspect
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config.serve import import_attr
from ..core.streams import StreamSchema
from ..data.formats import table_line
from ..data.tables import Example

log = logging.getLogger("ms_ray.serving")


# ---- the engine's side: one link per actor ----------------------------------------------
@dataclass
class ActorLink:
    """What the session engine knows of one actor: the streams it reads and writes, and how to
    call it (a Serve handle call, or any coroutine function in tests)."""

    name: str
    reads: tuple[str, ...]
    writes: frozenset[str]
    call: Callable[[dict], Awaitable[list[dict]]]
    timeout_s: float = 10.0
    rows: list[dict] = field(default_factory=list)  # not yet delivered
    ended: list[dict] = field(default_factory=list)
    task: asyncio.Task | None = None
    failures: int = 0  # batches given up on (logged)

    def batch(self) -> dict:
        batch = {"rows": self.rows, "ended": self.ended}
        self.rows, self.ended = [], []
        return batch


# ---- the calculator: the tool runner as a stream actor ----------------------------------
class Calculator:
    """Runs `tool` (default ms_ray.tools:run_call) on each call the model finishes on `call_stream`
    (its text up to the next silent cell) and appends the answer to `result_stream`, `delay_rows`
    after the call's last token (as the skills data times it), while the rows go on. A failing or
    slow tool answers `error: ...`, which the model reads like any tool result."""

    def __init__(self, checkpoint: str | None = None, tool="ms_ray.tools:run_call", call_stream: str = "tool_call",
                 result_stream: str = "tool", delay_rows: int = 3, timeout_s: float = 10.0,
                 answer_wait_s: float = 0.05):
        if delay_rows < 2:  # the call is known to be complete only at the silent cell after it
            raise ValueError(f"calculator delay_rows: at least 2, got {delay_rows}")
        self.tool = import_attr(tool) if isinstance(tool, str) else tool
        self.call_stream, self.result_stream = call_stream, result_stream
        self.delay_rows, self.timeout_s, self.answer_wait_s = delay_rows, timeout_s, answer_wait_s
        self.calls: dict[str, list] = {}  # session -> [text so far, row of its last token]
        self.tasks: dict[str, set[asyncio.Task]] = {}  # session -> its tools still running
        self.answers: list[dict] = []  # appends ready for the next reply

    async def __call__(self, batch: dict) -> list[dict]:
        started = []
        for row in batch["rows"]:
            sid, token = row["session"], row["tokens"].get(self.call_stream)
            if token is not None and token != batch["silence"]:
                call = self.calls.setdefault(sid, ["", row["row"]])
                call[0] += row["cells"].get(self.call_stream, "")
                call[1] = row["row"]
            elif sid in self.calls:
                text, last = self.calls.pop(sid)
                task = asyncio.get_running_loop().create_task(self.answer(sid, text.strip(), last + self.delay_rows))
                self.tasks.setdefault(sid, set()).add(task)
                task.add_done_callback(self.tasks[sid].discard)
                started.append(task)
        for end in batch["ended"]:
            self.calls.pop(end["session"], None)
            for task in self.tasks.pop(end["session"], set()):
                task.cancel()
        if started:  # a quick tool's answer goes back in this reply, in time for its row
            await asyncio.wait(started, timeout=self.answer_wait_s)
        answers, self.answers = self.answers, []
        return answers

    async def answer(self, session: str, call: str, due: int) -> None:
        try:
            if inspect.iscoroutinefunction(self.tool):
                result = await asyncio.wait_for(self.tool(call), self.timeout_s)
            else:
                result = await asyncio.wait_for(asyncio.to_thread(self.tool, call), self.timeout_s)
        except asyncio.TimeoutError:
            result = f"error: tool timed out after {self.timeout_s:g} s"
        except Exception as e:  # the model sees the failure in the tool stream, as a tool user would
            result = f"error: {e}"
        self.answers.append({"session": session, "stream": self.result_stream, "text": str(result), "at_row": due})


# ---- the recorder: served sessions become training data ---------------------------------
class Recorder:
    """Writes every finished session, all streams, as one line of table JSONL (ms_ray/data/formats.py)
    to `{path}/{date}/{replica}.jsonl`, flushed and synced at each session's end. Streams in
    `private` are written as silence (their names go in the line's meta.redacted). Read the files
    back with a `{kind: jsonl, format: table, path: ...}` source of `ms-ray prepare`. A session
    longer than `segment_rows` (one without an end, say) is written every segment_rows rows, as
    lines `{id}@{k}` (meta.segment k): the recorder's memory stays bounded too."""

    def __init__(self, checkpoint: str, path: str = "runs/sessions", private: list[str] = (), source: str = "serve",
                 min_rows: int = 1, segment_rows: int = 4096):
        from ..core.loading import load_tokenizer

        schema = StreamSchema.load(checkpoint)
        self.tokenizer = load_tokenizer(checkpoint, schema)
        self.schema = schema.bind(self.tokenizer)
        unknown = set(private) - set(self.schema.names)
        if unknown:
            raise ValueError(f"recorder private: {sorted(unknown)} are not streams of {checkpoint} "
                             f"({self.schema.names})")
        self.private, self.source, self.min_rows, self.segment_rows = sorted(private), source, min_rows, segment_rows
        self.folder = Path(path)
        self.sessions: dict[str, list[list[int]]] = {}  # session -> token rows (of its current segment), every stream
        self.segments: dict[str, int] = {}  # session -> segments written so far

    def file(self) -> Path:
        try:
            from ray import serve

            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # not in a Serve replica (tests, scripts)
            replica = f"pid{os.getpid()}"
        return self.folder / datetime.date.today().isoformat() / f"{replica}.jsonl"

    async def __call__(self, batch: dict) -> list[dict]:
        silence = batch["silence"]
        lines = []
        for row in batch["rows"]:
            rows = self.sessions.setdefault(row["session"], [])
            rows.append([row["tokens"].get(name, silence) for name in self.schema.names])
            if len(rows) >= self.segment_rows:
                lines.append(self.line(row["session"], None))
        lines += [self.line(end["session"], end["reason"]) for end in batch["ended"]]
        lines = [line for line in lines if line is not None]
        if lines:
            await asyncio.to_thread(self.append, lines)
        return []

    def line(self, session: str, reason: str | None) -> str | None:
        """The session's rows so far as a table line; reason None: a segment of a running session."""
        rows = self.sessions.pop(session, [])
        segment = self.segments.pop(session, 0) if reason is not None else self.segments.get(session, 0)
        if reason is None:
            self.segments[session] = segment + 1
        if len(rows) < self.min_rows:
            return None
        table = np.asarray(rows, dtype=np.int32)
        for name in self.private:
            table[:, self.schema.index(name)] = self.schema.silence_id
        meta = {"ended": reason, "redacted": self.private}
        example_id = session
        if segment or reason is None:  # a session written in parts: each part its own example
            meta["segment"] = segment
            example_id = f"{session}@{segment}"
        example = Example(example_id, self.source, session, "live", table, meta)
        return json.dumps(table_line(example, self.schema, self.tokenizer), ensure_ascii=False)

    def append(self, lines: list[str]) -> None:
        path = self.file()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
