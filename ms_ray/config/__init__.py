"""One typed config tree, loaded from YAML with dotted command-line overrides.

    cfg = load_config(TrainConfig, "jobs/tiny.yaml", ["optim.max_steps=500"])

Unknown keys and wrong types fail at load time with the file and the dotted field named,
before anything expensive starts. base: the loader; jobs: the job commands' configs; model:
their model section (LoRA included); serve: `ms-ray serve`; importing: `ms-ray import`;
evaluation: `ms-ray eval`'s chat section.
Import from here: `from ms_ray.config import TrainConfig`.
"""

from .base import (  # noqa: F401  (the public names)
    YAML_LEAKS,
    ConfigError,
    Strict,
    apply_override,
    check_paths,
    exported_model,
    load_config,
    parse_policy,
    plain_name,
    read_yaml,
    yaml_leak,
)
from .evaluation import ChatEvalConfig  # noqa: F401  (a public name)
from .importing import ImportConfig  # noqa: F401  (a public name)
from .jobs import (  # noqa: F401  (the public names)
    MAX_LR,
    CheckpointConfig,
    CompareArm,
    CompareConfig,
    DataConfig,
    DecodeConfig,
    DeepSpeedConfig,
    DemoConfig,
    EvalConfig,
    EvalJobConfig,
    ExportConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    PackingConfig,
    PrepareConfig,
    RunConfig,
    SamplingConfig,
    ScalingConfig,
    SchemaConfig,
    ScriptedInput,
    SkillEvalConfig,
    SkillSessionConfig,
    SourceConfig,
    SplitConfig,
    StreamConfig,
    TeacherSettings,
    TokenizerTrainConfig,
    TrainConfig,
    WandbConfig,
)
from .serve import (  # noqa: F401  (the public names)
    DEFAULT_ROLES,
    ActorConfig,
    IngressConfig,
    ModelReplicaConfig,
    RoleConfig,
    ServeConfig,
    SessionConfig,
    load_serve_file,
)
