import numpy as np
import pytest

from ms_ray.config import parse_policy
from ms_ray.data.convert import convert
from ms_ray.data.tables import Conversation, Dropped, Turn, stream_tokens


@pytest.fixture
def encode(tokenizer):
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def conv(*turns):
    return Conversation("test", "g1", [Turn(s, t) for s, t in turns], "chat.jsonl", 7)


def rows_of(rows, col):
    return [r for r in range(rows.shape[0]) if rows[r, col] != 0]  # silence id is 0 here


def test_parse_policy():
    assert parse_policy("after_input") == ("after_input", None)
    assert parse_policy("wait_k( 3 )") == ("wait_k", 3)
    with pytest.raises(ValueError, match="k must be >= 2"):
        parse_policy("wait_k(1)")
    with pytest.raises(ValueError, match="unknown conversion policy 'wait'"):
        parse_policy("wait")


def test_after_input_starts_two_rows_after_the_last_input(bound, encode):
    ex = convert(conv(("user", "how are you"), ("output", "yes")), bound, encode, "after_input", "x#1")
    user, output = rows_of(ex.rows, 0), rows_of(ex.rows, 2)
    assert user == [0, 1, 2]
    assert output == [4, 5]  # 'yes' then <|end|>: row 2 + 2
    assert stream_tokens(ex.rows, bound, "output") == encode("yes") + [bound.end_ids()["output"]]
    assert ex.policy == "after_input" and ex.meta["turns"] == [["user", 0, 3], ["output", 4, 6]]
    assert ex.meta["origin"] == "chat.jsonl:7"


@pytest.mark.parametrize("k", [2, 3, 5])
def test_wait_k_rows_line_up(bound, encode, k):
    ex = convert(conv(("user", "one two three four five six"), ("output", "hello there how are")),
                 bound, encode, f"wait_k({k})", "x#2")
    user, output = rows_of(ex.rows, 0), rows_of(ex.rows, 2)
    assert user == list(range(6))
    assert output == [k + j for j in range(5)]  # token j of the reply at row k + j (4 words + end)


def test_multi_turn_turns_follow_each_other(bound, encode):
    ex = convert(conv(("user", "hello"), ("output", "yes no"), ("user", "maybe"), ("output", "six")),
                 bound, encode, "wait_k(2)", "x#3")
    assert ex.meta["turns"] == [["user", 0, 1], ["output", 2, 5], ["user", 5, 6], ["output", 7, 9]]
    after = convert(conv(("user", "hello"), ("output", "yes no"), ("user", "maybe"), ("output", "six")),
                    bound, encode, "after_input", "x#4")
    assert after.meta["turns"] == [["user", 0, 1], ["output", 2, 5], ["user", 5, 6], ["output", 7, 9]]


@pytest.mark.parametrize("policy", ["after_input", "wait_k(2)"])
def test_session_timing_puts_silence_before_questions_and_after_replies(bound, encode, policy):
    """With a session, a conversation is timed like a live one: silence before the first question
    and between a reply and the next question, then after the last reply; each reply keeps its
    own timing relative to its question. Drawn from the example id: the same id, the same rows."""
    from ms_ray.config import SkillSessionConfig

    talk = conv(("user", "hello"), ("output", "yes no"), ("user", "maybe"), ("output", "six"))
    plain = convert(talk, bound, encode, policy, "x#6")
    shape = SkillSessionConfig(lead_zero=0.0, lead_silence=(3, 9), gap=(2, 6))
    timed = [convert(talk, bound, encode, policy, f"x#{i}", shape) for i in range(20)]
    assert convert(talk, bound, encode, policy, "x#0", shape).meta == timed[0].meta
    for ex in timed:
        (u1, s1, e1), (o1, os1, oe1), (u2, s2, e2), (o2, os2, oe2) = ex.meta["turns"]
        assert 3 <= s1 <= 9 and 2 <= s2 - oe1 <= 6  # the leading silence, the gap after a reply
        reply_lags = (plain.meta["turns"][1][1], plain.meta["turns"][3][1] - plain.meta["turns"][2][1])
        assert (os1 - s1, os2 - s2) == reply_lags
        assert 2 <= ex.num_rows - oe2 <= 6 and not ex.rows[oe2:].any()  # silence after the last reply
    assert len({ex.meta["turns"][0][1] for ex in timed}) > 1  # the pauses vary


def test_bad_turns_are_dropped_with_the_line(bound, encode):
    d = convert(conv(("user", "hello"), ("tool_call", "x")), bound, encode, "after_input", "x#5")
    assert isinstance(d, Dropped) and d.line == 7 and "turns[1]: stream 'tool_call' is not in the schema" in d.reason
    d = convert(conv(("user", "   ")), bound, encode, "after_input", "x#6")
    assert isinstance(d, Dropped) and "turns[0] (user): text encodes to no tokens" in d.reason
    assert str(d).startswith("chat.jsonl:7: ")
    d = convert(conv(), bound, encode, "after_input", "x#7")
    assert isinstance(d, Dropped) and "no turns" in d.reason
    with pytest.raises(ValueError, match="teacher policy needs an endpoint"):
        convert(conv(("user", "hello")), bound, encode, "teacher", "x#8")


def test_tables_are_int32_with_silence(bound, encode):
    ex = convert(conv(("user", "hello"), ("output", "yes")), bound, encode, "after_input", "x#9")
    assert ex.rows.dtype == np.int32 and ex.rows.shape == (4, 3)
    assert (ex.rows[:, 1] == bound.silence_id).all()  # think was never written


@pytest.mark.parametrize("fmt, line", [
    ("openai", {"messages": [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "What is 12 + 30?"},
                             {"role": "assistant", "content": "It is 42, my friend."}]}),
    ("alpaca", {"instruction": "Add the numbers.", "input": "12 and 30", "output": "42 in total."}),
    ("sharegpt", {"conversations": [{"from": "human", "value": "Hi there!"},
                                    {"from": "gpt", "value": "Hello, naïve café."}]}),
])
@pytest.mark.parametrize("policy", ["after_input", "wait_k(3)"])
def test_jsonl_to_tables_to_tokens_to_text_round_trip(tmp_path, fmt, line, policy):
    """JSONL -> Conversation -> timed table -> tokens -> text gives back every message exactly."""
    import json

    from ms_ray.core.streams import StreamSchema, StreamSpec
    from ms_ray.data.formats import read_jsonl
    from ms_ray.data.tokenizer import train_bpe

    schema = StreamSchema((StreamSpec("system", "input"), StreamSpec("user", "input", end_token="<|eou|>"),
                           StreamSpec("output", "output", end_token="<|end|>")))
    tok = train_bpe(["What is 12 + 30? It is 42, my friend. Add the numbers. Hello there"] * 20, schema, vocab_size=320)
    bound = schema.bind(tok)
    path = tmp_path / f"{fmt}.jsonl"
    path.write_text(json.dumps(line) + "\n")
    (conversation,) = list(read_jsonl(path, bound, fmt="auto"))
    ex = convert(conversation, bound, lambda t: tok(t, add_special_tokens=False)["input_ids"], policy, "x#1")
    for (stream, start, end), turn in zip(ex.meta["turns"], conversation.turns):
        cells = ex.rows[start:end, bound.index(stream)].tolist()
        end_id = bound.end_ids()[stream] if stream in bound.end_ids() else None
        if end_id is not None:
            assert cells[-1] == end_id
            cells = cells[:-1]
        assert tok.decode(cells) == turn.text
    assert [t.stream for t in conversation.turns][-1] == "output"
