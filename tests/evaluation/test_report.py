"""One definition of the skill metrics: summarize -> flat keys (W&B, Ray Train) -> the table
`ms-ray train` prints is the table `ms-ray eval` writes; the evaluation settings are one config."""

import math
import random
from pathlib import Path

import pytest

from ms_ray.config import ConfigError, EvalConfig, SkillEvalConfig, SkillSessionConfig, TrainConfig, load_config
from ms_ray.data.skill_sessions import CONDITIONS
from ms_ray.evaluation.report import COLUMNS, format_tables, skill_metrics, skill_table
from ms_ray.evaluation.scoring import SUMMARY, summarize, task_order

ROOT = Path(__file__).resolve().parents[2]


def record(i: int, task: str, condition: str, exact: bool, start, end, quiet=None, **behaviours) -> dict:
    return {"id": f"skills/session/{i}#0", "task": task, "condition": condition, "exact": exact,
            "start_rows_after_user": start, "start_ms_after_user": None if start is None else 5.0 * start,
            "end_rows_after_user": end, "end_ms_after_user": None if end is None else 5.0 * end,
            "quiet_after_end": quiet, **behaviours}


RECORDS = [
    record(0, "wait_k", "row0", True, -4, 3, True), record(1, "wait_k", "after_silence", False, None, None),
    record(2, "count_stop", "row0", True, 0, 5, True, reaction_exact=True, reaction_rows=2),
    record(3, "count_stop", "mid_answer", True, 1, 6, False),
    record(4, "count_stop", "later", False, 0, None, reaction_exact=False, reaction_rows=None),
    record(5, "tool_call", "later", True, 2, 10, True, tool_used=True, talk_while_tool=True),
    record(6, "tool_call", "mid_answer", False, 2, None, True, tool_used=False, talk_while_tool=True),
    record(7, "running_sum", "after_silence", True, 2, 3, True),
]
KEYS = ["wait_k", "wait_k@row0", "wait_k@after_silence", "running_sum", "running_sum@after_silence", "count_stop",
        "count_stop@row0", "count_stop@later", "count_stop@mid_answer", "tool_call", "tool_call@later",
        "tool_call@mid_answer", "all", "all@row0", "all@after_silence", "all@later", "all@mid_answer"]


def test_each_metric_is_computed_once_from_the_records():
    s = summarize(RECORDS)
    assert list(s) == KEYS and list(s["all"]) == list(SUMMARY)
    assert s["wait_k"] == pytest.approx({"n": 2, "accuracy": 0.5, "no_answer": 0.5, "start_rows_after_user": -4,
                                         "start_ms_after_user": -20, "end_rows_after_user": 3, "end_ms_after_user": 15,
                                         "quiet_after_end": 1.0, "reaction_exact": math.nan, "reaction_rows": math.nan,
                                         "tool_used": math.nan, "talk_while_tool": math.nan}, nan_ok=True)
    assert s["count_stop"]["reaction_exact"] == 0.5 and s["count_stop"]["reaction_rows"] == 2  # stopped ones only
    assert s["tool_call"]["tool_used"] == 0.5 and s["tool_call"]["talk_while_tool"] == 1.0
    assert s["all"]["n"] == 8 and s["all"]["accuracy"] == 5 / 8 and s["all"]["no_answer"] == 1 / 8
    assert s["all"]["end_rows_after_user"] == pytest.approx((3 + 5 + 6 + 10 + 3) / 5)  # exact answers only
    assert s["all"]["quiet_after_end"] == 5 / 6  # the answers with an end only
    # one group per (task, condition): the condition's own records only
    assert (s["count_stop@mid_answer"]["n"], s["count_stop@mid_answer"]["quiet_after_end"]) == (1, 0.0)
    assert s["count_stop@row0"]["reaction_exact"] == 1.0 and math.isnan(s["count_stop@mid_answer"]["reaction_exact"])
    assert s["tool_call@later"]["accuracy"] == 1.0 and s["tool_call@mid_answer"]["accuracy"] == 0.0
    assert sum(s[k]["n"] for k in KEYS if "@" in k and not k.startswith("all@")) == s["all"]["n"]
    assert sum(s[f"all@{c}"]["n"] for c in CONDITIONS) == s["all"]["n"] and s["all@mid_answer"]["accuracy"] == 0.5
    # a record without a condition (a single task from row 0) counts as row0
    old = summarize([{k: v for k, v in r.items() if k != "condition"} for r in RECORDS[:2]])
    assert list(old) == ["wait_k", "wait_k@row0", "all", "all@row0"] and old["wait_k@row0"]["n"] == 2


def test_conditions_follow_their_task_in_a_fixed_order():
    keys = ["all", "juggle@later", "tool_call@mid_answer", "juggle", "wait_k@later", "tool_call", "wait_k",
            "wait_k@row0", "tool_call@row0", "all@row0"]
    assert task_order(keys) == ["wait_k", "wait_k@row0", "wait_k@later", "tool_call", "tool_call@row0",
                                "tool_call@mid_answer", "juggle", "juggle@later"]


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
    # first the exact match per task (rows) and condition (columns)
    assert lines[2] == "| exact match % | row0 | after_silence | later | mid_answer | any |"
    assert lines[4:9] == ["| wait_k | 100.0 | 0.0 | – | – | 50.0 |", "| running_sum | – | 100.0 | – | – | 100.0 |",
                          "| count_stop | 100.0 | – | 0.0 | 100.0 | 66.7 |",
                          "| tool_call | – | – | 100.0 | 0.0 | 50.0 |", "| all | 100.0 | 50.0 | 50.0 | 50.0 | 62.5 |"]
    lines = lines[10:]
    assert lines[0] == "| task | condition | n | " + " | ".join(title for _, title, _, _ in COLUMNS) + " |"
    assert lines[1] == "|---|---|---:|" + "---:|" * len(COLUMNS)
    body = [line.split("|")[1:3] for line in lines[2:2 + len(KEYS)]]
    assert [(task.strip(), condition.strip()) for task, condition in body] == [
        (k.split("@")[0], k.split("@")[1] if "@" in k else "any") for k in KEYS]
    assert "| wait_k | any | 2 | 50.0 | -4.0 | -20.0 | +3.0 | +15.0 | 50.0 | 100.0 |" in lines
    assert "| wait_k | after_silence | 1 | 0.0 | – | – | – | – | 100.0 | – |" in lines
    assert "| count_stop | mid_answer | 1 | 100.0 | +1.0 | +5.0 | +6.0 | +30.0 | 0.0 | 0.0 |" in lines
    assert "| all | any | 8 | 62.5 |" in table and "silent after end %" in lines[0]
    assert "| rows from the user's `stop` to the end of the answer | 2.0 |" in lines
    assert skill_table({"val/loss": 0.1}) == ""


def test_a_comparison_reads_first_slash_second():
    a, b = summarize(RECORDS), summarize(RECORDS[:4])
    table = format_tables({"streams": a, "sequential": b})
    assert table.startswith("Cells read streams / sequential. Rows and ms are counted from")
    assert "| wait_k | any | 2 | 50.0 / 50.0 |" in table and "| tool_call | any | 2 | 50.0 / – |" in table
    assert "| count_stop | mid_answer | 1 | 100.0 / 100.0 |" in table  # in both
    assert "| count_stop | later | 1 | 0.0 / – |" in table  # a condition only the first model has


def test_one_set_of_evaluation_settings():
    train, job = EvalConfig(), SkillEvalConfig()
    assert isinstance(train, SkillEvalConfig)
    assert set(SkillEvalConfig.model_fields) <= set(EvalConfig.model_fields)
    assert (job.slack_rows, job.tool, job.batch_sessions, job.seed) == (8, "live", 1, train.seed)
    assert (train.slack_rows, train.tool, train.batch_sessions) == (8, "live", 256)
    assert EvalConfig(examples_per_task=0).examples_per_task == 0  # training: 0 = off
    assert job.session == train.session == SkillSessionConfig() and SkillEvalConfig(session=None).session is None
    with pytest.raises(ValueError):
        SkillEvalConfig(examples_per_task=0)
    with pytest.raises(ValueError):
        SkillEvalConfig(tool="fake")
    with pytest.raises(ConfigError, match="skills_per_task is now eval.examples_per_task"):
        load_config(TrainConfig, ROOT / "jobs/tiny.yaml", ["eval.skills_per_task=4"], check_paths=False)
    cfg = load_config(TrainConfig, ROOT / "jobs/tiny.yaml", ["eval.tool=scripted"], check_paths=False)
    assert (cfg.eval.examples_per_task, cfg.eval.tool) == (40, "scripted")
    cfg = load_config(TrainConfig, ROOT / "jobs/tiny.yaml", ["eval.session=null"], check_paths=False)
    assert cfg.eval.session is None  # single tasks from row 0
