"""`ms-ray eval`: files written, an offline W&B run, refusals."""

import json
import math
from pathlib import Path

import pytest
from conftest import make_model

from ms_ray.cli import main
from ms_ray.config import EvalJobConfig, load_config
from ms_ray.data.skill_sessions import CONDITIONS
from ms_ray.data.skills import SEQUENTIAL_STREAMS, TASKS
from ms_ray.evaluation.harness import held_out_examples
from ms_ray.evaluation.report import skill_metrics, skill_table

ROOT = Path(__file__).resolve().parents[2]


def check_outputs(out, label: str, held_out: list) -> dict:
    """What `ms-ray eval` writes for the held-out sessions (or single tasks): one record per task in
    order, summaries per task, per task and condition, and over all; report, plots, one W&B run."""
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / f"records-{label}.jsonl").read_text().splitlines()]
    tasks = [(f"{e.id}#{k}", t["task"], t["condition"]) for e in held_out for k, t in enumerate(e.meta["tasks"])]
    assert [(r["id"], r["task"], r["condition"]) for r in records] == tasks
    assert summary["summaries"][label]["all"]["n"] == len(tasks)
    assert set(summary["summaries"][label]) == {*TASKS, *(f"{t}@{c}" for _, t, c in tasks), "all",
                                                *(f"all@{c}" for _, _, c in tasks)}
    assert f"| all | any | {len(tasks)} |" in (out / "report.md").read_text()
    for plot in ("accuracy", "latency_rows", "latency_ms"):
        assert (out / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
    return summary


@pytest.mark.parametrize("layout, session", [("streams", "sessions"), ("sequential", "sessions"),
                                             ("streams", "single")])
def test_eval_scores_a_checkpoint_and_writes_the_report(layout, session, tmp_path, sch, tok, capsys):
    schema = sch if layout == "streams" else SEQUENTIAL_STREAMS.bind(tok)
    make_model(schema, len(tok)).save_pretrained(tmp_path / "ckpt", tokenizer=tok)
    out = tmp_path / "eval"
    shape = ["eval.session.rows=64", "eval.session.lead_silence=[1, 6]"] if session == "sessions" else [
        "eval.session=null"]
    args = [f"checkpoint={tmp_path / 'ckpt'}", "eval.examples_per_task=1", "eval.batch_sessions=16", *shape,
            f"output={out}", "wandb.mode=offline"]
    assert main(["eval", *args]) == 0
    cfg = load_config(EvalJobConfig, ROOT / "jobs/eval.yaml", args, check_paths=False)
    held_out = held_out_examples(cfg.eval, tok)  # what was scored: the same draws
    assert {e.meta["kind"] for e in held_out} == {"session" if session == "sessions" else "task"}
    summary = check_outputs(out, layout, held_out)
    if session == "sessions":  # every (task, condition), wait_k never mid-answer
        cells = {k for k in summary["summaries"][layout] if "@" in k and not k.startswith("all@")}
        assert cells == {f"{t}@{c}" for t in TASKS for c in CONDITIONS} - {"wait_k@mid_answer"}
        assert "| count_stop | mid_answer |" in (out / "report.md").read_text()
    assert summary["parameters"] > 0 and summary["streams"] == schema.names and summary["tool"] == "live"
    # one definition: the table `ms-ray train` prints from its flat metrics is the one in report.md
    per_task = {t: {k: math.nan if v is None else v for k, v in m.items()}
                for t, m in summary["summaries"][layout].items()}
    assert skill_table(skill_metrics(per_task), label=layout) in (out / "report.md").read_text()
    assert "exact match %" in capsys.readouterr().out


def test_eval_refuses_a_missing_checkpoint_or_one_that_is_not_a_skills_model(tmp_path, bound, tokenizer, capsys):
    assert main(["eval", f"checkpoint={tmp_path / 'nothing'}"]) == 2
    assert "nothing does not exist: give an exported model folder" in capsys.readouterr().err
    make_model(bound, len(tokenizer)).save_pretrained(tmp_path / "chat", tokenizer=tokenizer)  # user/think/output
    assert main(["eval", f"checkpoint={tmp_path / 'chat'}", f"output={tmp_path / 'out'}"]) == 2
    assert "not a skills model: streams ['user', 'think', 'output']" in capsys.readouterr().err
