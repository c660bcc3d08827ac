"""Skill sessions: leading silence, several tasks at random times, silence after every answer, a
question that cuts into a running count; the windows and answers the evaluation scores."""

import random
from collections import Counter

import numpy as np
import pytest

from ms_ray.config import SkillSessionConfig
from ms_ray.data.skill_sessions import CONDITIONS, generate_session, generate_sessions, targeted_sessions
from ms_ray.data.skills import REACTION, SEQUENTIAL_STREAMS, TASKS, sequential_turn, to_sequential

N = 150
SHAPE = SkillSessionConfig()
OUTPUTS = ("think", "output", "tool_call")
CELLS = {(t, c) for c in CONDITIONS for t in TASKS} - {("wait_k", "mid_answer")}


@pytest.fixture(scope="module")
def sessions(sch, encode):
    return generate_sessions(N, 5, sch, encode, SHAPE)


def silent(ex, sch, lo: int, hi: int, streams=None) -> bool:
    """Every cell of `streams` (default: all) in rows [lo, hi) is silence."""
    cols = [sch.index(s) for s in streams] if streams else list(range(sch.num_streams))
    return bool((ex.rows[lo:hi][:, cols] == sch.silence_id).all())


def pairs(sessions):
    """(session, task, the next task or None) for every task of every session."""
    for e in sessions:
        tasks = e.meta["tasks"]
        for k, task in enumerate(tasks):
            yield e, task, tasks[k + 1] if k + 1 < len(tasks) else None


def test_deterministic_for_a_seed(sch, encode, sessions):
    again = generate_sessions(N, 5, sch, encode, SHAPE)
    assert [e.id for e in again] == [e.id for e in sessions]
    assert all(np.array_equal(a.rows, b.rows) and a.meta == b.meta for a, b in zip(again, sessions))
    other = generate_sessions(20, 6, sch, encode, SHAPE)
    assert any(a.rows.shape != b.rows.shape or not np.array_equal(a.rows, b.rows) for a, b in zip(other, sessions))
    # session i does not depend on how many are drawn
    assert np.array_equal(generate_sessions(4, 5, sch, encode, SHAPE)[3].rows, sessions[3].rows)


def test_sessions_fit_their_rows_and_begin_with_silence(sch, encode, sessions):
    leads = []
    for i, e in enumerate(sessions):
        tasks = e.meta["tasks"]
        assert (e.id, e.source, e.policy, e.group) == (f"skills/session/5/{i}", "skills/session", "session",
                                                       f"session-5-{i}")
        assert e.meta["kind"] == "session" and e.rows.shape[1] == sch.num_streams and e.rows.dtype == np.int32
        assert e.num_rows <= SHAPE.rows and SHAPE.tasks[0] <= len(tasks) <= SHAPE.tasks[1]
        first = tasks[0]["start"]
        assert silent(e, sch, 0, first), e.id  # the leading silence: nothing at all before the first question
        assert e.rows[first, sch.index("user")] != sch.silence_id
        assert tasks[0]["condition"] == ("row0" if first == 0 else "after_silence")
        assert first == 0 or SHAPE.lead_silence[0] <= first <= SHAPE.lead_silence[1]
        assert [t["condition"] for t in tasks[1:]] == ["mid_answer" if p["interrupted"] else "later"
                                                       for p in tasks[:-1]]
        leads.append(first)
    assert 0.1 * N < leads.count(0) < 0.45 * N  # lead_zero = 0.25
    assert {len(e.meta["tasks"]) for e in sessions} == {1, 2, 3, 4}
    short = SkillSessionConfig(rows=70, tasks=(2, 3), lead_zero=0.0, lead_silence=(5, 9), gap=(3, 3))
    for e in generate_sessions(40, 1, sch, encode, short):
        assert e.num_rows <= 70 and len(e.meta["tasks"]) <= 3 and 5 <= e.meta["tasks"][0]["start"] <= 9
    for e in generate_sessions(10, 1, sch, encode, SkillSessionConfig(tasks=(1, 1))):
        assert len(e.meta["tasks"]) == 1 and e.meta["tasks"][0]["window"] == [0, e.num_rows]


def test_inputs_meta_rebuilds_the_input_streams(sch, sessions):
    for e in sessions:
        rebuilt = np.full_like(e.rows, sch.silence_id)
        for stream, placed in e.meta["inputs"].items():
            for r, t in placed:
                rebuilt[r, sch.index(stream)] = t
        assert set(e.meta["inputs"]) == {"user", "tool"}
        for stream in ("user", "tool"):
            assert np.array_equal(rebuilt[:, sch.index(stream)], e.rows[:, sch.index(stream)]), (e.id, stream)


def test_every_answer_is_followed_by_silence_until_the_next_question(sch, sessions):
    end, out = sch.end_ids()["output"], sch.index("output")
    interrupted = 0
    for e, task, nxt in pairs(sessions):
        assert e.rows[task["end_row"], out] == end
        if nxt is None:  # the last answer: silence to the end of the session
            assert silent(e, sch, task["end_row"] + 1, e.num_rows), e.id
            assert e.num_rows - task["end_row"] - 1 >= min(2, SHAPE.rows - task["end_row"] - 1)
        elif task["interrupted"]:  # the count ends exactly two rows after the question's first token
            interrupted += 1
            assert task["task"] == "count_stop" and nxt["condition"] == "mid_answer"
            assert task["end_row"] == nxt["start"] + REACTION, e.id
        else:  # nothing at all in the gap; the output streams stay quiet until the question can be heard
            assert SHAPE.gap[0] <= nxt["start"] - task["end_row"] - 1 <= SHAPE.gap[1], e.id
            assert silent(e, sch, task["end_row"] + 1, nxt["start"]), e.id
            assert silent(e, sch, task["end_row"] + 1, nxt["start"] + REACTION, OUTPUTS), e.id
    assert interrupted >= 5


def test_mid_answer_questions_cut_into_a_running_count(sch, tok, sessions):
    out, end = sch.index("output"), sch.end_ids()["output"]
    seen = Counter()
    for e, task, nxt in pairs(sessions):
        if nxt is None or nxt["condition"] != "mid_answer":
            assert not task["interrupted"]
            continue
        seen[nxt["task"]] += 1
        assert nxt["task"] != "wait_k" and task["task"] == "count_stop"
        assert not task["stopped"] and "stop" not in task["parts"]["user"].split()
        col = e.rows[:, out]
        # the count is running when the question begins, and its numbers go on until start + 1
        first = task["start"] + int(np.flatnonzero(col[task["start"]:] != sch.silence_id)[0])
        assert first <= nxt["start"] and col[nxt["start"]] not in (sch.silence_id, end)
        numbers = [int(w) for w in tok.convert_ids_to_tokens(col[first:nxt["start"] + REACTION].tolist())]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
        target = int(task["parts"]["user"].split()[3])
        assert numbers[-1] < target  # cut short: it would have counted on
        assert col[nxt["start"] + REACTION] == end
    assert set(seen) == {"running_sum", "count_stop", "tool_call"}


def test_windows_are_contiguous_and_hold_each_answer(sch, tok, sessions):
    out, end, silence = sch.index("output"), sch.end_ids()["output"], sch.silence_id
    for e in sessions:
        tasks = e.meta["tasks"]
        windows = [t["window"] for t in tasks]
        assert windows[0][0] == 0 and windows[-1][1] == e.num_rows
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(windows, windows[1:]))
        for k, task in enumerate(tasks):
            lo, hi = task["window"]
            if k + 1 < len(tasks):  # a later question cannot change its row + 2 or any earlier one
                nxt = tasks[k + 1]
                assert hi == nxt["start"] + REACTION + (nxt["condition"] == "mid_answer")
            assert task["answer"] == [int(t) for t in e.rows[lo:hi, out] if t != silence], e.id
            assert task["answer"][-1] == end and task["answer"].count(end) == 1 and lo <= task["end_row"] < hi
            assert tok.decode(task["answer"]) == task["parts"]["output"]  # what the sequential turn says
            until = tasks[k + 1]["start"] if k + 1 < len(tasks) else e.num_rows
            user = [r for r, _ in e.meta["inputs"]["user"] if task["start"] <= r < until]
            assert (min(user), max(user)) == (task["start"], task["user_end"])
            assert task["stopped"] == ("stop" in task["parts"]["user"].split())


@pytest.mark.parametrize("field, kwargs", [
    ("tasks", {"tasks": (3, 2)}), ("tasks", {"tasks": (0, 2)}), ("lead_silence", {"lead_silence": (9, 4)}),
    ("gap", {"gap": (-1, 2)}),
])
def test_a_bad_shape_is_refused_naming_the_field(field, kwargs):
    with pytest.raises(ValueError, match=f"{field} must be|{field}: a session"):
        SkillSessionConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [{"rows": 10}, {"rows": 60, "lead_silence": (50, 55)}])
def test_a_session_too_short_for_its_first_task_is_refused(sch, encode, kwargs):
    with pytest.raises(ValueError, match="session.rows=.* is too short"):
        generate_session(random.Random(0), sch, encode, SkillSessionConfig(lead_zero=0.0, **kwargs), uid="x")


def test_targeted_sessions_place_every_cell(sch, encode):
    sessions = targeted_sessions(2, 3, sch, encode, SHAPE)
    assert len(sessions) == 2 * len(CELLS) == 30
    placed = Counter()
    for e in sessions:
        _, _, seed, task, condition, i = e.id.split("/")
        assert seed == "3" and i in ("0", "1")
        assert (task, condition) in {(t["task"], t["condition"]) for t in e.meta["tasks"]}, e.id
        placed[task, condition] += 1
        assert e.num_rows <= SHAPE.rows
    assert placed == {cell: 2 for cell in CELLS}
    again = targeted_sessions(2, 3, sch, encode, SHAPE)
    assert all(np.array_equal(a.rows, b.rows) and a.meta == b.meta for a, b in zip(again, sessions))
    only = targeted_sessions(1, 0, sch, encode, SHAPE, tasks=("wait_k",))
    assert [e.id.split("/")[4] for e in only] == ["row0", "after_silence", "later"]
    assert {t["task"] for e in only for t in e.meta["tasks"]} == {"wait_k"}
    with pytest.raises(ValueError, match="unknown condition"):
        generate_session(random.Random(0), sch, encode, SHAPE, uid="x", target=("wait_k", "someday"))


def test_to_sequential_of_a_session_is_its_turns_joined(sch, tok, encode, sessions):
    seq_schema = SEQUENTIAL_STREAMS.bind(tok)
    stops = 0
    for e in sessions[:60]:
        seq = to_sequential(e, seq_schema, encode)
        turns = [sequential_turn(t) for t in e.meta["tasks"]]
        assert (seq.id, seq.group, seq.source) == (e.id, e.group, e.source)  # the same split
        assert tok.decode(seq.rows[:, 0].tolist()) == " ".join(turns)
        assert seq.rows[:, 0].tolist() == e.meta["sequential"] and seq.meta["tasks"] == e.meta["tasks"]
        text = " ".join(turns)
        assert text.count("user:") == len(e.meta["tasks"]) and text.count("<|end|>") == len(e.meta["tasks"])
        for task, turn in zip(e.meta["tasks"], turns):
            user = turn.split(" think:")[0].split(" tool_call:")[0].split(" output:")[0]
            assert user.endswith(" stop") == (task["interrupted"] or task["stopped"])
            assert turn.endswith("output: " + task["parts"]["output"])
            stops += task["interrupted"]
    assert stops > 0


def test_weights_skew_task_frequencies(sch, encode):
    drawn = Counter(t["task"] for e in generate_sessions(60, 2, sch, encode, SHAPE, weights=[0, 0, 0, 1])
                    for t in e.meta["tasks"])
    assert set(drawn) == {"tool_call"}
    skewed = Counter(t["task"] for e in generate_sessions(80, 2, sch, encode, SHAPE, tasks=("wait_k", "running_sum"),
                                                          weights=[1, 9]) for t in e.meta["tasks"])
    assert set(skewed) == {"wait_k", "running_sum"} and skewed["running_sum"] > 4 * skewed["wait_k"]
    equal = Counter(t["task"] for e in generate_sessions(80, 2, sch, encode, SHAPE, tasks=("wait_k", "running_sum"))
                    for t in e.meta["tasks"])
    assert equal["running_sum"] < 2 * equal["wait_k"]


def test_long_sums_draw_large_totals_for_training_only(sch, encode):
    """long_sums (training data) raises the share of large running-sum totals; at its default 0 the
    sessions are the evaluation's, untouched by the option."""
    def totals(shape):
        return [int(t["parts"]["output"].split()[0])
                for e in generate_sessions(120, 3, sch, encode, shape, weights=[0, 1, 0, 0]) for t in e.meta["tasks"]]

    natural, long = totals(SHAPE), totals(SkillSessionConfig(long_sums=1.0))
    assert max(natural) <= 72 and all(t >= 15 for t in long)  # 5-8 digits of 3-9
    share_large = [sum(t >= 40 for t in ts) / len(ts) for ts in (natural, long)]
    assert share_large[1] > 3 * share_large[0]
    assert [e.rows.tolist() for e in generate_sessions(20, 3, sch, encode, SkillSessionConfig(long_sums=0.0))] == \
        [e.rows.tolist() for e in generate_sessions(20, 3, sch, encode, SHAPE)]
