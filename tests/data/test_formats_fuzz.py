"""Property-based fuzzing of the JSONL readers (ms_ray/data/formats.py): files of arbitrary bytes
lines, whitespace lines, JSON nested too deeply, numbers Python will not read, unpaired
surrogate escapes, and JSON objects shaped like openai / alpaca / sharegpt / table lines with
any field right or wrong. Properties: reading never raises; every non-blank line gives exactly
one Conversation/Example or one Dropped (right 1-based line, non-empty reason), in order, so
nothing is lost; what is kept is clean (texts a tokenizer takes); well-formed lines are kept
exactly.

Deterministic (derandomize=True, no example database): the same examples on every run."""

import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ms_ray.data.formats import DEFAULT_ROLE_MAP, read_jsonl, read_table_jsonl, table_line
from ms_ray.data.tables import Conversation, Dropped, Example, Turn

# the fixtures (schema, tokenizer, bound, tmp_path) are never mutated: one per test is fine
FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                   HealthCheck.data_too_large, HealthCheck.large_base_example,
                                   HealthCheck.filter_too_much])
STREAMS = ["user", "think", "output"]  # the conftest schema
WORDS = ["hello", "there", "how", "yes", "no", "one", "two"]  # in the conftest tokenizer
SPECIALS = ["<|silence|>", "<|pad|>", "<|end|>", "<|unk|>"]

# ---- values --------------------------------------------------------------------------------
SURROGATES = st.sampled_from(["\ud800", "\udfff", "\udc80", "\ud83d\ude00"])  # the last: a valid pair
texts = st.one_of(st.text(max_size=12), st.lists(st.one_of(st.text(max_size=3), SURROGATES), max_size=4).map("".join))
clean_texts = st.text(min_size=1, max_size=12).filter(str.strip)  # what a good line says
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), texts)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(texts, inner, max_size=3)), max_leaves=5)
ROLES = [*DEFAULT_ROLE_MAP, "narrator", "", "User"]
roles = st.one_of(st.sampled_from(ROLES), json_values)
ROLE_MAPS = [None, {"narrator": "user"}, {"user": "think", "gpt": "nowhere"}]


def maybe(strategy, right):
    """Mostly the right kind of value, sometimes anything."""
    return st.one_of(right, right, right, strategy)


def messages_like(list_key, role_key, text_key):
    message = st.one_of(st.fixed_dictionaries({}, optional={role_key: roles, text_key: maybe(json_values, texts),
                                                           "name": texts}),
                        json_values)
    return st.fixed_dictionaries({list_key: maybe(json_values, st.lists(message, max_size=4))},
                                 optional={"id": maybe(json_values, st.one_of(texts, st.integers())),
                                           "extra": json_values})


alpaca_like = st.fixed_dictionaries({}, optional={key: maybe(json_values, texts) for key in
                                                  ("instruction", "input", "output", "id")})
table_like = st.fixed_dictionaries({}, optional={
    **{key: maybe(json_values, texts) for key in ("id", "source", "group", "policy")},
    "meta": maybe(json_values, st.dictionaries(texts, json_values, max_size=3)),
    "streams": maybe(json_values, st.dictionaries(
        st.one_of(st.sampled_from(STREAMS), texts),
        maybe(json_values, st.lists(st.one_of(st.none(), st.sampled_from(WORDS + SPECIALS + ["zebra", "hello there"]),
                                              scalars), max_size=4)), max_size=4)),
})
shaped = st.one_of(messages_like("messages", "role", "content"), messages_like("conversations", "from", "value"),
                   alpaca_like, table_like, st.dictionaries(texts, json_values, max_size=3), json_values)


deep = st.one_of(st.integers(1, 40), st.integers(3000, 6000))
odd_lines = st.one_of(  # bytes that are not a plain JSON object line
    deep.map(lambda n: b"[" * n), deep.map(lambda n: b'{"messages": ' + b"[" * n + b"]" * n + b"}"),
    st.sampled_from([4300, 4301, 6000]).map(lambda n: b'{"id": ' + b"9" * n + b', "messages": []}'),
    st.sampled_from([b"", b"  ", b"\t", b"\r", b"\x0c", b"\x1c", "\u00a0".encode(), "\u2028".encode(),
                     b"\xef\xbb\xbf", b"\xff\xfe{}", b"\xed\xa0\x80", b"{}", b"null", b'"text"', b"{",
                     b'{"messages": []}x']),
)


@st.composite
def with_surrogate(draw, good):
    """A well-formed line with an unpaired surrogate put into one of its strings."""
    entry = draw(good)
    obj = json.loads(json.dumps(entry[1] if isinstance(entry, tuple) else entry))
    places = []  # (container, key) of every string value
    stack = [obj]
    while stack:
        node = stack.pop()
        for key, value in (node.items() if isinstance(node, dict) else enumerate(node)):
            if isinstance(value, str):
                places.append((node, key))
            elif isinstance(value, (dict, list)):
                stack.append(value)
    if places:
        node, key = draw(st.sampled_from(places))
        at = draw(st.integers(0, len(node[key])))
        node[key] = node[key][:at] + draw(st.sampled_from(["\ud800", "\udfff", "\udbff"])) + node[key][at:]
    return obj


def dumped(value, ensure_ascii: bool) -> bytes:
    """One JSON line as a file holds it (surrogates written as they are: not UTF-8)."""
    return json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")


# ---- well-formed lines, with what reading them must give --------------------------------------
GOOD_ROLES = ["user", "human", "assistant", "gpt", "model", "think", "reasoning"]


@st.composite
def good_chat(draw):
    """(format, JSON object, [(role, text)]) of a well-formed chat line."""
    fmt = draw(st.sampled_from(["openai", "sharegpt", "alpaca"]))
    if fmt == "alpaca":
        instruction, output = draw(clean_texts), draw(clean_texts)
        extra = draw(st.one_of(st.none(), st.text(max_size=8)))
        obj = {"instruction": instruction, "output": output}
        if extra is not None:
            obj["input"] = extra
        prompt = instruction + "\n\n" + extra if extra and extra.strip() else instruction
        said = [("user", prompt), ("assistant", output)]
    else:
        said = draw(st.lists(st.tuples(st.sampled_from(GOOD_ROLES), clean_texts), min_size=1, max_size=4))
        list_key, role_key, text_key = (("messages", "role", "content") if fmt == "openai"
                                        else ("conversations", "from", "value"))
        obj = {list_key: [{role_key: r, text_key: t} for r, t in said]}
    line_id = draw(st.one_of(st.none(), clean_texts, st.integers()))
    if line_id is not None:
        obj["id"] = line_id
    return fmt, obj, said


@st.composite
def good_table(draw):
    rows = draw(st.integers(0, 4))
    cells = st.lists(st.one_of(st.none(), st.sampled_from(WORDS)), min_size=rows, max_size=rows)
    obj = {key: draw(st.text(max_size=8)) for key in ("id", "source", "group", "policy")}
    obj["meta"] = draw(st.dictionaries(st.text(max_size=4), st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=4)),
        lambda inner: st.lists(inner, max_size=2), max_leaves=4), max_size=3))
    obj["streams"] = {name: draw(cells) for name in STREAMS}
    return obj


@st.composite
def jsonl_file(draw, good, bad):
    """(file bytes, {physical line number: the good entry on it}). Entries are good lines, bad
    JSON objects or odd bytes (which may hold newlines of their own), joined by \\n or \\r\\n."""
    entries = draw(st.lists(st.one_of(good.map(lambda g: ("good", g)),
                                      bad.map(lambda b: ("bytes", dumped(b, True))),
                                      bad.map(lambda b: ("bytes", dumped(b, False))),
                                      with_surrogate(good).map(lambda b: ("bytes", dumped(b, True))),
                                      odd_lines.map(lambda b: ("bytes", b)),
                                      st.binary(max_size=24).map(lambda b: ("bytes", b))), max_size=6))
    sep = draw(st.sampled_from([b"\n", b"\r\n"]))
    data, good_at = b"\xef\xbb\xbf" if draw(st.booleans()) else b"", {}
    for i, (kind, entry) in enumerate(entries):
        if i:
            data += sep
        if kind == "good":
            good_at[data.count(b"\n") + 1] = entry
            entry = dumped(entry[1] if isinstance(entry, tuple) else entry, draw(st.booleans()))
        data += entry
    if entries and draw(st.booleans()):
        data += sep
    return data, good_at


def non_blank_lines(data: bytes) -> list[int]:
    """1-based numbers of the lines a reader must answer for: all but whitespace-only ones (a
    UTF-8 BOM opens the file; a line that is not UTF-8 is never blank)."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    numbers = []
    for n, raw in enumerate(lines, start=1):
        try:
            blank = not raw.decode("utf-8-sig" if n == 1 else "utf-8").strip()
        except UnicodeDecodeError:
            blank = False
        if not blank:
            numbers.append(n)
    return numbers


def is_text(s) -> bool:
    try:
        return isinstance(s, str) and s.encode("utf-8") is not None
    except UnicodeEncodeError:
        return False


def check_dropped(item: Dropped, path: str, line: int) -> None:
    assert item.file == path and item.line == line, (item, line)
    assert isinstance(item.reason, str) and item.reason.strip() and is_text(item.reason), item


# ---- properties ----------------------------------------------------------------------------------
@settings(max_examples=300, **FUZZ)
@given(case=jsonl_file(good_chat(), shaped), fmt=st.sampled_from(["auto", "openai", "alpaca", "sharegpt"]),
       role_map=st.sampled_from(ROLE_MAPS), max_chars=st.sampled_from([20000, 6]))
def test_read_jsonl_answers_every_line_once(tmp_path, schema, case, fmt, role_map, max_chars):
    data, good_at = case
    path = tmp_path / "chat.jsonl"
    path.write_bytes(data)
    file = str(path)
    items = list(read_jsonl(path, schema, fmt=fmt, role_map=role_map, max_chars=max_chars))  # never raises
    lines = non_blank_lines(data)
    assert len(items) == len(lines), (len(items), lines)  # count conservation
    to_stream = {**DEFAULT_ROLE_MAP, **(role_map or {})}
    for item, line in zip(items, lines):
        if isinstance(item, Dropped):
            check_dropped(item, file, line)
        else:
            assert isinstance(item, Conversation), item
            assert item.file == item.source == file and item.line == line, (item, line)
            assert item.turns and is_text(item.group)
            for turn in item.turns:
                assert turn.stream in schema.names and is_text(turn.text)
                assert turn.text.strip() and len(turn.text) <= max_chars
        if line in good_at:  # a well-formed line is kept exactly, or dropped for a reason we know
            line_fmt, obj, said = good_at[line]
            fits = all(len(text) <= max_chars for _, text in said)
            mapped = all(to_stream.get(role) in schema.names for role, _ in said)
            if fmt in ("auto", line_fmt) and fits and mapped:
                group = str(obj["id"]) if "id" in obj else f"{path}:{line}"
                assert item == Conversation(file, group, [Turn(to_stream[r], t) for r, t in said], file, line)
            else:
                assert isinstance(item, Dropped)
                if fmt in ("auto", line_fmt) and mapped:
                    assert "max_chars" in item.reason


@settings(max_examples=300, **FUZZ)
@given(case=jsonl_file(good_table(), shaped))
def test_read_table_jsonl_answers_every_line_once(tmp_path, bound, tokenizer, case):
    data, good_at = case
    path = tmp_path / "tables.jsonl"
    path.write_bytes(data)
    file = str(path)
    vocab = tokenizer.get_vocab()
    assert all(w in vocab for w in WORDS)
    items = list(read_table_jsonl(path, bound, tokenizer))  # never raises
    lines = non_blank_lines(data)
    assert len(items) == len(lines), (len(items), lines)  # count conservation
    for item, line in zip(items, lines):
        if isinstance(item, Dropped):
            check_dropped(item, file, line)
            assert item.reason.startswith(("table line: ", "malformed JSON", "line is")), item
        else:
            assert isinstance(item, Example), item
            rows = item.rows
            assert isinstance(rows, np.ndarray) and rows.dtype == np.int32
            assert rows.ndim == 2 and rows.shape[1] == len(STREAMS)
            assert ((rows >= 0) & (rows < len(tokenizer))).all()
            assert all(is_text(v) for v in (item.id, item.source, item.group, item.policy))
            assert isinstance(item.meta, dict)
            json.dumps(item.meta, ensure_ascii=False).encode("utf-8")  # writable as it is
        if line in good_at:  # a well-formed table reads back exactly and writes back the same
            obj = good_at[line]
            assert isinstance(item, Example), item
            by_stream = [[bound.silence_id if c is None else vocab[c] for c in obj["streams"][name]]
                         for name in STREAMS]
            assert rows.tolist() == np.array(by_stream, dtype=np.int32).reshape(len(STREAMS), -1).T.tolist()
            assert table_line(item, bound, tokenizer) == obj
