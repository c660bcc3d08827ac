"""The Serve app end to end: real Ray Serve, real sockets on 127.0.0.1, a tiny random model.

Three apps run side by side on one Serve instance:
  main  16+ sessions per replica, the tool runner, per-role keys (most tests);
  small one session per replica (the "busy" answer, a replica dying);
  auto  1-2 replicas autoscaling on live sessions (slow).
"""

import asyncio
import json
import time
from contextlib import AsyncExitStack

import httpx
import pytest
from served_app import KEYS, NUMBERS, app_config, collect, next_error, read_until, run, words_of, ws_url

from ms_ray.core.loading import load_tokenizer
from ms_ray.serving.client import connect_session, wait_ready
from ms_ray.serving.session_ids import replica_of


# ---- health ------------------------------------------------------------------------------
def test_health_and_readiness(served):
    assert httpx.get(f"{served['http']}/main/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{served['http']}/main/readyz").json()
    assert ready["ready"] is True and ready["warmup_s"] >= 0
    assert [s["name"] for s in ready["streams"]] == ["user", "think", "output", "tool", "tool_call"]


def test_the_web_page_is_served_under_the_route_prefix(served):
    """The page (browser tests: test_web.py) links its files and the API relative to a <base href>
    at the app's route prefix, and loads nothing from elsewhere."""
    for path in ("/main/", "/main"):  # /main redirects to /main/
        page = httpx.get(f"{served['http']}{path}", follow_redirects=True)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert str(page.url) == f"{served['http']}/main/"
        assert '<base href="/main/">' in page.text and 'src="static/app.js"' in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
    js = httpx.get(f"{served['http']}/main/static/app.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert '"v1/sessions"' in js.text
    assert httpx.get(f"{served['http']}/main/static/style.css").headers["content-type"].startswith("text/css")
    assert httpx.get(f"{served['http']}/main/static/..%2Fingress.py").status_code == 404  # only the page's own files
    assert httpx.get(f"{served['http']}/main/static/nope.js").json()["code"] == "not_found"


# ---- duplex ------------------------------------------------------------------------------
def test_duplex_session_output_while_input_streams(served):
    words = NUMBERS[10:30]

    async def scenario():
        async with connect_session(ws_url(served), KEYS["user"]) as s:
            assert s.first["type"] == "session" and s.first["role"] == "user"
            assert s.first["read"] == ["output", "tool", "tool_call", "user"] and s.first["write"] == ["user"]
            rows, arrived_between = [], 0
            for i, w in enumerate(words):
                await s.append("user", f" {w}")
                await asyncio.sleep(0.02)
                while True:  # rows that arrived while we were still typing
                    try:
                        frame = await asyncio.wait_for(s.recv(), 0.001)
                    except asyncio.TimeoutError:
                        break
                    rows.append(frame)
                    arrived_between += 0 < i < len(words) - 1
            more, _ = await read_until(s, lambda r: words_of(rows + r, "user") == words)
            rows += more
            end = await s.close()
            return rows, arrived_between, end, s.close_code

    rows, arrived_between, end, code = run(scenario())
    assert arrived_between > 0, "no row arrived while the user was still typing"
    assert words_of(rows, "user") == words  # echoed exactly once, in order
    last_input_row = max(r["row"] for r in rows if "user" in r["cells"])
    assert any("output" in r["cells"] and r["row"] < last_input_row for r in rows), "no output before the input ended"
    assert all("think" not in r["cells"] for r in rows)  # the user role does not read think
    assert [r["row"] for r in rows] == list(range(len(rows)))
    assert end[-1] == {"type": "end", "reason": "closed"} and code == 1000


def test_16_concurrent_sessions_lose_nothing(served):
    async def one(i):
        words = [NUMBERS[(i * 9 + j) % len(NUMBERS)] for j in range(12)]
        async with connect_session(ws_url(served), KEYS["user"]) as s:
            for w in words:
                await s.append("user", f" {w}")
                await asyncio.sleep(0.005 * (i % 4))
            rows, errors = await read_until(s, lambda r: len(words_of(r, "user")) >= len(words), timeout=60)
            rows += (await read_until(s, lambda r: len(r) >= 3))[0]  # a few more rows: nothing extra arrives
            rows += [f for f in await s.close() if f["type"] == "row"]
            return s.id, words, rows, errors

    async def all_sessions():
        return await asyncio.gather(*(one(i) for i in range(16)))

    results = run(all_sessions())
    for _, words, rows, errors in results:
        assert errors == []
        assert words_of(rows, "user") == words
        assert [r["row"] for r in rows] == list(range(len(rows))), "row numbers missing or repeated"
    check_recorded(served, {sid: rows for sid, _, rows, _ in results})


def check_recorded(served, received: dict[str, list[dict]]):
    """The recorder wrote each session as the clients received it, and `ms-ray prepare` reads the
    files back (format: table) without a drop."""
    from ms_ray.config import PrepareConfig, load_config
    from ms_ray.core.streams import StreamSchema
    from ms_ray.data.formats import read_table_jsonl
    from ms_ray.data.pipeline import prepare

    schema = StreamSchema.load(served["checkpoint"])
    tokenizer = load_tokenizer(served["checkpoint"], schema)
    schema = schema.bind(tokenizer)
    deadline, lines = time.monotonic() + 30, {}
    while set(received) - set(lines):  # a session's line is written once its end has reached the recorder
        assert time.monotonic() < deadline, f"not recorded: {sorted(set(received) - set(lines))}"
        time.sleep(0.2)
        files = sorted(served["sessions"].glob("*/*.jsonl"))
        lines = {e.id: e for f in files for e in read_table_jsonl(f, schema, tokenizer)}
    for sid, rows in received.items():
        table = lines[sid].rows
        assert len(table) == len(rows)
        for name in ("user", "output"):
            said = [int(t) for t in table[:, schema.index(name)] if t != schema.silence_id]
            assert tokenizer.decode(said).split() == words_of(rows, name), (sid, name)
    streams = [{"name": s.name, "role": s.role, **({"end_token": s.end_token} if s.end_token else {})}
               for s in schema.streams]
    data = {"schema": {"streams": streams}, "tokenizer": str(served["checkpoint"]),
            "output": str(served["sessions"].parent / "prepared"), "split": {"validation_fraction": 0.0},
            "packing": {"max_rows": 4096}, "max_drop_share": 0.0,
            "sources": [{"kind": "jsonl", "name": f"recorded{i}", "format": "table", "path": str(f)}
                        for i, f in enumerate(sorted(served["sessions"].glob("*/*.jsonl")))]}
    manifest = prepare(load_config(PrepareConfig, data=data), log=lambda *a: None)
    assert manifest["counts"]["examples"] >= len(received)


# ---- tools -------------------------------------------------------------------------------
def test_tool_runner_answers_while_rows_continue(served):
    async def scenario():
        async with connect_session(ws_url(served), KEYS["operator"]) as s:
            assert "tool_call" in s.first["write"]
            await s.append("tool_call", "mul 6 7")  # forced: the random model would never write it
            rows, _ = await read_until(s, lambda r: any("tool" in x["cells"] for x in r))
            rows += (await read_until(s, lambda r: len(r) >= 5))[0]
            await s.close()
            return rows

    rows = run(scenario())
    call_rows = [r["row"] for r in rows if "tool_call" in r["cells"]]
    assert "".join(r["cells"].get("tool_call", "") for r in rows).split() == ["mul", "6", "7"]
    result_row = next(r for r in rows if "tool" in r["cells"])
    assert result_row["cells"]["tool"].strip() == "42"
    assert result_row["row"] > max(call_rows) + 1  # the rows went on while the tool ran
    assert max(r["row"] for r in rows) >= result_row["row"] + 5
    assert [r["row"] for r in rows] == list(range(len(rows)))


# ---- permissions -------------------------------------------------------------------------
def test_monitor_reads_think_read_only_and_roles_are_enforced(served):
    async def scenario():
        async with connect_session(ws_url(served), KEYS["user"]) as user:
            async with connect_session(ws_url(served), KEYS["monitor"], session=user.id) as monitor:
                assert monitor.first["id"] == user.id and monitor.first["write"] == []
                await user.append("user", " 5 6 7")
                seen, _ = await read_until(monitor, lambda r: len(r) >= 8)
                await monitor.append("user", " 9")
                refused = await next_error(monitor)
                user_rows, user_errors = await read_until(user, lambda r: len(r) >= 8)
                await user.append("tool", " 3")
                tool_refused = await next_error(user)
            async with connect_session(ws_url(served), KEYS["tool"], session=user.id) as tool:
                await tool.append("user", " 1")
                tool_user = await next_error(tool)
                await tool.append("tool", " 12")
                tool_rows, tool_errors = await read_until(tool, lambda r: any("tool" in x["cells"] for x in r))
            async with connect_session(ws_url(served), KEYS["monitor"]) as opener:
                refused_open = opener.first, (await opener.recv(5)), opener.close_code
            await user.close()
            return seen, refused, user_rows, tool_refused, tool_user, tool_rows, tool_errors, refused_open

    seen, refused, user_rows, tool_refused, tool_user, tool_rows, tool_errors, refused_open = run(scenario())
    assert any("think" in r["cells"] for r in seen)  # the monitor reads the think stream
    assert all("think" not in r["cells"] for r in user_rows)
    assert refused["code"] == "forbidden" and "monitor" in refused["message"]
    assert tool_refused["code"] == "forbidden" and "'tool'" in tool_refused["message"]
    assert tool_user["code"] == "forbidden"
    assert tool_errors == [] and all(set(r["cells"]) <= {"tool", "tool_call"} for r in tool_rows)
    assert refused_open[0]["code"] == "forbidden" and refused_open[1] is None and refused_open[2] == 1008


def test_bad_frames_get_errors_and_the_session_survives(served):
    cases = [
        ("{not json", "bad_json"),
        ('["a list"]', "bad_frame"),
        (json.dumps({"type": "shout"}), "bad_frame"),
        (json.dumps({"type": "append", "stream": "user"}), "bad_frame"),
        (json.dumps({"type": "append", "stream": "user", "text": 5}), "bad_frame"),
        (json.dumps({"type": "append", "stream": "user", "text": "x", "extra": 1}), "bad_frame"),
        (json.dumps({"type": "append", "stream": "user", "text": "x" * 5000}), "too_large"),
        (b'{"type": "append", "stream": "user", "text": "\xff\xfe"}', "bad_utf8"),
        (json.dumps({"type": "append", "stream": "nope", "text": "x"}), "unknown_stream"),
        (json.dumps({"type": "append", "stream": "output", "text": "x"}), "output_stream"),
        (json.dumps({"type": "append", "stream": "tool", "text": "x"}), "forbidden"),
    ]

    async def scenario():
        async with connect_session(ws_url(served), KEYS["user"]) as s:
            errors = []
            for raw, _ in cases:
                await s.send_raw(raw)
                errors.append(await next_error(s))
            await s.append("user", " 77")
            rows, more = await read_until(s, lambda r: "77" in words_of(r, "user"))
            await s.close()
            return errors, rows, more

    errors, rows, more = run(scenario())
    assert [e["code"] for e in errors] == [code for _, code in cases]
    assert "4096" in errors[6]["message"] and "'nope'" in errors[8]["message"] and "'output'" in errors[9]["message"]
    assert more == [] and "77" in words_of(rows, "user")


def test_refusals_close_the_socket_with_a_code(served):
    async def scenario():
        out = {}
        async with connect_session(ws_url(served), "wrong-key") as s:
            out["bad_key"] = s.first, await s.recv(5), s.close_code
        async with connect_session(ws_url(served), KEYS["user"]) as live:  # its id names a live replica
            unknown = f"{replica_of(live.id)}.0123456789abcdef"
            for name, sid in (("unknown", unknown), ("gone", "zzzzzzzz.0123456789abcdef")):
                async with connect_session(ws_url(served), KEYS["monitor"], session=sid) as s:
                    frames = [f async for f in s.frames(5)]
                    out[name] = s.first, frames, s.close_code
            await live.close()
        async with connect_session(ws_url(served)) as s:  # no key, no anonymous role
            out["no_key"] = s.first, await s.recv(5), s.close_code
        return out

    out = run(scenario())
    assert out["bad_key"][0]["code"] == "unauthorized" and out["bad_key"][2] == 1008
    assert out["no_key"][0]["code"] == "unauthorized" and "key" in out["no_key"][0]["message"]
    # no session frame for a session that does not exist: the error once, then the close
    assert out["unknown"][0]["code"] == "unknown_session" and out["unknown"][1] == []
    assert out["unknown"][2] == 4404
    # an id of a replica that is not there (it died, or never was): session_lost, nothing waits for it
    assert out["gone"][0]["code"] == "session_lost" and out["gone"][1] == [] and out["gone"][2] == 1011


# ---- HTTP + SSE --------------------------------------------------------------------------
def sse_events(lines):
    event = {}
    for line in lines:
        if line.startswith("data: "):
            event = json.loads(line[6:])
        elif line == "" and event:
            yield event
            event = {}


def test_http_session_with_server_sent_events(served):
    base, key = f"{served['http']}/main", {"Authorization": f"Bearer {KEYS['user']}"}
    with httpx.Client(timeout=30) as http:
        created = http.post(f"{base}/v1/sessions", headers=key)
        assert created.status_code == 201, created.text
        sid, auth = created.json()["id"], {**key, "X-Session-Token": created.json()["token"]}
        stranger = http.post(f"{base}/v1/sessions/{sid}/append", headers=key, json={"stream": "user", "text": " 1"})
        assert stranger.status_code == 403 and "token" in stranger.json()["message"]
        assert http.delete(f"{base}/v1/sessions/{sid}", headers=key).status_code == 403
        for w in ("8", "9", "10"):
            ok = http.post(f"{base}/v1/sessions/{sid}/append", headers=auth, json={"stream": "user", "text": f" {w}"})
            assert ok.status_code == 200 and ok.json()["tokens"] == 1
        bad = http.post(f"{base}/v1/sessions/{sid}/append", headers=auth, json={"stream": "think", "text": "x"})
        assert bad.status_code == 403 and bad.json()["code"] == "output_stream"
        oops = http.post(f"{base}/v1/sessions/{sid}/append", headers=auth, content=b"{oops")
        assert oops.json()["code"] == "bad_json"
        other = http.post(f"{base}/v1/sessions/{sid}/append", headers=auth, json={"type": "close"})  # was a 500
        assert other.status_code == 400 and other.json()["code"] == "bad_frame"
        missing = http.post(f"{base}/v1/sessions/zzzzzzzz/append", headers=auth, json={"stream": "user", "text": "1"})
        assert missing.status_code == 404 and missing.json()["code"] == "unknown_session"
        assert http.post(f"{base}/v1/sessions", headers={"X-API-Key": "nope"}).status_code == 401
        rows = []
        with http.stream("GET", f"{base}/v1/sessions/{sid}/events", headers=auth) as events:
            assert events.headers["content-type"].startswith("text/event-stream")
            for event in sse_events(events.iter_lines()):
                rows.append(event)
                if words_of([r for r in rows if r["type"] == "row"], "user") == ["8", "9", "10"]:
                    assert http.delete(f"{base}/v1/sessions/{sid}", headers=auth).status_code == 200
                if event["type"] == "end":
                    break
        assert rows[-1] == {"type": "end", "reason": "closed"}
        row_numbers = [r["row"] for r in rows if r["type"] == "row"]
        assert row_numbers == list(range(len(row_numbers)))  # replayed from row 0: nothing before the GET lost
        resumed = http.get(f"{base}/v1/sessions/{sid}/events", headers={**auth, "Last-Event-ID": "2"})
        replay = list(sse_events(resumed.text.splitlines()))
        assert replay[0]["row"] == 3 and replay[-1]["type"] == "end"  # an ended session still replays


def test_one_shot_generate_streams_rows(served):
    base, auth = f"{served['http']}/main", {"Authorization": f"Bearer {KEYS['user']}"}
    body = {"inputs": {"user": " 1 2 3 4"}, "max_rows": 12}
    with httpx.Client(timeout=30) as http:
        events = list(sse_events(http.post(f"{base}/v1/generate", headers=auth, json=body).text.splitlines()))
        assert events[0]["type"] == "session" and events[-1]["type"] == "end"
        rows = [e for e in events if e["type"] == "row"]
        assert words_of(rows, "user") == ["1", "2", "3", "4"] and [r["row"] for r in rows] == list(range(len(rows)))
        assert len(rows) <= 12 and events[-1]["reason"] in ("max_rows", "end_token")
        refused = http.post(f"{base}/v1/generate", headers=auth, json={"inputs": {"tool": "1"}})
        assert refused.status_code == 403 and refused.json()["code"] == "forbidden"
        assert http.post(f"{base}/v1/generate", headers=auth, json={"inputs": "x"}).json()["code"] == "bad_frame"


# ---- capacity and failures ---------------------------------------------------------------
def test_busy_answer_at_the_session_limit(served):
    async def scenario():
        async with connect_session(ws_url(served, "small"), KEYS["user"]) as first:
            assert first.first["type"] == "session"
            async with connect_session(ws_url(served, "small"), KEYS["user"]) as second:
                busy = second.first, await second.recv(5), second.close_code
            http = httpx.post(f"{served['http']}/small/v1/sessions", headers={"X-API-Key": KEYS["user"]}, timeout=10)
            await first.close()
            return busy, http

    busy, http = run(scenario())
    assert busy[0]["code"] == "busy" and "retry" in busy[0]["message"] and busy[2] == 1013
    assert http.status_code == 503 and int(http.headers["Retry-After"]) > 0 and http.json()["code"] == "busy"


def test_replica_death_tells_the_client(served):
    import ray

    async def scenario():
        async with connect_session(ws_url(served, "small"), KEYS["user"]) as s:
            await read_until(s, lambda r: len(r) >= 2)
            (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                       if a["name"].startswith("SERVE_REPLICA::small#SessionServer")]
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
            started = time.monotonic()
            frames = [f async for f in s.frames(timeout=30)]
            return frames, s.close_code, s.close_reason, time.monotonic() - started

    frames, code, reason, seconds = run(scenario())
    errors = [f for f in frames if f["type"] == "error"]
    assert errors and errors[-1]["code"] == "session_lost", frames[-3:]
    assert code == 1011 and "gone" in reason and seconds < 30
    wait_ready(f"{served['http']}/small")  # Serve replaces the replica; new sessions work again


@pytest.mark.slow
def test_autoscaling_on_live_sessions_keeps_each_session_on_its_replica(served):
    from ray import serve

    from ms_ray.serving.app import build

    cfg = app_config(served["checkpoint"], served["port"], "auto", model={
        "min_replicas": 1, "max_replicas": 2, "target_sessions_per_replica": 2, "upscale_delay_s": 0,
        "downscale_delay_s": 2, "look_back_period_s": 2,
    })
    serve.run(build(cfg), name="auto", route_prefix="/auto", blocking=False)
    wait_ready(f"{served['http']}/auto")

    def replicas() -> int:
        states = serve.status().applications["auto"].deployments["SessionServer"].replica_states
        return states.get("RUNNING", 0)

    async def wait_for(condition, seconds):
        deadline = time.monotonic() + seconds
        while not condition():
            assert time.monotonic() < deadline, f"autoscaling did not happen in {seconds} s ({replicas()} replicas)"
            await asyncio.sleep(0.5)

    async def scenario():
        async with AsyncExitStack() as stack:
            sessions, frames, readers = [], [], []

            async def open_more(n):
                for _ in range(n):
                    s = await stack.enter_async_context(connect_session(ws_url(served, "auto"), KEYS["user"]))
                    sessions.append(s)
                    frames.append([])
                    # keep reading: no backlog, pings answered
                    readers.append(asyncio.create_task(collect(s, frames[-1])))

            await open_more(4)
            await wait_for(lambda: replicas() == 2, 90)  # 4 live sessions, 2 per replica: scale up
            await open_more(4)
            for i, s in enumerate(sessions):  # every session's input reaches the replica that holds it
                await s.append("user", f" {NUMBERS[i]}")
            await wait_for(lambda: all(NUMBERS[i] in words_of([f for f in got if f["type"] == "row"], "user")
                                       for i, got in enumerate(frames)), 30)
            for s in sessions:  # the readers drain up to the end frame
                await s.send_raw(json.dumps({"type": "close"}))
            await asyncio.gather(*readers)
        assert all(f["type"] != "error" for got in frames for f in got)
        await wait_for(lambda: replicas() == 1, 90)  # idle: drain and scale down
        return {replica_of(s.id) for s in sessions}

    owners = run(scenario(), timeout=240)
    serve.delete("auto")
    assert len(owners) == 2  # sessions opened after the scale-up went to the new replica
