"""The evaluation harness on tiny random models (no Ray): injection, the live tool, scoring."""

import math

import numpy as np
import pytest

from conftest import make_model
from ms_ray.data.skills import SEQUENTIAL_STREAMS, TASKS, TOOL_DELAY, generate_examples, sequential_text, to_sequential
from ms_ray.evaluation.harness import Layout, evaluate, layout_of, run_episodes, score, summarize

N = 16  # 4 examples per task


@pytest.fixture(scope="module")
def examples(sch, encode):
    return generate_examples(N, 11, sch, encode)


@pytest.fixture(scope="module")
def seq_schema(tok):
    return SEQUENTIAL_STREAMS.bind(tok)


@pytest.fixture(scope="module")
def streams_model(sch, tok):
    return make_model(sch, len(tok))


@pytest.fixture(scope="module")
def seq_model(seq_schema, tok):
    return make_model(seq_schema, len(tok))


def test_the_sequential_rendering_is_the_same_example_on_one_stream(examples, sch, seq_schema, encode, tok):
    for ex in examples:
        seq = to_sequential(ex, seq_schema, encode)
        assert (seq.id, seq.group, seq.source) == (ex.id, ex.group, ex.source)  # same split
        assert seq.rows.shape == (len(ex.meta["sequential"]), 1)
        assert tok.decode(seq.rows[:, 0].tolist()) == sequential_text(ex)
    with pytest.raises(ValueError, match="one-stream schema"):
        to_sequential(examples[0], sch, encode)


def perfect(layout, example, encode):
    """An episode whose rows are the reference (what a perfect model would decode), 1 ms per row."""
    ep = layout.episode("0", example, slack_rows=0)
    if layout.kind == "streams":
        ep.rows = example.rows.tolist()
    else:
        ep.rows = [[t] for t in encode(sequential_text(example))]
    ep.times = [i / 1000 for i in range(len(ep.rows))]
    return ep


def test_a_perfect_decode_scores_exact_with_the_reference_timing(examples, sch, seq_schema, tok, encode):
    streams, sequential = Layout(sch, tok), Layout(seq_schema, tok)
    for ex in examples:
        user_end = max(r for r, _ in ex.meta["inputs"]["user"])
        out = ex.rows[:, sch.index("output")]
        first, end = int(np.flatnonzero(out != sch.silence_id)[0]), int(np.flatnonzero(out == sch.end_ids()["output"])[0])
        rec = score(streams, perfect(streams, ex, encode), ex)
        assert rec["exact"] and rec["reference"] == rec["answer"] == ex.meta["parts"]["output"]
        assert (rec["ttft_rows"], rec["latency_rows"]) == (first - user_end, end - user_end)
        assert rec["latency_ms"] == pytest.approx(end - user_end)  # 1 ms per row

        seq = score(sequential, perfect(sequential, ex, encode), ex)
        full = encode(sequential_text(ex))
        prompt_end = len(encode(sequential_text({"user": ex.meta["parts"]["user"]}))) - 1
        label = full.index(tok.convert_tokens_to_ids("output:"))
        assert seq["exact"] and seq["answer"] == ex.meta["parts"]["output"]
        assert seq["ttft_rows"] == label + 1 - prompt_end and seq["latency_rows"] == len(full) - 1 - prompt_end
        if ex.meta["task"] == "wait_k":  # streams answer while the user is still typing; one stream cannot
            assert rec["ttft_rows"] < 0 < seq["ttft_rows"]


def test_user_cells_are_injected_at_their_rows_and_the_tool_answers_the_call(streams_model, examples, sch, tok):
    """A random model's own calls are noise, so the call is forced (pushed) on tool_call: the
    harness must run it and put the result on the tool stream TOOL_DELAY rows after it."""
    layout = Layout(sch, tok)
    ex = next(e for e in examples if e.meta["task"] == "tool_call")
    ep = layout.episode("0", ex, slack_rows=4)
    silence = sch.silence_id
    call = [silence] * 6 + tok.convert_tokens_to_ids(["mul", "6", "7"]) + [silence] * 8  # rows 6-8
    ep.pushes.setdefault(0, []).extend([("tool_call", call), ("output", [silence] * 13)])  # no early end
    run_episodes(streams_model, [ep], batch_sessions=1)
    rows = np.asarray(ep.rows)
    user = sch.index("user")
    for r, t in ex.meta["inputs"]["user"]:
        assert rows[r, user] == t
    finished = [(c["call"], c["result"], c["result_row"]) for c in ep.tool if "result" in c]
    assert finished == [("mul 6 7", "42", 8 + TOOL_DELAY)]
    assert rows[8 + TOOL_DELAY, sch.index("tool")] == tok.convert_tokens_to_ids("42")
    assert len(ep.times) == len(ep.rows) and ep.times == sorted(ep.times)


def test_the_sequential_model_gets_the_tool_result_after_its_tool_label(seq_model, examples, seq_schema, tok, encode):
    layout = Layout(seq_schema, tok)
    ex = next(e for e in examples if e.meta["task"] == "tool_call")
    ep = layout.episode("0", ex, slack_rows=4)
    forced = encode(" tool_call: mul 6 7 tool:")
    ep.pushes[ep.user_end + 1] = [("text", forced)]  # as if the model had written them
    run_episodes(seq_model, [ep], batch_sessions=1)
    col = [r[0] for r in ep.rows]
    tool_label = ep.user_end + len(forced)
    assert col[tool_label] == tok.convert_tokens_to_ids("tool:")
    assert col[tool_label + 1] == tok.convert_tokens_to_ids("42")
    assert ep.tool[0]["call"] == "mul 6 7" and ep.tool[0]["result_row"] == tool_label + 1


def test_random_models_score_low_and_the_summary_covers_every_task(streams_model, seq_model, examples, tok):
    for model in (streams_model, seq_model):
        records = evaluate(model, tok, examples, batch_sessions=3, slack_rows=2)
        assert [r["id"] for r in records] == [e.id for e in examples]
        summary = summarize(records)
        assert list(summary) == [*TASKS, "all"] and summary["all"]["n"] == N
        assert summary["all"]["accuracy"] <= 0.25
        assert math.isnan(summary["wait_k"]["tool_used"]) and not math.isnan(summary["tool_call"]["tool_used"])
        stopped = [r for r in records if "reaction_exact" in r]
        assert all(r["task"] == "count_stop" for r in stopped)


def test_a_model_that_is_not_a_skills_model_is_refused(model):
    with pytest.raises(ValueError, match="not a skills model"):
        layout_of(model.schema)


def test_progress_counts_finished_examples_and_ends_with_a_summary_line(streams_model, examples, tok, capsys):
    seen = []
    run_episodes(streams_model, [Layout(streams_model.schema, tok).episode(str(i), ex, 2) for i, ex in enumerate(examples)],
                 batch_sessions=3, progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == N and max(seen) == N  # monotone, all done at the end
    records = evaluate(streams_model, tok, examples[:4], batch_sessions=2, slack_rows=2, progress=True)
    captured = capsys.readouterr()
    assert len(records) == 4 and captured.out == ""  # progress goes to stderr; stdout stays the report's
    assert captured.err.splitlines()[-1].startswith("eval (streams): 4/4 examples | ") and "done in" in captured.err
