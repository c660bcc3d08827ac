"""Every YAML the project ships in jobs/ and serve/ is parsed and validated here (cluster/: tests/test_cluster.py)."""

import re
from pathlib import Path

import pytest
import yaml

from ms_ray import config
from ms_ray.config import load_config, load_serve_file

ROOT = Path(__file__).resolve().parents[1]
# shipped file -> the typed config that validates it; a new YAML must be added here
TYPED = {
    "jobs/demo.yaml": config.DemoConfig,
    "jobs/data-skills.yaml": config.PrepareConfig,
    "jobs/data-skills-sequential.yaml": config.PrepareConfig,
    "jobs/data-chat.yaml": config.PrepareConfig,
    "jobs/tokenizer.yaml": config.TokenizerTrainConfig,
    "jobs/tiny.yaml": config.TrainConfig,
    "jobs/qwen3-0.6b-zero2.yaml": config.TrainConfig,
    "jobs/qwen3-8b-zero3-offload.yaml": config.TrainConfig,
    "jobs/eval.yaml": config.EvalJobConfig,
    "jobs/data-smollm2-chat.yaml": config.PrepareConfig,
    "jobs/smollm2-chat.yaml": config.TrainConfig,
    "jobs/eval-smollm2-chat.yaml": config.EvalJobConfig,
    "jobs/compare-tiny.yaml": config.CompareConfig,
    "serve/local.yaml": config.ServeConfig,  # Serve config files: config.ServeConfig is applications[0].args
    "serve/cluster.yaml": config.ServeConfig,
    "serve/smollm2.yaml": config.ServeConfig,
}
GPU_PRESETS = {"jobs/qwen3-0.6b-zero2.yaml", "jobs/qwen3-8b-zero3-offload.yaml"}  # cluster paths (/mnt/...)


def imported_models() -> set[str]:
    """Where a make target writes `ms-ray import`'s HF folder (make smollm2: `SMOLLM2 := path`)."""
    return set(re.findall(r"^SMOLLM2 := (\S+)$", (ROOT / "Makefile").read_text(), re.M))


def shipped_outputs() -> set[str]:
    """Where shipped jobs (and the make targets' `ms-ray import`) write: an input there is made by
    running another shipped job."""
    configs = [load_config(cls, ROOT / p, check_paths=False) for p, cls in TYPED.items()
               if cls is not config.ServeConfig]
    outputs = {c.output for c in configs if isinstance(c, (config.PrepareConfig, config.TokenizerTrainConfig))}
    exports = {f"{c.run.storage}/{c.run.name}/export" for c in configs if isinstance(c, config.TrainConfig)}
    return outputs | exports | imported_models()
# cluster/ (launcher config, KubeRay manifests) is checked by tests/test_cluster.py instead
SHIPPED = sorted(str(p.relative_to(ROOT)) for d in ("jobs", "serve") for p in (ROOT / d).rglob("*.y*ml"))


def test_something_is_shipped():
    assert "jobs/demo.yaml" in SHIPPED


@pytest.mark.parametrize("path", SHIPPED)
def test_shipped_yaml_is_valid(path):
    assert path in TYPED, f"{path} has no typed config check: add it to TYPED"
    if TYPED[path] is config.ServeConfig:
        return check_serve_file(path)
    cfg = load_config(TYPED[path], ROOT / path, check_paths=False)
    if isinstance(cfg, config.TrainConfig):
        inputs = [p for p in (cfg.data.prepare,) if p]
        if path in GPU_PRESETS:
            assert cfg.scaling.use_gpu and cfg.model.pretrained and cfg.deepspeed.precision == "bf16"
            assert cfg.run.storage.startswith("/mnt/shared")  # every node must see the checkpoints
        else:
            inputs += [cfg.data.path] + ([cfg.model.pretrained] if cfg.model.pretrained else [])
        for p in inputs:
            made = p in shipped_outputs()
            assert (ROOT / p).exists() or made, f"{path}: input {p} neither ships nor is made by a shipped job"
    if isinstance(cfg, config.PrepareConfig):
        inputs = [s.path for s in cfg.sources if s.path] + ([cfg.tokenizer] if cfg.tokenizer != "skills" else [])
        for p in inputs:
            made = p in shipped_outputs()
            assert (ROOT / p).exists() or made, f"{path}: input {p} neither ships nor is made by a shipped job"
    if isinstance(cfg, config.EvalJobConfig):
        assert (ROOT / cfg.checkpoint).exists() or cfg.checkpoint in shipped_outputs()
        if cfg.chat is not None:  # its data is a shipped job's; its reference what `ms-ray import` writes
            assert (ROOT / cfg.chat.data).exists() or cfg.chat.data in shipped_outputs()
            assert cfg.chat.reference is None or (ROOT / cfg.chat.reference).exists() \
                or cfg.chat.reference in shipped_outputs()
    if isinstance(cfg, config.CompareConfig):  # both arms load, with the same budget and data a shipped job makes
        from ms_ray.experiments.compare import arm_configs

        for arm in arm_configs(cfg).values():
            assert arm.data.prepare and (ROOT / arm.data.prepare).exists()
    for doc in yaml.safe_load_all((ROOT / path).read_text()):
        assert isinstance(doc, dict)


def check_serve_file(path):
    """Ray's own schema for the file, ours for the app's args; the builder imports; local files
    bind to 127.0.0.1 and serve a checkpoint a shipped job makes."""
    from ray.serve.schema import ServeDeploySchema

    cfg, tree = load_serve_file(ROOT / path, check_paths=False)
    schema = ServeDeploySchema.model_validate(tree)
    module, name = schema.applications[0].import_path.split(":")
    assert callable(getattr(__import__(module, fromlist=[name]), name))
    assert set(cfg.roles) >= {"user", "monitor"}
    if path != "serve/cluster.yaml":  # one machine: local.yaml (the demo), smollm2.yaml (make smollm2)
        assert cfg.host == "127.0.0.1" and schema.http_options.host == "127.0.0.1"
        assert (ROOT / cfg.checkpoint).exists() or cfg.checkpoint in shipped_outputs()
    else:
        assert cfg.checkpoint.startswith("/mnt/shared") and cfg.model.num_gpus >= 1
        assert cfg.ingress.anonymous_role is None  # a cluster never serves without keys


def test_the_baseline_data_is_the_same_sessions_on_one_stream():
    """`ms-ray compare`'s two data sets draw the same sessions (seed, source, split); only the
    rendering, the schema and the pack length (rows x streams tokens per pack) differ."""
    streams, sequential = (load_config(config.PrepareConfig, ROOT / p, check_paths=False)
                           for p in ("jobs/data-skills.yaml", "jobs/data-skills-sequential.yaml"))
    same = {"rendering": "streams"}
    assert [s.model_copy(update=same) for s in sequential.sources] == streams.sources
    assert (sequential.seed, sequential.split) == (streams.seed, streams.split)
    assert sequential.packing.max_rows == streams.packing.max_rows * len(streams.schema_.streams)
    assert streams.sources[0].session is not None  # the main job trains on sessions
