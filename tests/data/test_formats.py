import json

import numpy as np
import pytest

from ms_ray.core.streams import SchemaError, StreamSchema, StreamSpec, TableError
from ms_ray.data import formats
from ms_ray.data.formats import read_chitchat, read_jsonl, read_table_jsonl, write_table_jsonl
from ms_ray.data.tables import Conversation, Dropped, Example, Turn
from ms_ray.data.tokenizer import word_tokenizer

STREAMS = ["system", "user", "output", "tool"]
WORDS = "hello there how are you yes no one two three".split()
GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.fixture
def chat_schema():
    return StreamSchema((StreamSpec("system", "input"), StreamSpec("user", "input"),
                         StreamSpec("output", "output"), StreamSpec("tool", "input")))


@pytest.fixture
def chat_tokenizer(chat_schema):
    return word_tokenizer(WORDS, chat_schema)


@pytest.fixture
def chat_bound(chat_schema, chat_tokenizer):
    return chat_schema.bind(chat_tokenizer)


def write_lines(path, lines):
    """Each line a dict (dumped as JSON) or a raw string; returns the path as a str."""
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return str(path)


def turns(conv):
    return [(t.stream, t.text) for t in conv.turns]


# ---- chat formats -------------------------------------------------------------------------
def test_openai_round_trip(tmp_path, chat_schema):
    line1 = {"id": "c1", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "  What is 2+2?\n"},
        {"role": "assistant", "content": "4", "name": "bot"}, {"role": "tool", "content": "{\"x\": 1}"}]}
    line2 = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write_lines(tmp_path / "chat.jsonl", [line1, line2])
    got = list(read_jsonl(path, chat_schema, fmt="openai"))
    assert [type(c) for c in got] == [Conversation, Conversation]
    assert turns(got[0]) == [("system", "Be brief."), ("user", "  What is 2+2?\n"), ("output", "4"),
                             ("tool", "{\"x\": 1}")]
    assert (got[0].source, got[0].group, got[0].file, got[0].line) == (path, "c1", path, 1)
    assert turns(got[1]) == [("user", "hi"), ("output", "hello")]
    assert (got[1].group, got[1].line) == (f"{path}:2", 2)


def test_alpaca_round_trip(tmp_path, chat_schema):
    lines = [{"instruction": "Add the numbers.", "input": "2 3", "output": "5", "id": 7},
             {"instruction": "Say hi.", "output": "hi"},
             {"instruction": "Say no.", "input": "  ", "output": "no"},
             {"instruction": "Say yes.", "input": None, "output": "yes"}]
    got = list(read_jsonl(write_lines(tmp_path / "a.jsonl", lines), chat_schema, fmt="alpaca"))
    assert [turns(c) for c in got] == [
        [("user", "Add the numbers.\n\n2 3"), ("output", "5")],
        [("user", "Say hi."), ("output", "hi")],
        [("user", "Say no."), ("output", "no")],
        [("user", "Say yes."), ("output", "yes")],
    ]
    assert got[0].group == "7"


def test_sharegpt_round_trip(tmp_path, chat_schema):
    line = {"id": "s1", "conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "hi"},
                                          {"from": "gpt", "value": "hello"}, {"from": "observation", "value": "42"}]}
    got = list(read_jsonl(write_lines(tmp_path / "s.jsonl", [line]), chat_schema, fmt="sharegpt"))
    assert len(got) == 1 and got[0].group == "s1"
    assert turns(got[0]) == [("system", "sys"), ("user", "hi"), ("output", "hello"), ("tool", "42")]


def test_auto_detects_each_line(tmp_path, chat_schema):
    lines = [GOOD, {"instruction": "Say hi.", "output": "hi"},
             {"conversations": [{"from": "human", "value": "yo"}, {"from": "gpt", "value": "hey"}]}]
    got = list(read_jsonl(write_lines(tmp_path / "mix.jsonl", lines), chat_schema))
    assert [turns(c) for c in got] == [[("user", "hi"), ("output", "hello")], [("user", "Say hi."), ("output", "hi")],
                                       [("user", "yo"), ("output", "hey")]]
    assert [c.line for c in got] == [1, 2, 3]


def test_explicit_format_drops_lines_of_another_format(tmp_path, chat_schema):
    path = write_lines(tmp_path / "mix.jsonl", [GOOD, {"instruction": "Say hi.", "output": "hi"}])
    got = list(read_jsonl(path, chat_schema, fmt="openai"))
    assert isinstance(got[0], Conversation)
    assert got[1] == Dropped(path, 2, "openai line: no 'messages' field")


def user_then(msg):
    return {"messages": [{"role": "user", "content": "hi"}, msg]}


NAMES = "['system', 'user', 'output', 'tool']"
BAD_LINES = {
    "malformed json": ('{"messages": [', "malformed JSON: Expecting value at column 15"),
    "not an object": ("[1, 2]", "line is a list, not a JSON object"),
    "not an object (string)": ('"hello"', "line is a string, not a JSON object"),
    "unknown format": ({"prompt": "x", "completion": "y"},
                       "unknown format: none of the keys [\"'conversations' (sharegpt)\", \"'instruction' (alpaca)\", "
                       "\"'messages' (openai)\"] is present (keys: ['completion', 'prompt'])"),
    "messages not a list": ({"messages": {"role": "user"}}, "openai line: messages is an object, not a list"),
    "messages empty": ({"messages": []}, "openai line: messages is empty"),
    "message not an object": (user_then("hello"), "openai line: messages[1] is a string, not an object"),
    "missing content": (user_then({"role": "assistant"}), "openai line: messages[1] has no 'content' field"),
    "missing role": (user_then({"content": "x"}), "openai line: messages[1] has no 'role' field"),
    "empty content": (user_then({"role": "assistant", "content": " \n"}), "openai line: messages[1].content is empty"),
    "null content": (user_then({"role": "assistant", "content": None}),
                     "openai line: messages[1].content is null, not a string"),
    "list content": (user_then({"role": "assistant", "content": [{"type": "text", "text": "x"}]}),
                     "openai line: messages[1].content is a list, not a string"),
    "role not a string": (user_then({"role": 3, "content": "x"}),
                          "openai line: messages[1].role is a number, not a string"),
    "unmapped role": (user_then({"role": "narrator", "content": "x"}),
                      f"openai line: messages[1].role 'narrator' has no stream in the schema (streams: {NAMES}; "
                      "it is not in the role map)"),
    "role to a stream not in schema": (user_then({"role": "think", "content": "x"}),
                                       f"openai line: messages[1].role 'think' has no stream in the schema "
                                       f"(streams: {NAMES}; the role map sends it to 'think')"),
    "too long": (user_then({"role": "assistant", "content": "x" * 31}),
                 "openai line: messages[1].content has 31 characters, over max_chars=30 (dropped, not truncated)"),
    "alpaca missing output": ({"instruction": "x"}, "alpaca line: no 'output' field"),
    "alpaca empty instruction": ({"instruction": "", "output": "x"}, "alpaca line: instruction is empty"),
    "alpaca input not a string": ({"instruction": "x", "input": 3, "output": "y"},
                                  "alpaca line: input is a number, not a string"),
    "alpaca too long": ({"instruction": "x" * 20, "input": "y" * 20, "output": "z"},
                        "alpaca line: instruction + input has 42 characters, over max_chars=30 "
                        "(dropped, not truncated)"),
    "alpaca empty output": ({"instruction": "x", "output": ""}, "alpaca line: output is empty"),
    "sharegpt missing value": ({"conversations": [{"from": "human"}]},
                               "sharegpt line: conversations[0] has no 'value' field"),
    "sharegpt value not a string": ({"conversations": [{"from": "human", "value": 5}]},
                                    "sharegpt line: conversations[0].value is a number, not a string"),
    "id not scalar": ({**GOOD, "id": ["a"]}, "id is a list, not a string or number"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_is_dropped_with_reason_and_neighbours_survive(tmp_path, chat_schema, case):
    bad, reason = BAD_LINES[case]
    path = write_lines(tmp_path / "bad.jsonl", [GOOD, "", bad, GOOD])
    got = list(read_jsonl(path, chat_schema, max_chars=30))
    assert got == [Conversation(path, f"{path}:1", [Turn("user", "hi"), Turn("output", "hello")], path, 1),
                   Dropped(path, 3, reason),
                   Conversation(path, f"{path}:4", [Turn("user", "hi"), Turn("output", "hello")], path, 4)]


def test_text_of_exactly_max_chars_is_kept(tmp_path, chat_schema):
    path = write_lines(tmp_path / "c.jsonl", [user_then({"role": "assistant", "content": "x" * 30})])
    (conv,) = read_jsonl(path, chat_schema, max_chars=30)
    assert conv.turns[1].text == "x" * 30


def test_invalid_utf8_line_is_dropped(tmp_path, chat_schema):
    path = tmp_path / "u.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"messages": "\xff"}\n' + json.dumps(GOOD).encode() + b"\n")
    got = list(read_jsonl(path, chat_schema))
    assert [type(c) for c in got] == [Conversation, Dropped, Conversation]
    assert got[1].line == 2 and got[1].reason.startswith("line is not valid UTF-8")


def test_blank_lines_skipped_and_lines_one_based(tmp_path, chat_schema):
    path = write_lines(tmp_path / "b.jsonl", ["", "   ", GOOD, "", GOOD])
    got = list(read_jsonl(path, chat_schema))
    assert [(type(c), c.line) for c in got] == [(Conversation, 3), (Conversation, 5)]


def test_role_map_adds_to_defaults(tmp_path, chat_schema):
    path = write_lines(tmp_path / "r.jsonl", [{"messages": [{"role": "narrator", "content": "once"},
                                                            {"role": "user", "content": "hi"}]}])
    (conv,) = read_jsonl(path, chat_schema, role_map={"narrator": "system"})
    assert turns(conv) == [("system", "once"), ("user", "hi")]


def test_missing_file_and_unknown_format_raise(tmp_path, chat_schema):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_jsonl(missing, chat_schema)
    with pytest.raises(ValueError, match="unknown format 'csv'"):
        read_jsonl(missing, chat_schema, fmt="csv")


# ---- table JSONL --------------------------------------------------------------------------
def make_examples(bound, tok):
    sil = bound.silence_id
    ids = dict(zip(WORDS, tok.convert_tokens_to_ids(WORDS)))
    a = np.full((4, 4), sil, dtype=np.int32)
    a[0, 1], a[1, 1], a[2, 2], a[3, 2], a[0, 0] = ids["hello"], ids["there"], ids["yes"], ids["no"], ids["one"]
    b = np.full((2, 4), sil, dtype=np.int32)
    b[1, 3], b[1, 2] = ids["three"], bound.pad_id
    meta = {"answer": "yes", "timing": [1, 2], "nested": {"x": None}}
    return [Example("e1", "chat.jsonl", "c1", "wait_k(3)", a, meta),
            Example("e2", "task", "g2", "task", b),
            Example("e3", "task", "g3", "task", np.full((0, 4), sil, dtype=np.int32))]


def test_table_round_trip_is_exact(tmp_path, chat_bound, chat_tokenizer):
    examples = make_examples(chat_bound, chat_tokenizer)
    path = tmp_path / "out" / "tables.jsonl"
    assert write_table_jsonl(examples, path, chat_bound, chat_tokenizer) == 3
    first = json.loads(path.read_text().splitlines()[0])
    assert first["streams"] == {"system": ["one", None, None, None], "user": ["hello", "there", None, None],
                                "output": [None, None, "yes", "no"], "tool": [None, None, None, None]}
    got = list(read_table_jsonl(path, chat_bound, chat_tokenizer))
    assert len(got) == 3
    for want, have in zip(examples, got):
        assert isinstance(have, Example)
        assert (have.id, have.source, have.group, have.policy) == (want.id, want.source, want.group, want.policy)
        assert have.meta == want.meta
        assert have.rows.dtype == np.int32 and have.rows.shape == want.rows.shape
        assert np.array_equal(have.rows, want.rows)


def table_obj(**streams):
    base = {"system": [None, None], "user": ["hello", None], "output": [None, "yes"], "tool": [None, None]}
    return {"id": "t", "source": "s", "group": "g", "policy": "p", "meta": {}, "streams": {**base, **streams}}


def without(obj, key):
    return {k: v for k, v in obj.items() if k != key}


BAD_TABLES = {
    "unknown stream": (table_obj(think=[None, None]), f"unknown stream 'think' (schema streams: {NAMES})"),
    "missing stream": ({**table_obj(), "streams": without(table_obj()["streams"], "tool")},
                       f"missing stream 'tool' (schema streams: {NAMES})"),
    "ragged": (table_obj(tool=[None]), "ragged streams: lengths {'system': 2, 'user': 2, 'output': 2, 'tool': 1} "
                                       "differ (every stream needs the same number of rows)"),
    "unknown word": (table_obj(output=[None, "zebra"]),
                     "stream 'output' row 1: cell 'zebra' is not a single token of the tokenizer"),
    "two words": (table_obj(user=["hello there", None]),
                  "stream 'user' row 0: cell 'hello there' is not a single token of the tokenizer"),
    "number cell": (table_obj(tool=[None, 5]), "stream 'tool' row 1: cell 5 is a number, not a token string or null"),
    "stream not a list": (table_obj(tool="hello"), "stream 'tool' is a string, not a list"),
    "streams not an object": ({**table_obj(), "streams": []}, "streams is a list, not an object"),
    "missing id": (without(table_obj(), "id"), "no 'id' field"),
    "id not a string": ({**table_obj(), "id": 3}, "id is a number, not a string"),
    "meta not an object": ({**table_obj(), "meta": [1]}, "meta is a list, not an object"),
}


@pytest.mark.parametrize("case", sorted(BAD_TABLES))
def test_bad_table_line_is_dropped_with_reason(tmp_path, chat_bound, chat_tokenizer, case):
    bad, reason = BAD_TABLES[case]
    path = write_lines(tmp_path / "t.jsonl", [table_obj(), bad, "{oops", table_obj()])
    got = list(read_table_jsonl(path, chat_bound, chat_tokenizer))
    assert [type(x) for x in got] == [Example, Dropped, Dropped, Example]
    assert got[1] == Dropped(path, 2, f"table line: {reason}")
    assert got[2].line == 3 and got[2].reason.startswith("malformed JSON")
    assert got[3].rows.tolist() == got[0].rows.tolist() == [[0, 3, 0, 0], [0, 0, 8, 0]]


def test_table_write_refuses_what_would_not_read_back(tmp_path, chat_schema, chat_bound, chat_tokenizer):
    good = make_examples(chat_bound, chat_tokenizer)[0]
    out_of_vocab = Example("x", "s", "g", "p", np.where(good.rows == 0, 0, 999).astype(np.int32))
    with pytest.raises(TableError, match=r"example 'x': stream 'system' row 0: id 999 is outside"):
        write_table_jsonl([out_of_vocab], tmp_path / "x.jsonl", chat_bound, chat_tokenizer)
    with pytest.raises(TableError, match=r"shape \(4, 3\)"):
        write_table_jsonl([Example("y", "s", "g", "p", good.rows[:, :3])], tmp_path / "y.jsonl", chat_bound,
                          chat_tokenizer)
    with pytest.raises(TableError, match="meta is not JSON-serialisable"):
        write_table_jsonl([Example("z", "s", "g", "p", good.rows, {"f": object()})], tmp_path / "z.jsonl",
                          chat_bound, chat_tokenizer)
    with pytest.raises(SchemaError, match="not bound"):
        write_table_jsonl([good], tmp_path / "w.jsonl", chat_schema, chat_tokenizer)
    with pytest.raises(SchemaError, match="not bound"):
        read_table_jsonl(tmp_path / "w.jsonl", chat_schema, chat_tokenizer)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_table_jsonl(tmp_path / "missing.jsonl", chat_bound, chat_tokenizer)


# ---- chitchat -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chitchat_pairs():
    return list(read_chitchat(limit=300))


def test_chitchat_pairs_well_formed_and_chained(chitchat_pairs):
    assert len(chitchat_pairs) == 300
    for conv in chitchat_pairs:
        assert conv.source == "chitchat" and [t.stream for t in conv.turns] == ["user", "output"]
        assert all(t.text and t.text == t.text.strip() for t in conv.turns)
    groups = [c.group for c in chitchat_pairs]
    assert groups == sorted(groups) and len(set(groups)) >= 3
    for a, b in zip(chitchat_pairs, chitchat_pairs[1:]):
        if a.group == b.group:  # pairs of one conversation share a turn: i->i+1, then i+1->i+2
            assert a.turns[1].text == b.turns[0].text


def test_chitchat_first_pair_matches_the_corpus(chitchat_pairs):
    # the first conversation id of the installed corpus, sorted, and its first two turns
    assert chitchat_pairs[0].group == "0004441d-0390-4033-a321-6fef32ed7ddb"
    assert turns(chitchat_pairs[0]) == [
        ("user", "I would binge watch just about about every tv show"),
        ("output", "After high confusion and probably a mental breakdown, since that would be wild, I would "
                   "definitely drive over to Banzai Bowls and make a sick acai bowl for free"),
    ]
    assert turns(chitchat_pairs[1])[0] == ("user", turns(chitchat_pairs[0])[1][1])


def test_chitchat_limit_and_order_are_deterministic(chitchat_pairs):
    again = list(read_chitchat(limit=7, user_stream="system", output_stream="tool"))
    assert len(again) == 7
    assert [(c.group, [t.text for t in c.turns]) for c in again] == \
        [(c.group, [t.text for t in c.turns]) for c in chitchat_pairs[:7]]
    assert [t.stream for t in again[0].turns] == ["system", "tool"]
    assert list(read_chitchat(limit=0)) == []


def test_chitchat_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(formats.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install chitchat-dataset"):
        read_chitchat()


def test_chitchat_joins_messages_and_skips_empty_texts(tmp_path, monkeypatch):
    def msg(text, sender):
        return {"text": text, "sender": sender, "timestamp": "2018-05-05T21:01:14Z"}

    corpus = {
        "b-conv": {"messages": [[msg("hi", "A"), msg(" ", "A"), msg("there ", "A")], [msg("", "B")],
                                [msg("yo", "A")], [msg("hey", "B"), msg("you", "B")]]},
        "a-conv": {"messages": [[msg("one", "A")], [msg("two", "B")]]},
        "c-conv": {"messages": [[msg("alone", "A")]]},
    }
    (tmp_path / "dataset.json").write_text(json.dumps(corpus))
    monkeypatch.setattr(formats.importlib.util, "find_spec",
                        lambda name: type("Spec", (), {"submodule_search_locations": [str(tmp_path)]})())
    got = [(c.group, turns(c)) for c in read_chitchat()]
    assert got == [("a-conv", [("user", "one"), ("output", "two")]),
                   ("b-conv", [("user", "yo"), ("output", "hey you")])]  # "hi there" -> "" -> "yo": no pair
