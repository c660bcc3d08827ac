"""One typed config tree, loaded from YAML with dotted command-line overrides.

    cfg = load_config(DemoConfig, "jobs/demo.yaml", ["model.hidden_size=64"])

Unknown keys and wrong types fail at load time with the file and the dotted field named,
before anything expensive starts.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

if TYPE_CHECKING:
    from .core.decode import Sampling, StopRules
from .core.streams import DEFAULT_PAD, DEFAULT_SILENCE, StreamSchema, StreamSpec


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the field."""


def check_paths(info: ValidationInfo) -> bool:
    """Input paths must exist, except where a caller only checks a config's shape."""
    return (info.context or {}).get("check_paths", True)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---- shared sections ---------------------------------------------------------------------
class StreamConfig(Strict):
    name: str
    role: Literal["input", "output"]
    loss_weight: float | None = None
    end_token: str | None = None


class SchemaConfig(Strict):
    streams: list[StreamConfig] = Field(min_length=1)
    silence_token: str = DEFAULT_SILENCE
    pad_token: str = DEFAULT_PAD

    def build(self) -> StreamSchema:
        return StreamSchema(
            tuple(StreamSpec(**s.model_dump()) for s in self.streams), self.silence_token, self.pad_token
        )


class ModelConfig(Strict):
    family: Literal["llama", "qwen2", "qwen3", "mistral"] = "llama"
    pretrained: str | None = None  # a HF folder; when set, the sizes below are ignored
    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    tie_embeddings: bool = True
    attention: Literal["auto", "sdpa", "flex"] = "auto"
    gradient_checkpointing: bool = False  # recompute each layer in backward: less memory, ~30 % more compute
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.pretrained is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads}): "
                             f"change model.hidden_size or model.num_heads")
        kv = self.num_kv_heads
        if self.pretrained is None and kv is not None and (kv <= 0 or self.num_heads % kv):
            raise ValueError(f"num_kv_heads ({kv}) must be positive and divide num_heads ({self.num_heads})")
        return self


class SamplingConfig(Strict):
    temperature: float = Field(0.0, ge=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    silence_penalty: float = 0.0

    def build(self) -> Sampling:
        from .core.decode import Sampling  # torch is imported only where a model runs (not in the ingress)

        return Sampling(**self.model_dump())


class DecodeConfig(Strict):
    max_new_rows: int | None = Field(64, gt=0)
    silent_rows: int | None = Field(None, gt=0)
    end_streams: list[str] | None = None
    sampling: dict[str, SamplingConfig] = {}  # per output stream; missing streams are greedy
    seed: int = 0

    def stop_rules(self) -> StopRules:
        from .core.decode import StopRules

        ends = tuple(self.end_streams) if self.end_streams is not None else None
        return StopRules(self.max_new_rows, ends, self.silent_rows)

    def sampling_by_stream(self) -> dict[str, Sampling]:
        return {name: s.build() for name, s in self.sampling.items()}


# ---- commands ----------------------------------------------------------------------------
class ScriptedInput(Strict):
    row: int = Field(ge=0)  # the row at which the first word goes in
    stream: str
    text: str  # one word per row


class DemoConfig(Strict):
    """`ms-ray demo`: a tiny random model decoding a scripted session."""

    schema_: SchemaConfig = Field(alias="schema")
    model: ModelConfig = ModelConfig()
    decode: DecodeConfig = DecodeConfig()
    script: list[ScriptedInput] = []


class TeacherSettings(Strict):
    """An OpenAI-compatible endpoint for the teacher policy (see ms_ray/data/teacher.py)."""

    base_url: str
    model: str = "teacher"
    api_key_env: str | None = None  # name of the environment variable holding the key
    chunk_words: int | None = Field(None, gt=0)  # None: split the input into sentences
    temperature: float = 0.0
    timeout_s: float = Field(30.0, gt=0)
    max_retries: int = Field(2, ge=0)


class SourceConfig(Strict):
    """One input of `ms-ray prepare`."""

    kind: Literal["skills", "chitchat", "jsonl"]
    name: str | None = None  # how the source is named in ids and the manifest; default per kind
    path: str | None = None  # jsonl: the file
    format: Literal["auto", "openai", "alpaca", "sharegpt", "table"] = "auto"
    role_map: dict[str, str] | None = None  # jsonl: role -> stream (default: the usual chat roles)
    policy: str = "after_input"  # after_input | wait_k(K) | teacher (skills are timed by their task)
    teacher: TeacherSettings | None = None
    limit: int | None = Field(None, gt=0)  # chitchat/jsonl: at most this many conversations
    examples: int = Field(1000, gt=0)  # skills: how many examples
    tasks: list[str] | None = None  # skills: which tasks (default: all)
    # skills: "streams" = stream tables; "sequential" = the same examples as one labelled
    # sequence (`user: ... output: ... <|end|>`) for a one-stream baseline schema
    rendering: Literal["streams", "sequential"] = "streams"
    shards: int = Field(1, gt=0)  # parallel read-convert-pack tasks, each writes one file per split
    max_chars: int = Field(20000, gt=0)  # longer texts are dropped and reported

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, v: str) -> str:
        from .data.convert import parse_policy

        parse_policy(v)
        return v.replace(" ", "")

    @model_validator(mode="after")
    def _complete(self):
        if self.kind == "jsonl" and not self.path:
            raise ValueError("a jsonl source needs a path")
        if self.rendering == "sequential" and self.kind != "skills":
            raise ValueError("rendering: sequential is for skills sources")
        if self.policy == "teacher" and self.teacher is None:
            raise ValueError("policy teacher needs a teacher: {base_url: ...} section")
        return self

    @property
    def label(self) -> str:
        return self.name or (self.path if self.kind == "jsonl" else self.kind)


class SplitConfig(Strict):
    validation_fraction: float = Field(0.05, ge=0, le=0.5)  # of source conversations (groups)


class PackingConfig(Strict):
    max_rows: int = Field(256, gt=0)
    overflow: Literal["drop", "truncate"] = "drop"  # for examples longer than max_rows


class PrepareConfig(Strict):
    """`ms-ray prepare`: read -> convert -> tokenize -> pack -> write, on Ray Data."""

    schema_: SchemaConfig = Field(alias="schema")
    tokenizer: str = "skills"  # "skills": the skill tasks' word vocabulary; else a HF tokenizer folder
    sources: list[SourceConfig] = Field(min_length=1)
    split: SplitConfig = SplitConfig()
    packing: PackingConfig = PackingConfig()
    output: str
    seed: int = 0
    max_drop_share: float = Field(0.05, ge=0, le=1)  # fail (after writing) above this share
    # fail (before the new set is swapped in) when more of a source's tokens are unknown to the tokenizer
    max_unknown_share: float = Field(0.01, ge=0, le=1)
    address: str | None = None  # a running Ray cluster; default: start a local one

    @model_validator(mode="after")
    def _paths_exist(self, info: ValidationInfo):
        if check_paths(info):
            missing = [s.path for s in self.sources if s.kind == "jsonl" and not Path(s.path).exists()]
            if missing:
                raise ValueError(f"source file(s) do not exist: {missing}")
            folders = [s.path for s in self.sources if s.kind == "jsonl" and not Path(s.path).is_file()]
            if folders:
                raise ValueError(f"source path(s) {folders} are not files: a jsonl source's path names one .jsonl file")
            if self.tokenizer != "skills" and not Path(self.tokenizer).exists():
                raise ValueError(f"tokenizer folder {self.tokenizer} does not exist")
        names = [s.label for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique (set `name`): {names}")
        return self


class TokenizerTrainConfig(Strict):
    """`ms-ray tokenizer train`: byte-level BPE on text that ships with the project."""

    schema_: SchemaConfig = Field(alias="schema")
    vocab_size: int = Field(4096, ge=300)
    min_frequency: int = Field(2, ge=1)
    chitchat_limit: int | None = Field(None, gt=0)  # conversation pairs of chitchat-dataset
    skills: bool = True  # add the skill tasks' vocabulary text
    files: list[str] = []  # extra plain-text files, one document per line
    output: str


class DataConfig(Strict):
    path: str  # a folder written by `ms-ray prepare` (manifest.json, train/, validation/)
    prepare: str | None = None  # a prepare config to run first when `path` has no manifest yet
    batch_size: int = Field(4, gt=0)  # packed sequences per worker per micro-batch


class DeepSpeedConfig(Strict):
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state and step on the CPU
    offload_params: bool = False  # ZeRO-3 only: parameters on the CPU
    precision: Literal["fp32", "bf16"] = "fp32"
    grad_accum: int = Field(1, gt=0)
    clip: float | None = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _offload_needs_stage3(self):
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage: 3")
        return self


MAX_LR = 1.0  # above this AdamW diverges at once on any model: a typo, not a setting


class OptimConfig(Strict):
    lr: float = Field(2e-3, gt=0, le=MAX_LR, allow_inf_nan=False)
    stream_embed_lr: float | None = Field(None, gt=0, le=MAX_LR, allow_inf_nan=False)  # default: lr
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = Field(0.01, ge=0)
    max_steps: int = Field(2000, gt=0)
    warmup_steps: int = Field(100, ge=0)
    schedule: Literal["cosine", "constant", "wsd"] = "cosine"  # wsd: warmup, constant, linear cooldown
    cooldown_steps: int = Field(0, ge=0)  # wsd: length of the final linear decay
    min_lr_ratio: float = Field(0.05, ge=0, le=1)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"each beta must be in [0, 1), got {list(v)} (usual: [0.9, 0.98])")
        return v

    @model_validator(mode="after")
    def _schedule_fits(self):
        if self.warmup_steps and self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be shorter than max_steps ({self.max_steps}): "
                             f"lower optim.warmup_steps")
        if self.cooldown_steps > self.max_steps - self.warmup_steps:
            raise ValueError(f"cooldown_steps ({self.cooldown_steps}) does not fit between warmup "
                             f"({self.warmup_steps}) and max_steps ({self.max_steps})")
        return self


class ScalingConfig(Strict):
    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, gt=0)


class CheckpointConfig(Strict):
    every: int = Field(500, gt=0)  # steps
    keep: int = Field(2, gt=0)


class EvalConfig(Strict):
    every: int = Field(500, gt=0)  # steps; also at the end
    skills_per_task: int = Field(50, ge=0)  # held-out generated examples per skill task (0: off)
    seed: int = 987_654  # generation seed for held-out skill examples, distinct from the data's
    max_val_batches: int | None = Field(None, gt=0)


class WandbConfig(Strict):
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online iff WANDB_API_KEY
    project: str = "ms_ray"
    entity: str | None = None


NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def plain_name(value: str) -> str:
    """A name that becomes one folder: letters, digits, '.', '_', '-'; never a path."""
    if not NAME.match(value):
        raise ValueError(f"{value!r} must be a plain folder name (letters, digits, '.', '_', '-'; no '/' or '..')")
    return value


class RunConfig(Strict):
    name: str = "run"  # the run's folder under `storage`: a plain name, never a path
    storage: str = "runs/train"  # checkpoints, metrics, W&B files, export: {storage}/{name}
    max_failures: int = Field(1, ge=0)
    log_every: int = Field(50, gt=0)
    fail_at_step: int | None = None  # fault injection (tests): one worker raises once at this step

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        return plain_name(v)


class TrainConfig(Strict):
    """`ms-ray train`: Ray Train + DeepSpeed ZeRO + W&B."""

    schema_: SchemaConfig = Field(alias="schema")
    model: ModelConfig = ModelConfig()
    data: DataConfig
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    optim: OptimConfig = OptimConfig()
    scaling: ScalingConfig = ScalingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    wandb: WandbConfig = WandbConfig()
    run: RunConfig = RunConfig()
    seed: int = 0
    address: str | None = None  # a running Ray cluster; default: start a local one

    @model_validator(mode="after")
    def _data_exists(self, info: ValidationInfo):
        from .data.pipeline import MANIFEST

        if check_paths(info) and not self.data.prepare and not (Path(self.data.path) / MANIFEST).exists():
            raise ValueError(f"data.path: {self.data.path} has no {MANIFEST}; run `ms-ray prepare` or set data.prepare")
        if check_paths(info) and self.data.prepare and not Path(self.data.prepare).exists():
            raise ValueError(f"data.prepare: config {self.data.prepare} does not exist")
        if check_paths(info) and self.model.pretrained and not Path(self.model.pretrained).exists():
            raise ValueError(f"model.pretrained: {self.model.pretrained} does not exist")
        return self


def exported_model(folder: str, info: ValidationInfo) -> str:
    """A model folder must be a whole MultiStreamLM export before a replica or an evaluation
    tries to load it (a bad one otherwise fails inside Ray, retried, after 30 s)."""
    if check_paths(info):
        from .core.export import check_export

        check_export(folder)  # ExportError is a ValueError: reported against the field
    return folder


# ---- evaluation (`ms-ray eval`, `ms-ray compare`) ----------------------------------------
class SkillEvalConfig(Strict):
    """Held-out skill examples, decoded as live sessions (ms_ray/evaluation/harness.py)."""

    examples_per_task: int = Field(100, gt=0)
    tasks: list[str] | None = None  # default: all
    seed: int = 987_654  # generation seed, distinct from the training data's
    batch_sessions: int = Field(1, gt=0)  # 1: each session decoded alone, so ms are one session's latency
    slack_rows: int = Field(8, ge=0)  # rows allowed beyond the reference length


class EvalJobConfig(Strict):
    """`ms-ray eval CHECKPOINT`: score a streams or single-stream skills model."""

    checkpoint: str
    eval: SkillEvalConfig = SkillEvalConfig()
    output: str | None = None  # default: {checkpoint}/../eval
    name: str = "eval"
    wandb: WandbConfig = WandbConfig()

    _checkpoint = field_validator("checkpoint")(exported_model)


class CompareArm(Strict):
    train: str  # a train config file (jobs/*.yaml)
    overrides: list[str] = []  # dotted overrides applied to it


class CompareConfig(Strict):
    """`ms-ray compare`: a multi-stream model and its single-stream baseline, trained on the same
    examples with the same budget, then scored by the same harness."""

    streams: CompareArm
    sequential: CompareArm
    overrides: list[str] = []  # applied to both arms after their own (a budget change stays equal)
    eval: SkillEvalConfig = SkillEvalConfig()
    output: str = "runs/compare/tiny"  # training runs, evaluations, report.md, plots
    name: str = "compare"
    wandb: WandbConfig = WandbConfig()
    address: str | None = None  # a running Ray cluster; default: start a local one

    @model_validator(mode="after")
    def _train_configs_exist(self, info: ValidationInfo):
        for arm in ("streams", "sequential"):
            if check_paths(info) and not Path(getattr(self, arm).train).exists():
                raise ValueError(f"{arm}.train: config {getattr(self, arm).train} does not exist")
        return self


# ---- serving (`ms-ray serve`, serve/*.yaml) ---------------------------------------------
class RoleConfig(Strict):
    """What a client holding one of `keys` may do (see serve/PROTOCOL.md)."""

    keys: list[str] = []  # API keys; "env:NAME" takes the key from that environment variable (unset: skipped)
    open: bool = True  # may open new sessions (others attach to a session by id)
    write: list[str] = []  # input streams it may append to
    force: list[str] = []  # output streams it may force (teacher forcing: the model's cell is replaced)
    read: list[str] = ["*"]  # streams it may read; "*" = every stream of the model
    hidden: list[str] = []  # taken out of `read`


DEFAULT_ROLES = {
    "user": RoleConfig(write=["user"], hidden=["think"]),
    "tool": RoleConfig(open=False, write=["tool"], read=["tool_call", "tool"]),
    "operator": RoleConfig(write=["system", "user"], hidden=["think"]),
    "monitor": RoleConfig(open=False),
}


class ModelReplicaConfig(Strict):
    """The model deployment: each replica owns one batched decoder and its sessions."""

    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(1, ge=1)
    target_sessions_per_replica: float = Field(8, gt=0)  # autoscaling target (live session streams)
    max_sessions_per_replica: int = Field(16, gt=0)  # beyond: "busy"
    max_ongoing_requests: int | None = Field(None, gt=0)  # default: 4 x max_sessions + 16
    max_queued_requests: int = Field(256, ge=1)  # calls waiting for a replica (bursts of opens); beyond: "busy"
    upscale_delay_s: float = Field(10, ge=0)
    downscale_delay_s: float = Field(300, ge=0)
    look_back_period_s: float = Field(30, gt=0)  # the load is averaged over this window
    # Serve picks which replica a downscale stops (by node, not by load): its sessions end with
    # session_lost after at most this long, and their clients reopen elsewhere.
    graceful_shutdown_timeout_s: float = Field(10, ge=0)
    num_cpus: float = Field(1, ge=0)
    num_gpus: float = Field(0, ge=0)

    @model_validator(mode="after")
    def _bounds(self):
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})")
        return self


class SessionConfig(Strict):
    row_interval_s: float = Field(0.05, ge=0)  # the row clock; 0 = as fast as the model goes
    max_rows: int = Field(4096, gt=0)
    end_on_end_token: bool = False  # end a session once its output says its end token
    quiet_after_end: bool = True  # else: after its end token a stream stays silent until new input
    silent_rows: int | None = Field(None, gt=0)  # end after this many all-silent rows
    idle_timeout_s: float = Field(60, gt=0)  # end a session nobody reads or writes for this long
    backlog_rows: int = Field(2048, ge=0)  # rows kept for late subscribers (SSE after POST)
    max_append_chars: int = Field(16384, gt=0)
    sampling: dict[str, SamplingConfig] = {}  # per output stream; missing streams are greedy
    seed: int = 0


class ToolsConfig(Strict):
    enabled: bool = True  # needs both streams in the model's schema
    call_stream: str = "tool_call"
    result_stream: str = "tool"
    timeout_s: float = Field(10, gt=0)
    replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0, ge=0)


class IngressConfig(Strict):
    replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0, ge=0)
    max_connections: int = Field(1024, gt=0)  # per ingress replica: every open WebSocket/SSE stream counts
    max_queued_connections: int = Field(1024, gt=0)  # waiting for an ingress replica; beyond: HTTP 503
    max_frame_bytes: int = Field(65536, gt=0)  # client frames and HTTP bodies
    call_timeout_s: float = Field(10, gt=0)  # any call to the model deployment
    anonymous_role: str | None = "user"  # the role of a client without a key; None: a key is required
    retry_after_s: int = Field(5, ge=1)  # told to "busy" clients


class ServeConfig(Strict):
    """`ms-ray serve` and the `args` of serve/*.yaml: one app, three deployments."""

    checkpoint: str  # a MultiStreamLM folder (`ms-ray train` exports one)
    name: str = "ms_ray"
    route_prefix: str = "/"
    host: str = "127.0.0.1"  # `ms-ray serve` only; serve/*.yaml use http_options
    port: int = Field(8000, ge=0, le=65535)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    model: ModelReplicaConfig = ModelReplicaConfig()
    session: SessionConfig = SessionConfig()
    tools: ToolsConfig = ToolsConfig()
    ingress: IngressConfig = IngressConfig()
    roles: dict[str, RoleConfig] = DEFAULT_ROLES
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    access_log: bool = False  # one line per call (every append): off unless debugging

    @model_validator(mode="after")
    def _checks(self, info: ValidationInfo):
        if self.ingress.anonymous_role is not None and self.ingress.anonymous_role not in self.roles:
            raise ValueError(f"ingress.anonymous_role: {self.ingress.anonymous_role!r} is not one of roles {sorted(self.roles)}")
        return self

    _checkpoint = field_validator("checkpoint")(exported_model)


def load_serve_file(path: str | Path, overrides: list[str] = (), check_paths: bool = True) -> tuple[ServeConfig, dict]:
    """A Serve config file (serve/*.yaml): our ServeConfig is its first application's `args`;
    its http_options give host and port. Returns (config, the whole file as a dict)."""
    source = str(path)
    tree = read_yaml(path)
    apps = (tree or {}).get("applications") if isinstance(tree, dict) else None
    if not isinstance(apps, list) or not apps or not isinstance(apps[0], dict) or not isinstance(apps[0].get("args"), dict):
        raise ConfigError(f"{source}: expected a Serve config with applications[0].args holding the ms_ray settings")
    data = dict(apps[0]["args"])
    http = tree.get("http_options") if isinstance(tree.get("http_options"), dict) else {}
    for key in ("host", "port"):
        if key in http:
            data.setdefault(key, http[key])
    data.setdefault("name", apps[0].get("name", "ms_ray"))
    data.setdefault("route_prefix", apps[0].get("route_prefix", "/"))
    cfg = load_config(ServeConfig, None, overrides, data=data, check_paths=check_paths,
                      source=f"{source} applications[0].args")
    return cfg, tree


# ---- loading -----------------------------------------------------------------------------
C = TypeVar("C", bound=BaseModel)


# Besides YAMLError, PyYAML's constructors raise these for some scalars ("2020-13-45", "!!bool x",
# "!!timestamp x", integers of over 4300 digits), and its composer RecursionError for deep nesting.
YAML_LEAKS = (RecursionError, ValueError, TypeError, KeyError, AttributeError)


def yaml_leak(e: Exception) -> str:
    return "nested too deeply" if isinstance(e, RecursionError) else f"a value YAML cannot read ({str(e).split(';')[0]})"


def read_yaml(path: str | Path):
    """A YAML file's content, or a ConfigError naming the file and what is wrong with it."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {source} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{source} is a folder, not a config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source} is not a text (UTF-8) file (byte {e.start}): give a YAML config") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {source}: {e.strerror or e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError(f"{source}{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    except YAML_LEAKS as e:
        raise ConfigError(f"{source}: not valid YAML: {yaml_leak(e)}") from None


def apply_override(tree: dict, override: str) -> tuple[str, ...]:
    """Apply one `a.b.c=value` override in place (the value is parsed as YAML); returns the key's path."""
    key, sep, raw = override.partition("=")
    parts = tuple(p.strip() for p in key.strip().split("."))
    if not sep or not all(parts):
        raise ConfigError(f"override {override!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({getattr(e, 'problem', None) or e}); "
                          "quote it, e.g. key='[1'") from None
    except YAML_LEAKS as e:
        raise ConfigError(f"override {override!r}: the value is not valid YAML: {yaml_leak(e)}") from None
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value
    return parts


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] = (), data: dict | None = None,
                check_paths: bool = True, source: str | None = None) -> C:
    """Build `cls` from a YAML file (or a dict) plus dotted overrides, or raise ConfigError.
    An error is reported against the override that set the field, else against the file.
    check_paths=False skips the existence of input paths (checking shipped configs' shape)."""
    source = source or (str(path) if path else "<config>")
    tree = dict(data or {})
    if path is not None:
        loaded = read_yaml(path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of settings, got {type(loaded).__name__}")
        tree.update(loaded or {})
    set_by = {apply_override(tree, o): o for o in overrides}
    try:
        return cls.model_validate(tree, context={"check_paths": check_paths})
    except OSError as e:  # a path check that cannot even ask (e.g. a name over 255 bytes)
        raise ConfigError(f"{source}: cannot check path {e.filename!r}: {e.strerror or e}") from None
    except UnicodeError:  # pydantic cannot even report a str holding an unpaired surrogate
        raise ConfigError(f"{source}: a value is not Unicode text: it holds an unpaired surrogate such as "
                          "\"\\ud800\" (YAML does not join \\uD83D\\uDE00 pairs: write the character, or \\U0001F600)") from None
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = tuple(str(p) for p in err["loc"])
            override = next((o for keys, o in set_by.items() if loc[: len(keys)] == keys or keys[: len(loc)] == loc
                             and loc), None)
            where = f"override {override} (over {source})" if override else source
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {'.'.join(loc) or cls.__name__}: {msg}")
        raise ConfigError("\n".join(lines)) from None
