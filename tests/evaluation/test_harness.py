"""The one skill evaluation on tiny random models (no Ray): injection, the tool live or scripted,
teacher forcing, scoring, records. (The merged tests of the former train/evaluate.py are here.)"""

import json
import math
import pickle

import numpy as np
import pytest
from conftest import make_model

from ms_ray.config import EvalConfig, SkillEvalConfig
from ms_ray.core.streams import StreamSchema, StreamSpec
from ms_ray.data.skills import SEQUENTIAL_STREAMS, TASKS, TOOL_DELAY, generate_examples, sequential_text, to_sequential
from ms_ray.evaluation.harness import (
    SUMMARY,
    Layout,
    evaluate,
    held_out_examples,
    is_skills_model,
    layout_of,
    run_episodes,
    score,
    summarize,
)

N = 16  # 4 examples per task
TIMING = ("start_ms_after_user", "end_ms_after_user")  # wall time: differs from run to run


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


@pytest.fixture(scope="module")
def models(streams_model, seq_model):
    return {"streams": streams_model, "sequential": seq_model}


def reference_timing(example, schema, encode, tok, layout: str) -> tuple[int, int]:
    """(start, end) rows after the user's last token, straight from the reference."""
    if layout == "streams":
        user_end = max(r for r, _ in example.meta["inputs"]["user"])
        out = example.rows[:, schema.index("output")]
        first = int(np.flatnonzero(out != schema.silence_id)[0])  # the answer stream, not think / tool_call
        return first - user_end, int(np.flatnonzero(out == schema.end_ids()["output"])[0]) - user_end
    full = encode(sequential_text(example))
    user_end = len(encode(sequential_text({"user": example.meta["parts"]["user"]}))) - 1
    return full.index(tok.convert_tokens_to_ids("output:")) + 1 - user_end, len(full) - 1 - user_end


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
        rec = score(streams, perfect(streams, ex, encode), ex)
        start, end = reference_timing(ex, sch, encode, tok, "streams")
        assert rec["exact"] and rec["reference"] == rec["answer"] == ex.meta["parts"]["output"]
        assert (rec["start_rows_after_user"], rec["end_rows_after_user"]) == (start, end)
        assert rec["end_ms_after_user"] == pytest.approx(end)  # 1 ms per row

        seq = score(sequential, perfect(sequential, ex, encode), ex)
        assert seq["exact"] and seq["answer"] == ex.meta["parts"]["output"]
        assert (seq["start_rows_after_user"], seq["end_rows_after_user"]) == reference_timing(ex, sch, encode, tok,
                                                                                               "sequential")
        if ex.meta["task"] == "wait_k":  # streams answer while the user is still typing; one stream cannot
            assert rec["start_rows_after_user"] < 0 < seq["start_rows_after_user"]


@pytest.mark.parametrize("layout", ["streams", "sequential"])
def test_teacher_forcing_reproduces_the_reference_timing_with_either_tool(layout, models, examples, sch, tok,
                                                                          encode):
    by_tool = {tool: evaluate(models[layout], tok, examples, batch_sessions=5, tool=tool, force_outputs=True)
               for tool in ("live", "scripted")}
    for tool, records in by_tool.items():
        for ex, rec in zip(examples, records):
            assert (rec["id"], rec["layout"], rec["tool"], rec["exact"]) == (ex.id, layout, tool, True)
            start, end = reference_timing(ex, sch, encode, tok, layout)
            assert (rec["start_rows_after_user"], rec["end_rows_after_user"]) == (start, end), ex.id
            if ex.meta["task"] == "tool_call":
                assert [(c["call"], c["result"]) for c in rec["tool_calls"]] == [(ex.meta["parts"]["tool_call"],
                                                                                  ex.meta["parts"]["tool"])]
                assert rec["tool_used"] and rec["talk_while_tool"] == (layout == "streams")
            if "reaction_exact" in rec:
                assert rec["reaction_exact"]
        summary = summarize(records)
        assert summary["all"]["accuracy"] == 1.0 and summary["all"]["no_answer"] == 0.0
    strip = [[{k: v for k, v in r.items() if k not in (*TIMING, "tool")} for r in recs] for recs in by_tool.values()]
    assert strip[0] == strip[1]  # a correct call gets the reference's answer at the reference's row either way


def test_teacher_forcing_rebuilds_the_reference_rows(streams_model, seq_model, examples, sch, seq_schema, tok, encode):
    streams, sequential = Layout(sch, tok, force_outputs=True), Layout(seq_schema, tok, force_outputs=True)
    eps = [streams.episode(str(i), ex, 4) for i, ex in enumerate(examples)]
    seq = [sequential.episode(str(i), ex, 4) for i, ex in enumerate(examples)]
    run_episodes(streams_model, eps, batch_sessions=16)
    run_episodes(seq_model, seq, batch_sessions=3)
    for ex, ep, sq in zip(examples, eps, seq):
        end = int(np.flatnonzero(ex.rows[:, sch.index("output")] == sch.end_ids()["output"])[0])
        np.testing.assert_array_equal(np.asarray(ep.rows), ex.rows[: end + 1])  # the session ends on <|end|>
        assert [r[0] for r in sq.rows] == encode(sequential_text(ex))


def test_user_cells_are_injected_at_their_rows_and_the_live_tool_answers_the_call(streams_model, examples, sch, tok):
    """A random model's own calls are noise, so a wrong call is forced (pushed) on tool_call: the
    live tool runs it and puts its result on the tool stream TOOL_DELAY rows after it; the
    scripted tool puts the reference's result at the reference's rows whatever was called."""
    ex = next(e for e in examples if e.meta["task"] == "tool_call")
    silence, a, b = sch.silence_id, *ex.meta["parts"]["tool_call"].split()[1:]
    call = [silence] * 6 + tok.convert_tokens_to_ids(["mul", "2", "3"]) + [silence] * 8  # rows 6-8
    eps = {}
    for tool in ("live", "scripted"):
        ep = eps[tool] = Layout(sch, tok, tool=tool).episode("0", ex, slack_rows=4)
        ep.pushes.setdefault(0, []).extend([("tool_call", call), ("output", [silence] * 13)])  # no early end
        run_episodes(streams_model, [ep], batch_sessions=1)
        rows = np.asarray(ep.rows)
        for stream in ("user", "tool") if tool == "scripted" else ("user",):
            for r, t in ex.meta["inputs"][stream]:
                assert rows[r, sch.index(stream)] == t
        assert len(ep.times) == len(ep.rows) and ep.times == sorted(ep.times)
    live = eps["live"]
    done = {tool: [(c["call"], c["result"], c["result_row"]) for c in ep.tool if "result" in c]  # finished calls
            for tool, ep in eps.items()}
    assert done["live"][:1] == [("mul 2 3", "6", 8 + TOOL_DELAY)]
    assert np.asarray(live.rows)[8 + TOOL_DELAY, sch.index("tool")] == tok.convert_tokens_to_ids("6")
    tool_row = min(r for r, _ in ex.meta["inputs"]["tool"])
    assert done["scripted"][:1] == [("mul 2 3", str(int(a) * int(b)), tool_row)]


def test_the_sequential_model_gets_the_tool_result_after_its_tool_label(seq_model, examples, seq_schema, tok, encode):
    ex = next(e for e in examples if e.meta["task"] == "tool_call")
    for tool, result in (("live", "6"), ("scripted", ex.meta["parts"]["tool"])):
        ep = Layout(seq_schema, tok, tool=tool).episode("0", ex, slack_rows=4)
        forced = encode(" tool_call: mul 2 3 tool:")
        ep.pushes[ep.user_end + 1] = [("text", forced)]  # as if the model had written them
        run_episodes(seq_model, [ep], batch_sessions=1)
        col = [r[0] for r in ep.rows]
        tool_label = ep.user_end + len(forced)
        assert col[tool_label] == tok.convert_tokens_to_ids("tool:")
        assert col[tool_label + 1] == tok.convert_tokens_to_ids(result)
        assert (ep.tool[0]["call"], ep.tool[0]["result"], ep.tool[0]["result_row"]) == ("mul 2 3", result,
                                                                                         tool_label + 1)


def test_random_models_score_low_and_records_are_plain(models, examples, tok):
    for layout, model in models.items():
        records = evaluate(model, tok, examples, batch_sessions=3, slack_rows=2)
        assert [r["id"] for r in records] == [e.id for e in examples]
        assert pickle.loads(pickle.dumps(records)) == records  # the training loop all_gathers them
        assert [json.loads(line) for line in map(json.dumps, records)] == records  # records-<model>.jsonl
        summary = summarize(records)
        assert list(summary) == [*TASKS, "all"] and summary["all"]["n"] == N
        assert summary["all"]["accuracy"] <= 0.25 and set(summary["all"]) == set(SUMMARY)
        assert math.isnan(summary["wait_k"]["tool_used"]) and not math.isnan(summary["tool_call"]["tool_used"])
        assert all(r["task"] == "count_stop" for r in records if "reaction_exact" in r)
        assert all(r["end_rows_after_user"] is None for r in records if not r["exact"])


def test_batch_size_changes_nothing_but_the_clock(streams_model, examples, tok):
    one = evaluate(streams_model, tok, examples[:8], batch_sessions=1, slack_rows=2)
    many = evaluate(streams_model, tok, examples[:8], batch_sessions=8, slack_rows=2)
    drop = [[{k: v for k, v in r.items() if k not in TIMING} for r in recs] for recs in (one, many)]
    assert drop[0] == drop[1]


def test_restores_training_mode_and_takes_no_examples(streams_model, examples, tok):
    streams_model.train()
    try:
        assert evaluate(streams_model, tok, examples[:2], slack_rows=1)
        assert streams_model.training
    finally:
        streams_model.eval()
    assert evaluate(streams_model, tok, []) == []  # a rank with no examples gathers nothing
    with pytest.raises(ValueError, match="tool must be one of"):
        evaluate(streams_model, tok, examples[:1], tool="fake")


def test_only_skills_models_are_scored(model, sch, seq_schema):
    assert is_skills_model(sch) and is_skills_model(seq_schema) and not is_skills_model(model.schema)
    assert not is_skills_model(StreamSchema((StreamSpec("chat", "output", end_token="<|end|>"),)))
    assert (layout_of(sch), layout_of(seq_schema)) == ("streams", "sequential")
    with pytest.raises(ValueError, match="not a skills model"):
        layout_of(model.schema)


def test_held_out_examples_follow_the_config(tok):
    a = held_out_examples(SkillEvalConfig(examples_per_task=2, tasks=["tool_call", "wait_k"]), tok)
    assert [e.meta["task"] for e in a] == ["tool_call", "wait_k"] * 2
    b = held_out_examples(EvalConfig(examples_per_task=2, tasks=["tool_call", "wait_k"]), tok)
    assert [e.id for e in a] == [e.id for e in b]  # training and `ms-ray eval` draw the same examples
    assert len(held_out_examples(SkillEvalConfig(examples_per_task=1), tok)) == len(TASKS)


def test_progress_counts_finished_examples_and_ends_with_a_summary_line(streams_model, examples, tok, capsys):
    seen = []
    layout = Layout(streams_model.schema, tok)
    run_episodes(streams_model, [layout.episode(str(i), ex, 2) for i, ex in enumerate(examples)],
                 batch_sessions=3, progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == N and max(seen) == N  # monotone, all done at the end
    records = evaluate(streams_model, tok, examples[:4], batch_sessions=2, slack_rows=2, progress=True)
    captured = capsys.readouterr()
    assert len(records) == 4 and captured.out == ""  # progress goes to stderr; stdout stays the report's
    assert captured.err.splitlines()[-1].startswith("eval (streams): 4/4 examples | ") and "done in" in captured.err
