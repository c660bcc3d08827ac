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
from pathlib import Path

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from ..config import ServeConfig
from .access import (
    HTTP_STATUS,
    WS_CLOSE,
    Access,
    AccessPolicy,
    ServeError,
    check_frame,
    key_from,
    parse_frame,
    parse_json_object,
)


async def awaited(response):
    """A handle call's response as a coroutine (for asyncio.wait_for). Module-level, above the
    deployments, in this torch-free module: Serve pickles the decorated deployments and their
    replicas import what they reference; app.py's SessionServer uses it too, for tool calls."""
    return await response


app = FastAPI(title="ms_ray", description="Multi-stream sessions: see serve/PROTOCOL.md")

WEB = Path(__file__).parent / "web"  # the page: package data, plain HTML/JS/CSS, read once
PAGE = (WEB / "index.html").read_text(encoding="utf-8")
STATIC = {name: ((WEB / name).read_bytes(), media) for name, media in
          (("app.js", "text/javascript; charset=utf-8"), ("style.css", "text/css; charset=utf-8"))}
WEB_HEADERS = {  # the page loads only its own files and talks only to this server
    "Content-Security-Policy": "default-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'self'",
    "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache",
}


def as_serve_error(e: BaseException) -> ServeError:
    """Map what a handle call can raise (the replica died, queues are full, ...) to the protocol's error."""
    if isinstance(e, ServeError):
        return e
    if isinstance(e, BackPressureError):
        return ServeError("busy", "every replica's queue is full; retry later")
    if isinstance(e, (RayActorError, ActorUnavailableError)):
        return ServeError("session_lost", f"the replica serving this session is gone ({type(e).__name__})")
    if isinstance(e, asyncio.TimeoutError):
        return ServeError("timeout", "the session server did not answer in time")
    return ServeError("internal", f"{type(e).__name__}: {e}")


def error_body(err: ServeError, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if err.code == "busy" and retry_after else None
    return JSONResponse({"type": "error", "code": err.code, "message": err.message},
                        status_code=HTTP_STATUS.get(err.code, 500), headers=headers)


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
        await send({"type": "error", "code": err.code, "message": err.message})
        await finish(WS_CLOSE.get(err.code, 1011), err.message)

    return send, finish, fail


def _sse(event: dict) -> str:
    row_id = f"id: {event['row']}\n" if event["type"] == "row" else ""
    return f"{row_id}event: {event['type']}\ndata: {json.dumps(event)}\n\n"


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, config: dict, server):
        self.cfg = ServeConfig.model_validate(config, context={"check_paths": False})
        self.server = server
        self.timeout = self.cfg.ingress.call_timeout_s
        self.streams: list[dict] | None = None  # the model's streams, learnt from the first ready() answer
        self.policy: AccessPolicy | None = None

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

    async def access(self, headers, query) -> Access:
        if self.policy is None:
            info = await self.call(self.server.ready.remote())
            self.streams = info["streams"]
            self.policy = AccessPolicy(self.cfg.roles, {s["name"]: s["role"] for s in self.streams},
                                       self.cfg.ingress.anonymous_role)
        return self.policy.resolve(key_from(headers, query))

    async def open_session(self, access: Access, **options) -> dict:
        if not access.open:
            raise ServeError("forbidden", f"role {access.role!r} may not open sessions; attach to one by id")
        return await self.call(self.server.open.remote(**options))

    async def append(self, access: Access, session: str, frame: dict) -> dict:
        stream = frame["stream"]
        force = access.check_write(stream, self.policy.stream_roles)
        return await self.call(self.server.append.remote(session=session, stream=stream, text=frame["text"],
                                                         force=force, end=frame.get("end", False)))

    async def events(self, access: Access, session: str, from_row: int = 0):
        """Batches of events of a session; raises ServeError (session_lost when its replica dies)."""
        stream = self.server.options(stream=True).events.remote(session=session, streams=sorted(access.read),
                                                                from_row=from_row)
        try:
            async for batch in stream:
                yield batch
        except Exception as e:
            raise as_serve_error(e) from None

    def session_frame(self, info: dict, access: Access) -> dict:
        return {"type": "session", "id": info["id"], "streams": info["streams"], "role": access.role,
                "read": sorted(access.read), "write": sorted(access.write | access.force)}

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

    async def websocket(self, ws: WebSocket, attach: str | None):
        await ws.accept()
        send, finish, fail = socket_senders(ws)
        try:
            access = await self.access(ws.headers, ws.query_params)
            info = {"id": attach, "streams": self.streams} if attach else await self.open_session(access)
        except ServeError as e:
            return await fail(e)
        sid, owner = info["id"], attach is None
        await send(self.session_frame(info, access))
        pump = asyncio.create_task(self.pump(sid, access, send, finish, fail))
        detach = False  # a read-only observer said close: leave the session running
        try:
            while not pump.done():  # the pump ends the connection after the end frame or a fatal error
                receive = asyncio.create_task(ws.receive())
                await asyncio.wait({receive, pump}, return_when=asyncio.FIRST_COMPLETED)
                if not receive.done():
                    receive.cancel()
                    break
                message = receive.result()
                if message["type"] == "websocket.disconnect":
                    break
                try:
                    raw = message.get("text") if message.get("text") is not None else message.get("bytes")
                    frame = parse_frame(raw, self.cfg.ingress.max_frame_bytes)
                    if frame["type"] == "append":
                        await self.append(access, sid, frame)
                    elif owner or access.write or access.force:
                        await self.call(self.server.close.remote(session=sid, reason="closed"))  # the end frame follows
                    else:
                        detach = True
                        break
                except ServeError as e:
                    if e.code in ("session_lost", "unknown_session", "session_ended"):
                        await fail(e)
                        break
                    await send({"type": "error", "code": e.code, "message": e.message})  # the session goes on
        except (WebSocketDisconnect, RuntimeError):
            pass  # the client went away
        finally:
            if not pump.done():  # the client left (or detached): stop sending to it at once
                pump.cancel()
                if detach:
                    await finish(1000, "detached")
                elif owner:  # the opener left without closing: end the session
                    try:
                        await self.call(self.server.close.remote(session=sid, reason="client_disconnected"))
                    except ServeError:
                        pass

    async def pump(self, sid: str, access: Access, send, finish, fail) -> None:
        """Session events -> frames, until the end event (close 1000) or an error."""
        try:
            async for batch in self.events(access, sid):
                for event in batch:
                    await send(event)
                    if event["type"] == "end":
                        await finish(1000, event["reason"])
                        return
                    if event["type"] == "error":
                        await fail(ServeError(event["code"], event["message"]))
                        return
            await fail(ServeError("session_lost", "the session's event stream ended without an end event"))
        except ServeError as e:
            await fail(e)
        except (WebSocketDisconnect, RuntimeError):
            pass

    # ---- HTTP + SSE ----------------------------------------------------------------------
    async def json_body(self, request: Request) -> dict:
        return parse_json_object(await request.body(), self.cfg.ingress.max_frame_bytes, "body")

    @app.post("/v1/sessions", status_code=201)
    async def http_open(self, request: Request):
        try:
            access = await self.access(request.headers, request.query_params)
            info = await self.open_session(access)
        except ServeError as e:
            return error_body(e, self.cfg.ingress.retry_after_s)
        return JSONResponse(self.session_frame(info, access), status_code=201)

    @app.post("/v1/sessions/{session}/append")
    async def http_append(self, session: str, request: Request):
        try:
            access = await self.access(request.headers, request.query_params)
            body = await self.json_body(request)
            if body.get("type", "append") != "append":  # this endpoint appends; a frame of another type is a mistake
                raise ServeError("bad_frame", f"this endpoint appends: type {body['type']!r} is not 'append'")
            frame = check_frame({**body, "type": "append"})
            return await self.append(access, session, frame)
        except ServeError as e:
            return error_body(e)

    @app.get("/v1/sessions/{session}/events")
    async def http_events(self, session: str, request: Request, from_row: int = 0):
        try:
            access = await self.access(request.headers, request.query_params)
        except ServeError as e:
            return error_body(e)
        last = request.headers.get("last-event-id")
        if last is not None and last.isdigit():  # an EventSource reconnecting resumes after its last row
            from_row = int(last) + 1
        return StreamingResponse(self.sse(access, session, from_row), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def sse(self, access: Access, session: str, from_row: int = 0, first: list[dict] = ()):
        for event in first:
            yield _sse(event)
        try:
            async for batch in self.events(access, session, from_row):
                for event in batch:
                    yield _sse(event)
        except ServeError as e:
            yield _sse({"type": "error", "code": e.code, "message": e.message})

    @app.delete("/v1/sessions/{session}")
    async def http_close(self, session: str, request: Request):
        try:
            access = await self.access(request.headers, request.query_params)
            if not (access.write or access.force):
                raise ServeError("forbidden", f"role {access.role!r} may not close sessions")
            await self.call(self.server.close.remote(session=session, reason="closed"))
        except ServeError as e:
            return error_body(e)
        return {"type": "end", "id": session, "reason": "closed"}

    @app.post("/v1/generate")
    async def generate(self, request: Request):
        """One shot: {"inputs": {STREAM: TEXT, ...}, "max_rows": N} -> SSE rows until the end
        token, max_rows or silent_rows. Every input's text is queued before the first row: it goes in
        from row 0, one token per row."""
        try:
            access = await self.access(request.headers, request.query_params)
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
            info = await self.open_session(access, max_rows=max_rows, end_on_end_token=True, inputs=queued)
        except ServeError as e:
            return error_body(e, self.cfg.ingress.retry_after_s)
        return StreamingResponse(self.sse(access, info["id"], 0, [self.session_frame(info, access)]),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
