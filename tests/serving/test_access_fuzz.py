"""Property-based fuzzing of the protocol frame parser (ms_ray/serving/access.py): whatever a
client sends — any bytes, any text, None, frames around `max_bytes`, JSON nested too deeply,
numbers Python will not read, unpaired surrogate escapes — the only exception that leaves
`parse_json_object`, `parse_frame` and `check_frame` is a ServeError with a protocol code.

Deterministic (derandomize=True, no example database): the same examples on every run."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ms_ray.serving.access import HTTP_STATUS, ServeError, check_frame, parse_frame, parse_json_object

FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
                                   HealthCheck.filter_too_much])
PARSE_CODES = {"bad_frame", "bad_json", "bad_utf8", "too_large"}  # all the parser may answer
LIMITS = st.one_of(st.integers(1, 80), st.sampled_from([65536]))

# ---- strategies ------------------------------------------------------------------------------
SURROGATES = st.sampled_from(["\ud800", "\udfff", "\udc80", "\ud83d\ude00"])  # the last: a valid pair
texts = st.one_of(
    st.text(max_size=30),
    st.lists(st.one_of(st.text(max_size=4), SURROGATES), max_size=5).map("".join),
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), texts),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)),
    max_leaves=12,
)
frame_objects = st.one_of(
    st.fixed_dictionaries(  # shaped like a frame, any field possibly wrong or extra
        {"type": st.one_of(st.sampled_from(["append", "close", "Append", "", "open"]), json_values)},
        optional={"stream": st.one_of(st.sampled_from(["user", "output", ""]), json_values),
                  "text": st.one_of(texts, json_values), "extra": json_values},
    ),
    st.dictionaries(texts, json_values, max_size=4),
    json_values,
)


@st.composite
def encoded(draw, values=frame_objects):
    """A JSON value as a client sends it: text or bytes, ASCII-escaped or not."""
    text = json.dumps(draw(values), ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass") if draw(st.booleans()) else text


@st.composite
def odd_json(draw):
    """Valid-looking JSON that Python's reader refuses or that breaks a naive reader."""
    n = draw(st.integers(1, 70000))
    kind = draw(st.sampled_from(["deep list", "deep object", "deep closed", "long int", "escape"]))
    if kind == "deep list":
        text = "[" * n
    elif kind == "deep object":
        text = '{"a":' * min(n, 20000)
    elif kind == "deep closed":
        n = min(n, 30000)
        text = '{"type": "close", "x": ' + "[" * n + "]" * n + "}"
    elif kind == "long int":
        text = '{"type": "close", "x": ' + "7" * min(n, 9000) + "}"
    else:
        text = '{"type": "append", "stream": "user", "text": "' + draw(st.sampled_from(
            ["\\ud800", "\\udfff x", "\\ud83d\\ude00", "\\ud83d", "\\\\ud800", "\\u0000"])) + '"}'
    return text.encode() if draw(st.booleans()) else text


@st.composite
def around_the_limit(draw):
    """(raw, max_bytes): a good append frame whose size is within a few bytes of max_bytes, with
    multi-byte characters so that characters and bytes differ."""
    char = draw(st.sampled_from(["a", "é", "€", "😀"]))
    count = draw(st.integers(0, 40))
    frame = json.dumps({"type": "append", "stream": "user", "text": char * count}, ensure_ascii=False)
    size = len(frame.encode())
    limit = max(1, size + draw(st.integers(-4, 4)))
    raw = frame.encode() if draw(st.booleans()) else frame
    return raw, limit


raws = st.one_of(st.none(), st.binary(max_size=120), st.text(max_size=120), encoded(), odd_json(),
                 st.binary(max_size=80).map(bytearray), st.integers(), st.lists(st.integers(), max_size=3))


def byte_size(raw) -> int:
    return len(bytes(raw)) if isinstance(raw, (bytes, bytearray)) else len(raw.encode("utf-8", "surrogatepass"))


def refused(call, *args) -> ServeError | None:
    """None when `call` returned; the ServeError when it refused. Anything else fails the test."""
    try:
        call(*args)
    except ServeError as e:
        assert e.code in HTTP_STATUS, e.code
        assert isinstance(e.message, str) and e.message
        e.message.encode("utf-8")  # a message is text the client can be sent
        return e
    return None


def all_text(value) -> bool:
    """Every string (keys too) in a parsed value is UTF-8 encodable."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ---- properties -------------------------------------------------------------------------------
@settings(max_examples=600, **FUZZ)
@given(raw=raws, max_bytes=LIMITS, what=st.sampled_from(["frame", "body"]))
def test_parse_json_object_only_raises_serve_errors(raw, max_bytes, what):
    err = refused(parse_json_object, raw, max_bytes, what)
    if err is not None:
        assert err.code in PARSE_CODES
        assert what in err.message
    if isinstance(raw, (str, bytes, bytearray)):  # size is checked first, and only size gives too_large
        too_big = byte_size(raw) > max_bytes
        assert (err is not None and err.code == "too_large") == too_big, (err, byte_size(raw), max_bytes)
    if err is None:
        frame = parse_json_object(raw, max_bytes, what)
        assert isinstance(frame, dict) and all_text(frame)


@settings(max_examples=600, **FUZZ)
@given(raw=raws, max_bytes=LIMITS)
def test_parse_frame_returns_a_checked_frame_or_a_serve_error(raw, max_bytes):
    err = refused(parse_frame, raw, max_bytes)
    if err is not None:
        assert err.code in PARSE_CODES
        return
    frame = parse_frame(raw, max_bytes)
    if frame["type"] == "append":
        assert set(frame) == {"type", "stream", "text"}
        assert isinstance(frame["stream"], str) and isinstance(frame["text"], str)
        frame["text"].encode("utf-8")  # a tokenizer will take it
    else:
        assert frame == {"type": "close"}


@settings(max_examples=300, **FUZZ)
@given(frame=st.one_of(frame_objects, json_values))
def test_check_frame_on_any_value(frame):
    err = refused(check_frame, frame)
    assert err is None or err.code == "bad_frame"


@settings(max_examples=300, **FUZZ)
@given(case=around_the_limit())
def test_good_frames_round_trip_up_to_the_byte_limit(case):
    raw, max_bytes = case
    size = byte_size(raw)
    err = refused(parse_frame, raw, max_bytes)
    if size > max_bytes:
        assert err is not None and err.code == "too_large" and str(size) in err.message
    else:
        assert err is None
        assert parse_frame(raw, max_bytes) == json.loads(raw)
