"""SessionEngine in a plain asyncio loop (no Ray, no HTTP), over a tiny random model.

Every test drives the engine with asyncio.run and a hard wait_for bound, so a broken engine fails
instead of hanging. row_interval_s=0: rows come as fast as the model goes (a few ms each).
"""

import asyncio
import contextlib
import random

import pytest
from conftest import make_model

from ms_ray.core.decode import Sampling
from ms_ray.data.skills import SKILL_STREAMS
from ms_ray.data.tokenizer import train_bpe
from ms_ray.serving.session_ids import replica_of
from ms_ray.serving.sessions import EngineSettings, IncrementalText, ServeError, SessionEngine
from ms_ray.serving.stream_actors import ActorLink, Calculator
from ms_ray.tools import run_call

WAIT = 30  # seconds: a bound that a working engine never comes near
FAST = dict(row_interval_s=0)
TALK = Sampling(silence_penalty=1e4)  # silence never wins: the stream always writes
MUTE = Sampling(silence_penalty=-1e4)  # silence always wins: the stream writes only what is forced
TEXTS = [
    "héllo wörld 日本 is nice.", "don't stop, it's fine . ok !", "mul 6 7 = 42",
    "error: boom, the tool timed out after 0.05 s", "naïve café — ünïcödé ✓ 😀",
]


def run(coro, timeout=WAIT):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def engine_for(model, tokenizer, **settings):
    return SessionEngine(model, tokenizer, EngineSettings(**{**FAST, **settings}))


async def read(engine, sid, streams=None, from_row=0, until=None) -> list[dict]:
    """Every event a subscriber gets until the session ends (or `until(events)` holds)."""
    events = []
    gen = engine.subscribe(sid, streams, from_row)
    async with contextlib.aclosing(gen):
        async for batch in gen:
            assert batch, "subscribe yielded an empty batch"
            events += batch
            if until is not None and until(events):
                break
    return events


def rows_of(events):
    return [e for e in events if e["type"] == "row"]


def text_of(events, stream):
    return "".join(e["cells"].get(stream, "") for e in rows_of(events))


def words_of(events, stream):
    return text_of(events, stream).split()


def check_rows(events, first=0):
    """Row numbers consecutive from `first`, none missing or repeated; returns the row events."""
    rows = rows_of(events)
    assert [e["row"] for e in rows] == list(range(first, first + len(rows)))
    return rows


def ended(events, reason):
    assert events[-1] == {"type": "end", "reason": reason}
    assert sum(e["type"] == "end" for e in events) == 1


async def close_all(engine):
    for sid in list(engine.sessions):
        await engine.close(sid)


def serve_error(code, fn, *args, **kwargs):
    with pytest.raises(ServeError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, str(info.value)
    return info.value.message


@pytest.fixture(scope="module")
def skill_model(sch, tok):
    return make_model(sch, len(tok))


@pytest.fixture(scope="module")
def bpe():
    """Byte-level BPE with few merges: most non-ASCII characters span several tokens."""
    return train_bpe(TEXTS * 3, SKILL_STREAMS, vocab_size=300, min_frequency=1)


@pytest.fixture(scope="module")
def bpe_model(bpe):
    return make_model(SKILL_STREAMS.bind(bpe), len(bpe))


# ---- opening, rows and input channels ------------------------------------------------------
def test_open_returns_an_id_naming_the_replica_and_the_streams(skill_model, tok, sch):
    async def main():
        engine = SessionEngine(skill_model, tok, EngineSettings(**FAST), replica="replica7")
        a, b = await engine.open(max_rows=3), await engine.open(max_rows=3)
        for info in (a, b):
            assert replica_of(info["id"]) == "replica7" and info["id"].startswith("replica7.")
            ends = {s.name: {"end_token": s.end_token} for s in sch.streams if s.end_token}
            assert info["streams"] == [{"name": s.name, "role": s.role, **ends.get(s.name, {})} for s in sch.streams]
        assert a["id"] != b["id"]
        assert engine.stats()["sessions"] == 2
        await close_all(engine)
        assert engine.stats()["sessions"] == 0

    run(main())


def test_rows_are_consecutive_and_words_arrive_once_in_order(skill_model, tok):
    async def main():
        engine = engine_for(skill_model, tok)
        sid = (await engine.open(max_rows=20))["id"]
        # before the first row: one word per row from row 0
        assert engine.append(sid, "user", "cat dog bird") == {"session": sid, "stream": "user", "tokens": 3,
                                                              "queued": 3}
        assert engine.append(sid, "user", " fish red")["queued"] == 5  # cells show what was typed: spaces too
        assert engine.append(sid, "user", "")["tokens"] == 0
        later = ["blue", "green", "sun"]

        def append_later(events):
            if len(rows_of(events)) == 8 and later:
                engine.append(sid, "user", " " + " ".join(later))
                later.clear()
            return False

        events = await read(engine, sid, until=append_later)
        rows = check_rows(events)
        assert len(rows) == 20
        ended(events, "max_rows")
        assert words_of(events, "user") == "cat dog bird fish red blue green sun".split()
        assert [rows[r]["cells"].get("user", "").strip() for r in range(5)] == "cat dog bird fish red".split()
        user_rows = [e["row"] for e in rows if "user" in e["cells"]]
        assert user_rows[:5] == [0, 1, 2, 3, 4] and len(user_rows) == 8
        assert user_rows[5:] == list(range(user_rows[5], user_rows[5] + 3))  # one append: consecutive rows
        assert engine.stats()["rows_total"] == 20

    run(main())


def test_open_with_inputs_and_bad_inputs(skill_model, tok):
    async def main():
        engine = engine_for(skill_model, tok)
        sid = (await engine.open(max_rows=4, inputs=[("user", "cat dog", False), ("tool", "42", False)]))["id"]
        events = await read(engine, sid)
        rows = check_rows(events)
        assert [r["cells"].get("user") for r in rows[:2]] == ["cat", " dog"]
        assert rows[0]["cells"].get("tool") == "42"
        with pytest.raises(ServeError) as info:
            await engine.open(inputs=[("user", "cat", False), ("think", "dog", False)])
        assert info.value.code == "output_stream"
        assert engine.sessions == {}  # the refused session does not linger
        assert [s.end for s in engine.ended.values()][-1] == {"type": "end", "reason": "bad_input"}

    run(main())


def test_concurrent_appends_are_all_applied(skill_model, tok):
    words = [[str(10 * k + i) for i in range(10)] for k in range(4)]  # distinct number words

    async def writer(engine, sid, mine):
        for w in mine:
            engine.append(sid, "user", f" {w}")
            await asyncio.sleep(0.001 * random.Random(w).random())

    async def main():
        engine = engine_for(skill_model, tok)
        sid = (await engine.open(max_rows=200))["id"]
        reader = asyncio.create_task(read(engine, sid, until=lambda ev: len(words_of(ev, "user")) >= 40))
        await asyncio.gather(*(writer(engine, sid, mine) for mine in words))
        events = await reader
        await engine.close(sid)
        check_rows(events)
        seen = words_of(events, "user")
        assert sorted(seen) == sorted(w for mine in words for w in mine)  # each exactly once
        for mine in words:  # each writer's words in its order
            assert [w for w in seen if w in mine] == mine

    run(main())


def test_sessions_stepped_together_stay_independent(skill_model, tok):
    plan = {"a": "cat dog bird fish", "b": "red blue green sun moon"}

    async def both(names):
        engine = engine_for(skill_model, tok)
        ids = {}
        for name in names:
            ids[name] = (await engine.open(max_rows=12))["id"]
            engine.append(ids[name], "user", plan[name])
        results = await asyncio.gather(*(read(engine, ids[n]) for n in names))
        return dict(zip(names, results))

    async def main():
        together = await both(["a", "b"])
        for name, events in together.items():
            check_rows(events)
            ended(events, "max_rows")
            assert words_of(events, "user") == plan[name].split()
        # stepped in one batch, each session's rows are what it gets alone (greedy decoding)
        for name in ("a", "b"):
            alone = await both([name])
            assert alone[name] == together[name]

    run(main())


def test_restricted_subscriber_sees_only_its_streams(skill_model, tok):
    async def main():
        engine = engine_for(skill_model, tok, sampling={"think": TALK, "output": TALK, "tool_call": TALK})
        sid = (await engine.open(max_rows=10))["id"]
        engine.append(sid, "user", "cat dog")
        engine.append(sid, "tool", "42")
        allowed = frozenset({"user", "output"})
        full, some, none = await asyncio.gather(read(engine, sid), read(engine, sid, allowed),
                                                read(engine, sid, frozenset()))
        assert {k for e in rows_of(full) for k in e["cells"]} == set(engine.schema.names)  # all streams talk
        assert all(e["cells"].keys() <= allowed for e in rows_of(some))
        filtered = [{k: v for k, v in e["cells"].items() if k in allowed} for e in rows_of(full)]
        assert filtered == [e["cells"] for e in rows_of(some)]
        assert all(e["cells"] == {} for e in rows_of(none))
        assert len(check_rows(some)) == len(check_rows(none)) == 10
        ended(some, "max_rows")
        ended(none, "max_rows")

    run(main())


def test_late_subscriber_replays_the_backlog(skill_model, tok):
    async def main():
        engine = engine_for(skill_model, tok)
        sid = (await engine.open(max_rows=14))["id"]
        engine.append(sid, "user", "cat dog bird fish red blue green")
        first = asyncio.create_task(read(engine, sid))
        for _ in range(2000):  # until some rows went by
            await asyncio.sleep(0.001)
            if len(engine.sessions[sid].backlog) >= 5:
                break
        assert 5 <= len(engine.sessions[sid].backlog) < 14
        late, later = await asyncio.gather(read(engine, sid, from_row=0), read(engine, sid, from_row=3))
        events = await first
        check_rows(events)
        assert late == events
        assert check_rows(later, first=3) == rows_of(events)[3:]
        ended(later, "max_rows")

    run(main())


def test_subscribe_after_the_end_gets_backlog_and_end(skill_model, tok):
    async def main():
        engine = engine_for(skill_model, tok, backlog_rows=4, sampling={"think": TALK})
        sid = (await engine.open(max_rows=6))["id"]
        engine.append(sid, "user", "cat dog bird fish red blue")
        live = await read(engine, sid)
        gen = engine.subscribe(sid)
        batch = await gen.__anext__()  # everything in one batch, then the generator is done
        with pytest.raises(StopAsyncIteration):
            await gen.__anext__()
        assert batch == rows_of(live)[2:] + [{"type": "end", "reason": "max_rows"}]  # the last 4 rows
        assert await read(engine, sid, from_row=5) == rows_of(live)[5:] + [live[-1]]
        hidden = await read(engine, sid, streams=frozenset({"user"}))
        assert all(e["cells"].keys() <= {"user"} for e in rows_of(hidden)) and hidden[-1] == live[-1]
        assert any("think" in e["cells"] for e in rows_of(live))
        assert "max_rows" in serve_error("session_ended", engine.append, sid, "user", "cat")
        await engine.close(sid)  # closing an ended session changes nothing
        assert (await read(engine, sid))[-1] == {"type": "end", "reason": "max_rows"}

    run(main())


def test_close_ends_every_subscriber(skill_model, tok):
    async def main():
        engine = engine_for(skill_model, tok)
        sid = (await engine.open())["id"]
        readers = [asyncio.create_task(read(engine, sid)), asyncio.create_task(read(engine, sid, frozenset({"user"})))]
        for _ in range(2000):
            await asyncio.sleep(0.001)
            if len(engine.sessions[sid].backlog) >= 3:
                break
        await engine.close(sid)
        for events in await asyncio.gather(*readers):
            check_rows(events)
            ended(events, "closed")
        assert sid not in engine.sessions and sid not in engine.decoder.sessions
        assert "closed" in serve_error("session_ended", engine.append, sid, "user", "cat")
        await engine.close(sid)  # twice: nothing happens
        await engine.close("no-such-session")
        assert (await read(engine, sid))[-1] == {"type": "end", "reason": "closed"}

    run(main())


def test_max_rows_is_capped_by_the_settings(skill_model, tok):
    async def main():
        engine = engine_for(skill_model, tok, max_rows=5)
        sid = (await engine.open(max_rows=100))["id"]
        events = await read(engine, sid)
        assert len(check_rows(events)) == 5
        ended(events, "max_rows")
        sid = (await engine.open(max_rows=2))["id"]  # a new session after the loop stopped
        events = await read(engine, sid)
        assert len(check_rows(events)) == 2
        ended(events, "max_rows")

    run(main())


def test_sessions_without_an_end_need_a_window_and_keep_a_constant_memory(sch, tok):
    from ms_ray.core.decode import cache_bytes

    plain = make_model(sch, len(tok))
    with pytest.raises(ValueError, match="needs a windowed model"):
        engine_for(plain, tok, max_rows=None)
    windowed = make_model(sch, len(tok))
    windowed.window = 16  # a slot of 16 + 2 rows
    per_session = cache_bytes(windowed, 18)
    engine = engine_for(windowed, tok, max_rows=None, max_sessions=None, kv_cache_gb=3.5 * per_session / 2**30)
    assert engine.max_sessions == 3  # admission from the memory budget: exact, the slots never grow
    with pytest.raises(ValueError, match="holds no session of 18 rows"):
        engine_for(windowed, tok, max_rows=None, max_sessions=None, kv_cache_gb=0.5 * per_session / 2**30)

    async def main():
        sid = (await engine.open())["id"]
        events = await read(engine, sid, until=lambda ev: len(rows_of(ev)) >= 400)
        assert len(check_rows(events)) >= 400 and sid in engine.sessions  # 400 rows > any slot: still going
        assert engine.decoder.cache.cells <= 18 * windowed.num_streams
        await engine.close(sid)

    run(main())


def test_silent_rows_end_a_silent_session(skill_model, tok):
    async def main():
        mute = {name: MUTE for name in ("think", "output", "tool_call")}
        engine = engine_for(skill_model, tok, silent_rows=3, sampling=mute)
        sid = (await engine.open())["id"]
        engine.append(sid, "user", "cat dog")  # rows 0-1 are not silent
        events = await read(engine, sid)
        assert len(check_rows(events)) == 5
        ended(events, "silence")

    run(main())


def test_open_beyond_max_sessions_is_busy(skill_model, tok):
    async def main():
        engine = engine_for(skill_model, tok, max_sessions=2)
        a = (await engine.open())["id"]
        await engine.open()
        with pytest.raises(ServeError) as info:
            await engine.open()
        assert info.value.code == "busy" and "2 of 2" in info.value.message
        await engine.close(a)
        await engine.open()  # a slot is free again
        assert len(engine.sessions) == 2
        await close_all(engine)

    run(main())


def test_concurrent_opens_at_capacity_are_busy_not_internal_errors(skill_model, tok):
    async def main():
        engine = engine_for(skill_model, tok, max_sessions=2)
        await engine.open()
        async with engine.lock:  # as the step loop holds it during every step
            tasks = [asyncio.create_task(engine.open()) for _ in range(2)]
            for _ in range(5):
                await asyncio.sleep(0)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await close_all(engine)
        errors = [r for r in results if isinstance(r, Exception)]
        assert len(errors) == 1
        assert isinstance(errors[0], ServeError) and errors[0].code == "busy", repr(errors[0])

    run(main())


def test_close_racing_the_last_row_keeps_the_first_end(skill_model, tok):
    async def main():
        engine = engine_for(skill_model, tok)
        sid = (await engine.open(max_rows=1))["id"]
        async with engine.lock:  # the step loop queues on the lock first, then close()
            gen = engine.subscribe(sid)
            first = asyncio.create_task(gen.__anext__())
            await asyncio.sleep(0)
            closing = asyncio.create_task(engine.close(sid))
            for _ in range(5):
                await asyncio.sleep(0)
        await closing
        live = await first
        await gen.aclose()
        assert live[-1] == {"type": "end", "reason": "max_rows"}
        assert (await read(engine, sid))[-1] == live[-1]  # a late subscriber hears the same end

    run(main())


def test_an_append_that_ends_the_turn_adds_the_stream_s_end_token(skill_model, tok):
    """end=True: the input stream's end token follows the text (a chat model's <|end_user|>, as after
    every user turn in training); typed, the same token is only text; a stream without one is unchanged."""
    from conftest import WORDS, word_tokenizer

    from ms_ray.core.streams import StreamSchema, StreamSpec

    chat = StreamSchema((StreamSpec("user", "input", end_token="<|end_user|>"),
                         StreamSpec("output", "output", end_token="<|end|>")))
    words = word_tokenizer(WORDS, chat)
    chat_model = make_model(chat.bind(words), len(words))

    async def main():
        engine = engine_for(chat_model, words)
        sid = (await engine.open(max_rows=6))["id"]
        assert (await engine.open())["streams"][0] == {"name": "user", "role": "input", "end_token": "<|end_user|>"}
        assert engine.append(sid, "user", "hello there", end=True)["tokens"] == 3
        assert engine.append(sid, "user", " <|end_user|>")["tokens"] == 1  # typed: unknown, never the control token
        queued = [ids for _, ids, _ in engine.sessions[sid].inbox]
        user = [e["cells"].get("user") for e in rows_of(await read(engine, sid))][:4]
        end_user = chat_model.schema.end_ids()["user"]
        assert queued[0][-1] == end_user and queued[1] == [words.unk_token_id]
        assert user == ["hello", " there", "<|end_user|>", " <|end_user|>"]  # the cells show what was typed
        skills = engine_for(skill_model, tok)
        sid = (await skills.open(max_rows=2))["id"]
        assert skills.append(sid, "user", "cat dog", end=True)["tokens"] == 2  # the skills' user has no end token
        await close_all(engine)
        await close_all(skills)

    run(main())


def test_append_errors(skill_model, tok):
    async def main():
        engine = engine_for(skill_model, tok, max_append_chars=10)
        assert "'nope'" in serve_error("unknown_session", engine.append, "nope", "user", "cat")
        sid = (await engine.open(max_rows=12))["id"]
        assert "'ghost'" in serve_error("unknown_stream", engine.append, sid, "ghost", "cat")
        assert "'ghost'" in serve_error("unknown_stream", engine.append, sid, "ghost", "cat", force=True)
        for stream in ("think", "output", "tool_call"):
            assert f"'{stream}'" in serve_error("output_stream", engine.append, sid, stream, "cat")
        assert engine.append(sid, "user", "cat dog bi")["tokens"] == 3  # exactly at the limit ("bi": unknown word)
        message = serve_error("too_large", engine.append, sid, "user", "cat dog bir")
        assert "11 characters" in message and "10" in message
        assert "'text'" in serve_error("bad_frame", engine.append, sid, "user", 42)
        assert "'text'" in serve_error("bad_frame", engine.append, sid, "user", None)
        engine.append(sid, "user", " red sun")
        events = await read(engine, sid)
        assert words_of(events, "user") == ["cat", "dog", "bi", "red", "sun"]  # refused appends queued nothing
        assert "max_rows" in serve_error("session_ended", engine.append, sid, "user", "cat")
        assert "'nope'" in serve_error("unknown_session", engine.append, "nope", "user", "cat")

    run(main())


def test_a_session_joining_mid_run(skill_model, tok):
    async def main():
        engine = engine_for(skill_model, tok, quiet_after_end=False, sampling={"output": TALK})
        first = (await engine.open(max_rows=30))["id"]
        engine.append(first, "user", "cat dog bird")
        reader = asyncio.create_task(read(engine, first))
        for _ in range(2000):
            await asyncio.sleep(0.001)
            if len(engine.sessions[first].backlog) >= 5:
                break
        second = (await engine.open(max_rows=6))["id"]
        engine.append(second, "user", "red blue")
        joined = await read(engine, second)
        rows = check_rows(joined)
        assert len(rows) == 6
        ended(joined, "max_rows")
        assert "output" not in rows[0]["cells"]  # nothing to sample its first row from
        assert all("output" in r["cells"] for r in rows[1:])
        assert words_of(joined, "user") == ["red", "blue"]
        events = await reader
        assert len(check_rows(events)) == 30 and words_of(events, "user") == ["cat", "dog", "bird"]

    run(main())


def test_a_failing_step_ends_every_session_with_an_error(skill_model, tok):
    async def main():
        engine = engine_for(skill_model, tok)
        ids = [(await engine.open())["id"] for _ in range(2)]
        readers = [asyncio.create_task(read(engine, sid)) for sid in ids]
        for _ in range(2000):
            await asyncio.sleep(0.001)
            if all(len(engine.sessions[sid].backlog) >= 2 for sid in ids):
                break

        def broken():
            raise RuntimeError("boom")

        engine.decoder.step = broken
        for events in await asyncio.gather(*readers):
            check_rows(events)
            error, end = events[-2:]
            assert error["type"] == "error" and error["code"] == "internal" and "RuntimeError: boom" in error["message"]
            assert end == {"type": "end", "reason": "internal_error"}
        with pytest.raises(RuntimeError, match="boom"):
            await engine.loop_task  # the loop re-raises: the replica is unhealthy
        assert engine.failure == "RuntimeError: boom" and engine.sessions == {}
        assert "internal_error" in serve_error("session_ended", engine.append, ids[0], "user", "cat")

    run(main())


# ---- forcing, special tokens, the end of a turn --------------------------------------------
def test_force_replaces_the_models_cells(skill_model, tok):
    async def main():
        engine = engine_for(skill_model, tok, sampling={"think": MUTE})
        sid = (await engine.open(max_rows=10))["id"]
        engine.append(sid, "user", "cat")
        engine.append(sid, "think", "red blue green", force=True)
        events = await read(engine, sid)
        rows = check_rows(events)
        assert text_of(events, "think") == "red blue green"  # only what was forced
        assert [r["cells"].get("think") for r in rows[:3]] == ["red", " blue", " green"]  # from row 0, one per row
        assert words_of(events, "user") == ["cat"]  # forcing an output stream is not input

    run(main())


def test_force_on_a_3_stream_schema(schema, tokenizer):
    bound = schema.bind(tokenizer)
    model = make_model(bound, len(tokenizer))

    async def main():
        engine = SessionEngine(model, tokenizer, EngineSettings(row_interval_s=0, sampling={"output": MUTE}))
        sid = (await engine.open(max_rows=6))["id"]
        engine.append(sid, "user", "hello there")
        engine.append(sid, "output", "yes no maybe", force=True)
        events = await read(engine, sid)
        assert text_of(events, "output") == "yes no maybe"
        assert words_of(events, "user") == ["hello", "there"]

    run(main())


def test_actor_streams_must_be_the_model_s(schema, tokenizer):
    model = make_model(schema.bind(tokenizer), len(tokenizer))
    with pytest.raises(KeyError, match="tool_call"):
        SessionEngine(model, tokenizer, EngineSettings(), actors=[calculator_link(lambda call: "0")])
    SessionEngine(model, tokenizer, EngineSettings(), actors=[])  # no actors: fine


def special_ids(tokenizer):
    return {tokenizer.convert_tokens_to_ids(t) for t in SKILL_STREAMS.special_tokens}


def test_typed_end_token_is_text_not_the_control_token_bpe(bpe_model, bpe):
    async def main():
        engine = engine_for(bpe_model, bpe)
        sid = (await engine.open(max_rows=40))["id"]
        typed = "héllo <|end|> 日本 <|silence|>"
        info = engine.append(sid, "user", typed)
        ((stream, ids, _),) = engine.sessions[sid].inbox
        assert stream == "user" and len(ids) == info["tokens"] > 4
        assert not set(ids) & special_ids(bpe)
        events = await read(engine, sid)
        assert text_of(events, "user") == typed  # multi-byte characters come out whole, exactly once

    run(main())


def test_typed_end_token_is_text_not_the_control_token_word_level(skill_model, tok, sch):
    async def main():
        engine = engine_for(skill_model, tok)
        sid = (await engine.open(max_rows=3))["id"]
        engine.append(sid, "user", "cat <|end|> <|silence|>")
        ((_, ids, _),) = engine.sessions[sid].inbox
        await engine.close(sid)
        assert sch.end_ids()["output"] not in ids and sch.silence_id not in ids, ids

    run(main())


@pytest.mark.parametrize("quiet", [True, False])
def test_quiet_after_end_until_new_input(skill_model, tok, sch, quiet):
    end_id = sch.end_ids()["output"]

    # The end token goes in through the inbox, as if the model had written it: a client cannot
    # type the control token (see the typed-end-token tests above).
    async def main():
        engine = engine_for(skill_model, tok, quiet_after_end=quiet, sampling={"output": TALK})
        sid = (await engine.open(max_rows=60))["id"]
        state = {}

        def drive(events):
            rows = rows_of(events)
            if len(rows) == 4 and "end" not in state:
                state["end"] = True
                engine.sessions[sid].inbox.append(("output", [end_id], []))
            ends = [r["row"] for r in rows if r["cells"].get("output", "").strip() == "<|end|>"]
            if ends and "user" not in state and rows[-1]["row"] >= ends[0] + 8:
                state["user"] = True
                engine.append(sid, "user", "cat")
            return "user" in state and rows[-1]["row"] >= ends[0] + 16

        events = await read(engine, sid, until=drive)
        await engine.close(sid)
        rows = check_rows(events)
        outputs = [r["cells"].get("output") for r in rows]
        end_rows = [i for i, o in enumerate(outputs) if o is not None and o.strip() == "<|end|>"]
        user_row = next(r["row"] for r in rows if "user" in r["cells"])
        end = end_rows[0]
        assert outputs[0] is None  # nothing to sample the first row from
        assert all(o is not None for o in outputs[1:end])  # the model talks (TALK) before the end
        assert end < user_row - 7
        if quiet:  # silent from the row after the end until the user's word, then talking again
            assert all(o is None for o in outputs[end + 1 : user_row])
            assert any(o is not None for o in outputs[user_row : user_row + 3])
        else:
            assert all(o is not None for o in outputs[end + 1 : user_row])

    run(main())


def test_end_on_end_token_ends_the_session(skill_model, tok, sch):
    end_id = sch.end_ids()["output"]

    async def main():
        engine = engine_for(skill_model, tok, sampling={"output": MUTE})
        sid = (await engine.open(max_rows=50, end_on_end_token=True))["id"]
        engine.sessions[sid].inbox.append(("output", [tok.convert_tokens_to_ids("cat"), end_id], []))
        events = await read(engine, sid)
        assert len(check_rows(events)) == 2
        ended(events, "end_token")
        other = (await engine.open(max_rows=4))["id"]  # the setting (False) is back for the next session
        engine.sessions[other].inbox.append(("output", [end_id], []))
        events = await read(engine, other)
        assert len(check_rows(events)) == 4
        ended(events, "max_rows")

    run(main())


# ---- idle sessions and slow readers --------------------------------------------------------
def test_idle_timeout_ends_unread_sessions_only(skill_model, tok):
    async def main():
        engine = engine_for(skill_model, tok, row_interval_s=0.002, idle_timeout_s=0.1)
        idle = (await engine.open())["id"]
        watched = (await engine.open())["id"]
        reader = asyncio.create_task(read(engine, watched))
        for _ in range(3000):
            await asyncio.sleep(0.002)
            if idle in engine.ended:
                break
        assert engine.ended[idle].end == {"type": "end", "reason": "idle_timeout"}
        assert idle not in engine.decoder.sessions
        events = await read(engine, idle)
        assert len(check_rows(events)) > 0
        ended(events, "idle_timeout")
        assert "idle_timeout" in serve_error("session_ended", engine.append, idle, "user", "cat")
        await asyncio.sleep(0.3)  # three timeouts later the watched session still runs
        assert watched in engine.sessions
        await engine.close(watched)
        ended(await reader, "closed")

    run(main())


async def slow_and_fast(engine):
    """One subscriber that attaches and never reads again, one that reads everything."""
    sid = (await engine.open(max_rows=20))["id"]
    engine.append(sid, "user", "cat dog bird")
    slow = engine.subscribe(sid)
    first = await slow.__anext__()
    fast = await read(engine, sid)
    rest = await slow.__anext__()
    with pytest.raises(StopAsyncIteration):
        await slow.__anext__()
    return sid, first, rest, fast


def test_slow_subscriber_is_dropped_others_go_on(skill_model, tok):
    async def main():
        engine = engine_for(skill_model, tok, subscriber_queue=3)
        sid, first, rest, fast = await slow_and_fast(engine)
        assert len(check_rows(fast)) == 20
        ended(fast, "max_rows")
        assert words_of(fast, "user") == ["cat", "dog", "bird"]
        assert first == [rows_of(fast)[0]]
        assert rest[-1]["type"] == "error" and rest[-1]["code"] == "slow_consumer"
        assert "3 rows behind" in rest[-1]["message"] and "from_row" in rest[-1]["message"]
        assert len(rest) == 4 and all(e["type"] == "row" for e in rest[:-1])  # the queue held 3 rows, none dropped
        assert f"from_row={rest[-2]['row'] + 1}" in rest[-1]["message"]
        assert all(e in rows_of(fast) for e in rest[:-1])
        assert engine.ended[sid].subscribers == []

    run(main())


def test_slow_subscriber_can_resume_without_losing_rows(skill_model, tok):
    async def main():
        engine = engine_for(skill_model, tok, subscriber_queue=3)
        sid, first, rest, fast = await slow_and_fast(engine)
        got = rows_of(first + rest)
        resumed = rows_of(await read(engine, sid, from_row=got[-1]["row"] + 1))
        assert got + resumed == rows_of(fast)

    run(main())


# ---- stream actors: the calculator (the tool runner) ---------------------------------------
def calculator_link(tool, **args) -> ActorLink:
    """The calculator as the engine sees it, called in-process (in Serve: a deployment handle)."""
    return ActorLink("calculator", ("tool_call",), frozenset({"tool"}), Calculator(tool=tool, **args))


def test_tool_call_result_comes_back_while_rows_go_on(skill_model, tok):
    calls = []

    async def calculator(call):
        calls.append(call)
        await asyncio.sleep(0.01)
        return run_call(call)

    async def main():
        settings = EngineSettings(row_interval_s=0, sampling={"tool_call": MUTE})
        engine = SessionEngine(skill_model, tok, settings, actors=[calculator_link(calculator)])
        sid = (await engine.open(max_rows=40))["id"]
        engine.append(sid, "user", "what")
        engine.append(sid, "tool_call", "mul 6 7", force=True)
        events = await read(engine, sid)
        rows = check_rows(events)
        ended(events, "max_rows")
        assert calls == ["mul 6 7"]
        assert text_of(events, "tool_call") == "mul 6 7"
        assert text_of(events, "tool") == "42"
        (answer_row,) = [r["row"] for r in rows if "tool" in r["cells"]]
        assert answer_row >= 4  # after the call's 3 tokens and the silent cell that ends it
        assert len(rows) == 40 and answer_row < 35  # rows kept coming, before and after the answer

    run(main())


@pytest.mark.parametrize("delay", [2, 3, 5])
def test_a_quick_tool_answers_exactly_delay_rows_after_the_call(skill_model, tok, delay):
    """The result enters the tool stream `tool_delay_rows` after the call's last token, as the skills
    model was trained (data/skills.TOOL_DELAY = 3), however much sooner the tool answered."""
    async def calculator(call):
        return run_call(call)

    async def main():
        settings = EngineSettings(row_interval_s=0.02, sampling={"tool_call": MUTE})
        engine = SessionEngine(skill_model, tok, settings, actors=[calculator_link(calculator, delay_rows=delay)])
        sid = (await engine.open(max_rows=16))["id"]
        engine.append(sid, "tool_call", "mul 6 7", force=True)  # rows 0-2, silent at row 3
        rows = check_rows(await read(engine, sid))
        assert [r["row"] for r in rows if "tool" in r["cells"]] == [2 + delay]

    run(main())


@pytest.mark.parametrize("mode", ["raises", "times_out"])
def test_tool_failure_is_written_to_the_tool_stream(bpe_model, bpe, mode):
    expected = {"raises": "error: boom", "times_out": "error: tool timed out after 0.05 s"}[mode]

    async def broken(call):
        if mode == "raises":
            raise RuntimeError("boom")
        await asyncio.sleep(60)

    async def main():
        settings = EngineSettings(row_interval_s=0, sampling={"tool_call": MUTE})
        engine = SessionEngine(bpe_model, bpe, settings, actors=[calculator_link(broken, timeout_s=0.05)])
        sid = (await engine.open(max_rows=300))["id"]
        engine.append(sid, "tool_call", "mul 6 7", force=True)
        events = await read(engine, sid, until=lambda ev: len(text_of(ev, "tool")) >= len(expected))
        await engine.close(sid)
        check_rows(events)
        assert text_of(events, "tool") == expected
        assert text_of(events, "tool_call") == "mul 6 7"

    run(main())


def test_an_overlong_tool_answer_still_reaches_the_tool_stream(skill_model, tok):
    async def verbose(call):
        return " ".join(["42"] * 40)  # 119 characters

    async def main():
        settings = EngineSettings(row_interval_s=0, sampling={"tool_call": MUTE}, max_append_chars=50)
        engine = SessionEngine(skill_model, tok, settings, actors=[calculator_link(verbose)])
        sid = (await engine.open(max_rows=25))["id"]
        engine.append(sid, "tool_call", "mul 6 7", force=True)
        events = await read(engine, sid)
        assert text_of(events, "tool") != ""  # the answer, cut, or an error: something the model can read

    run(main())


def test_tool_task_is_cancelled_when_the_session_closes(skill_model, tok):
    cancelled = []

    async def main():
        begun = asyncio.Event()

        async def slow(call):
            begun.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.append(call)
                raise

        settings = EngineSettings(row_interval_s=0, sampling={"tool_call": MUTE})
        engine = SessionEngine(skill_model, tok, settings, actors=[calculator_link(slow)])
        sid = (await engine.open())["id"]
        engine.append(sid, "tool_call", "mul 1 2", force=True)
        await asyncio.wait_for(begun.wait(), 10)
        await engine.close(sid)
        for _ in range(100):
            await asyncio.sleep(0.001)
            if cancelled:
                break
        assert cancelled == ["mul 1 2"]

    run(main())


# ---- incremental detokenisation ------------------------------------------------------------
def pieces(tokenizer, ids):
    text = IncrementalText(tokenizer)
    return [text.add(i) for i in ids]


def test_incremental_text_bpe_matches_decode(bpe):
    waited = False
    for text in TEXTS + ["日本", "😀😀", " leading space", "a\nb\tc"]:
        ids = bpe(text, add_special_tokens=False)["input_ids"]
        out = pieces(bpe, ids)
        assert "".join(out) == bpe.decode(ids) == text
        assert not any("\ufffd" in p for p in out)  # a character split over tokens comes out whole
        waited |= "" in out
    assert waited  # some character did span several tokens


def test_incremental_text_bpe_random_ids(bpe):
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(len(bpe)) for _ in range(rng.randrange(1, 25))]
        full = bpe.decode(ids)
        if not full.endswith("\ufffd"):  # a trailing incomplete character is held back, by design
            assert "".join(pieces(bpe, ids)) == full, ids


def test_incremental_text_word_level(tok):
    ids = tok("cat dog 42 bird", add_special_tokens=False)["input_ids"]
    assert pieces(tok, ids) == ["cat", " dog", " 42", " bird"]
    assert "".join(pieces(tok, ids + [tok.convert_tokens_to_ids("<|end|>")])) == "cat dog 42 bird <|end|>"


# ---- outboxes, ownership, exact echo ------------------------------------------------------
def test_one_outbox_takes_every_watched_session_in_one_message(skill_model, tok):
    """What an ingress replica gets (SessionServer.feed): one message per step for all the sessions
    it watches, each watch with only its own streams, not one message per row per session."""
    async def main():
        engine = engine_for(skill_model, tok, row_interval_s=0.02)
        sids = [(await engine.open(max_rows=30))["id"] for _ in range(3)]
        for i, sid in enumerate(sids):
            engine.watch(sid, "ingress-1", f"w{i}", frozenset({"user"}) if i == 0 else None)
            engine.append(sid, "user", f" cat dog {i}")
        engine.outbox("ingress-1").attached = True
        messages = []
        gen = engine.feed("ingress-1")
        async with contextlib.aclosing(gen):
            async for message in gen:
                messages.append(message)
                if sum(e["type"] == "end" for m in messages for events in m.values() for e in events) == 3:
                    break
        assert "ingress-1" not in engine.outboxes  # the feed's end drops its outbox
        return messages

    messages = run(main())
    per_watch = {w: [e for m in messages for e in m.get(w, [])] for w in ("w0", "w1", "w2")}
    for w, events in per_watch.items():
        check_rows(events)
        ended(events, "max_rows")
        assert len(rows_of(events)) == 30
    assert all(set(r["cells"]) <= {"user"} for r in rows_of(per_watch["w0"]))
    assert any("output" in r["cells"] for r in rows_of(per_watch["w1"]))
    assert len(messages) <= 31  # a message per step at most, whatever the number of sessions
    assert sum(len(m) == 3 for m in messages) >= 20  # most carry all three sessions' rows


def test_unattached_outbox_is_reaped_and_unwatch_detaches(skill_model, tok):
    async def main():
        engine = engine_for(skill_model, tok, row_interval_s=0.01, idle_timeout_s=0.2)
        sid = (await engine.open(max_rows=200))["id"]
        engine.watch(sid, "gone", "w")  # an ingress that never came to take its events
        watch = engine.watch(sid, "here", "w")
        engine.outbox("here").attached = True
        engine.unwatch("here", "w")
        assert watch.done.is_set() and engine.sessions[sid].subscribers == [engine.outboxes["gone"].watches["w"]]
        await asyncio.sleep(0.5)
        reaped = "gone" not in engine.outboxes and engine.sessions.get(sid) is None
        return reaped, engine.ended[sid].end

    reaped, end = run(main())
    assert reaped and end == {"type": "end", "reason": "idle_timeout"}  # nobody watches: the session idles out


def test_the_session_token_is_the_owners(skill_model, tok):
    async def main():
        engine = engine_for(skill_model, tok)
        info = await engine.open(max_rows=5)
        other = await engine.open(max_rows=5)
        engine.owner(info["id"], info["token"])
        messages = [serve_error("forbidden", engine.owner, info["id"], token)
                    for token in (None, "", other["token"], info["token"][:-1])]
        await close_all(engine)
        return info, other, messages

    info, other, messages = run(main())
    assert info["token"] != other["token"] and len(info["token"]) >= 32
    assert all("token" in m for m in messages)


@pytest.mark.parametrize("typed", ["  cat dog", " cat  dog ", "cat\tdog\n", "  日本 😀 ok"])
def test_input_cells_join_to_exactly_what_was_typed(bpe_model, bpe, typed):
    async def main():
        engine = engine_for(bpe_model, bpe)
        sid = (await engine.open(max_rows=40))["id"]
        engine.append(sid, "user", typed, end=False)
        return await read(engine, sid)

    assert text_of(run(main()), "user") == typed


def test_input_cells_keep_spaces_with_a_word_level_vocabulary(skill_model, tok):
    async def main():
        engine = engine_for(skill_model, tok)
        sid = (await engine.open(max_rows=12))["id"]
        engine.append(sid, "user", "  cat   dog ")
        engine.append(sid, "user", "zzzunknown bird")  # an unknown word: its cell still shows what was typed
        return await read(engine, sid)

    assert text_of(run(main()), "user") == "  cat   dog zzzunknown bird"


def test_a_serve_config_without_max_rows_needs_a_windowed_checkpoint(sch, tok, tmp_path):
    """Refused when the config is read (`ms-ray serve` says it at once, naming the field), not by
    every replica failing to start."""
    from ms_ray.config import ConfigError, ServeConfig, load_config

    plain = make_model(sch, len(tok))
    plain.save_pretrained(tmp_path / "plain", tok)
    with pytest.raises(ConfigError, match=r"session.max_rows: null .* has none"):
        load_config(ServeConfig, None, ["session.max_rows=null"], data={"checkpoint": str(tmp_path / "plain")})
    plain.window = 8
    plain.save_pretrained(tmp_path / "windowed", tok)
    cfg = load_config(ServeConfig, None, ["session.max_rows=null"], data={"checkpoint": str(tmp_path / "windowed")})
    assert cfg.session.max_rows is None
