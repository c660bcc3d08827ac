"""Scoring decoded sessions without a model: rows replayed as if decoded. A perfect decode is exact
with the reference's timing; a token after an answer's end costs that answer only; each task's
window decides which cells are its answer."""

import numpy as np
import pytest

from ms_ray.config import SkillSessionConfig
from ms_ray.data.skill_sessions import targeted_sessions
from ms_ray.data.skills import REACTION, SEQUENTIAL_STREAMS, generate_examples, sequential_turn
from ms_ray.evaluation.harness import Layout, reference_tool
from ms_ray.evaluation.scoring import score_session, summarize


@pytest.fixture(scope="module")
def seq_schema(tok):
    return SEQUENTIAL_STREAMS.bind(tok)


@pytest.fixture(scope="module")
def examples(sch, encode):
    return generate_examples(16, 11, sch, encode)


@pytest.fixture(scope="module")
def sessions(sch, encode):
    return targeted_sessions(1, 4, sch, encode, SkillSessionConfig())


def replay(layout, example, rows, slack_rows=0):
    """An episode fed `rows` as the decoder would (the layout sees every row: tool calls, turns), 1 ms a row."""
    ep = layout.episode("0", example, slack_rows)
    ep.reference_tool = reference_tool(example, layout)
    for row in rows:
        ep.rows.append([int(t) for t in row])
        ep.times.append(len(ep.times) / 1000)
        ep.on_row(ep, len(ep.rows) - 1, ep.rows[-1])
        if ep.done:
            break
    return ep


def perfect_rows(layout, example, slack_rows=0):
    if layout.kind == "streams":
        silence = np.full((slack_rows, example.rows.shape[1]), layout.silence)
        return np.vstack([example.rows, silence]).tolist()
    return [[t] for t in example.meta["sequential"]]


def reference_timing(layout, example, k, encode, tok) -> tuple[int, int]:
    """(start, end) rows of task k's answer after its user's last token, from the reference."""
    task = example.meta["tasks"][k]
    if layout.kind == "streams":
        lo, hi = task["window"]
        out = example.rows[lo:hi, layout.schema.index("output")]
        first = lo + int(np.flatnonzero(out != layout.silence)[0])  # the answer stream, not think or tool_call
        return first - task["user_end"], task["end_row"] - task["user_end"]
    space = " " if k else ""
    full = encode(space + sequential_turn(task))
    user_end = len(encode(space + sequential_turn({**task, "parts": {"user": task["parts"]["user"]}}))) - 1
    return full.index(tok.convert_tokens_to_ids("output:")) + 1 - user_end, len(full) - 1 - user_end


@pytest.mark.parametrize("tool", ["live", "scripted"])
@pytest.mark.parametrize("which", ["examples", "sessions"])
def test_a_perfect_decode_scores_exact_with_the_reference_timing(which, tool, request, sch, seq_schema, tok, encode):
    for ex in request.getfixturevalue(which):
        per_layout = {}
        for layout in (Layout(sch, tok, tool), Layout(seq_schema, tok, tool)):
            records = per_layout[layout.kind] = score_session(layout, replay(layout, ex, perfect_rows(layout, ex, 3)),
                                                              ex)
            assert [(r["id"], r["task"], r["condition"]) for r in records] == [
                (f"{ex.id}#{k}", t["task"], t["condition"]) for k, t in enumerate(ex.meta["tasks"])]
            for k, (rec, task) in enumerate(zip(records, ex.meta["tasks"])):
                assert rec["exact"] and rec["answer"] == rec["reference"] == task["parts"]["output"], (ex.id, k)
                start, end = reference_timing(layout, ex, k, encode, tok)
                assert (rec["start_rows_after_user"], rec["end_rows_after_user"]) == (start, end), (ex.id, k)
                assert rec["end_ms_after_user"] == pytest.approx(end)  # 1 ms per row
                assert rec["quiet_after_end"] is (True if layout.kind == "streams" else None)
                assert rec.get("reaction_exact", True) and (task["task"] == "count_stop" and task["stopped"]) == (
                    "reaction_exact" in rec)
                if task["task"] == "tool_call":
                    assert [(c["call"], c["result"]) for c in rec["tool_calls"]] == [(task["parts"]["tool_call"],
                                                                                      task["parts"]["tool"])]
                    assert rec["tool_used"] and rec["talk_while_tool"] == (layout.kind == "streams")
        for rec, seq in zip(per_layout["streams"], per_layout["sequential"]):
            if rec["task"] == "wait_k":  # streams answer while the user is still typing; one stream cannot
                assert rec["start_rows_after_user"] < 0 < seq["start_rows_after_user"]


def inject(rows, row: int, column: int, token: int):
    rows = [list(r) for r in rows]
    rows[row][column] = token
    return rows


def test_a_token_after_an_answer_costs_that_answer_only(sessions, sch, tok):
    layout, out, think = Layout(sch, tok), sch.index("output"), sch.index("think")
    seven = tok.convert_tokens_to_ids("7")
    ex = next(e for e in sessions if len(e.meta["tasks"]) >= 3 and not e.meta["tasks"][1]["interrupted"])
    rows = perfect_rows(layout, ex, slack_rows=4)
    perfect = score_session(layout, replay(layout, ex, rows), ex)
    end = ex.meta["tasks"][1]["end_row"]
    for column, exact in ((out, False), (think, True)):  # a word on the answer stream, a thought after it
        records = score_session(layout, replay(layout, ex, inject(rows, end + 1, column, seven)), ex)
        assert records[1]["quiet_after_end"] is False and records[1]["exact"] is exact
        assert records[1]["answer"] == perfect[1]["answer"] + ("" if exact else " 7")
        assert records[1]["end_rows_after_user"] == (perfect[1]["end_rows_after_user"] if exact else None)
        assert [r for k, r in enumerate(records) if k != 1] == [r for k, r in enumerate(perfect) if k != 1]
    # the last answer is watched to the end of the decode, slack rows included
    records = score_session(layout, replay(layout, ex, inject(rows, len(rows) - 1, think, seven)), ex)
    assert records[-1]["exact"] and records[-1]["quiet_after_end"] is False and records[:-1] == perfect[:-1]
    summary = summarize(records)
    assert summary["all"]["quiet_after_end"] == pytest.approx((len(records) - 1) / len(records))


def test_an_interrupted_count_owns_its_end_token(sessions, sch, tok):
    """The question cut the count at its start: <|end|> at start + 2 is the count's; one row later
    it falls in the question's window, and both answers are wrong."""
    layout, out, silence = Layout(sch, tok), sch.index("output"), sch.silence_id
    end_id = sch.end_ids()["output"]
    cut = [e for e in sessions if e.meta["tasks"][0]["interrupted"]]
    assert {e.meta["tasks"][1]["task"] for e in cut} == {"running_sum", "count_stop", "tool_call"}
    for ex in cut:
        count, question = ex.meta["tasks"][:2]
        assert count["end_row"] == question["start"] + REACTION and question["condition"] == "mid_answer"
        rows = perfect_rows(layout, ex)
        records = score_session(layout, replay(layout, ex, rows), ex)
        assert records[0]["exact"] and records[0]["answer"].endswith("<|end|>") and records[1]["exact"]
        assert records[0]["end_rows_after_user"] == count["end_row"] - count["user_end"]
        late = inject(inject(rows, count["end_row"], out, silence), count["end_row"] + 1, out, end_id)
        records = score_session(layout, replay(layout, ex, late), ex)
        assert not records[0]["exact"] and records[0]["quiet_after_end"] is None  # no end in its window
        assert not records[1]["exact"] and records[1]["answer"].startswith("<|end|>")


def test_a_turn_the_transcript_never_reached_has_no_answer(sessions, seq_schema, tok, encode):
    layout = Layout(seq_schema, tok)
    ex = next(e for e in sessions if len(e.meta["tasks"]) >= 2)
    first = len(encode(sequential_turn(ex.meta["tasks"][0])))
    ep = replay(layout, ex, perfect_rows(layout, ex)[:first])  # cut after the first turn's end
    assert not ep.done and ep.current == 1
    records = score_session(layout, ep, ex)
    assert records[0]["exact"] and records[0]["end_rows_after_user"] is not None
    for rec in records[1:]:
        assert (rec["exact"], rec["answer"], rec["start_rows_after_user"], rec["end_ms_after_user"]) == (
            False, "", None, None)
    assert [r["reference"] for r in records] == [t["parts"]["output"] for t in ex.meta["tasks"]]
    assert summarize(records)["all"]["no_answer"] == pytest.approx((len(records) - 1) / len(records))
