"""`/v1/realtime` (WebSocket): the OpenAI Realtime event protocol, text modality, over one live session.

Connecting opens a session, as `/v1/sessions` does (same keys, roles, quotas and `busy`); the socket
is its opener and closing it ends the session. The session runs on the row clock from the start:
the model reads what arrives and decides by itself when to write, so a **response** here is one
turn of the answer stream, from its first token to its end token, announced with the standard
response.* events when the model starts it. serve/PROTOCOL.md lists what each event does here.

Client events: session.update (instructions -> the system stream, text output only),
conversation.item.create (a message's text -> its role's stream as a whole turn; a
function_call_output -> the tool stream), response.create (accepted: the model answers by itself),
ms_ray.input.append (ours: text as it is typed, {stream, text, end}). Anything else gets an
`error` event naming it; the session goes on.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import WebSocket, WebSocketDisconnect

from .access import WS_CLOSE, ServeError, next_raw_frame, parse_json_object
from .openai_api import (
    ParamError,
    check_model,
    close_session,
    end_token_of,
    error_object,
    message_stream,
    new_id,
    side_streams,
    text_of,
)

INSECURE_KEY = "openai-insecure-api-key."  # a browser's WebSocket sends its key as a subprotocol


def event(kind: str, **fields) -> dict:
    return {"type": kind, "event_id": new_id("event_"), **fields}


def error(err: ServeError, client_event: str | None = None) -> dict:
    return event("error", error={**error_object(err), "event_id": client_event})


class Responses:
    """Row events -> Realtime server events: the answer stream's turns as responses (created,
    output item, content part, output_text deltas, done ...), other readable streams as
    `ms_ray.stream.delta`."""

    def __init__(self, answer: str, end_token: str | None, side: tuple[str, ...]):
        self.answer, self.end_token, self.side = answer, end_token, side
        self.current: dict | None = None  # the response in progress
        self.input_tokens = 0  # appended since the last response ended

    def rows(self, batch: list[dict]) -> list[dict]:
        out = []
        for row in (e for e in batch if e["type"] == "row"):
            cells = row["cells"]
            for name in self.side:
                if name in cells:
                    out.append(event("ms_ray.stream.delta", stream=name, row=row["row"], delta=cells[name],
                                     response_id=self.current and self.current["id"]))
            text = cells.get(self.answer)
            if text is None:
                continue
            if text.strip() == self.end_token:  # the cell may carry the space before it
                out += self.done("completed") if self.current else []
                continue
            if self.current is None:
                out += self.start()
            r = self.current
            r["text"] += text
            r["tokens"] += 1
            out.append(event("response.output_text.delta", response_id=r["id"], item_id=r["item"], output_index=0,
                             content_index=0, delta=text))
        return out

    def start(self) -> list[dict]:
        r = self.current = {"id": new_id("resp_"), "item": new_id("item_"), "text": "", "tokens": 0}
        ids = {"response_id": r["id"], "item_id": r["item"], "output_index": 0}
        return [event("response.created", response=self.response("in_progress")),
                event("response.output_item.added", response_id=r["id"], output_index=0, item=self.item("in_progress")),
                event("response.content_part.added", **ids, content_index=0, part={"type": "output_text", "text": ""})]

    def done(self, status: str) -> list[dict]:
        """The response in progress ends: `completed` at the end token, `incomplete` when the session ends first."""
        r = self.current
        ids = {"response_id": r["id"], "item_id": r["item"], "output_index": 0}
        item_status = "completed" if status == "completed" else "incomplete"
        events = [event("response.output_text.done", **ids, content_index=0, text=r["text"]),
                  event("response.content_part.done", **ids, content_index=0,
                        part={"type": "output_text", "text": r["text"]}),
                  event("response.output_item.done", response_id=r["id"], output_index=0, item=self.item(item_status)),
                  event("response.done", response=self.response(status, [self.item(item_status)]))]
        self.current, self.input_tokens = None, 0
        return events

    def item(self, status: str) -> dict:
        r = self.current
        return {"id": r["item"], "object": "realtime.item", "type": "message", "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": r["text"]}]}

    def response(self, status: str, output: list | None = None) -> dict:
        r = self.current
        usage = {"input_tokens": self.input_tokens, "output_tokens": r["tokens"],
                 "total_tokens": self.input_tokens + r["tokens"]}
        return {"id": r["id"], "object": "realtime.response", "status": status, "output": output or [],
                "output_modalities": ["text"], "usage": usage}


async def admit(ingress, ws: WebSocket, key: str | None):
    """The caller, its new session and the watch on it; raises ServeError before any event."""
    access, client = await ingress.access(ws, key)
    if "model" in ws.query_params:
        check_model(ws.query_params["model"], ingress.model_name)
    answer = ingress.cfg.chat.answer_stream
    if answer not in access.read:
        raise ServeError("forbidden", f"role {access.role!r} may not read the answer stream {answer!r}")
    info = await ingress.open_session(access, client)
    try:
        return access, client, info, await ingress.hub.watch(info["id"], access.read)
    except ServeError:
        close_session(ingress, info, "closed")  # opened, then lost before it was watched
        raise


async def realtime(ingress, ws: WebSocket):
    offered = ws.scope.get("subprotocols") or []
    key = next((p[len(INSECURE_KEY):] for p in offered if p.startswith(INSECURE_KEY)), None)
    await ws.accept(subprotocol="realtime" if "realtime" in offered else None)
    lock = asyncio.Lock()

    async def send(*events: dict):
        async with lock:
            for e in events:
                await ws.send_text(json.dumps(e))

    try:
        access, client, info, watcher = await admit(ingress, ws, key)
    except ServeError as e:
        await send(error(e))
        return await ws.close(WS_CLOSE.get(e.code, 1008), reason=e.message[:120])
    chat = ingress.cfg.chat
    responses = Responses(chat.answer_stream, end_token_of(ingress.streams, chat.answer_stream),
                          side_streams(ingress.cfg, ingress.streams, access.read, (chat.answer_stream,)))
    session = {"type": "realtime", "object": "realtime.session", "id": info["id"], "model": ingress.model_name,
               "output_modalities": ["text"], "instructions": "", "tools": [], "max_output_tokens": "inf",
               "streams": info["streams"]}  # ours: the model's streams
    pump = None
    try:
        await send(event("session.created", session=session))
        pump = asyncio.create_task(forward(watcher, responses, send))
        while not pump.done():
            raw = await next_raw_frame(ws, pump)
            if raw is None:
                break
            client_event = None
            try:
                frame = parse_json_object(raw, ingress.cfg.ingress.max_frame_bytes, "event")
                client_event = frame.get("event_id")
                await send(*await handle(ingress, access, client, info, session, responses, frame))
            except ServeError as e:
                await send(error(e, client_event))
                if e.code in ("session_lost", "unknown_session", "session_ended"):
                    break
    except (WebSocketDisconnect, RuntimeError):
        pass  # the client went away
    finally:
        ingress.hub.forget(watcher)
        if pump is not None:
            pump.cancel()
        close_session(ingress, info, "client_disconnected")  # the socket opened it: the session ends with it
        try:
            await ws.close(1000)
        except RuntimeError:
            pass  # already closed


async def forward(watcher, responses: Responses, send) -> None:
    """The session's rows -> events, until it ends (an `error` event says why, then the socket closes)."""
    async for batch in watcher.batches():
        await send(*responses.rows(batch))
        final = batch[-1] if batch else None
        if final and final["type"] in ("end", "error"):
            if responses.current:
                await send(*responses.done("incomplete"))
            err = ServeError(final["code"], final["message"]) if final["type"] == "error" else \
                ServeError("session_ended", f"the session ended ({final['reason']})")
            await send(error(err))
            return


async def handle(ingress, access, client: str, info: dict, session: dict, responses: Responses, frame: dict) -> list:
    """One client event -> the events that answer it."""
    kind, sid, token = frame.get("type"), info["id"], info["token"]

    async def append(stream: str, text: str, end: bool = True) -> None:
        answer = await ingress.append(access, client, sid, {"stream": stream, "text": text, "end": end}, token)
        responses.input_tokens += answer["tokens"]

    if kind == "session.update":
        update = frame.get("session")
        if not isinstance(update, dict):
            raise ParamError("invalid_value", "session.update needs a `session` object", "session")
        for name, value in update.items():
            if name == "type" and value == "realtime" or name == "output_modalities" and value == ["text"] \
                    or name == "max_output_tokens" and value == "inf":
                continue
            if name == "model":
                check_model(value, session["model"], "session.model")
            elif name == "instructions" and isinstance(value, str):
                stream = message_stream(ingress.cfg.chat, "system", ingress.policy.stream_roles, "session.instructions")
                await append(stream, value)
                session["instructions"] = value
            else:
                raise ParamError("unsupported", f"session.{name}={json.dumps(value)[:80]}: this server takes "
                                                'instructions, output_modalities ["text"] and model', f"session.{name}")
        return [event("session.updated", session=session)]
    if kind == "conversation.item.create":
        item = frame.get("item")
        if not isinstance(item, dict):
            raise ParamError("invalid_value", "conversation.item.create needs an `item` object", "item")
        item = {"id": new_id("item_"), **item, "object": "realtime.item", "status": "completed"}
        if item.get("type") == "message":
            stream = message_stream(ingress.cfg.chat, item.get("role"), ingress.policy.stream_roles, "item.role")
            await append(stream, text_of(item.get("content"), "item.content"))
        elif item.get("type") == "function_call_output" and isinstance(item.get("output"), str):
            await append(message_stream(ingress.cfg.chat, "tool", ingress.policy.stream_roles, "item.type"),
                         item["output"])
        else:
            raise ParamError("unsupported", f"item type {item.get('type')!r}: this server takes message and "
                                            "function_call_output items", "item.type")
        previous = frame.get("previous_item_id")
        return [event("conversation.item.added", previous_item_id=previous, item=item),
                event("conversation.item.done", previous_item_id=previous, item=item)]
    if kind == "response.create":
        options = frame.get("response") or {}
        extra = {k: v for k, v in options.items() if not (k == "output_modalities" and v == ["text"])}
        if extra:
            raise ParamError("unsupported", f"response.{sorted(extra)[0]}: a response here is the model's own next "
                                            "turn; it takes no options", f"response.{sorted(extra)[0]}")
        return []  # the model answers when it has read the input: its next turn is the response
    if kind == "ms_ray.input.append":
        if not isinstance(frame.get("stream"), str) or not isinstance(frame.get("text"), str) \
                or not isinstance(frame.get("end", False), bool):
            raise ParamError("invalid_value", "ms_ray.input.append is {stream, text, end?}", "stream")
        await append(frame["stream"], frame["text"], frame.get("end", False))
        return []
    raise ParamError("unsupported", f"event type {kind!r} is not supported here (text sessions: session.update, "
                                    "conversation.item.create, response.create, ms_ray.input.append)", "type")
