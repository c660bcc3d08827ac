import pytest

from ms_ray.config import ConfigError, DemoConfig, ModelConfig, apply_override, load_config


def test_dotted_overrides_are_typed(tmp_path):
    cfg = load_config(DemoConfig, "jobs/demo.yaml", ["model.hidden_size=32", "decode.sampling.output.temperature=0.5",
                                                       "model.family=qwen3"])
    assert cfg.model.hidden_size == 32 and cfg.model.family == "qwen3"
    assert cfg.decode.sampling["output"].temperature == 0.5
    assert cfg.schema_.build().names == ["user", "think", "output"]


@pytest.mark.parametrize("override, field", [
    ("model.hidden_size=big", "model.hidden_size"),
    ("model.hiden_size=3", "model.hiden_size: Extra inputs are not permitted"),
    ("model.family=gpt9", "model.family"),
    ("decode.sampling.output.top_p=2", "decode.sampling.output.top_p"),
    ("schema.streams=[]", "schema.streams"),
])
def test_bad_values_name_the_field_and_file(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(DemoConfig, "jobs/demo.yaml", [override])
    assert field in str(e.value) and "jobs/demo.yaml" in str(e.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(DemoConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml:1:17: not valid YAML"):
        load_config(DemoConfig, bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(DemoConfig, bad)
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(ModelConfig, None, ["hidden_size"])


def test_override_into_a_scalar_is_refused():
    tree = {"model": 3}
    with pytest.raises(ConfigError, match="model is not a section"):
        apply_override(tree, "model.size=1")


def test_skills_sessions_and_task_weights_are_for_skills_sources():
    from ms_ray.config import PrepareConfig, SkillSessionConfig, SourceConfig

    src = SourceConfig(kind="skills", session={"rows": 96, "gap": [2, 5]}, tasks=["wait_k", "tool_call"],
                       task_weights={"tool_call": 3})
    assert src.session == SkillSessionConfig(rows=96, gap=(2, 5)) and src.task_weights == {"tool_call": 3.0}
    assert SourceConfig(kind="skills").session is None  # single tasks from row 0 unless asked
    cfg = load_config(PrepareConfig, "jobs/data-skills.yaml", check_paths=False)
    assert cfg.sources[0].session.rows == cfg.packing.max_rows and sum(cfg.sources[0].task_weights.values()) == 1
    for kind, extra in (("chitchat", {}), ("jsonl", {"path": "x.jsonl"})):
        with pytest.raises(ValueError, match="task_weights is for skills sources"):
            SourceConfig(kind=kind, **extra, task_weights={"wait_k": 1})
        assert SourceConfig(kind=kind, **extra, session={"gap": [2, 9]}).session.gap == (2, 9)  # chat timing
    for extra in ({"policy": "teacher", "teacher": {"base_url": "http://127.0.0.1:1"}}, {"format": "table"}):
        with pytest.raises(ValueError, match="session timing applies to skills and to the after_input and wait_k"):
            SourceConfig(kind="jsonl", path="x.jsonl", session={}, **extra)
    with pytest.raises(ValueError, match="task_weights must be >= 0 with a positive sum"):
        SourceConfig(kind="skills", task_weights={"wait_k": -1, "tool_call": 2})
    with pytest.raises(ValueError, match=r"task_weights names tasks this source does not draw: \['count_stop'\]"):
        SourceConfig(kind="skills", tasks=["wait_k"], task_weights={"wait_k": 1, "count_stop": 2})


@pytest.mark.parametrize("override, field", [
    ("sources=[{kind: chitchat, task_weights: {wait_k: 1}}]", "task_weights is for skills sources"),
    ("sources=[{kind: skills, tasks: [wait_k], task_weights: {tool_call: 1}}]", "does not draw: ['tool_call']"),
    ("sources=[{kind: skills, session: {lead_zero: 2}}]", "sources.0.session.lead_zero"),
    ("sources=[{kind: skills, session: {rows: 0}}]", "sources.0.session.rows"),
    ("sources=[{kind: skills, session: {colour: red}}]", "colour: Extra inputs are not permitted"),
    ("eval.session.mid_answer=-1", "eval.session.mid_answer"),
])
def test_bad_session_settings_name_the_field(override, field):
    from ms_ray.config import EvalJobConfig, PrepareConfig

    cls, path = (EvalJobConfig, "jobs/eval.yaml") if override.startswith("eval.") else (PrepareConfig,
                                                                                        "jobs/data-skills.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(cls, path, [override], check_paths=False)
    assert field in str(e.value)


def test_placement_auto_spreads_cpu_workers_and_packs_gpu_workers():
    from ms_ray.config.jobs import ScalingConfig

    assert ScalingConfig().placement_strategy == "SPREAD"
    assert ScalingConfig(use_gpu=True).placement_strategy == "PACK"
    assert ScalingConfig(placement="strict_spread", use_gpu=True).placement_strategy == "STRICT_SPREAD"
    with pytest.raises(ValueError, match="placement"):
        ScalingConfig(placement="everywhere")
