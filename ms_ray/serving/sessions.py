"""Live multi-stream sessions over the batched row decoder, with per-stream channels.

One `SessionEngine` per model replica. It knows nothing of Ray or HTTP (the deployment and the
ingress wrap it), so it runs and is tested in a plain asyncio loop:

  input channels   `append(session, stream, text)` may be called by many clients at once; the text
                   is tokenised and queued per stream, and each row consumes one queued token per
                   input stream (silence when the queue is empty);
  the step loop    one task steps ALL open sessions together: one batched forward per row
                   (RowDecoder), at most one row per `row_interval_s` (a real-time row clock);
  output channels  each row becomes one event {"type": "row", "row": N, "cells": {stream: text}}
                   (silent cells left out; an input cell is the typed text its token came from, so
                   a stream's cells join to exactly what was typed), put in the outbox of every
                   watcher of the session (outboxes.py: one message per step per consumer), each
                   seeing only the streams it may read. A bounded backlog lets a watcher that
                   attaches late (an SSE client after POST /v1/sessions) replay from row 0.
  ownership        opening a session makes a secret token; appending and closing need it
                   (`owner()`), unless the caller is privileged (the operator role, tools).
  stream actors    after each step, every actor (stream_actors.py: the calculator, the recorder,
                   yours) gets one batch with the new rows of the streams it reads and the
                   sessions that ended; what it appends goes in like a client's text, while the
                   model keeps writing rows.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from ..core.decode import RowDecoder, Sampling, StopRules, cache_bytes, session_rows
from .access import ServeError
from .outboxes import Outbox, Watch
from .session_ids import new_session_id
from .stream_actors import ActorLink, log


@dataclass(frozen=True)
class EngineSettings:
    max_sessions: int | None = 16  # None: as many as kv_cache_gb holds (sessions x their most rows)
    kv_cache_gb: float = 1.0  # the KV-cache memory a replica may use when max_sessions is None
    row_interval_s: float = 0.05  # the row clock; 0 = as fast as the model goes
    max_rows: int | None = 4096  # rows per session, then it ends with reason "max_rows"; None: no end
    # (a windowed model only: its sessions need a constant memory)
    end_on_end_token: bool = False  # end when every output stream with an end token said it
    quiet_after_end: bool = True  # a stream that said its end token stays silent until new input
    silent_rows: int | None = None  # end after this many all-silent rows in a row
    idle_timeout_s: float = 60.0  # end a session nobody reads or writes for this long
    backlog_rows: int = 2048  # rows kept for late subscribers
    subscriber_queue: int = 4096  # events a slow watcher may fall behind before it is dropped
    max_append_chars: int = 16384
    sampling: dict[str, Sampling] = field(default_factory=dict)  # per output stream; others greedy
    seed: int = 0


def admitted_sessions(model, settings: EngineSettings) -> int:
    """settings.max_sessions, or as many sessions as settings.kv_cache_gb holds at their most
    rows (exact for a windowed model: its sessions never hold more). Refuses sessions without an
    end on a model without a window: their memory would grow with every row."""
    rows = session_rows(model, settings.max_rows)
    if rows is None:
        raise ValueError("session.max_rows: null (sessions without an end) needs a windowed model (trained with "
                         "model.window_rows): without a window a session's cache grows with every row")
    if settings.max_sessions is not None:
        return settings.max_sessions
    admitted = int(settings.kv_cache_gb * 2**30 // cache_bytes(model, rows))
    if admitted < 1:
        raise ValueError(f"model.kv_cache_gb={settings.kv_cache_gb:g} holds no session of {rows} rows "
                         f"({cache_bytes(model, rows) / 2**20:.1f} MiB each): raise it or lower session.max_rows")
    return admitted


class IncrementalText:
    """Token-by-token detokenisation of one stream: each new token yields the text it adds.
    Decoding a window (not single tokens) keeps word joins and multi-byte characters right."""

    def __init__(self, tokenizer):
        self.ids: list[int] = []
        self.prefix = self.read = 0
        backend = getattr(tokenizer, "_tokenizer", None)  # a fast tokenizer's Rust decoder: the same
        # text as tokenizer.decode without its per-call Python (most of a row's publishing cost)
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            self.decode = lambda ids: backend.decode(ids, skip_special_tokens=False)
        else:
            self.decode = tokenizer.decode

    def add(self, token: int) -> str:
        self.ids.append(token)
        decode = self.decode
        before = decode(self.ids[self.prefix : self.read])
        now = decode(self.ids[self.prefix :])
        if now.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next byte
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before) :]


@dataclass
class LiveSession:
    id: str
    token: str  # the owner's secret: appending and closing need it
    texts: dict[str, IncrementalText]  # output streams' detokenisers
    backlog: deque  # recent row events, for late watchers
    subscribers: list[Watch] = field(default_factory=list)
    inbox: list[tuple[str, list[int], list[str]]] = field(default_factory=list)  # appends not yet in the decoder
    typed: dict[str, deque] = field(default_factory=dict)  # input stream -> the text of each queued token
    rows: int = 0  # rows published: the next step builds row `rows`
    scheduled: list[tuple[int, str, list[int], list[str]]] = field(default_factory=list)  # actors' appends, by row
    last_seen: float = field(default_factory=time.monotonic)
    end: dict | None = None  # the end event, once ended
    finished: asyncio.Event = field(default_factory=asyncio.Event)


class SessionEngine:
    def __init__(self, model, tokenizer, settings: EngineSettings = EngineSettings(), replica: str = "local",
                 actors: list[ActorLink] = ()):
        self.tokenizer, self.settings = tokenizer, settings
        self.schema = model.schema
        self.max_sessions = admitted_sessions(model, settings)
        self.decoder = RowDecoder(model, max_sessions=self.max_sessions, seed=settings.seed)
        self.replica = replica  # the start of every session id here
        self.actors = list(actors)
        for link in self.actors:  # index(): a KeyError naming the stream when the schema lacks it
            for name in (*link.reads, *link.writes):
                self.schema.index(name)
        self.sessions: dict[str, LiveSession] = {}
        self.lock = asyncio.Lock()  # the decoder is touched by one coroutine (or the step thread) at a time
        self.loop_task: asyncio.Task | None = None
        self.ended: dict[str, LiveSession] = {}  # recently ended: late watchers get the backlog and the end
        self.outboxes: dict[str, Outbox] = {}  # consumer -> its watches' pending events
        self.control_ids = set(self.schema.token_ids.values()) if self.schema.token_ids else set()
        self.unknown = tokenizer.unk_token_id
        self.end_ids = self.schema.end_ids() if self.schema.token_ids else {}  # stream -> its end token id
        self.failure: str | None = None  # set when a step raised: the replica is unhealthy
        self.rows_total = 0
        self.step_seconds = 0.0

    # ---- what clients call -----------------------------------------------------------------
    def describe(self) -> list[dict]:
        return [{"name": s.name, "role": s.role, **({"end_token": s.end_token} if s.end_token else {})}
                for s in self.schema.streams]

    async def open(self, max_rows: int | None = None, end_on_end_token: bool | None = None, inputs=(),
                   sampling: dict[str, dict] | None = None, seed: int | None = None,
                   gap_rows: int | None = None) -> dict:
        """Start a session; its rows begin at once, on the row clock. max_rows/end_on_end_token
        override the settings for this session (the one-shot endpoint ends on the end token);
        sampling {output stream: {field: value}} changes Sampling fields of the settings' for this
        session; seed gives it random numbers of its own (the same seed, the same draws).
        inputs [(stream, text, force[, end])] are queued before its first row: all from row 0
        (gap_rows None), or in turn, each `gap_rows` silent rows after the previous one's last
        token (a chat's messages). The answer's `prompt` says where the inputs went: `rows` (the
        row after the last input token), `tokens`, and `reply_from` (the row after the last forced
        output token: where the model's own writing on that stream begins; 0 without one)."""
        sid = new_session_id(self.replica)
        end = self.settings.end_on_end_token if end_on_end_token is None else end_on_end_token
        # quiet_after_end: the decoder keeps an ended stream silent until the next input re-opens it
        quiet = self.settings.quiet_after_end and not end
        limits = [n for n in (max_rows, self.settings.max_rows) if n is not None]
        stop = StopRules(min(limits) if limits else None,
                         None if end or quiet else (), self.settings.silent_rows, reopen_on_input=quiet)
        async with self.lock:  # checked under the lock: two opens waiting for a step cannot both pass
            if len(self.sessions) >= self.max_sessions:
                raise ServeError("busy", f"this replica runs {len(self.sessions)} of {self.max_sessions} "
                                         "sessions; retry later")
            per_stream = {**self.settings.sampling}
            for name, fields in (sampling or {}).items():
                per_stream[name] = replace(per_stream.get(name, Sampling()), **fields)
            self.decoder.open(sid, sampling=per_stream, stop=stop, seed=seed)
        token = secrets.token_urlsafe(24)
        self.sessions[sid] = LiveSession(
            sid, token, {name: IncrementalText(self.tokenizer) for name in self.schema.names},
            deque(maxlen=self.settings.backlog_rows),
            typed={s.name: deque() for s in self.schema.streams if s.role == "input"},
        )
        prompt = {"rows": 0, "tokens": 0, "reply_from": 0}
        try:
            for stream, text, force, *end_turn in inputs:
                at_row = None if gap_rows is None else prompt["rows"] + (gap_rows if prompt["tokens"] else 0)
                queued = self.append(sid, stream, text, force, at_row=at_row, end=bool(end_turn and end_turn[0]))
                last = (at_row or 0) + queued["tokens"]
                prompt["rows"], prompt["tokens"] = max(prompt["rows"], last), prompt["tokens"] + queued["tokens"]
                if force:
                    prompt["reply_from"] = max(prompt["reply_from"], last)
        except ServeError:
            await self.close(sid, "bad_input")
            raise
        if self.loop_task is None or self.loop_task.done():
            self.loop_task = asyncio.get_running_loop().create_task(self._run())
        return {"id": sid, "token": token, "streams": self.describe(), "prompt": prompt}

    def owner(self, session_id: str, token: str | None) -> None:
        """Raise `forbidden` unless `token` is the session's (appending and closing need it)."""
        session = self._live(session_id)
        if not isinstance(token, str) or not hmac.compare_digest(token.encode(), session.token.encode()):
            raise ServeError("forbidden", f"session {session_id!r} belongs to the client that opened it: writing "
                                          "and closing need its session token (watching does not)")

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
        ids, pieces = self._tokens(text, force)
        if end and stream in self.end_ids:
            ids.append(self.end_ids[stream])
            pieces.append(self.schema.streams[self.schema.index(stream)].end_token)
        if at_row is None:
            session.inbox.append((stream, ids, pieces))
        else:
            session.scheduled.append((at_row, stream, ids, pieces))
        session.last_seen = time.monotonic()
        queued = sum(len(item[1]) for item in session.inbox if item[0] == stream)
        return {"session": session_id, "stream": stream, "tokens": len(ids), "queued": queued}

    def _tokens(self, text: str, force: bool) -> tuple[list[int], list[str]]:
        """Token ids of typed text and the piece of the text each one stands for (the spaces before
        a token go with it, the rest of the text with the last), so echoed cells join to the text."""
        # split_special_tokens: a user typing "<|end|>" must not inject the control token itself
        enc = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
        ids, cuts = [], []
        for t, (_, stop) in zip(enc["input_ids"], enc["offset_mapping"]):
            if not force and t in self.control_ids:  # a word-level vocabulary maps a typed "<|end|>" to it
                t = self.unknown
            if t is not None:
                ids.append(t)
                cuts.append(stop)
        if cuts:
            cuts[-1] = len(text)
        return ids, [text[a:b] for a, b in zip([0] + cuts[:-1], cuts)]

    # ---- watching --------------------------------------------------------------------------
    def watch(self, session_id: str, outbox_id: str, watch_id: str, streams: frozenset[str] | None = None,
              from_row: int = 0, allow_ended: bool = True) -> Watch:
        """Start putting a session's events in an outbox: the backlog from `from_row` first, then
        live rows, then the end event. Streams outside `streams` are left out of the rows."""
        session = self._live(session_id, allow_ended=allow_ended)
        outbox = self.outbox(outbox_id)
        readable = frozenset(self.schema.names) if streams is None else frozenset(streams)
        watch = outbox.watches[watch_id] = Watch(watch_id, session_id, readable, outbox)
        outbox.replay(watch, [e for e in session.backlog if e["row"] >= from_row])
        if session.end is not None:
            outbox.put_final(watch, session.end)
        else:
            session.subscribers.append(watch)
            session.last_seen = time.monotonic()
        return watch

    def unwatch(self, outbox_id: str, watch_id: str) -> None:
        outbox = self.outboxes.get(outbox_id)
        watch = outbox.watches.pop(watch_id, None) if outbox else None
        if watch is not None:
            outbox.pending.pop(watch_id, None)
            self._detach(watch)

    def outbox(self, outbox_id: str) -> Outbox:
        if outbox_id not in self.outboxes:
            self.outboxes[outbox_id] = Outbox(outbox_id, self.settings.subscriber_queue)
        return self.outboxes[outbox_id]

    async def feed(self, outbox_id: str) -> AsyncIterator[dict[str, list[dict]]]:
        """An outbox's events as they come, {watch id: events} per message, until the consumer
        stops reading; its watches end with it."""
        outbox = self.outbox(outbox_id)
        outbox.attached = True
        try:
            while True:
                yield await outbox.take()
        finally:
            self.drop_outbox(outbox_id)

    def drop_outbox(self, outbox_id: str) -> None:
        outbox = self.outboxes.pop(outbox_id, None)
        for watch in list(outbox.watches.values()) if outbox else ():
            self._detach(watch)

    def _detach(self, watch: Watch) -> None:
        session = self.sessions.get(watch.session) or self.ended.get(watch.session)
        if session is not None and watch in session.subscribers:
            session.subscribers.remove(watch)
        watch.done.set()

    async def subscribe(self, session_id: str, streams: frozenset[str] | None = None,
                        from_row: int = 0) -> AsyncIterator[list[dict]]:
        """One in-process watcher: the session's events in batches (everything ready at once)
        until its end event or an error (e.g. `slow_consumer`, saying where to resume)."""
        outbox_id = f"local.{uuid.uuid4().hex}"
        watch = self.watch(session_id, outbox_id, "w", streams, from_row)
        self.outbox(outbox_id).attached = True
        try:
            while True:
                batch = (await watch.outbox.take()).get(watch.id, [])
                if batch:
                    yield batch
                    if batch[-1]["type"] in ("end", "error"):
                        return
        finally:
            self.drop_outbox(outbox_id)

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

    async def wait_end(self, session_id: str) -> str:
        """The session's end reason, once it has ended."""
        session = self._live(session_id, allow_ended=True)
        await session.finished.wait()
        return session.end["reason"]

    def stats(self) -> dict:
        return {"sessions": len(self.sessions), "max_sessions": self.max_sessions,
                "rows_total": self.rows_total, "step_seconds": round(self.step_seconds, 3)}

    # ---- the step loop ---------------------------------------------------------------------
    async def _run(self) -> None:
        interval = self.settings.row_interval_s
        while self.sessions:
            started = time.monotonic()
            async with self.lock:
                for session in self.sessions.values():
                    due = [item for item in session.scheduled if item[0] <= session.rows]
                    for stream, ids, pieces in session.inbox + [item[1:] for item in due]:
                        self.decoder.push(session.id, stream, ids)
                        if stream in session.typed:
                            session.typed[stream].extend(pieces)
                    session.inbox.clear()
                    session.scheduled = [item for item in session.scheduled if item[0] > session.rows]
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
            self._deliver()
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    def _publish(self, row) -> None:
        session = self.sessions.get(row.session)
        if session is None:  # closed while the step ran
            return
        self.rows_total += 1
        session.rows = row.row + 1
        said = {}  # stream -> text of its non-silent cell ("" while a character is incomplete)
        for name, token in zip(self.schema.names, row.tokens):
            if token != self.decoder.silence:
                typed = session.typed.get(name)
                said[name] = typed.popleft() if typed else session.texts[name].add(token)
        tokens = dict(zip(self.schema.names, row.tokens))
        for link in self.actors:
            link.rows.append({"session": session.id, "row": row.row, "tokens": {n: tokens[n] for n in link.reads},
                              "cells": {n: said[n] for n in link.reads if n in said}})
        event = {"type": "row", "row": row.row, "cells": {name: text for name, text in said.items() if text}}
        session.backlog.append(event)
        for watch in list(session.subscribers):
            if not watch.outbox.put(watch, event):  # never let one slow reader hold the others back
                session.subscribers.remove(watch)
                watch.outbox.put_final(watch, {"type": "error", "code": "slow_consumer",
                                               "message": f"fell {self.settings.subscriber_queue} rows behind; "
                                                          f"resubscribe with from_row={event['row']}"})
        if row.done:
            self._finish(session, row.done)

    # ---- stream actors -----------------------------------------------------------------------
    def _deliver(self) -> None:
        """Start a call to every actor that has rows or ends waiting and no call in flight."""
        for link in self.actors:
            if link.task is None and (link.rows or link.ended):
                batch = {"silence": self.decoder.silence, **link.batch()}
                link.task = asyncio.get_running_loop().create_task(self._call_actor(link, batch))

    async def _call_actor(self, link: ActorLink, batch: dict, attempts: int = 3) -> None:
        try:
            for attempt in range(attempts):
                try:
                    appends = await asyncio.wait_for(link.call(batch), link.timeout_s)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # a batch is retried, then given up on (logged): the rows go on
                    log.warning("stream actor %s: %s: %s (attempt %d of %d)", link.name, type(e).__name__, e,
                                attempt + 1, attempts)
            else:
                link.failures += 1
                return
            for item in appends or ():
                self._actor_append(link, item)
        finally:
            link.task = None
            if self.actors and (link.rows or link.ended):
                self._deliver()

    def _actor_append(self, link: ActorLink, item: dict) -> None:
        session, stream = item.get("session"), item.get("stream")
        if stream not in link.writes:
            log.warning("stream actor %s may not write %r (it writes %s): dropped", link.name, stream,
                        sorted(link.writes))
            return
        if session not in self.sessions:
            return  # it ended meanwhile
        text = str(item.get("text", ""))[: self.settings.max_append_chars]
        self.append(session, stream, text, at_row=item.get("at_row"))

    def _expire_idle(self) -> None:
        now = time.monotonic()
        for outbox in list(self.outboxes.values()):  # watches of a consumer that never came to take them
            if not outbox.attached and now - outbox.created > self.settings.idle_timeout_s:
                self.drop_outbox(outbox.id)
        for session in list(self.sessions.values()):
            if session.subscribers:
                session.last_seen = now
            elif now - session.last_seen > self.settings.idle_timeout_s:
                if session.id in self.decoder.sessions:
                    self.decoder.close(session.id)  # between steps: the loop holds no thread now
                self._finish(session, "idle_timeout")

    def _finish(self, session: LiveSession, reason: str, error: dict | None = None) -> None:
        session.end = {"type": "end", "reason": reason}
        session.finished.set()
        for link in self.actors:
            link.ended.append({"session": session.id, "reason": reason})
        if self.actors:
            self._deliver()
        for watch in session.subscribers:
            watch.outbox.put_final(watch, *([error] if error else []), session.end)
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
