import math

import numpy as np
import pytest

from conftest import make_model
from ms_ray.data.skills import TASKS, generate_examples
from ms_ray.train.evaluate import evaluate_skills, format_skill_table

N = 16  # 4 examples per task


@pytest.fixture(scope="module")
def examples(sch, tok):
    return generate_examples(N, 3, sch, lambda text: tok(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def model(sch, tok):
    return make_model(sch, len(tok))


@pytest.fixture(scope="module")
def free_run(model, examples):
    return evaluate_skills(model, examples, return_records=True)


def reference_timing(example, schema):
    """(ttft, latency) computed straight from the reference table."""
    rows, silence = example.rows, schema.silence_id
    answer = rows[:, schema.index(example.meta["answer_stream"])]
    first = int(np.flatnonzero(answer != silence)[0])  # the answer stream, not think / tool_call
    end = int(np.flatnonzero(answer == schema.end_ids()["output"])[0])
    return first - example.meta["input_end_row"], end - example.meta["input_end_row"], end


def test_teacher_forcing_reproduces_the_reference(model, examples, sch):
    metrics, records = evaluate_skills(model, examples, force_outputs=True, return_records=True)
    for task in TASKS:
        mine = [e for e in examples if e.meta["task"] == task]
        timing = [reference_timing(e, sch) for e in mine]
        assert metrics[f"skills/{task}/n"] == len(mine) == N // len(TASKS)
        assert metrics[f"skills/{task}/accuracy"] == 1.0
        assert metrics[f"skills/{task}/no_output"] == 0.0
        assert metrics[f"skills/{task}/ttft_rows"] == pytest.approx(np.mean([t[0] for t in timing]))
        assert metrics[f"skills/{task}/latency_rows"] == pytest.approx(np.mean([t[1] for t in timing]))
    assert metrics["skills/all/accuracy"] == 1.0 and metrics["skills/all/n"] == N
    assert metrics["skills/wait_k/ttft_rows"] < 0  # wait_k answers while reading
    for ex, rec in zip(examples, records):
        ttft, latency, end = reference_timing(ex, sch)
        assert rec["id"] == ex.id and rec["exact"]
        assert (rec["ttft_rows"], rec["latency_rows"]) == (ttft, latency)
        np.testing.assert_array_equal(rec["rows"], ex.rows[: end + 1])  # the session ends on <|end|>


def test_random_model_scores_low(free_run):
    metrics, records = free_run
    for task in TASKS:
        assert metrics[f"skills/{task}/accuracy"] <= 0.25, task
        assert 0.0 <= metrics[f"skills/{task}/no_output"] <= 1.0
    assert metrics["skills/all/accuracy"] < 0.25
    assert metrics["skills/eval_seconds"] > 0
    for rec in records:
        assert rec["exact"] is False and rec["latency_rows"] is None


def test_inputs_are_injected_at_their_rows(free_run, examples, sch):
    _, records = free_run
    for ex, rec in zip(examples, records):
        assert len(rec["rows"]) <= ex.num_rows + 4  # max_new_rows = table rows + slack
        for stream, cells in ex.meta["inputs"].items():
            expected = np.full(len(rec["rows"]), sch.silence_id)
            for row, token in cells:
                if row < len(expected):
                    expected[row] = token
            np.testing.assert_array_equal(rec["rows"][:, sch.index(stream)], expected, err_msg=f"{ex.id} {stream}")


def test_small_batches_give_the_same_results(model, examples, free_run):
    big, big_records = free_run
    small, small_records = evaluate_skills(model, examples, batch_sessions=3, return_records=True)
    for key in big:
        if key != "skills/eval_seconds":
            assert small[key] == big[key] or (math.isnan(small[key]) and math.isnan(big[key])), key
    for a, b in zip(big_records, small_records):
        np.testing.assert_array_equal(a["rows"], b["rows"])


def test_restores_training_mode_and_formats_a_table(model, examples):
    model.train()
    try:
        metrics = evaluate_skills(model, examples[:4], force_outputs=True)
        assert model.training
    finally:
        model.eval()
    table = format_skill_table(metrics).splitlines()
    assert table[0].startswith("| task | n | accuracy %")
    assert [line.split("|")[1].strip() for line in table[2:]] == [*TASKS, "all"]
    assert table[-1].split("|")[3].strip() == "100.0"


def test_rejects_empty_input(model):
    with pytest.raises(ValueError):
        evaluate_skills(model, [])
