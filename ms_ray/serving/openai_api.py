"""What the OpenAI-compatible endpoints share (chat_completions.py, realtime.py): the model's name,
the error body, chat messages -> stream text, and a reply read off a session's rows.

A chat is a session of its own: every message goes in, in turn, on the stream of its role
(ChatConfig.role_streams), one token per row; the answer is what the model then writes on the
answer stream until its end token. Nothing here knows of Ray or HTTP.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import PurePath

from ..config.serve import ChatConfig
from .access import HTTP_STATUS, ServeError

# protocol error code -> the OpenAI error body's (type, code): clients key on the HTTP status (the SDKs
# pick their exception class by it); type and code are what OpenAI's own API says in these cases
OPENAI_KINDS = {
    "unauthorized": ("invalid_request_error", "invalid_api_key"),
    "forbidden": ("permission_error", "forbidden"),
    "busy": ("server_error", "busy"),
    "rate_limited": ("rate_limit_error", "rate_limit_exceeded"),
    "model_not_found": ("invalid_request_error", "model_not_found"),
    "unsupported": ("invalid_request_error", "unsupported_parameter"),
    "invalid_value": ("invalid_request_error", "invalid_value"),
    "timeout": ("server_error", "timeout"),
    "internal": ("server_error", "internal_error"),
    "session_lost": ("server_error", "session_lost"),
}
STATUS = {**HTTP_STATUS, "model_not_found": 404, "unsupported": 400, "invalid_value": 400}


class ParamError(ServeError):
    """A request the OpenAI endpoints refuse because of one parameter (`param` in the error body)."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(code, message)
        self.param = param


def error_object(err: ServeError) -> dict:
    kind, code = OPENAI_KINDS.get(err.code, ("invalid_request_error", err.code))
    return {"message": err.message, "type": kind, "param": getattr(err, "param", None), "code": code}


def status_of(err: ServeError) -> int:
    return STATUS.get(err.code, 500)


def model_name(chat: ChatConfig, checkpoint: str) -> str:
    if chat.model_name:
        return chat.model_name
    path = PurePath(checkpoint.rstrip("/"))
    return path.parent.name if path.name == "export" and path.parent.name else path.name


def check_model(requested, served: str, param: str = "model") -> None:
    if requested != served:
        raise ParamError("model_not_found", f"The model {requested!r} does not exist: this server serves {served!r}",
                         param)


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def close_session(ingress, info: dict, reason: str) -> None:
    """End a session this request opened, in the background (feeds.FeedHub.background): when the
    client has gone away, Serve cancels the request and the calls it makes."""
    ingress.hub.background(lambda: ingress.server.close.remote(session=info["id"], reason=reason,
                                                               token=info["token"]))


def text_of(content, where: str) -> str:
    """A message's content: a string, or a list of text parts (OpenAI's content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text", "output_text") \
                    or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ParamError("unsupported", f"{where}[{i}]: only text parts are supported (got {kind!r}); "
                                                "this model reads and writes text streams", f"{where}[{i}]")
            texts.append(part["text"])
        return "".join(texts)
    raise ParamError("invalid_value", f"{where} must be a string or a list of text parts", where)


def message_stream(chat: ChatConfig, role, streams: dict[str, str], where: str) -> str:
    """The stream a message of `role` goes to; refuses a role this model has no stream for."""
    stream = chat.role_streams.get(role) if isinstance(role, str) else None
    if stream is None:
        raise ParamError("invalid_value", f"{where}: role {role!r} is not one of {sorted(chat.role_streams)}", where)
    if stream not in streams:
        inputs = sorted(name for name, kind in streams.items() if kind == "input")
        raise ParamError("invalid_value", f"{where}: this model has no {stream!r} stream for role {role!r} messages "
                                          f"(its input streams: {inputs}); leave those messages out", where)
    return stream


def side_streams(cfg, streams: list[dict], readable, leave_out: tuple) -> tuple[str, ...]:
    """The streams an answer carries beside its content: the readable output streams (tool calls,
    reasoning) and the input streams stream actors write (tool results), less `leave_out`."""
    actor_writes = {name for actor in cfg.actors for name in actor.writes}
    return tuple(s["name"] for s in streams if s["name"] in readable and s["name"] not in leave_out
                 and (s["role"] == "output" or s["name"] in actor_writes))


def end_token_of(streams: list[dict], name: str) -> str | None:
    return next((s.get("end_token") for s in streams if s["name"] == name), None)


@dataclass
class Reply:
    """The answer of one chat, read off its session's row events: `content` is the answer stream from
    row `reply_from` until its end token (left out), a stop string (left out) or `max_tokens`;
    reasoning and side streams (other output streams, tool results) are kept apart. add() returns
    the new text per field, as the chunks of a streamed answer carry it."""

    answer: str
    end_token: str | None
    reply_from: int
    reasoning: str | None = None  # a stream name, when the caller may read it
    side: tuple[str, ...] = ()
    stops: tuple[str, ...] = ()
    max_tokens: int | None = None
    last_row: int | None = None  # the reply is cut here (finish "length") if it has not ended
    content: str = ""
    reasoning_text: str = ""
    side_text: dict[str, str] = field(default_factory=dict)
    tokens: int = 0  # answer-stream tokens of the reply (its end token included)
    reasoning_tokens: int = 0
    rows: int = 0  # rows the session ran
    finish: str | None = None  # "stop" or "length", once finished
    held: str = ""  # content that may be the start of a stop string
    stopped: bool = False  # a stop string ended it (what was held was its start)

    def add(self, event: dict) -> dict:
        """One row event -> {"content": ..., "reasoning_content": ..., "streams": {...}} of what it adds."""
        delta: dict = {}
        if self.finish or event["type"] != "row":
            return delta
        row, cells = event["row"], event["cells"]
        self.rows = row + 1
        if row < self.reply_from:
            return delta
        if self.reasoning and self.reasoning in cells:
            self.reasoning_tokens += 1
            self.reasoning_text += cells[self.reasoning]
            delta["reasoning_content"] = cells[self.reasoning]
        side = {name: cells[name] for name in self.side if name in cells}
        for name, text in side.items():
            self.side_text[name] = self.side_text.get(name, "") + text
        if side:
            delta["streams"] = side
        if self.answer in cells:
            self.tokens += 1
            text = cells[self.answer]
            if text.strip() == self.end_token:  # the cell may carry the space before it
                self.finish = "stop"
                text = ""
            sent = self._through_stops(text)
            if self.finish is None and self.max_tokens is not None and self.tokens >= self.max_tokens:
                self.finish = "length"
            if self.finish is not None and not self.stopped:  # what was held was no stop string after all
                sent, self.held = sent + self.held, ""
            if sent:
                self.content += sent
                delta["content"] = sent
        if self.finish is None and self.last_row is not None and self.rows >= self.last_row:
            tail = self.ended("max_rows").get("content")
            if tail:
                delta["content"] = delta.get("content", "") + tail
        return delta

    def _through_stops(self, text: str) -> str:
        """Text that may go out now: up to a stop string (then finished), less a tail that could
        begin one (held until the next token says)."""
        pending = self.held + text
        hits = [pending.find(s) for s in self.stops if s in pending]
        if hits:
            self.finish, self.stopped, self.held = "stop", True, ""
            return pending[: min(hits)]
        keep = max((n for s in self.stops for n in range(1, len(s)) if pending.endswith(s[:n])), default=0)
        self.held = pending[len(pending) - keep :] if keep else ""
        return pending[: len(pending) - keep]

    def ended(self, reason: str) -> dict:
        """The session ended (its row limit) or the reply's rows ran out before the reply did: what
        was held goes out."""
        delta = {"content": self.held} if self.held else {}
        self.content += self.held
        self.held, self.finish = "", self.finish or "length"
        return delta

    def usage(self, prompt_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": self.tokens + self.reasoning_tokens,
                "total_tokens": prompt_tokens + self.tokens + self.reasoning_tokens,
                "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
                "rows": self.rows}  # ours: the rows the session ran (each one step of every stream)
