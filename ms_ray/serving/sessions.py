"""Live multi-stream sessions over the batched row decoder, with per-stream channels.

One `SessionEngine` per model replica. It knows nothing of Ray or HTTP (the deployment and the
ingress wrap it), so it runs and is tested in a plain asyncio loop:

  input channels   `append(session, stream, text)` may be called by many clients at once; the text
                   is tokenised and queued per stream, and each row consumes one queued token per
                   input stream (silence when the queue is empty);
  the step loop    one task steps ALL open sessions together: one batched forward per row
                   (RowDecoder), at most one row per `row_interval_s` (a real-time row clock);
  output channels  each row becomes one event {"type": "row", "row": N, "cells": {stream: text}}
                   (silent cells left out), fanned out to every subscriber of the session, each
                   seeing only the streams it may read. A bounded backlog lets a subscriber that
                   attaches late (an SSE client after POST /v1/sessions) replay from row 0.
  tools            a finished call on the tool-call stream (its tokens followed by a silent cell)
                   goes to `run_tool` in the background; the answer is appended to the tool stream
                   while the model keeps writing rows.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from ..core.decode import RowDecoder, Sampling, StopRules
from .access import ServeError
from .session_ids import new_session_id


@dataclass(frozen=True)
class EngineSettings:
    max_sessions: int = 16
    row_interval_s: float = 0.05  # the row clock; 0 = as fast as the model goes
    max_rows: int = 4096  # rows per session, then it ends with reason "max_rows"
    end_on_end_token: bool = False  # end when every output stream with an end token said it
    quiet_after_end: bool = True  # a stream that said its end token stays silent until new input
    silent_rows: int | None = None  # end after this many all-silent rows in a row
    idle_timeout_s: float = 60.0  # end a session nobody reads or writes for this long
    backlog_rows: int = 2048  # rows kept for late subscribers
    subscriber_queue: int = 4096  # events a slow subscriber may fall behind before it is dropped
    max_append_chars: int = 16384
    sampling: dict[str, Sampling] = field(default_factory=dict)  # per output stream; others greedy
    tool_call_stream: str | None = "tool_call"  # None: no tool wiring
    tool_result_stream: str | None = "tool"
    tool_timeout_s: float = 10.0
    tool_delay_rows: int = 3  # the result enters the tool stream no sooner than this after the call's last token
    seed: int = 0


class IncrementalText:
    """Token-by-token detokenisation of one stream: each new token yields the text it adds.
    Decoding a window (not single tokens) keeps word joins and multi-byte characters right."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read])
        now = decode(self.ids[self.prefix :])
        if now.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next byte
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before) :]


@dataclass
class Subscriber:
    streams: frozenset[str]  # what this subscriber may read
    queue: asyncio.Queue
    missed_from: int | None = None  # dropped for falling behind: the first row it did not get


@dataclass
class LiveSession:
    id: str
    texts: dict[str, IncrementalText]
    backlog: deque  # recent row events, for late subscribers
    subscribers: list[Subscriber] = field(default_factory=list)
    inbox: list[tuple[str, list[int]]] = field(default_factory=list)  # appends not yet in the decoder
    call_tokens: list[int] = field(default_factory=list)  # the tool call being written
    rows: int = 0  # rows published: the next step builds row `rows`
    scheduled: list[tuple[int, str, list[int]]] = field(default_factory=list)  # (row, stream, ids): tool results
    tool_tasks: set = field(default_factory=set)
    last_seen: float = field(default_factory=time.monotonic)
    end: dict | None = None  # the end event, once ended


class SessionEngine:
    def __init__(self, model, tokenizer, settings: EngineSettings = EngineSettings(), replica: str = "local",
                 run_tool: Callable[[str], Awaitable[str]] | None = None):
        self.tokenizer, self.settings = tokenizer, settings
        self.schema = model.schema
        self.decoder = RowDecoder(model, max_sessions=settings.max_sessions, seed=settings.seed)
        self.replica, self.run_tool = replica, run_tool  # replica: the start of every session id here
        self.sessions: dict[str, LiveSession] = {}
        self.lock = asyncio.Lock()  # the decoder is touched by one coroutine (or the step thread) at a time
        self.loop_task: asyncio.Task | None = None
        self.ended: dict[str, LiveSession] = {}  # recently ended: late subscribers get the backlog and the end
        self.control_ids = set(self.schema.token_ids.values()) if self.schema.token_ids else set()
        self.unknown = tokenizer.unk_token_id
        self.end_ids = self.schema.end_ids() if self.schema.token_ids else {}  # stream -> its end token id
        self.failure: str | None = None  # set when a step raised: the replica is unhealthy
        self.rows_total = 0
        self.step_seconds = 0.0
        self.tool_call_index = None
        if run_tool is not None:  # index(): a KeyError naming the stream when the schema lacks it
            self.tool_call_index = self.schema.index(settings.tool_call_stream)
            self.schema.index(settings.tool_result_stream)

    # ---- what clients call -----------------------------------------------------------------
    def describe(self) -> list[dict]:
        return [{"name": s.name, "role": s.role, **({"end_token": s.end_token} if s.end_token else {})}
                for s in self.schema.streams]

    async def open(self, max_rows: int | None = None, end_on_end_token: bool | None = None, inputs=()) -> dict:
        """Start a session; its rows begin at once, on the row clock. max_rows/end_on_end_token
        override the settings for this session (the one-shot endpoint ends on the end token);
        inputs [(stream, text, force)] are queued before its first row."""
        sid = new_session_id(self.replica)
        end = self.settings.end_on_end_token if end_on_end_token is None else end_on_end_token
        # quiet_after_end: the decoder keeps an ended stream silent until the next input re-opens it
        quiet = self.settings.quiet_after_end and not end
        stop = StopRules(min(max_rows or self.settings.max_rows, self.settings.max_rows),
                         None if end or quiet else (), self.settings.silent_rows, reopen_on_input=quiet)
        async with self.lock:  # checked under the lock: two opens waiting for a step cannot both pass
            if len(self.sessions) >= self.settings.max_sessions:
                raise ServeError("busy", f"this replica runs {len(self.sessions)} of {self.settings.max_sessions} "
                                         "sessions; retry later")
            self.decoder.open(sid, sampling=self.settings.sampling, stop=stop)
        self.sessions[sid] = LiveSession(
            sid, {name: IncrementalText(self.tokenizer) for name in self.schema.names},
            deque(maxlen=self.settings.backlog_rows),
        )
        try:
            for stream, text, force in inputs:
                self.append(sid, stream, text, force)
        except ServeError:
            await self.close(sid, "bad_input")
            raise
        if self.loop_task is None or self.loop_task.done():
            self.loop_task = asyncio.get_running_loop().create_task(self._run())
        return {"id": sid, "streams": self.describe()}

    def append(self, session_id: str, stream: str, text: str, force: bool = False, at_row: int | None = None,
               end: bool = False) -> dict:
        """Queue `text` on an input stream; one token goes in per row, in order of arrival.
        force=True also takes an output stream: its tokens replace what the model would write.
        at_row: not before that row (a tool's result, timed as in training). end=True: the turn is
        over; the stream's end token (schema end_token, e.g. <|end_user|>) follows the text, as it
        followed every input turn in training. On a stream without one, end changes nothing."""
        session = self._live(session_id)
        if stream not in self.schema.names:
            raise ServeError("unknown_stream", f"no stream {stream!r}; this model's streams are {self.schema.names}")
        if self.schema.role(stream) != "input" and not force:
            raise ServeError("output_stream",
                             f"stream {stream!r} is an output stream: the model writes it, clients cannot")
        if not isinstance(text, str):
            raise ServeError("bad_frame", f"'text' must be a string, got {type(text).__name__}")
        if len(text) > self.settings.max_append_chars:
            raise ServeError("too_large",
                             f"text of {len(text)} characters; at most {self.settings.max_append_chars} per append")
        # split_special_tokens: a user typing "<|end|>" must not inject the control token itself
        ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if not force:  # a word-level vocabulary still maps a typed "<|end|>" to the control token: unknown instead
            ids = [self.unknown if t in self.control_ids else t for t in ids]
            ids = [t for t in ids if t is not None]
        if end and stream in self.end_ids:
            ids.append(self.end_ids[stream])
        if at_row is None:
            session.inbox.append((stream, ids))
        else:
            session.scheduled.append((at_row, stream, ids))
        session.last_seen = time.monotonic()
        queued = sum(len(t) for s, t in session.inbox if s == stream)
        return {"session": session_id, "stream": stream, "tokens": len(ids), "queued": queued}

    async def subscribe(self, session_id: str, streams: frozenset[str] | None = None,
                        from_row: int = 0) -> AsyncIterator[list[dict]]:
        """Events of a session as they happen, in batches (everything ready at once): the backlog
        from `from_row` first, then live rows, then the end event. Streams outside `streams` are
        left out of the rows."""
        session = self._live(session_id, allow_ended=True)
        readable = frozenset(self.schema.names) if streams is None else frozenset(streams)
        sub = Subscriber(readable, asyncio.Queue(self.settings.subscriber_queue))
        replay = [e for e in session.backlog if e["row"] >= from_row]
        if session.end is None:
            session.subscribers.append(sub)
        try:
            batch = [_visible(e, readable) for e in replay]
            if session.end is not None:
                yield batch + [session.end]
                return
            while True:
                if not batch:
                    batch.append(await sub.queue.get())
                while not sub.queue.empty():
                    batch.append(sub.queue.get_nowait())
                if sub.missed_from is not None:
                    batch.append({"type": "error", "code": "slow_consumer",
                                  "message": f"fell {self.settings.subscriber_queue} rows behind; "
                                             f"resubscribe with from_row={sub.missed_from}"})
                yield batch
                if batch[-1]["type"] in ("end", "error"):
                    return
                batch = []
        finally:
            if sub in session.subscribers:
                session.subscribers.remove(sub)

    async def close(self, session_id: str, reason: str = "closed") -> None:
        session = self.sessions.get(session_id)
        if session is None:
            return
        async with self.lock:
            if session_id not in self.sessions:  # it ended while we waited for the step: keep its reason
                return
            if session_id in self.decoder.sessions:
                self.decoder.close(session_id)
        self._finish(session, reason)

    def stats(self) -> dict:
        return {"sessions": len(self.sessions), "max_sessions": self.settings.max_sessions,
                "rows_total": self.rows_total, "step_seconds": round(self.step_seconds, 3)}

    # ---- the step loop ---------------------------------------------------------------------
    async def _run(self) -> None:
        interval = self.settings.row_interval_s
        while self.sessions:
            started = time.monotonic()
            async with self.lock:
                for session in self.sessions.values():
                    for stream, ids in session.inbox:
                        self.decoder.push(session.id, stream, ids)
                    session.inbox.clear()
                    for item in [item for item in session.scheduled if item[0] <= session.rows]:
                        session.scheduled.remove(item)
                        self.decoder.push(session.id, item[1], item[2])
                try:
                    rows = await asyncio.to_thread(self.decoder.step)
                except Exception as e:  # tell every client, then let the health check replace this replica
                    self.failure = f"{type(e).__name__}: {e}"
                    error = {"type": "error", "code": "internal", "message": f"the model step failed: {self.failure}"}
                    for session in list(self.sessions.values()):
                        self._finish(session, "internal_error", error)
                    raise
            self.step_seconds += time.monotonic() - started
            for row in rows:
                self._publish(row)
            self._expire_idle()
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    def _publish(self, row) -> None:
        session = self.sessions.get(row.session)
        if session is None:  # closed while the step ran
            return
        self.rows_total += 1
        session.rows = row.row + 1
        cells = {}
        for s, (name, token) in enumerate(zip(self.schema.names, row.tokens)):
            if token != self.decoder.silence:
                text = session.texts[name].add(token)
                if text:
                    cells[name] = text
        if self.tool_call_index is not None:
            self._watch_tool_call(session, row.tokens[self.tool_call_index])
        event = {"type": "row", "row": row.row, "cells": cells}
        session.backlog.append(event)
        for sub in list(session.subscribers):
            try:
                sub.queue.put_nowait(_visible(event, sub.streams))
            except asyncio.QueueFull:  # never let one slow reader hold the others back
                session.subscribers.remove(sub)
                sub.missed_from = event["row"]  # its generator reports this once the queue is drained
        if row.done:
            self._finish(session, row.done)

    def _watch_tool_call(self, session: LiveSession, token: int) -> None:
        if token != self.decoder.silence:
            session.call_tokens.append(token)
            return
        if not session.call_tokens:
            return
        call = self.tokenizer.decode(session.call_tokens).strip()  # an unknown word stays visible: the tool says so
        session.call_tokens = []
        due = session.rows - 2 + self.settings.tool_delay_rows  # the call's last token was at row session.rows - 2
        task = asyncio.get_running_loop().create_task(self._call_tool(session.id, call, due))
        session.tool_tasks.add(task)
        task.add_done_callback(session.tool_tasks.discard)

    async def _call_tool(self, session_id: str, call: str, due: int) -> None:
        try:
            result = await asyncio.wait_for(self.run_tool(call), self.settings.tool_timeout_s)
        except asyncio.TimeoutError:
            result = f"error: tool timed out after {self.settings.tool_timeout_s:g} s"
        except Exception as e:  # the model sees the failure in the tool stream, as a tool user would
            result = f"error: {e}"
        if session_id in self.sessions:
            self.append(session_id, self.settings.tool_result_stream, str(result)[: self.settings.max_append_chars],
                        at_row=due)

    def _expire_idle(self) -> None:
        now = time.monotonic()
        for session in list(self.sessions.values()):
            if session.subscribers:
                session.last_seen = now
            elif now - session.last_seen > self.settings.idle_timeout_s:
                if session.id in self.decoder.sessions:
                    self.decoder.close(session.id)  # between steps: the loop holds no thread now
                self._finish(session, "idle_timeout")

    def _finish(self, session: LiveSession, reason: str, error: dict | None = None) -> None:
        session.end = {"type": "end", "reason": reason}
        for task in session.tool_tasks:
            task.cancel()
        for sub in session.subscribers:
            if error:
                _put_last(sub.queue, error)
            _put_last(sub.queue, session.end)
        session.subscribers.clear()
        self.sessions.pop(session.id, None)
        self.ended[session.id] = session
        while len(self.ended) > 256:
            self.ended.pop(next(iter(self.ended)))

    def _live(self, session_id: str, allow_ended: bool = False) -> LiveSession:
        session = self.sessions.get(session_id) or (self.ended.get(session_id) if allow_ended else None)
        if session is None:
            if session_id in self.ended:
                reason = self.ended[session_id].end["reason"]
                raise ServeError("session_ended", f"session {session_id!r} has ended ({reason})")
            raise ServeError("unknown_session", f"no session {session_id!r} on this server")
        return session


def _visible(event: dict, streams: frozenset[str]) -> dict:
    if event["type"] != "row" or event["cells"].keys() <= streams:
        return event
    return {**event, "cells": {k: v for k, v in event["cells"].items() if k in streams}}


def _put_last(queue: asyncio.Queue, event: dict) -> None:
    """Put a final event even into a full queue (dropping the oldest): an end is never lost."""
    if queue.full():
        queue.get_nowait()
    queue.put_nowait(event)
