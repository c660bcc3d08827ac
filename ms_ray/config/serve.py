"""The config of `ms-ray serve`: the `args` of serve/*.yaml (one app: the ingress, the model
replicas and the stream actors), roles and their keys, sessions, the ingress."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from ..core.export import export_window
from .base import ConfigError, Strict, check_paths, exported_model, load_config, read_yaml
from .model import SamplingConfig


# ---- serving (`ms-ray serve`, serve/*.yaml) ---------------------------------------------
class RoleConfig(Strict):
    """What a client holding one of `keys` may do (see serve/PROTOCOL.md)."""

    keys: list[str] = []  # API keys; "env:NAME" takes the key from that environment variable (unset: skipped)
    open: bool = True  # may open new sessions (others attach to a session by id)
    write: list[str] = []  # input streams it may append to
    force: list[str] = []  # output streams it may force (teacher forcing: the model's cell is replaced)
    read: list[str] = ["*"]  # streams it may read; "*" = every stream of the model
    hidden: list[str] = []  # taken out of `read`
    # a session belongs to its opener (its session token); a trusted back end (tools, operators)
    # may write to and close any session it can name
    any_session: bool = False
    # limits per client (its key; without a key, its address), kept by each ingress replica
    max_sessions: int | None = Field(None, gt=0)  # sessions open at once
    max_watchers: int | None = Field(None, gt=0)  # sessions watched without owning them
    appends_per_s: float | None = Field(None, gt=0)  # sustained append rate ...
    append_burst: int = Field(20, gt=0)  # ... after a burst of this many


DEFAULT_ROLES = {
    "user": RoleConfig(write=["user"], hidden=["think"]),
    "tool": RoleConfig(open=False, write=["tool"], read=["tool_call", "tool"], any_session=True),
    "operator": RoleConfig(write=["system", "user"], hidden=["think"], any_session=True),
    "monitor": RoleConfig(open=False),
}


class ModelReplicaConfig(Strict):
    """The model deployment: each replica owns one batched decoder and its sessions."""

    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(1, ge=1)
    target_sessions_per_replica: float = Field(8, gt=0)  # autoscaling target (live session streams)
    max_sessions_per_replica: int | None = Field(16, gt=0)  # beyond: "busy"; null: as many as kv_cache_gb holds
    # the KV-cache memory of a replica when max_sessions_per_replica is null: sessions x their most rows
    # (window + window/8 for a windowed model, else session.max_rows) x the cache's bytes per row
    kv_cache_gb: float = Field(1.0, gt=0)
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
    # at most this many replicas on one node (null: no limit). 1 spreads the sessions over the
    # machines, so a node's death loses only the sessions of its replica
    max_replicas_per_node: int | None = Field(None, ge=1)
    resources: dict[str, float] = {}  # custom Ray resources each replica needs (pins it to nodes that have them)

    @model_validator(mode="after")
    def _bounds(self):
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})")
        return self


class SessionConfig(Strict):
    row_interval_s: float = Field(0.05, ge=0)  # the row clock; 0 = as fast as the model goes
    max_rows: int | None = Field(4096, gt=0)  # null: until closed or idle (a windowed model only)
    end_on_end_token: bool = False  # end a session once its output says its end token
    # True: after its end token an output stream is held silent until the next input re-opens it
    # (the decoder's StopRules.reopen_on_input); False: the model alone decides (a skills model
    # trained on sessions stays quiet by itself)
    quiet_after_end: bool = True
    silent_rows: int | None = Field(None, gt=0)  # end after this many all-silent rows
    idle_timeout_s: float = Field(60, gt=0)  # end a session nobody reads or writes for this long
    backlog_rows: int = Field(2048, ge=0)  # rows kept for late subscribers (SSE after POST)
    max_append_chars: int = Field(16384, gt=0)
    sampling: dict[str, SamplingConfig] = {}  # per output stream; missing streams are greedy
    seed: int = 0


def import_attr(path: str):
    """`module:attribute` -> the object; ValueError naming what is missing."""
    module, _, name = path.partition(":")
    if not module or not name:
        raise ValueError(f"import path {path!r}: expected 'module:attribute'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"import path {path!r}: {e}") from None


class ActorConfig(Strict):
    """A stream actor (ms_ray/serving/stream_actors.py): a deployment attached to streams. An actor
    whose streams the model lacks is left out (the calculator beside a chat model), unless required."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
    import_path: str  # module:Class; the class gets checkpoint= and `args`
    reads: list[str] = []  # streams whose cells it gets; "*" = every stream
    writes: list[str] = []  # input streams it may append to
    args: dict[str, Any] = {}
    required: bool = False
    replicas: int = Field(1, ge=1)  # calls of one model replica always reach the same actor replica
    num_cpus: float = Field(0, ge=0)
    timeout_s: float = Field(10, gt=0)  # one batch call; a batch that fails 3 times is given up (logged)

    @model_validator(mode="after")
    def _constructible(self):
        actor = import_attr(self.import_path)
        try:
            inspect.signature(actor).bind(checkpoint="", **self.args)
        except TypeError as e:
            raise ValueError(f"args do not fit {self.import_path}: {e}") from None
        return self


def default_actors() -> list[ActorConfig]:
    """The calculator (the tool runner): `mul 6 7` on tool_call -> `42` on tool, 3 rows after the call."""
    return [ActorConfig(name="calculator", import_path="ms_ray.serving.stream_actors:Calculator",
                        reads=["tool_call"], writes=["tool"])]


class IngressConfig(Strict):
    replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0, ge=0)
    # custom Ray resources each replica needs, e.g. one only the head node has: the connections an
    # ingress replica holds end with its node, so it belongs on the node clients reach (its proxy)
    resources: dict[str, float] = {}
    max_connections: int = Field(1024, gt=0)  # per ingress replica: every open WebSocket/SSE stream counts
    max_queued_connections: int = Field(1024, gt=0)  # waiting for an ingress replica; beyond: HTTP 503
    max_frame_bytes: int = Field(65536, gt=0)  # client frames and HTTP bodies
    call_timeout_s: float = Field(10, gt=0)  # any call to the model deployment
    anonymous_role: str | None = "user"  # the role of a client without a key; None: a key is required
    retry_after_s: int = Field(5, ge=1)  # told to "busy" clients
    heartbeat_s: float = Field(1.0, gt=0)  # protocol v2: a frame at least this often, rows or not
    # protocol v2: at most one frame per connection this often; rows that come sooner wait and go
    # together (a person cannot tell 20 frames/s from more; the proxy's CPU per frame can)
    frame_interval_s: float = Field(0.05, ge=0)


class ChatConfig(Strict):
    """The OpenAI-compatible endpoints (/v1/chat/completions, /v1/models, /v1/realtime; serve/PROTOCOL.md):
    how a chat's messages become stream text and where its answer is read."""

    model_name: str | None = None  # the `model` clients name; null: the checkpoint folder's name (its
    # parent's when the folder is an `export`, as `ms-ray train` writes: runs/train/tiny/export -> tiny)
    # message role -> the stream its text goes to (a role missing here, or mapped to a stream the
    # model lacks, is refused naming the streams it has); `assistant` turns are the answer stream's history
    role_streams: dict[str, str] = {"system": "system", "developer": "system", "user": "user", "tool": "tool",
                                    "assistant": "output"}
    answer_stream: str = "output"  # the reply's `content`, until the stream's end token
    reasoning_stream: str | None = "think"  # `reasoning_content`, for roles that may read it (never in content)
    gap_rows: int = Field(1, ge=0)  # silent rows between one message's last token and the next message
    max_reply_rows: int = Field(512, gt=0)  # rows after the last message; then finish_reason "length"


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
    actors: list[ActorConfig] = Field(default_factory=default_actors)
    ingress: IngressConfig = IngressConfig()
    roles: dict[str, RoleConfig] = DEFAULT_ROLES
    chat: ChatConfig = ChatConfig()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    access_log: bool = False  # one line per call (every append): off unless debugging

    @model_validator(mode="after")
    def _checks(self, info: ValidationInfo):
        names = [a.name for a in self.actors]
        if len(set(names)) != len(names):
            raise ValueError(f"actors: names must be unique, got {names}")
        if self.session.max_rows is None and check_paths(info) and export_window(self.checkpoint) is None:
            raise ValueError(f"session.max_rows: null (sessions without an end) needs a model trained with a window "
                             f"(model.window_rows); {self.checkpoint} has none, so a session's memory would grow with "
                             "every row: set session.max_rows")
        if self.ingress.anonymous_role is not None and self.ingress.anonymous_role not in self.roles:
            raise ValueError(f"ingress.anonymous_role: {self.ingress.anonymous_role!r} is not one of roles "
                             f"{sorted(self.roles)}")
        return self

    _checkpoint = field_validator("checkpoint")(exported_model)


def load_serve_file(path: str | Path, overrides: list[str] = (), check_paths: bool = True) -> tuple[ServeConfig, dict]:
    """A Serve config file (serve/*.yaml): our ServeConfig is its first application's `args`;
    its http_options give host and port. Returns (config, the whole file as a dict)."""
    source = str(path)
    tree = read_yaml(path)
    apps = (tree or {}).get("applications") if isinstance(tree, dict) else None
    first = apps[0] if isinstance(apps, list) and apps else None
    if not isinstance(first, dict) or not isinstance(first.get("args"), dict):
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
