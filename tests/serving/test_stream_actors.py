"""Stream actors (ms_ray/serving/stream_actors.py) in a plain asyncio loop: the batches the engine
hands them, what they may append, an actor that fails, and the session recorder, whose files
`ms-ray prepare` reads back (format: table). The deployed actors: test_serve.py."""

import asyncio
import json

import pytest
from conftest import make_model

from ms_ray.core.decode import Sampling
from ms_ray.data.formats import read_table_jsonl
from ms_ray.data.tables import Dropped
from ms_ray.serving.sessions import EngineSettings, SessionEngine
from ms_ray.serving.stream_actors import ActorLink, Recorder

TALK = Sampling(silence_penalty=1e4)


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def checkpoint(sch, tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("actors") / "tiny"
    make_model(sch, len(tok)).save_pretrained(folder, tok)
    return folder


async def read_all(engine, sid) -> list[dict]:
    events = []
    async for batch in engine.subscribe(sid):
        events += batch
    return events


def text_of(events, stream):
    return "".join(e["cells"].get(stream, "") for e in events if e["type"] == "row")


def test_actors_get_every_row_once_in_order_and_may_append(checkpoint, sch, tok):
    batches, calls_in_flight = [], []

    async def echo(batch):  # answers each "cat" on the user stream with " dog" on the tool stream, 2 rows on
        calls_in_flight.append(1)
        assert len(calls_in_flight) == 1, "one call at a time per actor"
        batches.append(batch)
        await asyncio.sleep(0.003)
        calls_in_flight.pop()
        return [{"session": r["session"], "stream": "tool", "text": " dog", "at_row": r["row"] + 2}
                for r in batch["rows"] if r["cells"].get("user", "").strip() == "cat"] + \
               [{"session": r["session"], "stream": "user", "text": " nope"} for r in batch["rows"][:1]]

    async def main():
        link = ActorLink("echo", ("user", "tool"), frozenset({"tool"}), echo)
        # a 20 ms row clock: the 3 ms answer is back before the row it asks for
        engine = SessionEngine(make_model(sch, len(tok)), tok, EngineSettings(row_interval_s=0.02), actors=[link])
        sids = [(await engine.open(max_rows=20))["id"] for _ in range(2)]
        for sid in sids:
            engine.append(sid, "user", "red cat blue")
        events = {sid: await read_all(engine, sid) for sid in sids}
        while link.task is not None:
            await asyncio.sleep(0.01)
        return sids, events

    sids, events = run(main())
    for sid in sids:
        rows = [(r["row"], r["tokens"]) for b in batches for r in b["rows"] if r["session"] == sid]
        assert [r for r, _ in rows] == list(range(20))  # every row once, in order, across batches
        assert all(set(tokens) == {"user", "tool"} for _, tokens in rows)  # only the streams it reads
        assert text_of(events[sid], "tool") == " dog"  # its append, from the row it asked for
        assert next(e["row"] for e in events[sid] if "tool" in e.get("cells", {})) == 3  # "cat" at row 1, +2
        assert "nope" not in text_of(events[sid], "user")  # a stream it does not write: dropped
    assert sorted(e["session"] for b in batches for e in b["ended"]) == sorted(sids)
    assert all(b["silence"] == sch.silence_id for b in batches)
    assert len(batches) < 40  # batched: about one call per step for both sessions, not one per row


def test_a_failing_actor_does_not_stop_the_rows(checkpoint, sch, tok):
    attempts = []

    async def broken(batch):
        attempts.append(len(batch["rows"]))
        raise RuntimeError("boom")

    async def main():
        link = ActorLink("broken", ("user",), frozenset(), broken)
        engine = SessionEngine(make_model(sch, len(tok)), tok, EngineSettings(row_interval_s=0.005), actors=[link])
        sid = (await engine.open(max_rows=30))["id"]
        events = await read_all(engine, sid)
        while link.task is not None:
            await asyncio.sleep(0.01)
        return events, link.failures

    events, failures = run(main())
    assert [e["row"] for e in events if e["type"] == "row"] == list(range(30))
    assert events[-1] == {"type": "end", "reason": "max_rows"}
    assert failures >= 1 and len(attempts) == 3 * failures  # each batch tried 3 times, then given up (logged)


def test_the_recorder_writes_sessions_prepare_reads_back(checkpoint, sch, tok, tmp_path):
    recorder = Recorder(str(checkpoint), path=str(tmp_path / "sessions"), private=["think"], source="test")

    async def main():
        link = ActorLink("recorder", tuple(sch.names), frozenset(), recorder)
        engine = SessionEngine(make_model(sch, len(tok)), tok,
                               EngineSettings(row_interval_s=0, sampling={"output": TALK, "think": TALK}),
                               actors=[link])
        opened = [await engine.open(max_rows=n) for n in (12, 25, 7)]
        for i, info in enumerate(opened):
            engine.append(info["id"], "user", " cat dog" if i else " 6 times 7")
        events = {info["id"]: await read_all(engine, info["id"]) for info in opened}
        while link.task is not None:
            await asyncio.sleep(0.01)
        return events

    events = run(main())
    (day,) = (tmp_path / "sessions").iterdir()
    (path,) = day.iterdir()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(line["id"] for line in lines) == sorted(events)
    examples = list(read_table_jsonl(path, sch, tok))
    assert not [e for e in examples if isinstance(e, Dropped)]
    for line, example in zip(lines, examples):
        received = events[line["id"]]
        assert example.num_rows == sum(e["type"] == "row" for e in received)
        assert line["meta"] == {"ended": "max_rows", "redacted": ["think"]} and line["source"] == "test"
        assert set(line["streams"]["think"]) == {None}  # private: written as silence
        for s, name in enumerate(sch.names):
            if name == "think":
                continue
            said = [int(t) for t in example.rows[:, s] if t != sch.silence_id]
            assert tok.decode(said).split() == text_of(received, name).split(), name  # what the clients saw


def test_the_recorder_writes_long_sessions_in_segments(checkpoint, sch, tok, tmp_path):
    """segment_rows: a session longer than that is written as it goes (memory stays bounded),
    every part a table line of its own that prepare reads; together they are the whole session."""
    recorder = Recorder(str(checkpoint), path=str(tmp_path / "sessions"), source="test", segment_rows=10)

    async def main():
        link = ActorLink("recorder", tuple(sch.names), frozenset(), recorder)
        engine = SessionEngine(make_model(sch, len(tok)), tok,
                               EngineSettings(row_interval_s=0, sampling={"output": TALK}), actors=[link])
        info = await engine.open(max_rows=25)
        events = await read_all(engine, info["id"])
        while link.task is not None:
            await asyncio.sleep(0.01)
        return info["id"], events

    sid, events = run(main())
    (path,) = (tmp_path / "sessions").iterdir().__next__().iterdir()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["id"] for line in lines] == [f"{sid}@0", f"{sid}@1", f"{sid}@2"]
    assert [line["meta"].get("segment") for line in lines] == [0, 1, 2]
    assert [line["meta"]["ended"] for line in lines] == [None, None, "max_rows"]
    examples = list(read_table_jsonl(path, sch, tok))
    assert [e.num_rows for e in examples] == [10, 10, 5] and not recorder.sessions and not recorder.segments
    output = sch.index("output")
    said = [int(t) for e in examples for t in e.rows[:, output] if t != sch.silence_id]
    assert tok.decode(said).split() == text_of(events, "output").split()
