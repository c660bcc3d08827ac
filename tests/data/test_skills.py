import random

import numpy as np
import pytest

from ms_ray.core.streams import SchemaError
from ms_ray.data.skills import (
    DICTIONARY,
    SKILL_STREAMS,
    TASKS,
    generate,
    generate_examples,
    sequential_text,
    sequential_turn,
    vocabulary,
)
from ms_ray.data.tables import Example, stream_tokens

N = 200  # 50 examples per task: enough to see both count_stop variants, cheap to build


@pytest.fixture(scope="module")
def examples(sch, encode):
    return generate_examples(N, 7, sch, encode)


def by_task(examples, task):
    out = [e for e in examples if e.meta["task"] == task]
    assert out, task
    return out


def cells(ex, sch, tok, stream):
    """[(row, word)] of the non-silent cells of one stream."""
    col = ex.rows[:, sch.index(stream)]
    return [(r, tok.convert_ids_to_tokens(int(t))) for r, t in enumerate(col) if t != sch.silence_id]


def test_vocabulary_is_fixed_and_one_token_per_word(tok, encode):
    words = vocabulary()
    assert words == vocabulary() and len(set(words)) == len(words)
    assert {str(n) for n in range(145)} <= set(words)  # sums, counts and all 2..12 products
    assert {str(a * b) for a in range(2, 13) for b in range(2, 13)} <= set(words)
    for w in words:
        ids = encode(w)
        assert len(ids) == 1 and ids[0] != tok.unk_token_id, w
    assert len(tok) == len(words) + len(SKILL_STREAMS.special_tokens) + 1  # + <|unk|>


def test_deterministic_for_a_seed(sch, encode, examples):
    again = generate_examples(N, 7, sch, encode)
    assert [e.id for e in again] == [e.id for e in examples]
    assert all(np.array_equal(a.rows, b.rows) and a.meta == b.meta for a, b in zip(again, examples))
    other = generate_examples(N, 8, sch, encode)
    assert [e.id for e in other] != [e.id for e in examples]
    assert any(a.rows.shape != b.rows.shape or not np.array_equal(a.rows, b.rows) for a, b in zip(other, examples))
    # example i does not depend on how many are generated
    assert np.array_equal(generate_examples(3, 7, sch, encode)[2].rows, examples[2].rows)


def test_ids_groups_and_round_robin(sch, encode, examples):
    assert [e.meta["task"] for e in examples[:8]] == list(TASKS) * 2
    for i, e in enumerate(examples):
        task = TASKS[i % 4]
        assert e.id == f"skills/{task}/7/{i}" and e.source == f"skills/{task}" and e.policy == "task"
        assert e.group == f"{task}-7-{i}"
    assert len({e.group for e in examples}) == len(examples)
    only = generate_examples(6, 1, sch, encode, tasks=("tool_call",))
    assert {e.meta["task"] for e in only} == {"tool_call"}


def test_tables_have_five_streams_and_only_vocabulary_tokens(tok, sch, examples):
    allowed = set(tok.convert_tokens_to_ids(vocabulary())) | {sch.silence_id, sch.end_ids()["output"]}
    for e in examples:
        assert e.rows.ndim == 2 and e.rows.shape[1] == 5 == sch.num_streams
        assert e.rows.dtype == np.int32
        assert set(np.unique(e.rows).tolist()) <= allowed, e.id
        assert not (e.rows[-1] == sch.silence_id).all()  # no trailing empty rows


def test_meta_answer_and_inputs_reproduce_the_table(sch, examples):
    for e in examples:
        m = e.meta
        assert m["answer"] == stream_tokens(e.rows, sch, "output") and m["answer_stream"] == "output"
        assert m["answer"][-1] == sch.end_ids()["output"] and m["answer"].count(sch.end_ids()["output"]) == 1
        assert set(m["inputs"]) == {"user", "tool"}
        rebuilt = np.full_like(e.rows, sch.silence_id)
        for stream, placed in m["inputs"].items():
            for r, t in placed:
                rebuilt[r, sch.index(stream)] = t
        for stream in ("user", "tool"):
            c = sch.index(stream)
            assert np.array_equal(rebuilt[:, c], e.rows[:, c]), (e.id, stream)
        input_rows = [r for placed in m["inputs"].values() for r, _ in placed]
        assert m["input_end_row"] == max(input_rows)
        out_rows = np.nonzero(e.rows[:, sch.index("output")] != sch.silence_id)[0]
        assert m["first_output_row"] == out_rows[0]


def test_a_single_example_is_a_one_task_session_from_row_0(sch, tok, examples):
    """meta["tasks"]: the one description the evaluation scores, for single tasks as for sessions."""
    end = sch.end_ids()["output"]
    for e in examples:
        assert e.meta["kind"] == "task" and len(e.meta["tasks"]) == 1
        t = e.meta["tasks"][0]
        user_rows = [r for r, _ in e.meta["inputs"]["user"]]
        assert (t["task"], t["condition"], t["start"], t["window"]) == (e.meta["task"], "row0", 0, [0, e.num_rows])
        assert t["user_end"] == max(user_rows) and min(user_rows) == 0
        assert t["answer"] == e.meta["answer"] and t["parts"] == e.meta["parts"]
        assert e.rows[t["end_row"], sch.index("output")] == end and t["end_row"] == e.num_rows - 1
        assert t["stopped"] == (len(user_rows) == 5 and e.meta["task"] == "count_stop") and not t["interrupted"]
        assert sequential_turn(t) == sequential_text(e)  # nothing was interrupted: the turn is the example
        assert tok.decode(t["answer"]) == t["parts"]["output"]
    assert any(e.meta["tasks"][0]["stopped"] for e in examples)


def test_wait_k_translates_word_i_at_row_i_plus_2(sch, tok, examples):
    for e in by_task(examples, "wait_k"):
        user, out = cells(e, sch, tok, "user"), cells(e, sch, tok, "output")
        assert 4 <= len(user) <= 10 and [r for r, _ in user] == list(range(len(user)))
        assert out == [(r + 2, DICTIONARY[w]) for r, w in user] + [(len(user) + 2, "<|end|>")]
        assert e.num_rows == len(user) + 3


def test_running_sum_think_totals_two_rows_after_each_digit(sch, tok, examples):
    for e in by_task(examples, "running_sum"):
        user = cells(e, sch, tok, "user")
        words = [w for _, w in user]
        assert words[-1] == "=" and words[1:-1:2] == ["+"] * (len(words) // 2 - 1)
        digits = [(r, int(w)) for r, w in user[0::2]]
        assert 3 <= len(digits) <= 8 and all(0 <= d <= 9 for _, d in digits)
        totals = np.cumsum([d for _, d in digits]).tolist()
        assert cells(e, sch, tok, "think") == [(r + 2, str(t)) for (r, _), t in zip(digits, totals)]
        eq_row = user[-1][0]
        assert cells(e, sch, tok, "output") == [(eq_row + 2, str(totals[-1])), (eq_row + 3, "<|end|>")]


def test_count_stop_counts_and_ends_two_rows_after_stop(sch, tok, examples):
    stopped = 0
    for e in by_task(examples, "count_stop"):
        user, out = cells(e, sch, tok, "user"), cells(e, sch, tok, "output")
        assert [w for _, w in user[:4:2]] == ["count", "to"]
        a, b, cmd_row = int(user[1][1]), int(user[3][1]), user[3][0]
        assert 0 <= a < b <= 99
        numbers = out[:-1]
        assert [r for r, _ in numbers] == list(range(cmd_row + 2, cmd_row + 2 + len(numbers)))
        assert [w for _, w in numbers] == [str(k) for k in range(a, a + len(numbers))]
        end_row = out[-1][0]
        assert out[-1][1] == "<|end|>" and end_row == numbers[-1][0] + 1
        if len(user) == 5:  # interrupted: end exactly two rows after `stop`, before the count is done
            stopped += 1
            stop_row = user[4][0]
            assert user[4][1] == "stop" and stop_row >= cmd_row + 2  # said once the count has begun
            assert end_row == stop_row + 2 and int(numbers[-1][1]) < b
        else:
            assert len(user) == 4 and numbers[-1][1] == str(b)
    total = len(by_task(examples, "count_stop"))
    assert 0.3 * total <= stopped <= 0.7 * total  # about half


def test_tool_call_result_three_rows_after_call_and_repeated(sch, tok, examples):
    for e in by_task(examples, "tool_call"):
        user, call = cells(e, sch, tok, "user"), cells(e, sch, tok, "tool_call")
        tool, out = cells(e, sch, tok, "tool"), cells(e, sch, tok, "output")
        a, b = int(user[2][1]), int(user[4][1])
        assert [w for _, w in user] == ["what", "is", str(a), "times", str(b)] and 2 <= a <= 12 and 2 <= b <= 12
        start = user[-1][0] + 2
        assert call == [(start, "mul"), (start + 1, str(a)), (start + 2, str(b))]
        assert tool == [(call[-1][0] + 3, str(a * b))]
        assert out == [(start, "let"), (start + 1, "me"), (start + 2, "check"),
                       (tool[0][0] + 2, str(a * b)), (tool[0][0] + 3, "<|end|>")]
        assert cells(e, sch, tok, "think") == []


def dependencies(e, sch, tok):
    """For every non-silent cell of every output stream: the row of the latest input cell it
    depends on, read off the table itself (not from the generator)."""
    task, deps = e.meta["task"], {}
    user = cells(e, sch, tok, "user")
    out = cells(e, sch, tok, "output")
    if task == "wait_k":
        for (r, _), (ur, _) in zip(out[:-1], user):
            deps[("output", r)] = ur
        deps[("output", out[-1][0])] = user[-1][0] + 1  # the first silent row says the user is done
    elif task == "running_sum":
        digit_rows = [r for r, w in user if w.isdigit()]
        for (r, _), dr in zip(cells(e, sch, tok, "think"), digit_rows):
            deps[("think", r)] = dr
        for r, _ in out:
            deps[("output", r)] = user[-1][0]  # needs `=`
    elif task == "count_stop":
        for r, _ in out:
            deps[("output", r)] = user[3][0]
        if len(user) == 5:
            deps[("output", out[-1][0])] = user[4][0]  # the end reacts to `stop`
    else:  # tool_call
        for stream in ("tool_call", "output"):
            for r, _ in cells(e, sch, tok, stream):
                deps[(stream, r)] = user[-1][0]
        tool_row = cells(e, sch, tok, "tool")[0][0]
        for r, _ in out[-2:]:
            deps[("output", r)] = tool_row  # the repeated product and the end wait for the tool
    return deps


def test_no_output_reacts_to_an_input_less_than_two_rows_earlier(sch, tok, examples):
    for e in examples:
        deps = dependencies(e, sch, tok)
        for stream in ("think", "output", "tool_call"):
            for r, _ in cells(e, sch, tok, stream):
                assert (stream, r) in deps, (e.id, stream, r)  # every output cell is accounted for
                assert r - deps[(stream, r)] >= 2, (e.id, stream, r, deps[(stream, r)])


def test_sequential_text_has_the_same_answer(sch, tok, encode, examples):
    for e in examples:
        text = sequential_text(e)
        assert e.meta["sequential"] == encode(text)
        assert text.startswith("user: ")
        answer_words = tok.convert_ids_to_tokens(e.meta["answer"])
        assert text.endswith("output: " + " ".join(answer_words))
        labels = [w for w in text.split() if w.endswith(":")]
        assert labels == [f"{s}:" for s in ("user", "think", "tool_call", "tool", "output") if f"{s}:" in labels]
        if e.meta["task"] == "running_sum":
            assert " think: " + " ".join(w for _, w in cells(e, sch, tok, "think")) + " output:" in text
    assert sequential_text({"output": "7 <|end|>", "user": "3 + 4 ="}) == "user: 3 + 4 = output: 7 <|end|>"
    with pytest.raises(TypeError):
        sequential_text(["user"])


def test_multi_token_words_are_timed_from_their_last_token(tok, sch):
    """Numbers split into digits (as BPE tokenizers do): each reply starts two rows after the
    LAST token of what it depends on, and streams never overlap."""

    def encode(text):
        return tok.convert_tokens_to_ids([p for w in text.split() for p in (list(w) if w.isdigit() else [w])])

    def digits(n):
        return list(str(n))

    exs = generate_examples(80, 3, sch, encode)
    for e in exs:
        user, out = cells(e, sch, tok, "user"), cells(e, sch, tok, "output")
        assert e.meta["answer"] == stream_tokens(e.rows, sch, "output")
        if e.meta["task"] == "running_sum":
            total, expected = 0, []
            for r, w in user[0::2]:  # digits sit at even positions, `=` is last (odd)
                total += int(w)
                expected += [(r + 2 + i, d) for i, d in enumerate(digits(total))]
            assert cells(e, sch, tok, "think") == expected
            eq = user[-1][0]
            answer = [(eq + 2 + i, d) for i, d in enumerate(digits(total))]
            assert out == answer + [(eq + 2 + len(answer), "<|end|>")]
        elif e.meta["task"] == "tool_call":
            words = "".join(w if w.isdigit() else f" {w} " for _, w in user).split()
            a, b = int(words[2]), int(words[4])
            start = user[-1][0] + 2
            call = ["mul", *digits(a), *digits(b)]
            assert cells(e, sch, tok, "tool_call") == [(start + i, w) for i, w in enumerate(call)]
            first = start + len(call) - 1 + 3
            prod = digits(a * b)
            assert cells(e, sch, tok, "tool") == [(first + i, d) for i, d in enumerate(prod)]
            rep = first + len(prod) - 1 + 2
            assert out[3:] == [(rep + i, d) for i, d in enumerate(prod)] + [(rep + len(prod), "<|end|>")]
        elif e.meta["task"] == "count_stop":
            if user[-1][1] == "stop":
                assert out[-1] == (user[-1][0] + 2, "<|end|>") and user[-1][0] >= out[0][0]
            words = "".join(w if w.isdigit() else f" {w} " for _, w in user).split()
            a = int(words[1])
            full = "".join(str(k) for k in range(a, int(words[3]) + 1))
            written = "".join(w for _, w in out[:-1])
            # a prefix of the count that stops at a number boundary
            assert any(written == "".join(str(k) for k in range(a, m)) for m in range(a + 1, int(words[3]) + 2))
            assert full.startswith(written)
            assert [r for r, _ in out] == list(range(out[0][0], out[0][0] + len(out)))
        else:
            assert out[:-1] == [(r + 2, DICTIONARY[w]) for r, w in user]
    assert {e.meta["task"] for e in exs} == set(TASKS)


def test_bad_task_and_unbound_schema(sch, encode):
    with pytest.raises(ValueError, match="unknown skill task"):
        generate("juggle", random.Random(0), sch, encode)
    with pytest.raises(ValueError):
        generate_examples(2, 0, sch, encode, tasks=())
    with pytest.raises(SchemaError):
        generate("wait_k", random.Random(0), SKILL_STREAMS, encode)
    ex = generate("tool_call", random.Random(0), sch, encode)
    assert isinstance(ex, Example) and ex.id.startswith("skills/tool_call/")
    assert generate("tool_call", random.Random(0), sch, encode).id == ex.id  # drawn from the rng
