"""One definition of the skill metrics: summarize -> flat keys (W&B, Ray Train) -> the table
`ms-ray train` prints is the table `ms-ray eval` writes; the evaluation settings are one config."""

import math
import random
from pathlib import Path

import pytest

from ms_ray.config import ConfigError, EvalConfig, SkillEvalConfig, TrainConfig, load_config
from ms_ray.data.skills import TASKS
from ms_ray.evaluation.harness import SUMMARY, summarize
from ms_ray.evaluation.report import COLUMNS, format_tables, skill_metrics, skill_table

ROOT = Path(__file__).resolve().parents[2]

def record(i: int, task: str, exact: bool, start, end, **behaviours) -> dict:
    return {"id": f"skills/{task}/{i}", "task": task, "exact": exact, "start_rows_after_user": start,
            "start_ms_after_user": None if start is None else 5.0 * start, "end_rows_after_user": end,
            "end_ms_after_user": None if end is None else 5.0 * end, **behaviours}


RECORDS = [
    record(0, "wait_k", True, -4, 3), record(1, "wait_k", False, None, None),
    record(2, "count_stop", True, 0, 5, reaction_exact=True, reaction_rows=2), record(3, "count_stop", True, 1, 6),
    record(4, "count_stop", False, 0, None, reaction_exact=False, reaction_rows=None),
    record(5, "tool_call", True, 2, 10, tool_used=True, talk_while_tool=True),
    record(6, "tool_call", False, 2, None, tool_used=False, talk_while_tool=True),
    record(7, "running_sum", True, 2, 3),
]


def test_each_metric_is_computed_once_from_the_records():
    s = summarize(RECORDS)
    assert list(s) == [*TASKS, "all"] and list(s["all"]) == list(SUMMARY)
    assert s["wait_k"] == pytest.approx({"n": 2, "accuracy": 0.5, "no_answer": 0.5, "start_rows_after_user": -4,
                                         "start_ms_after_user": -20, "end_rows_after_user": 3, "end_ms_after_user": 15,
                                         "reaction_exact": math.nan, "reaction_rows": math.nan,
                                         "tool_used": math.nan, "talk_while_tool": math.nan}, nan_ok=True)
    assert s["count_stop"]["reaction_exact"] == 0.5 and s["count_stop"]["reaction_rows"] == 2  # stopped ones only
    assert s["tool_call"]["tool_used"] == 0.5 and s["tool_call"]["talk_while_tool"] == 1.0
    assert s["all"]["n"] == 8 and s["all"]["accuracy"] == 5 / 8 and s["all"]["no_answer"] == 1 / 8
    assert s["all"]["end_rows_after_user"] == pytest.approx((3 + 5 + 6 + 10 + 3) / 5)  # exact answers only


def test_records_gathered_from_ranks_in_any_order_give_the_same_summary():
    shuffled = RECORDS[1::2] + RECORDS[0::2]  # what all_gather of two ranks' records gives
    random.Random(0).shuffle(shuffled)
    assert skill_metrics(summarize(shuffled)) == skill_metrics(summarize(RECORDS))


def test_the_training_table_is_the_eval_report_table():
    """The same records give the same numbers via skill_table (training: flat keys through W&B /
    Ray Train) and via the eval report (format_tables of the summary)."""
    summary = summarize(RECORDS)
    metrics = skill_metrics(summary)
    assert "skills/wait_k/accuracy" in metrics and "skills/wait_k/tool_used" not in metrics  # NaNs left out
    assert all(not math.isnan(v) for v in metrics.values())
    extra = {"val/loss": 0.1, "step": 100, "skills/eval_seconds": 3.0}  # other keys are ignored
    reordered = dict(sorted({**metrics, **extra}.items()))  # a report may reorder its keys
    table = skill_table(reordered, label="tiny")
    assert table == format_tables({"tiny": summary})
    lines = table.splitlines()
    assert lines[2] == "| task | n | " + " | ".join(title for _, title, _, _ in COLUMNS) + " |"
    assert [line.split("|")[1].strip() for line in lines[4:9]] == [*TASKS, "all"]
    assert "| wait_k | 2 | 50.0 | -4.0 | -20.0 | +3.0 | +15.0 | 50.0 |" in lines
    assert "| rows from the user's `stop` to the end of the answer | 2.0 |" in lines
    assert skill_table({"val/loss": 0.1}) == ""


def test_a_comparison_reads_first_slash_second():
    a, b = summarize(RECORDS), summarize(RECORDS[:4])
    table = format_tables({"streams": a, "sequential": b})
    assert table.startswith("Cells read streams / sequential. Rows and ms are counted from")
    assert "| wait_k | 2 | 50.0 / 50.0 |" in table and "| tool_call | 2 | 50.0 / – |" in table


def test_one_set_of_evaluation_settings():
    train, job = EvalConfig(), SkillEvalConfig()
    assert isinstance(train, SkillEvalConfig)
    assert set(SkillEvalConfig.model_fields) <= set(EvalConfig.model_fields)
    assert (job.slack_rows, job.tool, job.batch_sessions, job.seed) == (8, "live", 1, train.seed)
    assert (train.slack_rows, train.tool, train.batch_sessions) == (8, "live", 256)
    assert EvalConfig(examples_per_task=0).examples_per_task == 0  # training: 0 = off
    with pytest.raises(ValueError):
        SkillEvalConfig(examples_per_task=0)
    with pytest.raises(ValueError):
        SkillEvalConfig(tool="fake")
    with pytest.raises(ConfigError, match="skills_per_task is now eval.examples_per_task"):
        load_config(TrainConfig, ROOT / "jobs/tiny.yaml", ["eval.skills_per_task=4"], check_paths=False)
    cfg = load_config(TrainConfig, ROOT / "jobs/tiny.yaml", ["eval.tool=scripted"], check_paths=False)
    assert (cfg.eval.examples_per_task, cfg.eval.tool) == (50, "scripted")
