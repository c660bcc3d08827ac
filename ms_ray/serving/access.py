"""Who may do what, and what a client frame must look like (serve/PROTOCOL.md).

Roles come from the config (`roles:`), each with its API keys and the streams it may write, force
and read. The ingress resolves a key to an `Access` once per connection or request; everything
else asks that object. Client frames are checked here too, so that every malformed frame gets an
error naming the problem and the session goes on.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from dataclasses import dataclass

from ..core.streams import unicode_problem


class ServeError(Exception):
    """A request the server refuses; `code` is the protocol's error code (serve/PROTOCOL.md)."""

    def __init__(self, code: str, message: str, retry_after: int | None = None):
        super().__init__(code, message, retry_after)  # all in args: survives pickling across Ray
        self.code, self.message, self.retry_after = code, message, retry_after

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

def retry_headers(err: ServeError, retry_after: int | None = None) -> dict | None:
    """The Retry-After header of a refusal: the error's own, or `retry_after` for busy and rate_limited."""
    retry = err.retry_after or (retry_after if err.code in ("busy", "rate_limited") else None)
    return {"Retry-After": str(retry)} if retry else None


HTTP_STATUS = {  # protocol error code -> HTTP status
    "unauthorized": 401, "forbidden": 403, "output_stream": 403, "unknown_stream": 400, "bad_json": 400,
    "bad_frame": 400, "bad_utf8": 400, "too_large": 413, "unknown_session": 404, "session_ended": 410,
    "session_lost": 410, "busy": 503, "rate_limited": 429, "timeout": 504, "internal": 500,
    "bad_version": 400,
}
WS_CLOSE = {  # protocol error code -> WebSocket close code, for errors that end the connection
    "unauthorized": 1008, "forbidden": 1008, "busy": 1013, "rate_limited": 1013, "unknown_session": 4404,
    "session_ended": 4410, "session_lost": 1011, "timeout": 1011, "internal": 1011, "bad_version": 1008,
}


@dataclass(frozen=True)
class Access:
    role: str
    open: bool  # may open sessions
    write: frozenset[str]  # input streams it may append to
    force: frozenset[str]  # output streams it may force
    read: frozenset[str]
    any_session: bool = False  # may write to and close sessions it did not open (no session token)
    max_sessions: int | None = None  # per client (quotas.py)
    max_watchers: int | None = None
    appends_per_s: float | None = None
    append_burst: int = 20

    def check_write(self, stream: str, roles_of_streams: dict[str, str]) -> bool:
        """-> whether the write is a force (an output stream); raises the protocol's error otherwise."""
        kind = roles_of_streams.get(stream)
        if kind is None:
            raise ServeError("unknown_stream",
                             f"no stream {stream!r}; this model's streams are {list(roles_of_streams)}")
        if kind == "output":
            if stream in self.force:
                return True
            raise ServeError("output_stream",
                             f"stream {stream!r} is an output stream: the model writes it, clients cannot")
        if stream not in self.write:
            raise ServeError("forbidden",
                             f"role {self.role!r} may not write stream {stream!r} (it may write {sorted(self.write)})")
        return False


class AccessPolicy:
    """Keys -> roles -> Access, for one model's streams."""

    def __init__(self, roles: dict, stream_roles: dict[str, str], anonymous_role: str | None):
        self.stream_roles = stream_roles
        names = set(stream_roles)
        self.by_role: dict[str, Access] = {}
        self.by_key: dict[str, str] = {}
        for role, cfg in roles.items():
            read = names if "*" in cfg.read else names & set(cfg.read)
            self.by_role[role] = Access(
                role, cfg.open, frozenset(names & set(cfg.write)), frozenset(names & set(cfg.force)),
                frozenset(read - set(cfg.hidden)), cfg.any_session, cfg.max_sessions, cfg.max_watchers,
                cfg.appends_per_s, cfg.append_burst,
            )
            for key in cfg.keys:
                value = os.environ.get(key[4:]) if key.startswith("env:") else key
                if value:
                    if value in self.by_key and self.by_key[value] != role:
                        raise ValueError(f"roles: one API key is given to both {self.by_key[value]!r} and {role!r}")
                    self.by_key[value] = role
        self.anonymous_role = anonymous_role

    def resolve(self, key: str | None) -> Access:
        if key:
            role = self.by_key.get(key)
            if role is None:
                raise ServeError("unauthorized", "unknown API key")
            return self.by_role[role]
        if self.anonymous_role is None:
            raise ServeError("unauthorized", "an API key is required (Authorization: Bearer KEY, X-API-Key or ?key=)")
        return self.by_role[self.anonymous_role]


def key_from(headers, query) -> str | None:
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get("x-api-key") or query.get("key")


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how JSON text says a surrogate


def parse_json_object(raw: str | bytes | None, max_bytes: int, what: str = "frame") -> dict:
    """A JSON object sent as text or UTF-8 bytes (a WebSocket frame, an HTTP body), size-checked
    first; ServeError names what is wrong. Every string in it is Unicode text (no unpaired
    surrogate escapes)."""
    if raw is None:
        raise ServeError("bad_frame", f"empty {what}")
    if isinstance(raw, (bytearray, memoryview)):
        raw = bytes(raw)
    if not isinstance(raw, (str, bytes)):
        raise ServeError("bad_frame", f"{what} is {type(raw).__name__}, not text or bytes")
    size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))
    # a str that says "\ud800" (or holds one): look for unpaired surrogates in what it parses to
    suspect = isinstance(raw, str) and size != len(raw.encode("utf-8", "replace"))
    if size > max_bytes:
        raise ServeError("too_large", f"{what} of {size} bytes; the limit is {max_bytes}")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ServeError("bad_utf8", f"{what} is not valid UTF-8 (byte {e.start}: {e.reason})") from None
    suspect = suspect or _SURROGATE_ESCAPE.search(raw) is not None
    try:
        frame = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ServeError("bad_json", f"{what} is not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise ServeError("bad_json", f"{what} is not JSON we read: nested too deeply") from None
    except ValueError as e:  # valid JSON Python refuses, e.g. an integer of over 4300 digits
        raise ServeError("bad_json", f"{what} is not JSON we read: {str(e).split(';')[0]}") from None
    if not isinstance(frame, dict):
        article = "a" if what == "frame" else "the"
        raise ServeError("bad_frame", f"{article} {what} is a JSON object, got {type(frame).__name__}")
    bad = suspect and unicode_problem(frame, what)
    if bad:
        raise ServeError("bad_frame", bad)
    return frame


async def next_raw_frame(ws, pump: asyncio.Task):
    """A WebSocket client's next frame as sent (text or bytes), or None once `pump` (the task
    sending to it) has ended or the client has left."""
    receive = asyncio.create_task(ws.receive())
    await asyncio.wait({receive, pump}, return_when=asyncio.FIRST_COMPLETED)
    if not receive.done():
        receive.cancel()
        return None
    message = receive.result()
    if message["type"] == "websocket.disconnect":
        return None
    return message.get("text") if message.get("text") is not None else message.get("bytes")


def parse_frame(raw: str | bytes | None, max_bytes: int) -> dict:
    """A client frame (text, or UTF-8 bytes) -> a checked dict; ServeError names what is wrong."""
    return check_frame(parse_json_object(raw, max_bytes))


def check_frame(frame: dict) -> dict:
    """The fields of an append or close frame."""
    if not isinstance(frame, dict):
        raise ServeError("bad_frame", f"a frame is a JSON object, got {type(frame).__name__}")
    kind = frame.get("type")
    if kind == "append":
        for name in ("stream", "text"):
            if not isinstance(frame.get(name), str):
                raise ServeError("bad_frame", f"append frame: '{name}' must be a string")
        if not isinstance(frame.get("end", False), bool):
            raise ServeError("bad_frame", "append frame: 'end' must be true or false")
        unknown = set(frame) - {"type", "stream", "text", "end"}
    elif kind == "close":
        unknown = set(frame) - {"type"}
    else:
        raise ServeError("bad_frame", f"unknown frame type {kind!r}; expected 'append' or 'close'")
    if unknown:
        raise ServeError("bad_frame", f"{kind} frame: unknown field(s) {sorted(unknown)}")
    return frame
