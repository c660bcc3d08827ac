"""Sessions strangers can share (serve/PROTOCOL.md): a session belongs to its opener (the session
token), a share link only watches, limits per client, protocol v2 `rows` frames, and the answers
the protocol promises for unknown and ended sessions. Real Serve, real sockets (conftest.py)."""

import asyncio
import time

import httpx
from served_app import KEYS, next_error, read_until, run, words_of, ws_url

from ms_ray.serving.client import connect_session
from ms_ray.serving.session_ids import replica_of


def test_a_session_belongs_to_its_opener(served):
    async def scenario():
        out = {}
        async with connect_session(ws_url(served), KEYS["user"]) as owner:
            out["owner"] = owner.first
            # the share link: the same role, no token -> it watches
            async with connect_session(ws_url(served), KEYS["user"], session=owner.id) as watcher:
                out["watcher"] = watcher.first
                await watcher.append("user", " 5")
                out["refused"] = await next_error(watcher)
                out["detached"] = await watcher.close(), watcher.close_code, watcher.close_reason
            async with connect_session(ws_url(served), KEYS["user"], session=owner.id, token="guess") as guess:
                out["guess"] = guess.first
            async with connect_session(ws_url(served), KEYS["user"], session=owner.id, token=owner.token) as second:
                out["second"] = second.first
                await second.append("user", " 7")
                await read_until(owner, lambda r: "7" in words_of(r, "user"))
            await owner.append("user", " 9")  # the session went on through all of that
            rows, errors = await read_until(owner, lambda r: "9" in words_of(r, "user"))
            out["rows"], out["errors"], out["end"] = rows, errors, await owner.close()
        return out

    out = run(scenario())
    assert out["owner"]["write"] == ["user"] and len(out["owner"]["token"]) >= 32
    assert out["watcher"]["write"] == [] and "token" not in out["watcher"]
    assert out["refused"]["code"] == "forbidden" and "token" in out["refused"]["message"]
    assert out["detached"][1:] == (1000, "detached")
    assert out["guess"]["write"] == [] and out["second"]["write"] == ["user"]
    assert "5" not in words_of(out["rows"], "user") and out["errors"] == []
    assert out["end"][-1] == {"type": "end", "reason": "closed"}


def test_limits_per_client_refuse_that_client_only(served):
    url, http_url = ws_url(served), f"{served['http']}/main"

    async def scenario():
        out = {}
        async with connect_session(url, KEYS["limited"]) as first:
            async with connect_session(url, KEYS["limited"]) as second:
                out["second"] = second.first, await second.recv(5), second.close_code
            out["http"] = httpx.post(f"{http_url}/v1/sessions", headers={"X-API-Key": KEYS["limited"]}, timeout=10)
            async with connect_session(url, KEYS["user"]) as other:  # another client is not limited by it
                out["other"] = other.first
                async with connect_session(url, KEYS["limited"], session=other.id) as w1:
                    async with connect_session(url, KEYS["limited"], session=other.id) as w2:
                        out["watchers"] = w1.first["type"], w2.first, w2.close_code
                await other.close()
            for i in range(5):  # a burst of 3 passes, then 2 per second
                await first.append("user", f" {i}")
            out["rate"] = [await next_error(first), await next_error(first)]
            await asyncio.sleep(0.7)
            await first.append("user", " 44")
            rows, errors = await read_until(first, lambda r: "44" in words_of(r, "user"))
            out["rows"], out["errors"] = rows, errors
            await first.close()
        deadline = time.monotonic() + 10  # its quota comes back when the session has ended
        while True:
            async with connect_session(url, KEYS["limited"]) as again:
                if again.first["type"] == "session" or time.monotonic() > deadline:
                    out["again"] = again.first
                    if again.first["type"] == "session":
                        await again.close()
                    return out
            await asyncio.sleep(0.2)

    out = run(scenario())
    assert out["second"][0]["code"] == "rate_limited" and out["second"][1:] == (None, 1013)
    assert out["http"].status_code == 429 and out["http"].json()["code"] == "rate_limited"
    assert int(out["http"].headers.get("Retry-After", "5")) > 0
    assert out["other"]["type"] == "session"
    assert out["watchers"][0] == "session" and out["watchers"][1]["code"] == "rate_limited"
    assert [e["code"] for e in out["rate"]] == ["rate_limited", "rate_limited"]
    said = words_of(out["rows"], "user")  # (0-2 may have passed while the errors were read)
    assert said[-1] == "44" and "3" not in said and "4" not in said  # refused appends queued nothing
    assert out["again"]["type"] == "session"


def test_protocol_v2_rows_frames_skip_silence_and_keep_the_clock(served):
    async def scenario():
        async with connect_session(ws_url(served), KEYS["user"], version=2) as s:
            assert s.first["protocol"] == 2 and s.first["row"] == 0
            await s.append("user", " 3 4 5")
            frames = []
            while sum(len(f.get("rows", [])) for f in frames) < 40:
                frames.append(await s.recv(10))
            async with connect_session(ws_url(served), KEYS["tool"], session=s.id, version=2) as tool:
                quiet = [await tool.recv(5) for _ in range(3)]  # tool_call and tool stay silent: heartbeats
                await tool.append("tool", " 12")
                said, _ = await read_until(tool, lambda r: any("tool" in x["cells"] for x in r))
            end = await s.close()
            return frames, quiet, said, end

    frames, quiet, said, end = run(scenario())
    rows = [r for f in frames for r in f["rows"]]
    assert all(f["type"] == "rows" for f in frames)
    # the output talks from row 1 on (row 0 has nothing to sample from: silent, so left out)
    assert rows[0]["row"] <= 1 and [r["row"] for r in rows] == list(range(rows[0]["row"], rows[0]["row"] + len(rows)))
    assert all(f["clock"] == f["rows"][-1]["row"] for f in frames if f["rows"])
    assert all(f["type"] == "rows" and f["rows"] == [] for f in quiet)
    clocks = [f["clock"] for f in quiet]
    assert clocks == sorted(clocks) and clocks[-1] > clocks[0]  # the clock goes on while nothing is said
    assert all(r["cells"] for r in said) and words_of(said, "tool") == ["12"]
    assert end[-1] == {"type": "end", "reason": "closed"}


def test_unknown_and_ended_sessions_answer_as_the_protocol_says(served):
    base, key = f"{served['http']}/main", {"X-API-Key": KEYS["user"]}

    async def scenario():
        async with connect_session(ws_url(served), KEYS["user"]) as s:
            await s.append("user", "  12 13")  # two leading spaces: echoed exactly as typed
            rows, _ = await read_until(s, lambda r: words_of(r, "user") == ["12", "13"])
            sid = s.id
            await s.close()
        async with connect_session(ws_url(served), KEYS["user"], session=sid) as late:
            return rows, sid, late.first, [f async for f in late.frames(5)], late.close_code

    rows, sid, first, after, code = run(scenario())
    assert "".join(r["cells"].get("user", "") for r in rows) == "  12 13"
    assert first["code"] == "session_ended" and after == [] and code == 4410
    unknown = httpx.get(f"{base}/v1/sessions/{replica_of(sid)}.0123456789abcdef/events", headers=key, timeout=10)
    assert unknown.status_code == 404 and unknown.json()["code"] == "unknown_session", unknown.text
    ended = httpx.get(f"{base}/v1/sessions/{sid}/events", headers=key, timeout=10)  # replays, then the end
    assert ended.status_code == 200 and ended.text.rstrip().endswith('"reason": "closed"}')
    bad = httpx.get(f"{base}/v1/sessions/{sid}/events?v=9", headers=key, timeout=10)
    assert bad.status_code == 400 and bad.json()["code"] == "bad_version"


def test_framer_v1_v2_heartbeat_and_frame_interval():
    from ms_ray.serving.ingress import Framer

    rows = [{"type": "row", "row": 0, "cells": {}}, {"type": "row", "row": 1, "cells": {"output": " hi"}}]
    end = {"type": "end", "reason": "closed"}
    assert Framer(1, 1.0).frames(rows + [end]) == rows + [end]  # v1: a frame per row, silent ones too
    v2 = Framer(2, heartbeat_s=0.2, frame_interval_s=0.1)
    assert v2.frames(rows) == [{"type": "rows", "clock": 1, "rows": [{"row": 1, "cells": {"output": " hi"}}]}]
    assert v2.frames([{"type": "row", "row": 2, "cells": {}}]) == []  # silent, heartbeat not due
    started = time.monotonic()
    run(v2.pause())  # the next frame no sooner than frame_interval_s after the last
    assert 0.05 < time.monotonic() - started < 0.5
    time.sleep(0.2)
    assert v2.frames([{"type": "row", "row": 3, "cells": {}}]) == [{"type": "rows", "clock": 3, "rows": []}]
    assert v2.frames([end]) == [end]
