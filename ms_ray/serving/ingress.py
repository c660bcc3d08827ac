"""FastAPI ingress: WebSocket, HTTP + Server-Sent Events, one-shot generation, health, and the
web page (web/, at the app's route prefix).

Every route resolves the caller's role once (access.py), talks to the session server through a
pinned handle call with a timeout (nothing waits forever), and turns every failure into the
protocol's error: a frame on WebSockets, a JSON body with an HTTP status otherwise. The protocol
is written down in serve/PROTOCOL.md.
No `from __future__ import annotations` here: FastAPI must see the real WebSocket/Request types
on Serve's class-based routes.
"""

import asyncio
import html
import json
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve

from ..config import ServeConfig
from .access import (
    HTTP_STATUS,
    WS_CLOSE,
    Access,
    AccessPolicy,
    ServeError,
    check_frame,
    key_from,
    next_raw_frame,
    parse_frame,
    parse_json_object,
    retry_headers,
)
from .chat_completions import chat_completions, models
from .feeds import FeedHub, Watcher, as_serve_error, awaited, error_event
from .openai_api import model_name
from .quotas import Quotas, client_id
from .realtime import realtime

app = FastAPI(title="ms_ray", description="Multi-stream sessions: see serve/PROTOCOL.md")

WEB = Path(__file__).parent / "web"  # the page: package data, plain HTML/JS/CSS, read once
PAGE = (WEB / "index.html").read_text(encoding="utf-8")
STATIC = {name: ((WEB / name).read_bytes(), media) for name, media in
          (("app.js", "text/javascript; charset=utf-8"), ("style.css", "text/css; charset=utf-8"))}
WEB_HEADERS = {  # the page loads only its own files and talks only to this server
    "Content-Security-Policy": "default-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'self'",
    "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache",
}
VERSIONS = (1, 2)  # 1: a frame per row; 2: "rows" frames (several rows, silent ones left out, heartbeats)


def error_body(err: ServeError, retry_after: int | None = None) -> JSONResponse:
    return JSONResponse({"type": "error", "code": err.code, "message": err.message},
                        status_code=HTTP_STATUS.get(err.code, 500), headers=retry_headers(err, retry_after))


def socket_senders(ws: WebSocket):
    """send(frame), finish(code, reason) and fail(error) for one WebSocket; one writer at a time
    (the pump and the receive loop both send)."""
    lock = asyncio.Lock()

    async def send(frame: dict):
        async with lock:
            await ws.send_text(json.dumps(frame))

    async def finish(code: int, reason: str):
        async with lock:
            await ws.close(code, reason=reason[:120])  # a close reason holds at most 123 bytes

    async def fail(err: ServeError):
        await send(error_event(err))
        await finish(WS_CLOSE.get(err.code, 1011), err.message)

    return send, finish, fail


def version_of(query) -> int:
    raw = query.get("v", "1")
    if not raw.isdigit() or int(raw) not in VERSIONS:
        raise ServeError("bad_version", f"protocol version {raw!r}: this server speaks v=1 and v=2")
    return int(raw)


def from_row_of(query) -> int:
    raw = query.get("from_row", "0")
    if not raw.isdigit():
        raise ServeError("bad_frame", f"from_row must be a row number (0 or more), got {raw!r}")
    return int(raw)


class Framer:
    """A watcher's batches of events -> what one client receives. v1: a frame per row. v2: one
    `rows` frame per batch with the rows that say something to this client, its `clock` the last
    row reached, and an empty one at least every `heartbeat_s` so the clock stays visible; after a
    frame, the next waits `frame_interval_s` (`pause()`), so rows that come faster share frames."""

    def __init__(self, version: int, heartbeat_s: float, frame_interval_s: float = 0.0):
        self.version, self.heartbeat_s, self.interval = version, heartbeat_s, frame_interval_s
        self.clock, self.sent = -1, time.monotonic()

    async def pause(self) -> None:
        if self.version == 2 and self.interval:
            await asyncio.sleep(max(0.0, self.sent + self.interval - time.monotonic()))

    def frames(self, batch: list[dict]) -> list[dict]:
        rows = [e for e in batch if e["type"] == "row"]
        final = [e for e in batch if e["type"] != "row"]
        if self.version == 1:
            return rows + final
        self.clock = max([self.clock] + [e["row"] for e in rows])
        said = [{"row": e["row"], "cells": e["cells"]} for e in rows if e["cells"]]
        now = time.monotonic()
        if not said and now - self.sent < self.heartbeat_s:
            return final
        self.sent = now
        return [{"type": "rows", "clock": self.clock, "rows": said}] + final


def sse_event(frame: dict) -> str:
    row_id = {"row": frame.get("row"), "rows": frame.get("clock")}.get(frame["type"])
    head = f"id: {row_id}\n" if row_id is not None else ""
    return f"{head}event: {frame['type']}\ndata: {json.dumps(frame)}\n\n"


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, config: dict, server):
        self.cfg = ServeConfig.model_validate(config, context={"check_paths": False})
        self.server = server
        self.timeout = self.cfg.ingress.call_timeout_s
        self.streams: list[dict] | None = None  # the model's streams, learnt from the first ready() answer
        self.policy: AccessPolicy | None = None
        self.hub: FeedHub | None = None  # made in the replica's event loop, on first use
        self.quotas = Quotas()
        self.holds: set[asyncio.Task] = set()  # one wait_end call per session opened here
        self.model_name = model_name(self.cfg.chat, self.cfg.checkpoint)  # what OpenAI clients call it
        self.started = int(time.time())

    # ---- plumbing ------------------------------------------------------------------------
    async def call(self, response):
        """Await one handle call with the configured timeout; raises ServeError."""
        try:
            result = await asyncio.wait_for(awaited(response), self.timeout)
        except asyncio.TimeoutError as e:
            response.cancel()
            raise as_serve_error(e) from None
        except Exception as e:
            raise as_serve_error(e) from None
        if isinstance(result, dict) and result.get("type") == "error":  # the session server's refusal
            raise ServeError(result["code"], result["message"])
        return result

    async def access(self, connection, key: str | None = None) -> tuple[Access, str]:
        """The caller's Access and client id (quotas.py), from a WebSocket or a Request (or `key`)."""
        if self.policy is None:
            info = await self.call(self.server.ready.remote())
            self.streams = info["streams"]
            self.policy = AccessPolicy(self.cfg.roles, {s["name"]: s["role"] for s in self.streams},
                                       self.cfg.ingress.anonymous_role)
            name = f"{serve.get_replica_context().replica_id.unique_id}.{uuid.uuid4().hex[:8]}"
            self.hub = FeedHub(self.server, name, self.timeout)
        key = key or key_from(connection.headers, connection.query_params)
        return self.policy.resolve(key), client_id(key, connection.client.host if connection.client else None)

    async def open_session(self, access: Access, client: str, **options) -> dict:
        if not access.open:
            raise ServeError("forbidden", f"role {access.role!r} may not open sessions; attach to one by id")
        self.quotas.take("open", client, access.max_sessions)
        try:
            info = await self.call(self.server.open.remote(**options))
        except ServeError:
            self.quotas.give_back("open", client)
            raise
        hold = asyncio.get_running_loop().create_task(self.hold(info["id"], client))
        self.holds.add(hold)
        hold.add_done_callback(self.holds.discard)
        return info

    async def hold(self, session: str, client: str) -> None:
        """Count the session against its opener until it ends (however it ends)."""
        try:
            await awaited(self.server.wait_end.remote(session=session))
        except Exception:
            pass  # its replica is gone: so is the session
        finally:
            self.quotas.give_back("open", client)

    async def append(self, access: Access, client: str, session: str, frame: dict, token: str | None) -> dict:
        stream = frame["stream"]
        force = access.check_write(stream, self.policy.stream_roles)
        self.quotas.append(client, access.appends_per_s, access.append_burst)
        return await self.call(self.server.append.remote(session=session, stream=stream, text=frame["text"],
                                                         force=force, end=frame.get("end", False), token=token,
                                                         privileged=access.any_session))

    async def close(self, access: Access, session: str, token: str | None, reason: str = "closed") -> dict:
        if not (access.write or access.force):
            raise ServeError("forbidden", f"role {access.role!r} may not close sessions")
        return await self.call(self.server.close.remote(session=session, reason=reason, token=token,
                                                        privileged=access.any_session))

    async def owns(self, access: Access, session: str, token: str | None) -> bool:
        """Whether this caller may write to the session: its role may write, and it holds the
        session's token or its role may write to any session."""
        if not (access.write or access.force):
            return False
        if access.any_session:
            return True
        if token is None:
            return False
        answer = await self.call(self.server.check_token.remote(session=session, token=token))
        return answer["owner"]

    def session_frame(self, info: dict, access: Access, writer: bool, version: int, row: int,
                      token: str | None = None) -> dict:
        frame = {"type": "session", "id": info["id"], "protocol": version, "row": row, "streams": self.streams,
                 "role": access.role, "read": sorted(access.read),
                 "write": sorted(access.write | access.force) if writer else []}
        return {**frame, "token": token} if token else frame

    # ---- health --------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz(self):
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self):
        try:
            info = await self.call(self.server.ready.remote())
        except ServeError as e:
            return JSONResponse({"ready": False, "reason": e.message}, status_code=503)
        return {"ready": True, **info}

    # ---- the web page --------------------------------------------------------------------
    @app.get("/")
    async def page(self, request: Request):
        """The session page. Its links are relative to a <base href> at the app's route prefix
        (Serve's proxy puts that prefix in root_path), so it works under any prefix."""
        base = html.escape(request.scope.get("root_path", "").rstrip("/") + "/", quote=True)
        return HTMLResponse(PAGE.replace("<head>", f'<head>\n<base href="{base}">', 1), headers=WEB_HEADERS)

    @app.get("/static/{name}")
    async def static(self, name: str):
        if name not in STATIC:
            return JSONResponse({"type": "error", "code": "not_found", "message": f"no file {name!r}"}, status_code=404)
        body, media_type = STATIC[name]
        return Response(body, media_type=media_type, headers=WEB_HEADERS)

    # ---- WebSocket -----------------------------------------------------------------------
    @app.websocket("/v1/sessions")
    async def ws_open(self, ws: WebSocket):
        await self.websocket(ws, None)

    @app.websocket("/v1/sessions/{session}")
    async def ws_attach(self, ws: WebSocket, session: str):
        await self.websocket(ws, session)

    async def admit(self, ws: WebSocket, attach: str | None) -> dict:
        """Who this connection is and what it watches: opens the session, or attaches to one (with
        its token as a writer, else as a watcher). Raises ServeError before any session frame."""
        version = version_of(ws.query_params)
        access, client = await self.access(ws)
        if not attach:
            info = await self.open_session(access, client)
            watcher = await self.hub.watch(info["id"], access.read)
            first = self.session_frame(info, access, True, version, 0, info["token"])
            return {"access": access, "client": client, "watcher": watcher, "first": first, "version": version,
                    "token": info["token"], "writer": True, "observer": False}
        token = ws.query_params.get("token") or ws.headers.get("x-session-token")
        from_row = from_row_of(ws.query_params)
        writer = await self.owns(access, attach, token)
        if not writer:  # watching counts against its own limit, never against sessions
            self.quotas.take("watching", client, access.max_watchers)
        try:
            watcher = await self.hub.watch(attach, access.read, from_row, allow_ended=False)
        except ServeError:
            if not writer:
                self.quotas.give_back("watching", client)
            raise
        return {"access": access, "client": client, "watcher": watcher, "version": version, "token": token,
                "first": self.session_frame({"id": attach}, access, writer, version, from_row),
                "writer": writer, "observer": not writer}

    async def websocket(self, ws: WebSocket, attach: str | None):
        await ws.accept()
        send, finish, fail = socket_senders(ws)
        try:
            c = await self.admit(ws, attach)
        except ServeError as e:
            return await fail(e)
        sid, opener, access, watcher = c["first"]["id"], attach is None, c["access"], c["watcher"]
        pump, detach = None, False  # detach: a watcher said close, the session goes on
        try:
            await send(c["first"])
            pump = asyncio.create_task(self.pump(watcher, self.framer(c["version"]), send, finish, fail))
            while not pump.done():  # the pump ends the connection after the end frame or a fatal error
                raw = await next_raw_frame(ws, pump)
                if raw is None:
                    break
                try:
                    frame = parse_frame(raw, self.cfg.ingress.max_frame_bytes)
                    if frame["type"] == "append":
                        if not c["writer"]:
                            raise ServeError("forbidden", f"role {access.role!r} watches this session: writing "
                                                          "needs its session token (?token=)")
                        await self.append(access, c["client"], sid, frame, c["token"])
                    elif c["writer"]:
                        await self.close(access, sid, c["token"])  # the end frame follows
                    else:
                        detach = True
                        break
                except ServeError as e:
                    if e.code in ("session_lost", "unknown_session", "session_ended"):
                        await fail(e)
                        break
                    await send(error_event(e))  # the session goes on
        except (WebSocketDisconnect, RuntimeError):
            pass  # the client went away
        finally:
            self.hub.forget(watcher)
            if c["observer"]:
                self.quotas.give_back("watching", c["client"])
            if pump is None or not pump.done():  # the client left (or detached): stop sending to it at once
                await self.leave(pump, sid, detach, opener, finish)

    async def leave(self, pump, sid: str, detach: bool, opener: bool, finish) -> None:
        if pump is not None:
            pump.cancel()
        if detach:
            await finish(1000, "detached")
        elif opener:  # the opener left without closing: end the session
            try:
                await self.call(self.server.close.remote(session=sid, reason="client_disconnected", privileged=True))
            except ServeError:
                pass

    async def pump(self, watcher: Watcher, framer: Framer, send, finish, fail) -> None:
        """Session events -> frames, until the end event (close 1000) or an error."""
        try:
            async for batch in watcher.batches():
                for frame in framer.frames(batch):
                    if frame["type"] == "end":
                        await send(frame)
                        await finish(1000, frame["reason"])
                        return
                    if frame["type"] == "error":
                        await fail(ServeError(frame["code"], frame["message"]))
                        return
                    await send(frame)
                await framer.pause()
        except (WebSocketDisconnect, RuntimeError):
            pass

    def framer(self, version: int) -> Framer:
        return Framer(version, self.cfg.ingress.heartbeat_s, self.cfg.ingress.frame_interval_s)

    # ---- HTTP + SSE ----------------------------------------------------------------------
    async def json_body(self, request: Request) -> dict:
        return parse_json_object(await request.body(), self.cfg.ingress.max_frame_bytes, "body")

    @staticmethod
    def token_of(request: Request) -> str | None:
        return request.headers.get("x-session-token") or request.query_params.get("token")

    @app.post("/v1/sessions", status_code=201)
    async def http_open(self, request: Request):
        try:
            access, client = await self.access(request)
            version = version_of(request.query_params)
            info = await self.open_session(access, client)
        except ServeError as e:
            return error_body(e, self.cfg.ingress.retry_after_s)
        return JSONResponse(self.session_frame(info, access, True, version, 0, info["token"]), status_code=201)

    @app.post("/v1/sessions/{session}/append")
    async def http_append(self, session: str, request: Request):
        try:
            access, client = await self.access(request)
            body = await self.json_body(request)
            if body.get("type", "append") != "append":  # this endpoint appends; a frame of another type is a mistake
                raise ServeError("bad_frame", f"this endpoint appends: type {body['type']!r} is not 'append'")
            frame = check_frame({**body, "type": "append"})
            return await self.append(access, client, session, frame, self.token_of(request))
        except ServeError as e:
            return error_body(e)

    @app.get("/v1/sessions/{session}/events")
    async def http_events(self, session: str, request: Request):
        try:
            access, client = await self.access(request)
            version, from_row = version_of(request.query_params), from_row_of(request.query_params)
            last = request.headers.get("last-event-id")
            if last is not None and last.isdigit():  # an EventSource reconnecting resumes after its last row
                from_row = int(last) + 1
            watcher = await self.hub.watch(session, access.read, from_row)  # refused: 404 / 410 here
        except ServeError as e:
            return error_body(e)
        return StreamingResponse(self.sse(watcher, self.framer(version)),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def sse(self, watcher: Watcher, framer: Framer, first: list[dict] = ()):
        try:
            for frame in first:
                yield sse_event(frame)
            async for batch in watcher.batches():
                for frame in framer.frames(batch):
                    yield sse_event(frame)
                await framer.pause()
        finally:
            self.hub.forget(watcher)

    @app.delete("/v1/sessions/{session}")
    async def http_close(self, session: str, request: Request):
        try:
            access, _ = await self.access(request)
            ended = await self.close(access, session, self.token_of(request))
        except ServeError as e:
            return error_body(e)
        return {"type": "end", "id": session, "reason": ended["reason"]}

    @app.post("/v1/generate")
    async def generate(self, request: Request):
        """One shot: {"inputs": {STREAM: TEXT, ...}, "max_rows": N} -> SSE: the session frame, rows
        until the end token, max_rows or silent_rows, the end. Every input's text is queued before
        the first row: it goes in from row 0, one token per row."""
        try:
            access, client = await self.access(request)
            version = version_of(request.query_params)
            body = await self.json_body(request)
            unknown = set(body) - {"inputs", "max_rows"}
            if unknown:
                raise ServeError("bad_frame", f"unknown field(s) {sorted(unknown)}; expected 'inputs' and 'max_rows'")
            inputs, max_rows = body.get("inputs"), body.get("max_rows")
            if not isinstance(inputs, dict) or not all(isinstance(v, str) for v in inputs.values()):
                raise ServeError("bad_frame", "'inputs' must map stream names to text")
            if max_rows is not None and (not isinstance(max_rows, int) or max_rows <= 0):
                raise ServeError("bad_frame", "'max_rows' must be a positive integer")
            queued = [(stream, text, access.check_write(stream, self.policy.stream_roles))
                      for stream, text in inputs.items()]
            info = await self.open_session(access, client, max_rows=max_rows, end_on_end_token=True, inputs=queued)
            watcher = await self.hub.watch(info["id"], access.read)
        except ServeError as e:
            return error_body(e, self.cfg.ingress.retry_after_s)
        first = [self.session_frame(info, access, True, version, 0, info["token"])]
        return StreamingResponse(self.sse(watcher, self.framer(version), first),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ---- OpenAI-compatible (chat_completions.py, realtime.py) -------------------------------
    @app.post("/v1/chat/completions")
    async def openai_chat(self, request: Request):
        return await chat_completions(self, request)

    @app.get("/v1/models")
    async def openai_models(self, request: Request):
        return await models(self, request)

    @app.get("/v1/models/{model:path}")
    async def openai_model(self, model: str, request: Request):
        return await models(self, request, model)

    @app.websocket("/v1/realtime")
    async def openai_realtime(self, ws: WebSocket):
        await realtime(self, ws)
