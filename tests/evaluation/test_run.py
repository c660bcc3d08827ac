"""`ms-ray eval` and `ms-ray compare`: files written, W&B offline runs, refusals; compare trains
both arms for real (Ray Train + DeepSpeed ZeRO-2, 2 CPU workers) on a small budget."""

import json
from pathlib import Path

import pytest

from conftest import make_model
from ms_ray.cli import main
from ms_ray.config import CompareConfig, ConfigError, PrepareConfig, load_config
from ms_ray.data.skills import SEQUENTIAL_STREAMS, TASKS
from ms_ray.evaluation.run import arm_configs

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


def check_outputs(out: Path, labels: list[str], n: int) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    report = (out / "report.md").read_text()
    for label in labels:
        assert summary["summaries"][label]["all"]["n"] == n
        assert set(summary["summaries"][label]) == {*TASKS, "all"}
        records = (out / f"records-{label}.jsonl").read_text().splitlines()
        assert len(records) == n and {json.loads(r)["task"] for r in records} == set(TASKS)
    assert f"| all | {n} |" in report and " / ".join(labels) in report
    for plot in ("accuracy", "latency_rows", "latency_ms"):
        assert (out / f"{plot}.png").read_bytes()[:8] == PNG
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
    return summary


@pytest.mark.parametrize("layout", ["streams", "sequential"])
def test_eval_scores_a_checkpoint_and_writes_the_report(layout, tmp_path, sch, tok, capsys):
    schema = sch if layout == "streams" else SEQUENTIAL_STREAMS.bind(tok)
    make_model(schema, len(tok)).save_pretrained(tmp_path / "ckpt", tokenizer=tok)
    out = tmp_path / "eval"
    assert main(["eval", str(tmp_path / "ckpt"), "eval.examples_per_task=2", f"output={out}", "wandb.mode=offline"]) == 0
    summary = check_outputs(out, [layout], 2 * len(TASKS))
    assert summary["parameters"] > 0 and summary["streams"] == schema.names
    assert "exact match %" in capsys.readouterr().out


def test_eval_refuses_a_missing_checkpoint_or_one_that_is_not_a_skills_model(tmp_path, bound, tokenizer, capsys):
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "nothing does not exist: give an exported model folder" in capsys.readouterr().err
    make_model(bound, len(tokenizer)).save_pretrained(tmp_path / "chat", tokenizer=tokenizer)  # user/think/output
    assert main(["eval", str(tmp_path / "chat"), f"output={tmp_path / 'out'}"]) == 2
    assert "not a skills model: streams ['user', 'think', 'output']" in capsys.readouterr().err


def test_compare_refuses_arms_with_different_budgets():
    cfg = load_config(CompareConfig, ROOT / "jobs/compare-tiny.yaml", ["sequential.overrides=[model.hidden_size=64, optim.lr=0.001]"])
    with pytest.raises(ConfigError, match="same budget: model, optim differ"):
        arm_configs(cfg)
    cfg = load_config(CompareConfig, ROOT / "jobs/compare-tiny.yaml", ["sequential.overrides=[]"])
    with pytest.raises(ConfigError, match="sequential.train must have one stream"):
        arm_configs(cfg)


@pytest.mark.slow
def test_compare_trains_both_arms_and_reports(ray_local, tmp_path):
    from ms_ray.data.pipeline import prepare
    from ms_ray.evaluation.run import compare

    data = {}
    for arm, source in (("streams", "{kind: skills, examples: 400, shards: 1}"),
                        ("sequential", "{kind: skills, examples: 400, shards: 1, rendering: sequential}")):
        config = "jobs/data-skills.yaml" if arm == "streams" else "jobs/data-skills-sequential.yaml"
        data[arm] = tmp_path / "data" / arm
        prepare(load_config(PrepareConfig, ROOT / config, [f"output={data[arm]}", f"sources=[{source}]"]))
    out = tmp_path / "compare"
    cfg = load_config(CompareConfig, ROOT / "jobs/compare-tiny.yaml", [
        f"output={out}", "eval.examples_per_task=3", "wandb.mode=offline",
        f"streams.overrides=[data.path={data['streams']}, data.prepare=null]",
        "sequential.overrides=[\"schema.streams=[{name: text, role: output, end_token: '<|end|>'}]\", "
        f"data.path={data['sequential']}, data.prepare=null]",
        "overrides=[optim.max_steps=6, optim.warmup_steps=2, checkpoint.every=6, eval.every=1000, "
        "eval.skills_per_task=1, run.log_every=3, data.batch_size=2, wandb.mode=offline]",
    ])
    summaries = compare(cfg)
    assert set(summaries) == {"streams", "sequential"}
    summary = check_outputs(out, ["streams", "sequential"], 3 * len(TASKS))
    for arm in ("streams", "sequential"):
        assert (out / "train" / arm / "export" / "model.safetensors").exists()
        assert summary["budget"][arm]["steps"] == 6 and summary["budget"][arm]["tokens_per_pack"] == 320
    assert summary["models"]["streams"]["streams"] == ["user", "think", "output", "tool", "tool_call"]
    assert summary["models"]["sequential"]["streams"] == ["text"]
    assert "tokens per step" in (out / "report.md").read_text()
