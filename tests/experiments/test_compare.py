"""`ms-ray compare`: refusals of unequal budgets; both arms trained for real (Ray Train +
DeepSpeed ZeRO-2, 2 CPU workers) on a small budget, scored and reported."""

from pathlib import Path

import pytest
from conftest import check_report_outputs

from ms_ray.config import CompareConfig, ConfigError, PrepareConfig, load_config
from ms_ray.data.pipeline import prepare
from ms_ray.experiments.compare import arm_configs, compare

ROOT = Path(__file__).resolve().parents[2]


def test_compare_refuses_arms_with_different_budgets():
    cfg = load_config(CompareConfig, ROOT / "jobs/compare-tiny.yaml",
                      ["sequential.overrides=[model.hidden_size=64, optim.lr=0.001]"])
    with pytest.raises(ConfigError, match="same budget: model, optim differ"):
        arm_configs(cfg)
    cfg = load_config(CompareConfig, ROOT / "jobs/compare-tiny.yaml", ["sequential.overrides=[]"])
    with pytest.raises(ConfigError, match="sequential.train must have one stream"):
        arm_configs(cfg)


@pytest.mark.slow
def test_compare_trains_both_arms_and_reports(ray_local, tmp_path):
    data = {}
    for arm, source in (("streams", "{kind: skills, examples: 200, shards: 1, session: {}}"),
                        ("sequential", "{kind: skills, examples: 200, shards: 1, session: {}, rendering: sequential}")):
        config = "jobs/data-skills.yaml" if arm == "streams" else "jobs/data-skills-sequential.yaml"
        data[arm] = tmp_path / "data" / arm
        prepare(load_config(PrepareConfig, ROOT / config, [f"output={data[arm]}", f"sources=[{source}]"]))
    out = tmp_path / "compare"
    # all 45 held-out sessions decoded together (test_run's `ms-ray eval` batches too): compare-tiny.yaml
    # decodes each alone for its ms, which this test does not read; one at a time cost ~35 s here (a
    # 6-step model rarely ends its answers), together ~1 s. test_harness's
    # test_batch_size_changes_nothing_but_the_clock checks that batching changes no record.
    cfg = load_config(CompareConfig, ROOT / "jobs/compare-tiny.yaml", [
        f"output={out}", "eval.examples_per_task=3", "eval.batch_sessions=45", "wandb.mode=offline",
        f"streams.overrides=[data.path={data['streams']}, data.prepare=null]",
        "sequential.overrides=[\"schema.streams=[{name: text, role: output, end_token: '<|end|>'}]\", "
        f"data.path={data['sequential']}, data.prepare=null]",
        "overrides=[optim.max_steps=6, optim.warmup_steps=2, checkpoint.every=6, eval.every=1000, "
        "eval.examples_per_task=1, run.log_every=3, data.batch_size=2, wandb.mode=offline]",
    ])
    summaries = compare(cfg)
    assert set(summaries) == {"streams", "sequential"}
    summary = check_report_outputs(out, ["streams", "sequential"], 3 * 15)  # 3 sessions per task and condition
    for arm in ("streams", "sequential"):
        assert (out / "train" / arm / "export" / "model.safetensors").exists()
        assert summary["budget"][arm]["steps"] == 6 and summary["budget"][arm]["tokens_per_pack"] == 640
    assert summary["models"]["streams"]["streams"] == ["user", "think", "output", "tool", "tool_call"]
    assert summary["models"]["sequential"]["streams"] == ["text"]
    assert "tokens per step" in (out / "report.md").read_text()
