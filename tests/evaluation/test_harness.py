"""The one skill evaluation on tiny random models (no Ray): single tasks and sessions, injection, the
tool live or scripted, teacher forcing, the sequential turns, records. (Scoring alone: test_scoring.py.)"""

import json
import math
import pickle

import numpy as np
import pytest
from conftest import make_model
from test_scoring import reference_timing

from ms_ray.config import EvalConfig, SkillEvalConfig, SkillSessionConfig
from ms_ray.core.streams import StreamSchema, StreamSpec
from ms_ray.data.skill_sessions import CONDITIONS, targeted_sessions
from ms_ray.data.skills import SEQUENTIAL_STREAMS, TASKS, TOOL_DELAY, generate_examples, sequential_text, to_sequential
from ms_ray.evaluation.harness import (
    Layout,
    evaluate,
    held_out_examples,
    is_skills_model,
    layout_of,
    reference_tool,
    run_episodes,
)
from ms_ray.evaluation.scoring import SUMMARY, score_session, summarize

N = 16  # 4 examples per task
TIMING = ("start_ms_after_user", "end_ms_after_user")  # wall time: differs from run to run
CELLS = {f"{t}@{c}" for t in TASKS for c in CONDITIONS} - {"wait_k@mid_answer"}


@pytest.fixture(scope="module")
def examples(sch, encode):
    return generate_examples(N, 11, sch, encode)


@pytest.fixture(scope="module")
def sessions(sch, encode):
    return targeted_sessions(1, 21, sch, encode, SkillSessionConfig())  # one session per (task, condition)


@pytest.fixture(scope="module")
def short_sessions(sch, encode):
    """The same cells in shorter sessions (less leading silence, shorter gaps): cheaper to decode."""
    return targeted_sessions(1, 22, sch, encode, SkillSessionConfig(rows=64, lead_silence=(1, 6), gap=(1, 4)))


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


def test_the_sequential_rendering_is_the_same_example_on_one_stream(examples, sch, seq_schema, encode, tok):
    for ex in examples:
        seq = to_sequential(ex, seq_schema, encode)
        assert (seq.id, seq.group, seq.source) == (ex.id, ex.group, ex.source)  # same split
        assert seq.rows.shape == (len(ex.meta["sequential"]), 1)
        assert tok.decode(seq.rows[:, 0].tolist()) == sequential_text(ex)
    with pytest.raises(ValueError, match="one-stream schema"):
        to_sequential(examples[0], sch, encode)


@pytest.mark.parametrize("which", ["examples", "sessions"])
@pytest.mark.parametrize("layout", ["streams", "sequential"])
def test_teacher_forcing_reproduces_the_reference_timing_with_either_tool(layout, which, request, models, tok,
                                                                          encode):
    items = request.getfixturevalue(which)
    by_tool = {tool: evaluate(models[layout], tok, items, batch_sessions=16, tool=tool, force_outputs=True)
               for tool in ("live", "scripted")}
    kind = Layout(models[layout].schema, tok)
    tasks = [(ex, k, task) for ex in items for k, task in enumerate(ex.meta["tasks"])]
    for tool, records in by_tool.items():
        assert len(records) == len(tasks)
        for (ex, k, task), rec in zip(tasks, records):
            assert (rec["id"], rec["layout"], rec["tool"], rec["exact"]) == (f"{ex.id}#{k}", layout, tool, True)
            assert (rec["task"], rec["condition"]) == (task["task"], task["condition"])
            assert rec["quiet_after_end"] is (True if layout == "streams" else None), rec["id"]
            start, end = reference_timing(kind, ex, k, encode, tok)
            assert (rec["start_rows_after_user"], rec["end_rows_after_user"]) == (start, end), rec["id"]
            if task["task"] == "tool_call":
                assert [(c["call"], c["result"]) for c in rec["tool_calls"]] == [(task["parts"]["tool_call"],
                                                                                  task["parts"]["tool"])]
                assert rec["tool_used"] and rec["talk_while_tool"] == (layout == "streams")
            assert rec.get("reaction_exact", True)
        summary = summarize(records)
        assert summary["all"]["accuracy"] == 1.0 and summary["all"]["no_answer"] == 0.0
        assert summary["all"]["quiet_after_end"] == 1.0 if layout == "streams" else math.isnan(
            summary["all"]["quiet_after_end"])
        if which == "sessions":
            assert CELLS <= set(summary)  # every (task, condition) was decoded
    strip = [[{k: v for k, v in r.items() if k not in (*TIMING, "tool")} for r in recs] for recs in by_tool.values()]
    assert strip[0] == strip[1]  # a correct call gets the reference's answer at the reference's row either way


@pytest.mark.parametrize("which", ["examples", "short_sessions"])
def test_teacher_forcing_rebuilds_the_reference_rows(which, request, streams_model, seq_model, sch, seq_schema, tok):
    """Streams: the reference then silence for the slack rows; the end token stops nothing.
    Sequential: the transcript, every turn closed on its own end token."""
    items = request.getfixturevalue(which)
    streams, sequential = Layout(sch, tok, force_outputs=True), Layout(seq_schema, tok, force_outputs=True)
    eps = [streams.episode(str(i), ex, 4) for i, ex in enumerate(items)]
    seq = [sequential.episode(str(i), ex, 4) for i, ex in enumerate(items)]
    run_episodes(streams_model, eps, batch_sessions=16)
    run_episodes(seq_model, seq, batch_sessions=3)
    end = seq_schema.end_ids()["text"]
    for ex, ep, sq in zip(items, eps, seq):
        slack = np.full((4, sch.num_streams), sch.silence_id)
        np.testing.assert_array_equal(np.asarray(ep.rows), np.vstack([ex.rows, slack]))
        col = [r[0] for r in sq.rows]
        assert col == ex.meta["sequential"] and sq.done
        assert [t["closed_row"] for t in sq.turns] == [i for i, t in enumerate(col) if t == end]
        assert [t["user_end"] for t in ep.turns] == [t["user_end"] for t in ex.meta["tasks"]]


def test_user_cells_are_injected_at_their_rows_and_the_live_tool_answers_the_call(streams_model, examples, sch, tok):
    """A random model's own calls are noise, so a wrong call is forced (pushed) on tool_call: the
    live tool runs it and puts its result on the tool stream TOOL_DELAY rows after it; the
    scripted tool puts the reference's result at the reference's rows whatever was called."""
    ex = next(e for e in examples if e.meta["task"] == "tool_call")
    silence, a, b = sch.silence_id, *ex.meta["parts"]["tool_call"].split()[1:]
    call = [silence] * 6 + tok.convert_tokens_to_ids(["mul", "2", "3"]) + [silence] * 8  # rows 6-8
    eps = {}
    for tool in ("live", "scripted"):
        layout = Layout(sch, tok, tool=tool)
        ep = eps[tool] = layout.episode("0", ex, slack_rows=4)
        ep.reference_tool = reference_tool(ex, layout)  # what evaluate() sets: the scripted tool's answers
        ep.pushes.setdefault(0, []).append(("tool_call", call))
        run_episodes(streams_model, [ep], batch_sessions=1)
        rows = np.asarray(ep.rows)
        assert len(rows) == ex.num_rows + 4  # whatever the model wrote, <|end|> included
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
        layout = Layout(seq_schema, tok, tool=tool)
        ep = layout.episode("0", ex, slack_rows=4)
        ep.reference_tool = reference_tool(ex, layout)
        user_end = ep.turns[0]["user_end"]
        forced = encode(" tool_call: mul 2 3 tool:")
        ep.pushes[user_end + 1] = [("text", forced)]  # as if the model had written them
        run_episodes(seq_model, [ep], batch_sessions=1)
        col = [r[0] for r in ep.rows]
        tool_label = user_end + len(forced)
        assert col[tool_label] == tok.convert_tokens_to_ids("tool:")
        assert col[tool_label + 1] == tok.convert_tokens_to_ids(result)
        assert (ep.tool[0]["call"], ep.tool[0]["result"], ep.tool[0]["result_row"]) == ("mul 2 3", result,
                                                                                         tool_label + 1)


@pytest.mark.parametrize("answer", [" output: 5 <|end|>", " think: 1 2 output: 3 4 <|end|>"])
def test_the_sequential_layout_asks_the_next_question_after_the_models_end(answer, seq_model, sessions, seq_schema,
                                                                           tok, encode):
    """Turn 1's question comes right after the model's end of turn 0, wherever it falls; a turn
    whose end never comes is closed after its budget and the next question follows."""
    ex = next(e for e in sessions if len(e.meta["tasks"]) >= 3)
    layout = Layout(seq_schema, tok)
    ep = layout.episode("0", ex, slack_rows=2)
    t0, t1, t2 = ep.turns[:3]
    assert ("start" not in t1 and "start" not in t2) and len(ep.pushes) == 1  # only turn 0's question at first
    spoken = encode(answer)
    ep.pushes[t0["user_end"] + 1] = [("text", spoken)]  # the model ends turn 0 (wrongly) here
    end0 = t0["user_end"] + len(spoken)
    user_end1 = end0 + len(t1["prompt"])
    closed1 = end0 + t1["budget"]  # its budget counts from its first row, end0 + 1
    ep.pushes[user_end1 + 1] = [("text", encode(" 7") * (closed1 - user_end1))]  # turn 1 never ends
    run_episodes(seq_model, [ep], batch_sessions=1)
    col = [r[0] for r in ep.rows]
    assert col[: t0["user_end"] + 1] == t0["prompt"] and t0["closed_row"] == end0
    assert (t1["start"], t1["user_end"]) == (end0 + 1, user_end1) and col[end0 + 1: user_end1 + 1] == t1["prompt"]
    assert t1["closed_row"] == closed1 and col[closed1] == tok.convert_tokens_to_ids("7")
    assert (t2["start"], t2["user_end"]) == (closed1 + 1, closed1 + len(t2["prompt"]))
    assert col[t2["start"]: t2["user_end"] + 1] == t2["prompt"]
    assert len(col) <= ep.max_rows
    records = score_session(layout, ep, ex)
    assert records[0]["answer"] == answer.split("output: ")[1] and records[0]["end_rows_after_user"] is None
    assert (records[1]["answer"], records[1]["start_rows_after_user"], records[1]["exact"]) == ("", None, False)


def test_random_models_score_low_and_records_are_plain(models, examples, short_sessions, tok):
    for layout, model in models.items():
        records = evaluate(model, tok, examples, batch_sessions=3, slack_rows=2)
        assert [r["id"] for r in records] == [f"{e.id}#0" for e in examples]
        if layout == "streams":  # decoded for the reference's rows plus slack, whatever the model said
            assert [r["rows"] for r in records] == [e.num_rows + 2 for e in examples]
        assert pickle.loads(pickle.dumps(records)) == records  # the training loop all_gathers them
        assert [json.loads(line) for line in map(json.dumps, records)] == records  # records-<model>.jsonl
        summary = summarize(records)
        assert list(summary) == [k for t in TASKS for k in (t, f"{t}@row0")] + ["all", "all@row0"]
        assert summary["all"]["n"] == summary["all@row0"]["n"] == N
        assert summary["all"]["accuracy"] <= 0.25 and set(summary["all"]) == set(SUMMARY)
        assert math.isnan(summary["wait_k"]["tool_used"]) and not math.isnan(summary["tool_call"]["tool_used"])
        assert all(r["task"] == "count_stop" for r in records if "reaction_exact" in r)
        assert all(r["end_rows_after_user"] is None for r in records if not r["exact"])
        cut = short_sessions[::4]
        records = evaluate(model, tok, cut, batch_sessions=4, slack_rows=2)
        assert [r["id"] for r in records] == [f"{e.id}#{k}" for e in cut for k in range(len(e.meta["tasks"]))]
        assert summarize(records)["all"]["n"] == len(records) and pickle.loads(pickle.dumps(records)) == records


def test_batch_size_changes_nothing_but_the_clock(streams_model, examples, short_sessions, tok):
    for items in (examples[:8], short_sessions[12:]):  # the mid-answer sessions
        one = evaluate(streams_model, tok, items, batch_sessions=1, slack_rows=2)
        many = evaluate(streams_model, tok, items, batch_sessions=8, slack_rows=2)
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
    single = held_out_examples(SkillEvalConfig(examples_per_task=2, tasks=["tool_call", "wait_k"], session=None), tok)
    assert [e.meta["task"] for e in single] == ["tool_call", "wait_k"] * 2
    assert {e.meta["kind"] for e in single} == {"task"}
    train = held_out_examples(EvalConfig(examples_per_task=2, tasks=["tool_call", "wait_k"], session=None), tok)
    assert [e.id for e in single] == [e.id for e in train]  # training and `ms-ray eval` draw the same examples

    sessions = held_out_examples(SkillEvalConfig(examples_per_task=2), tok)  # the default: sessions
    assert len(sessions) == 2 * len(CELLS) == 30 and {e.meta["kind"] for e in sessions} == {"session"}
    placed = {}
    for e in sessions:
        _, _, _, task, condition, _ = e.id.split("/")
        assert (task, condition) in {(t["task"], t["condition"]) for t in e.meta["tasks"]}
        placed[f"{task}@{condition}"] = placed.get(f"{task}@{condition}", 0) + 1
        assert e.num_rows <= SkillEvalConfig().session.rows
    assert placed == {cell: 2 for cell in CELLS}
    assert [e.id for e in held_out_examples(EvalConfig(examples_per_task=2), tok)] == [e.id for e in sessions]
    short = held_out_examples(SkillEvalConfig(examples_per_task=1, session={"rows": 80, "lead_silence": [1, 10]}), tok)
    assert len(short) == len(CELLS) and max(e.num_rows for e in short) <= 80


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


@pytest.mark.slow
def test_sessions_at_a_late_offset_are_decoded_and_scored_like_sessions_at_row_0(sch, tok, short_sessions):
    """offset_rows: each session continues a copy of one lead-in session (here 300 rows, a windowed
    model: its slot holds 24 + 3 rows whatever the offset). Teacher forcing reproduces every
    reference there too: the late sessions are decoded and scored by the same machinery."""
    windowed = make_model(sch, len(tok))
    windowed.window = 24
    records = evaluate(windowed, tok, short_sessions, batch_sessions=16, force_outputs=True, offset_rows=300)
    summary = summarize(records)
    assert len(records) == sum(len(ex.meta["tasks"]) for ex in short_sessions)
    assert summary["all"]["accuracy"] == 1.0 and summary["all"]["quiet_after_end"] == 1.0
