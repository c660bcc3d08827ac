"""/v1/realtime driven by the `openai` SDK's own Realtime client (its events as OpenAI's public
reference names them), against the shared apps of tests/served_app.py (a tiny random model: its
output stream writes every row, so a response starts at once and runs on). The whole response
cycle, end token included, runs against a trained model in tests/serving/test_live_skills.py."""

import asyncio
import json

import openai
import pytest
import websockets
from served_app import KEYS, run

MODEL = "tiny"


def realtime(served, key=KEYS["user"], model=MODEL, app="main"):
    c = openai.AsyncOpenAI(base_url=f"{served['http']}/{app}/v1", api_key=key, max_retries=0)
    return c.realtime.connect(model=model)


async def next_of(conn, kinds: set[str], limit: int = 400, seen: list | None = None):
    """The next event of one of `kinds` (others are skipped, at most `limit` of them; all go in `seen`)."""
    for _ in range(limit):
        event = await asyncio.wait_for(conn.recv(), 20)
        if seen is not None:
            seen.append(event)
        if event.type in kinds:
            return event
    raise AssertionError(f"no {kinds} in {limit} events")


def test_a_text_session_opens_takes_items_and_streams_the_answer(served):
    async def main():
        async with realtime(served) as conn:
            seen = []  # the random model starts answering at once: its response began before any item
            created = await next_of(conn, {"session.created"}, seen=seen)
            assert created.session.model == MODEL and created.session.output_modalities == ["text"]
            await conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
            assert (await next_of(conn, {"session.updated"}, seen=seen)).session.id == created.session.id
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "what is 6 times 7"}]})
            added = await next_of(conn, {"conversation.item.added"}, seen=seen)
            assert added.item.role == "user" and added.item.content[0].text == "what is 6 times 7"
            await conn.response.create()
            deltas = [(await next_of(conn, {"response.output_text.delta"}, seen=seen)) for _ in range(5)]
            kinds = [e.type for e in seen]
            started = seen[kinds.index("response.created")]
            assert started.response.status == "in_progress"
            assert kinds.index("response.created") < kinds.index("response.output_item.added") \
                < kinds.index("response.content_part.added") < kinds.index("response.output_text.delta")
            assert {e.response_id for e in deltas} == {started.response.id}
            assert "".join(e.delta for e in deltas).strip()
    run(main())


def test_refusals_are_error_events_and_the_session_goes_on(served):
    async def main():
        async with realtime(served) as conn:
            await next_of(conn, {"session.created"})
            await conn.session.update(session={"type": "realtime", "instructions": "be brief"})
            error = await next_of(conn, {"error"})
            assert error.error.param == "session.instructions" and "system" in error.error.message  # no such stream
            await conn.session.update(session={"type": "realtime", "output_modalities": ["audio"]})
            assert (await next_of(conn, {"error"})).error.param == "session.output_modalities"
            await conn.send({"type": "input_audio_buffer.append", "audio": "AAAA"})
            assert (await next_of(conn, {"error"})).error.code == "unsupported_parameter"
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "moon"}]})
            assert (await next_of(conn, {"conversation.item.added"})).item.content[0].text == "moon"
    run(main())


def test_bad_key_and_bad_model_get_an_error_event_then_the_close(served):
    async def refused(key, model):
        url = f"{served['ws']}/main/v1/realtime?model={model}"
        async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {key}"}) as ws:
            event = json.loads(await asyncio.wait_for(ws.recv(), 20))
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 20)
            return event, ws.close_code

    async def main():
        event, code = await refused("not-a-key", MODEL)
        assert event["type"] == "error" and event["error"]["code"] == "invalid_api_key" and code == 1008
        event, code = await refused(KEYS["user"], "gpt-realtime")
        assert event["error"]["code"] == "model_not_found" and code == 1008
    run(main())


def test_a_browser_style_key_in_the_subprotocol_and_typed_text_as_it_comes(served):
    """A browser's WebSocket cannot set headers: the key comes as the `openai-insecure-api-key.KEY`
    subprotocol. ms_ray.input.append puts text in as it is typed (no whole turn)."""
    async def main():
        url = f"{served['ws']}/main/v1/realtime?model={MODEL}"
        protocols = ["realtime", f"openai-insecure-api-key.{KEYS['limited']}"]
        async with websockets.connect(url, subprotocols=protocols) as ws:
            assert ws.subprotocol == "realtime"
            created = json.loads(await asyncio.wait_for(ws.recv(), 20))
            assert created["type"] == "session.created"
            await ws.send(json.dumps({"type": "ms_ray.input.append", "stream": "user", "text": "what is"}))
            await ws.send(json.dumps({"type": "ms_ray.input.append", "stream": "tool", "text": "42"}))
            kinds, think = set(), []
            for _ in range(200):
                event = json.loads(await asyncio.wait_for(ws.recv(), 20))
                kinds.add(event["type"])
                if event["type"] == "ms_ray.stream.delta" and event["stream"] == "think":
                    think.append(event["delta"])  # the limited role reads think: it comes apart
                if event["type"] == "error":
                    assert event["error"]["code"] == "forbidden" and "tool" in event["error"]["message"]
                if len(think) >= 3 and "error" in kinds:
                    break
            assert {"response.output_text.delta", "ms_ray.stream.delta", "error"} <= kinds
    run(main())
