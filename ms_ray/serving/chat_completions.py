"""`POST /v1/chat/completions` and `GET /v1/models`: the OpenAI chat shape over a session of its own.

A request opens a session (the caller's keys, roles, quotas and the replica's `busy` apply as to
any session), its messages go in one after another on the streams of their roles, the answer is
read off the answer stream (openai_api.Reply) and the session is closed. `stream: true` sends the
answer as Server-Sent Events in the standard chunk shape, ending with `data: [DONE]`. Every
request parameter is honoured or refused with the standard error body (PARAMETERS below).
"""

from __future__ import annotations

import json
import numbers

from fastapi.responses import JSONResponse, StreamingResponse

from .access import ServeError, retry_headers
from .openai_api import (
    ParamError,
    Reply,
    check_model,
    close_session,
    end_token_of,
    error_object,
    message_stream,
    now,
    side_streams,
    status_of,
    text_of,
)

# parameters taken at any value (checked below); `user` is the caller's end-user id (not read by the model)
PARAMETERS = {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
              "temperature", "top_p", "stop", "seed", "user"}
# parameters taken only at the value that asks for nothing (what a client library may send by default)
NO_OP_VALUES = {"n": (1,), "frequency_penalty": (0,), "presence_penalty": (0,), "logprobs": (False,),
                "logit_bias": ({},), "tools": ([],), "tool_choice": ("none",), "response_format": ({"type": "text"},),
                "modalities": (["text"],), "store": (False,), "parallel_tool_calls": ()}
WHY_NOT = {"n": "one choice per request (send n requests)",
           "tools": "this server runs its tools itself, in the session (see `streams` in the answer); "
                    "client-side function calling is not supported",
           "tool_choice": "client-side function calling is not supported",
           "parallel_tool_calls": "client-side function calling is not supported",
           "logprobs": "log probabilities are not returned", "logit_bias": "logit_bias is not supported",
           "frequency_penalty": "frequency_penalty is not supported", "presence_penalty": "presence_penalty is not "
           "supported", "response_format": "only text answers", "modalities": "only text", "store": "nothing is stored"}
MESSAGE_FIELDS = {"role", "content", "name", "tool_call_id"}  # name, tool_call_id: accepted, not read by the model


def error_response(err: ServeError, retry_after: int | None = None) -> JSONResponse:
    return JSONResponse({"error": error_object(err)}, status_code=status_of(err),
                        headers=retry_headers(err, retry_after))


def number(body: dict, name: str, low: float, high: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return None
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise ParamError("invalid_value", f"{name} must be {what} from {low:g} to {high:g}, got {value!r}", name)
    return value


def parse_request(body: dict, served_model: str) -> dict:
    """The request's parameters, checked; refuses (ParamError) whatever this server would not honour."""
    for name, value in body.items():
        if name in PARAMETERS:
            continue
        if name not in NO_OP_VALUES:
            raise ParamError("unsupported", f"Unrecognized request argument supplied: {name}", name)
        if value is not None and value not in NO_OP_VALUES[name]:
            raise ParamError("unsupported", f"{name}={json.dumps(value)}: {WHY_NOT[name]}", name)
    check_model(body.get("model"), served_model)
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise ParamError("invalid_value", "stream must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise ParamError("invalid_value", "stream_options is {\"include_usage\": BOOL}, with stream: true",
                         "stream_options")
    limit = number(body, "max_completion_tokens", 1, 2**31, integer=True)
    legacy = number(body, "max_tokens", 1, 2**31, integer=True)
    if limit is not None and legacy is not None and limit != legacy:
        raise ParamError("invalid_value", "max_tokens and max_completion_tokens disagree; send one", "max_tokens")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ParamError("invalid_value", "stop is a string or a list of up to 4 non-empty strings", "stop")
    seed = number(body, "seed", -(2**63), 2**63 - 1, integer=True)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ParamError("invalid_value", "messages must be a non-empty list", "messages")
    return {"stream": stream, "usage_chunk": bool((options or {}).get("include_usage")),
            "max_tokens": limit if limit is not None else legacy, "stops": tuple(stops), "seed": seed,
            "temperature": number(body, "temperature", 0, 2), "top_p": number(body, "top_p", 0, 1),
            "messages": messages}


def message_inputs(messages: list, ingress, access) -> list[tuple]:
    """Messages -> the session's inputs [(stream, text, force, end)], in order; each message is a
    whole turn (its stream's end token follows). Input streams need the role's write permission,
    as appends do; assistant turns are the answer stream's history, forced into this request's
    own session."""
    chat, stream_roles = ingress.cfg.chat, ingress.policy.stream_roles
    inputs = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ParamError("invalid_value", f"{where} must be an object with role and content", where)
        unknown = set(message) - MESSAGE_FIELDS
        if unknown:
            why = "client-side function calling is not supported" if "tool_calls" in unknown else "unknown field"
            raise ParamError("unsupported", f"{where}: {sorted(unknown)}: {why}", f"{where}.{sorted(unknown)[0]}")
        stream = message_stream(chat, message.get("role"), stream_roles, f"{where}.role")
        text = text_of(message.get("content"), f"{where}.content")
        if message.get("role") == "assistant":
            inputs.append((stream, text, True, True))
        else:
            inputs.append((stream, text, access.check_write(stream, stream_roles), True))
    return inputs


def sampling_of(request: dict, streams: list[str]) -> dict[str, dict]:
    """temperature / top_p for the streams the answer is read from (the others keep the server's)."""
    fields = {name: request[name] for name in ("temperature", "top_p") if request[name] is not None}
    return {stream: fields for stream in streams} if fields else {}


async def chat_completions(ingress, request):
    info = None
    try:
        access, client = await ingress.access(request)
        body = await ingress.json_body(request)
        served = ingress.model_name
        req = parse_request(body, served)
        chat = ingress.cfg.chat
        inputs = message_inputs(req["messages"], ingress, access)
        reasoning = chat.reasoning_stream if chat.reasoning_stream in access.read else None
        side = side_streams(ingress.cfg, ingress.streams, access.read, (chat.answer_stream, reasoning))
        if chat.answer_stream not in ingress.policy.stream_roles:
            raise ServeError("internal", f"chat.answer_stream {chat.answer_stream!r} is not a stream of this model "
                                         f"({sorted(ingress.policy.stream_roles)}): set it in the serve config")
        if chat.answer_stream not in access.read:
            raise ServeError("forbidden", f"role {access.role!r} may not read the answer stream {chat.answer_stream!r}")
        info = await ingress.open_session(
            access, client, inputs=inputs, gap_rows=chat.gap_rows, end_on_end_token=False, seed=req["seed"],
            sampling=sampling_of(req, [chat.answer_stream] + ([chat.reasoning_stream] if chat.reasoning_stream
                                                               in ingress.policy.stream_roles else [])))
        watcher = await ingress.hub.watch(info["id"], access.read)
    except ServeError as e:
        if info is not None:  # opened, then lost before it was watched
            close_session(ingress, info, "closed")
        return error_response(e, ingress.cfg.ingress.retry_after_s)
    prompt = info["prompt"]
    reply = Reply(chat.answer_stream, end_token_of(ingress.streams, chat.answer_stream), prompt["reply_from"],
                  reasoning, side, req["stops"], req["max_tokens"], last_row=prompt["rows"] + chat.max_reply_rows)
    answer = {"id": f"chatcmpl-{info['id']}", "created": now(), "model": served, "system_fingerprint": None}
    if req["stream"]:
        return StreamingResponse(streamed(ingress, watcher, info, reply, answer, req["usage_chunk"]),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        async for _ in deltas(ingress, watcher, reply):
            pass
    except ServeError as e:
        return error_response(e)
    finally:
        finish(ingress, watcher, info)
    message = {"role": "assistant", "content": reply.content, "refusal": None}
    if reasoning:
        message["reasoning_content"] = reply.reasoning_text
    if side:
        message["streams"] = reply.side_text
    return {**answer, "object": "chat.completion", "usage": reply.usage(info["prompt"]["tokens"]),
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish}]}


async def deltas(ingress, watcher, reply: Reply):
    """The reply's deltas as its rows come, until it finishes (or its session ends)."""
    async for batch in watcher.batches():
        for event in batch:
            if event["type"] == "error":
                raise ServeError(event["code"], event["message"])
            delta = reply.ended(event["reason"]) if event["type"] == "end" else reply.add(event)
            if delta:
                yield delta
            if reply.finish:
                return


async def streamed(ingress, watcher, info: dict, reply: Reply, answer: dict, usage_chunk: bool):
    def chunk(delta: dict, finish: str | None = None) -> str:
        data = {**answer, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return f"data: {json.dumps(data)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        try:
            async for delta in deltas(ingress, watcher, reply):
                yield chunk(delta)
        except ServeError as e:  # after the 200: the error travels as an event, as OpenAI's streams do
            yield f"data: {json.dumps({'error': error_object(e)})}\n\n"
            return
        yield chunk({}, reply.finish)
        if usage_chunk:
            data = {**answer, "object": "chat.completion.chunk", "choices": [],
                    "usage": reply.usage(info["prompt"]["tokens"])}
            yield f"data: {json.dumps(data)}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # finished, failed, or the client went away: the session ends now
        finish(ingress, watcher, info)


def finish(ingress, watcher, info: dict) -> None:
    ingress.hub.forget(watcher)
    close_session(ingress, info, "closed")


async def models(ingress, request, model: str | None = None):
    """GET /v1/models (the one model this app serves) and /v1/models/{model}."""
    try:
        await ingress.access(request)
        if model is not None:
            check_model(model, ingress.model_name)
    except ServeError as e:
        return error_response(e)
    card = {"id": ingress.model_name, "object": "model", "created": ingress.started, "owned_by": "ms_ray",
            "streams": ingress.streams}  # ours: the model's streams
    return card if model is not None else {"object": "list", "data": [card]}
