"""Every YAML the project ships in jobs/, serve/ and cluster/ is parsed and validated here."""

from pathlib import Path

import pytest
import yaml

from ms_ray.config import DemoConfig, PrepareConfig, TokenizerTrainConfig, TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
# shipped file -> the typed config that validates it; a new YAML must be added here
TYPED = {
    "jobs/demo.yaml": DemoConfig,
    "jobs/data-skills.yaml": PrepareConfig,
    "jobs/data-chat.yaml": PrepareConfig,
    "jobs/tokenizer.yaml": TokenizerTrainConfig,
    "jobs/tiny.yaml": TrainConfig,
    "jobs/qwen3-0.6b-zero2.yaml": TrainConfig,
    "jobs/qwen3-8b-zero3-offload.yaml": TrainConfig,
}
GPU_PRESETS = {"jobs/qwen3-0.6b-zero2.yaml", "jobs/qwen3-8b-zero3-offload.yaml"}  # cluster paths (/mnt/...)


def shipped_outputs() -> set[str]:
    """Where shipped jobs write: an input there is made by running another shipped job."""
    configs = [load_config(cls, ROOT / p, check_paths=False) for p, cls in TYPED.items()]
    return {c.output for c in configs if isinstance(c, (PrepareConfig, TokenizerTrainConfig))}
SHIPPED = sorted(str(p.relative_to(ROOT)) for d in ("jobs", "serve", "cluster") for p in (ROOT / d).rglob("*.y*ml"))


def test_something_is_shipped():
    assert "jobs/demo.yaml" in SHIPPED


@pytest.mark.parametrize("path", SHIPPED)
def test_shipped_yaml_is_valid(path):
    assert path in TYPED, f"{path} has no typed config check: add it to TYPED"
    cfg = load_config(TYPED[path], ROOT / path, check_paths=False)
    if isinstance(cfg, TrainConfig):
        inputs = [p for p in (cfg.data.prepare,) if p]
        if path in GPU_PRESETS:
            assert cfg.scaling.use_gpu and cfg.model.pretrained and cfg.deepspeed.precision == "bf16"
            assert cfg.run.storage.startswith("/mnt/shared")  # every node must see the checkpoints
        else:
            inputs.append(cfg.data.path)
        for p in inputs:
            assert (ROOT / p).exists() or p in shipped_outputs(), f"{path}: input {p} neither ships nor is made by a shipped job"
    if isinstance(cfg, PrepareConfig):
        inputs = [s.path for s in cfg.sources if s.path] + ([cfg.tokenizer] if cfg.tokenizer != "skills" else [])
        for p in inputs:
            assert (ROOT / p).exists() or p in shipped_outputs(), f"{path}: input {p} neither ships nor is made by a shipped job"
    for doc in yaml.safe_load_all((ROOT / path).read_text()):
        assert isinstance(doc, dict)
