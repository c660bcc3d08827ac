"""One typed config tree, loaded from YAML with dotted command-line overrides.

    cfg = load_config(TrainConfig, "jobs/tiny.yaml", ["optim.max_steps=500"])

Unknown keys and wrong types fail at load time with the file and the dotted field named,
before anything expensive starts. base: the loader; jobs: the job commands' configs;
serve: `ms-ray serve`. Import from here: `from ms_ray.config import TrainConfig`.
"""

from .base import (  # noqa: F401  (the public names)
    ConfigError, check_paths, Strict, plain_name, exported_model, parse_policy, yaml_leak, read_yaml,
    apply_override, load_config, YAML_LEAKS,
)
from .jobs import (  # noqa: F401  (the public names)
    StreamConfig, SchemaConfig, ModelConfig, SamplingConfig, DecodeConfig, ScriptedInput, DemoConfig,
    TeacherSettings, SourceConfig, SplitConfig, PackingConfig, PrepareConfig, TokenizerTrainConfig,
    DataConfig, DeepSpeedConfig, OptimConfig, ScalingConfig, CheckpointConfig, EvalConfig, WandbConfig,
    RunConfig, TrainConfig, SkillEvalConfig, EvalJobConfig, CompareArm, CompareConfig, MAX_LR,
)
from .serve import (  # noqa: F401  (the public names)
    RoleConfig, ModelReplicaConfig, SessionConfig, ToolsConfig, IngressConfig, ServeConfig, load_serve_file,
    DEFAULT_ROLES,
)
