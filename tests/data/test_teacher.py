"""Teacher policy against the real local endpoint over loopback sockets."""

import re
import socket
import time

import httpx
import pytest
from teacher_endpoint import serve_local_teacher

from ms_ray.core.streams import StreamSchema, StreamSpec
from ms_ray.data.tables import Conversation, Dropped, Example, Turn, stream_tokens
from ms_ray.data.teacher import TeacherClient, TeacherConfig, leaked_words, split_chunks, teacher_convert
from ms_ray.data.tokenizer import word_tokenizer

USER = "Hello there. I have seven apples and three pears. How many fruits do I have?"
SENTENCES = ["Hello there.", " I have seven apples and three pears.", " How many fruits do I have?"]
FOUR_WORDS = ["Hello there. I have", " seven apples and three", " pears. How many fruits", " do I have?"]
REFERENCE = "Hello! Let me count. Seven apples plus three pears make ten fruits in total."
# Only "Hello" and words of no input chunk: safe to write before any input arrives.
SAFE_REFERENCE = "Hello! Sure, glad to help."
VOCAB = sorted({w for s in (USER, REFERENCE, SAFE_REFERENCE) for w in s.split()})


def make_schema(user_end=None):
    return StreamSchema((StreamSpec("user", "input", end_token=user_end),
                         StreamSpec("output", "output", end_token="<|end|>")))


def setup(user_end=None):
    schema = make_schema(user_end)
    tok = word_tokenizer(VOCAB, schema)
    encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert tok.unk_token_id not in encode(USER + " " + REFERENCE)
    return schema.bind(tok), encode


def conv(reference=REFERENCE):
    return Conversation("test", "g1", [Turn("user", USER), Turn("output", reference)], file="t.jsonl", line=7)


@pytest.fixture
def server():
    srv, url = serve_local_teacher()
    yield srv, url
    srv.shutdown()
    srv.server_close()


def user_section(body):
    return re.search(r"<input>\n(.*?)\n</input>", body["messages"][-1]["content"], re.S).group(1)


@pytest.mark.parametrize("chunk_words,expected", [(None, SENTENCES), (4, FOUR_WORDS)])
def test_teacher_sees_only_input_up_to_the_chunk(server, chunk_words, expected):
    srv, url = server
    assert "".join(expected) == USER and split_chunks(USER, chunk_words) == expected
    schema, encode = setup()
    client = TeacherClient(TeacherConfig(url, model="m", chunk_words=chunk_words))
    ex = teacher_convert(conv(), schema, encode, client)
    client.close()
    assert isinstance(ex, Example), ex
    assert len(srv.requests) == len(expected) + 1  # one call per chunk, then "the rest"
    for t, body in enumerate(srv.requests, 1):
        assert body["model"] == "m" and body["temperature"] == 0.0 and body["max_tokens"] > 0
        seen = "".join(expected[:t])
        assert user_section(body) == seen
        # The system message and the instruction line are fixed text, the same for every
        # conversation; the rest must hold no word of later chunks that is not in the seen text,
        # except inside the reference reply (the content target, shown on purpose).
        system, user = body["messages"]
        assert system == srv.requests[0]["messages"][0] and system["role"] == "system"
        head, instruction = user["content"].rsplit("\n", 1)
        ends = srv.requests[:1] + srv.requests[-1:]
        assert instruction in {r["messages"][-1]["content"].rsplit("\n", 1)[1] for r in ends}
        later = {w for w in "".join(expected[t:]).split() if w not in seen.split()}
        outside_ref = re.sub(r"<reference>.*?</reference>", "", head, flags=re.S)
        assert not [w for w in later if re.search(rf"(?<!\w){re.escape(w)}(?!\w)", outside_ref)], t
        final = "<status>input complete</status>" in body["messages"][-1]["content"]
        assert final == (t == len(expected) + 1)


@pytest.mark.parametrize("user_end", [None, "<|eot|>"])
def test_table_placement(server, user_end):
    srv, url = server
    schema, encode = setup(user_end)
    client = TeacherClient(TeacherConfig(url, model="local"))
    ex = teacher_convert(conv(), schema, encode, client)
    client.close()
    assert isinstance(ex, Example), ex
    assert ex.policy == "teacher" and ex.meta["teacher_model"] == "local" and ex.group == "g1"
    rows, u, o = ex.rows, schema.index("user"), schema.index("output")
    user_ids = encode(USER)
    n = len(user_ids)
    assert rows[:n, u].tolist() == user_ids  # in order, one per row from row 0
    ends = schema.end_ids()
    last_input_row = n - 1
    if user_end:
        assert rows[n, u] == ends["user"]
        last_input_row = n
    assert stream_tokens(rows, schema, "user") == user_ids + ([ends["user"]] if user_end else [])
    chunks = ex.meta["chunks"]
    assert len(chunks) == len(SENTENCES) + 1
    placed, prev_end = [], 0
    for t, c in enumerate(chunks, 1):
        final = t > len(SENTENCES)
        upto = n if final else len(encode("".join(SENTENCES[:t])))
        assert c["input_upto_token"] == upto
        if not c["reply"]:
            assert c["start_row"] is None
            continue
        ids = encode(c["reply"])
        start = c["start_row"]
        assert start >= (last_input_row if final else upto - 1) + 2  # causal by two rows
        assert start >= prev_end
        assert rows[start:start + len(ids), o].tolist() == ids
        placed += ids
        prev_end = start + len(ids)
    assert placed and " ".join(c["reply"] for c in chunks if c["reply"]) == REFERENCE
    out = stream_tokens(rows, schema, "output")
    assert out == placed + [ends["output"]]  # nothing overwritten, end token last
    end_row = int((rows[:, o] == ends["output"]).nonzero()[0][0])
    assert end_row >= max(prev_end, last_input_row + 2) and end_row == rows.shape[0] - 1
    # Every placed token is in its own cell: the silent-cell count adds up.
    assert int((rows != schema.silence_id).sum()) == len(user_ids) + bool(user_end) + len(placed) + 1
    # A teacher silent until told the input is complete: its reply starts at the earliest row
    # that can see the last input token (the input end token when the schema has one).
    srv.ratio = 0.0
    client = TeacherClient(TeacherConfig(url))
    late = teacher_convert(conv(), schema, encode, client)
    client.close()
    assert [c["start_row"] for c in late.meta["chunks"]] == [None] * len(SENTENCES) + [last_input_row + 2]
    assert late.rows[last_input_row + 2:, o].tolist() == encode(REFERENCE) + [ends["output"]]
    assert (late.rows[:last_input_row + 2, o] == schema.silence_id).all()


def test_causality_check_drops_a_leaking_teacher(server):
    srv, url = server
    schema, encode = setup()
    srv.mode = "eager"  # writes the whole reference at step 1, before later input arrived
    client = TeacherClient(TeacherConfig(url))
    dropped = teacher_convert(conv(), schema, encode, client)
    assert isinstance(dropped, Dropped) and (dropped.file, dropped.line) == ("t.jsonl", 7)
    assert "causality" in dropped.reason and "reply chunk 1" in dropped.reason
    for word in ("seven", "apple", "three", "pear", "fruit"):  # only in input chunks 2 and 3
        assert f"'{word}'" in dropped.reason
    assert "'ten'" not in dropped.reason and "'hello'" not in dropped.reason  # not later input
    assert len(srv.requests) == 1  # stopped at the leaking chunk
    # The same eager teacher is fine when the reference holds no later input words.
    ok = teacher_convert(conv(SAFE_REFERENCE), schema, encode, client)
    client.close()
    assert isinstance(ok, Example), ok
    assert ok.meta["chunks"][0]["reply"] == SAFE_REFERENCE
    assert leaked_words("ten fruits", SENTENCES[:2], SENTENCES[2:]) == {"fruit"}
    assert leaked_words("I have ten", SENTENCES[:2], SENTENCES[2:]) == set()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode,pattern,tries,received", [
    ("error", r"HTTP 500", 3, 3),
    ("malformed", r"malformed response", 3, 3),
    ("slow", r"Timeout", 3, 3),
    ("unauthorized", r"HTTP 401", 1, 1),  # not retried: a bad key does not get better
    ("unreachable", r"ConnectError", 3, 0),
])
def test_endpoint_failures_drop_after_bounded_retries(server, mode, pattern, tries, received):
    srv, url = server
    schema, encode = setup()
    if mode == "unreachable":
        url = f"http://127.0.0.1:{free_port()}/v1"
    elif mode == "unauthorized":
        srv.api_key = "sk-right"
    else:
        srv.mode = mode
    srv.delay_s = 1.0
    client = TeacherClient(TeacherConfig(url, api_key="sk-wrong", timeout_s=0.3, max_retries=2))
    t0 = time.monotonic()
    dropped = teacher_convert(conv(), schema, encode, client)
    elapsed = time.monotonic() - t0
    client.close()
    assert isinstance(dropped, Dropped), dropped
    assert "endpoint failed at step 1/4" in dropped.reason and re.search(pattern, dropped.reason), dropped.reason
    assert f"{tries} attempt(s) failed" in dropped.reason  # max_retries=2: at most 3 tries
    assert len(srv.requests) == received
    assert elapsed < 5.0


def test_api_key_is_sent_as_bearer_and_models_listed(server):
    srv, url = server
    srv.api_key = "sk-right"
    schema, encode = setup()
    client = TeacherClient(TeacherConfig(url, api_key="sk-right"))
    assert isinstance(teacher_convert(conv(), schema, encode, client), Example)
    client.close()
    with httpx.Client(trust_env=False, timeout=5) as http:
        models = http.get(f"{url}/models").json()
    assert models["data"][0]["id"] == "local-rule-teacher"
