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
