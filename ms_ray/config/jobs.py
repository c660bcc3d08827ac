"""The configs of the job commands (`ms-ray demo`, `prepare`, `tokenizer`, `train`, `export`,
`eval`, `compare`): jobs/*.yaml parsed into these models, every field checked at load time."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from ..core.streams import DEFAULT_PAD, DEFAULT_SILENCE, StreamSchema, StreamSpec
from ..manifest import MANIFEST
from .base import Strict, check_paths, exported_model, parse_policy, plain_name
from .evaluation import ChatEvalConfig
from .model import LoraConfig, ModelConfig, SamplingConfig  # noqa: F401  (LoraConfig: re-exported)

if TYPE_CHECKING:
    from ..core.decode import Sampling, StopRules


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


class DecodeConfig(Strict):
    max_new_rows: int | None = Field(64, gt=0)
    silent_rows: int | None = Field(None, gt=0)
    end_streams: list[str] | None = None
    sampling: dict[str, SamplingConfig] = {}  # per output stream; missing streams are greedy
    seed: int = 0

    def stop_rules(self) -> StopRules:
        from ..core.decode import StopRules

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


class SkillSessionConfig(Strict):
    """How skill sessions are drawn (ms_ray/data/skill_sessions.py): leading silence, 1-4 tasks
    separated by silent gaps or asked while a count runs, in at most `rows` rows."""

    rows: int = Field(128, gt=0)  # a session never exceeds this; at most packing.max_rows
    tasks: tuple[int, int] = (1, 4)  # tasks per session, inclusive
    lead_zero: float = Field(0.25, ge=0, le=1)  # probability that the first question starts at row 0
    lead_silence: tuple[int, int] = (1, 40)  # else: silent rows before it
    gap: tuple[int, int] = (1, 12)  # silent rows between an answer's end and the next question
    mid_answer: float = Field(0.5, ge=0, le=1)  # after a count that still runs: chance the next question cuts in
    long_sums: float = Field(0.0, ge=0, le=1)  # chance a running_sum adds 5-8 digits of 3-9 (large totals; training)

    @field_validator("tasks", "lead_silence", "gap")
    @classmethod
    def _range(cls, v: tuple[int, int], info: ValidationInfo) -> tuple[int, int]:
        if not 0 <= v[0] <= v[1]:
            raise ValueError(f"{info.field_name} must be [low, high] with 0 <= low <= high, got {list(v)}")
        if info.field_name == "tasks" and v[0] < 1:
            raise ValueError("tasks: a session has at least one task")
        return v


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
    # skills: sessions (questions at any time, several per session; `examples` counts sessions),
    # or null for one task per example from row 0 (the single-task layout); after_input / wait_k:
    # the same lead_zero, lead_silence and gap around a conversation's turns
    session: SkillSessionConfig | None = None
    task_weights: dict[str, float] | None = None  # skills: how often each task is drawn (default: equal)
    shards: int = Field(1, gt=0)  # parallel read-convert-pack tasks, each writes one file per split
    max_chars: int = Field(20000, gt=0)  # longer texts are dropped and reported

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, v: str) -> str:
        parse_policy(v)
        return v.replace(" ", "")

    @model_validator(mode="after")
    def _complete(self):
        if self.kind == "jsonl" and not self.path:
            raise ValueError("a jsonl source needs a path")
        if self.rendering == "sequential" and self.kind != "skills":
            raise ValueError("rendering: sequential is for skills sources")
        if self.kind != "skills" and self.task_weights:
            raise ValueError("task_weights is for skills sources")
        if self.session is not None and (self.policy == "teacher" or self.format == "table") and self.kind != "skills":
            raise ValueError("session timing applies to skills and to the after_input and wait_k policies; "
                             "the teacher and table rows carry their own timing")
        weights = (self.task_weights or {}).values()
        if self.task_weights is not None and (min(weights, default=0) < 0 or sum(weights) <= 0):
            raise ValueError(f"task_weights must be >= 0 with a positive sum, got {self.task_weights}")
        if self.tasks and set(self.task_weights or ()) - set(self.tasks):
            raise ValueError(f"task_weights names tasks this source does not draw: "
                             f"{sorted(set(self.task_weights) - set(self.tasks))}")
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
    """`ms-ray tokenizer`: byte-level BPE on text that ships with the project."""

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
    # where the workers go on a cluster: auto = pack for GPU workers (ranks of one node talk over
    # its fast links; resources still spread them when a node is full), spread for CPU workers
    # (data parallelism across nodes: every node's cores and memory bandwidth add up)
    placement: Literal["auto", "pack", "spread", "strict_pack", "strict_spread"] = "auto"

    @property
    def placement_strategy(self) -> str:
        """Ray's name of the placement (ScalingConfig.placement_strategy)."""
        if self.placement == "auto":
            return "PACK" if self.use_gpu else "SPREAD"
        return self.placement.upper()


class CheckpointConfig(Strict):
    every: int = Field(500, gt=0)  # steps
    keep: int = Field(2, gt=0)


class SkillEvalConfig(Strict):
    """Held-out skill examples decoded as live sessions and scored by ms_ray/evaluation/harness.py:
    the one definition of the skill evaluation, for `ms-ray eval`, `ms-ray compare` and training."""

    examples_per_task: int = Field(100, gt=0)
    tasks: list[str] | None = None  # default: all
    seed: int = 987_654  # generation seed, distinct from the training data's
    batch_sessions: int = Field(1, gt=0)  # 1: each session decoded alone, so ms are one session's latency
    slack_rows: int = Field(8, ge=0)  # rows allowed beyond the reference length
    # every session begins at this row of a live session without input before (e.g. 50000: a
    # question an hour into a session; a windowed model's memory stays constant, an unwindowed one's grows)
    offset_rows: int = Field(0, ge=0)
    tool: Literal["live", "scripted"] = "live"  # live: the real tool answers the model's own call; scripted:
    # the reference's result at the reference's rows
    # sessions: examples_per_task sessions per task and condition (row 0, after silence, later,
    # mid-answer), drawn with this shape; null: one task per example from row 0
    session: SkillSessionConfig | None = SkillSessionConfig()

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        if isinstance(data, dict) and "skills_per_task" in data:
            raise ValueError("eval.skills_per_task is now eval.examples_per_task")
        return data


class EvalConfig(SkillEvalConfig):
    """`ms-ray train`'s evaluation: validation loss every `every` steps and at the end, and the
    skill evaluation (SkillEvalConfig) of the model being trained."""

    every: int = Field(500, gt=0)  # steps; also at the end
    examples_per_task: int = Field(50, ge=0)  # held-out generated examples per skill task (0: off)
    batch_sessions: int = Field(256, gt=0)  # sessions decoded together on each rank: ms are a batch's
    max_val_batches: int | None = Field(None, gt=0)


class WandbConfig(Strict):
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online iff WANDB_API_KEY
    project: str = "ms_ray"
    entity: str | None = None




class RunConfig(Strict):
    name: str = "run"  # the run's folder under `storage`: a plain name, never a path
    storage: str = "runs/train"  # checkpoints, metrics, W&B files, export: {storage}/{name}
    max_failures: int = Field(1, ge=0)
    # after a failure, the workers must be running again within startup_timeout_s (e.g. a dead node's
    # replacement joined); a start that times out is retried startup_retries times, then the run fails
    startup_timeout_s: float = Field(120.0, gt=0)
    startup_retries: int = Field(1, ge=0)
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
        if check_paths(info) and not self.data.prepare and not (Path(self.data.path) / MANIFEST).exists():
            raise ValueError(f"data.path: {self.data.path} has no {MANIFEST}; run `ms-ray prepare` or set data.prepare")
        if check_paths(info) and self.data.prepare and not Path(self.data.prepare).exists():
            raise ValueError(f"data.prepare: config {self.data.prepare} does not exist")
        if check_paths(info) and self.model.pretrained and not Path(self.model.pretrained).exists():
            raise ValueError(f"model.pretrained: {self.model.pretrained} does not exist")
        return self


class ExportConfig(TrainConfig):
    """`ms-ray export`: a run's train config, plus which checkpoint to consolidate (any ZeRO stage)
    into one MultiStreamLM folder, and where. Here `checkpoint` is that checkpoint's folder; the
    train config's own `checkpoint:` section (how often to save) means nothing to an export and is
    dropped."""

    checkpoint: str | None = None  # a checkpoint_* folder of the run; default: the run's latest
    out: str | None = None  # default: {run.storage}/{run.name}/export

    @model_validator(mode="before")
    @classmethod
    def _drop_checkpoint_settings(cls, data):
        if isinstance(data, dict) and isinstance(data.get("checkpoint"), dict):
            data = {k: v for k, v in data.items() if k != "checkpoint"}
        return data

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_folder(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and check_paths(info) and not Path(value).is_dir():
            what = "is not a folder" if Path(value).exists() else "does not exist"
            raise ValueError(f"{value} {what}: give one of the run's checkpoint_* folders, or leave checkpoint "
                             "unset for the latest")
        return value


# ---- evaluation (`ms-ray eval`, `ms-ray compare`) ----------------------------------------
class EvalJobConfig(Strict):
    """`ms-ray eval [CONFIG] checkpoint=PATH`: score a streams or single-stream skills model, or a chat model."""

    checkpoint: str
    eval: SkillEvalConfig = SkillEvalConfig()
    chat: ChatEvalConfig | None = None  # set: score a chat model on held-out conversations instead (eval: ignored)
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
