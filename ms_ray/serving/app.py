"""The Ray Serve application: ingress -> session server (model replicas) -> tool runner.

    build(args)          the application builder `serve run` / `serve deploy` call (serve/*.yaml);
    serve_local(cfg)     `ms-ray serve checkpoint=PATH`: embedded Ray on 127.0.0.1, blocks until Ctrl-C.

Each SessionServer replica loads the checkpoint, warms up, and only then counts as running
(readiness). Calls naming a session are pinned to its replica by routing.SessionRouter.
"""

from __future__ import annotations

import logging
import signal
import time

import torch
from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig

from ..config import ServeConfig, load_config
from ..core.loading import load_export
from ..ray_env import init_ray
from ..tools import run_call
from .access import ServeError
from .ingress import Ingress, awaited  # never the other way round: the ingress replica must not load torch
from .session_ids import replica_of
from .sessions import EngineSettings, SessionEngine


def refusal(e: ServeError) -> dict:
    return {"type": "error", "code": e.code, "message": e.message}


def engine_settings(cfg: ServeConfig, tools: bool) -> EngineSettings:
    s = cfg.session
    return EngineSettings(
        max_sessions=cfg.model.max_sessions_per_replica, row_interval_s=s.row_interval_s, max_rows=s.max_rows,
        end_on_end_token=s.end_on_end_token, quiet_after_end=s.quiet_after_end, silent_rows=s.silent_rows,
        idle_timeout_s=s.idle_timeout_s, backlog_rows=s.backlog_rows, max_append_chars=s.max_append_chars,
        sampling={k: v.build() for k, v in s.sampling.items()},
        tool_call_stream=cfg.tools.call_stream if tools else None,
        tool_result_stream=cfg.tools.result_stream if tools else None,
        tool_timeout_s=cfg.tools.timeout_s, tool_delay_rows=cfg.tools.delay_rows, seed=s.seed,
    )


@serve.deployment(name="ToolRunner")
class ToolRunner:
    """Executes tool calls (tools.run_call: the calculator and its `mul A B` forms)."""

    async def run(self, call: str) -> str:
        return run_call(call)


@serve.deployment(name="SessionServer")
class SessionServer:
    """One batched decoder and its live sessions; the unit that autoscales."""

    def __init__(self, config: dict, tools=None):
        cfg = ServeConfig.model_validate(config, context={"check_paths": False})
        if cfg.model.num_cpus >= 1:
            torch.set_num_threads(int(cfg.model.num_cpus))
        self.replica = serve.get_replica_context().replica_id.unique_id
        model, tokenizer = load_export(cfg.checkpoint, cfg.device, cfg.dtype)
        names = model.schema.names
        use_tools = tools is not None and cfg.tools.call_stream in names and cfg.tools.result_stream in names
        run_tool = (lambda call: awaited(tools.run.remote(call))) if use_tools else None
        self.engine = SessionEngine(model, tokenizer, engine_settings(cfg, use_tools), self.replica, run_tool)
        started = time.perf_counter()
        warm = self.engine.decoder.open("warmup")  # the first forward pays for lazy init: not a client
        self.engine.decoder.step(), self.engine.decoder.step()
        self.engine.decoder.close(warm)
        self.warmup_s = time.perf_counter() - started

    # Refusals come back as error events, not exceptions: a client's mistake is not a server
    # error (no traceback in the replica log) and needs no unwrapping on the other side.
    async def open(self, max_rows: int | None = None, end_on_end_token: bool | None = None, inputs=()) -> dict:
        try:
            return await self.engine.open(max_rows, end_on_end_token, inputs)
        except ServeError as e:
            return refusal(e)

    async def append(self, session: str, stream: str, text: str, force: bool = False, end: bool = False) -> dict:
        try:
            self._owned(session)
            return self.engine.append(session, stream, text, force, end=end)
        except ServeError as e:
            return refusal(e)

    async def events(self, session: str, streams: list[str] | None = None, from_row: int = 0):
        try:
            self._owned(session)
            readable = None if streams is None else frozenset(streams)
            async for batch in self.engine.subscribe(session, readable, from_row):
                yield batch
        except ServeError as e:
            yield [refusal(e)]

    async def close(self, session: str, reason: str = "closed") -> dict:
        try:
            self._owned(session)
            await self.engine.close(session, reason)
            return {"type": "end", "reason": reason}
        except ServeError as e:
            return refusal(e)

    async def ready(self) -> dict:
        return {"replica": self.replica, "warmup_s": round(self.warmup_s, 3), "streams": self.engine.describe(),
                **self.engine.stats()}

    def check_health(self) -> None:
        if self.engine.failure:
            raise RuntimeError(f"the step loop failed: {self.engine.failure}")

    def _owned(self, session: str) -> None:
        if session in self.engine.sessions or session in self.engine.ended:
            return
        owner = replica_of(session)
        if owner is not None and owner != self.replica:
            raise ServeError("session_lost", f"session {session!r} lived on a replica that is gone; open a new session")


def build(args: dict):
    """Application builder: `args` is a ServeConfig (the `args:` of serve/*.yaml)."""
    cfg = args if isinstance(args, ServeConfig) else load_config(ServeConfig, data=args)
    m = cfg.model
    logs = {"log_level": cfg.log_level, "enable_access_log": cfg.access_log}
    tools = ToolRunner.options(num_replicas=cfg.tools.replicas, ray_actor_options={"num_cpus": cfg.tools.num_cpus},
                               max_ongoing_requests=64, logging_config=logs)
    server = SessionServer.options(
        autoscaling_config=AutoscalingConfig(
            min_replicas=m.min_replicas, max_replicas=m.max_replicas, initial_replicas=m.min_replicas,
            target_ongoing_requests=m.target_sessions_per_replica,
            upscale_delay_s=m.upscale_delay_s, downscale_delay_s=m.downscale_delay_s,
            look_back_period_s=m.look_back_period_s, metrics_interval_s=min(10.0, m.look_back_period_s / 4),
        ),
        max_ongoing_requests=m.max_ongoing_requests or 4 * m.max_sessions_per_replica + 16,
        max_queued_requests=m.max_queued_requests,
        graceful_shutdown_timeout_s=m.graceful_shutdown_timeout_s,
        ray_actor_options={"num_cpus": m.num_cpus, "num_gpus": m.num_gpus},
        request_router_config=RequestRouterConfig(request_router_class="ms_ray.serving.routing:SessionRouter"),
        logging_config=logs,
    )
    config = cfg.model_dump(by_alias=True)
    server_app = server.bind(config, tools.bind() if cfg.tools.enabled else None)
    ingress = Ingress.options(num_replicas=cfg.ingress.replicas, ray_actor_options={"num_cpus": cfg.ingress.num_cpus},
                              max_ongoing_requests=cfg.ingress.max_connections,  # Serve's default is 5
                              max_queued_requests=cfg.ingress.max_queued_connections, logging_config=logs)
    return ingress.bind(config, server_app)


def stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt


def serve_local(cfg: ServeConfig, blocking: bool = True):
    """Run the app on an embedded Ray bound to 127.0.0.1 (or cfg.host); returns the base URL.
    Ctrl-C stops it cleanly at any point, start-up included."""
    url = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
    print(f"ms-ray serve: starting {cfg.checkpoint} at {url}", flush=True)
    init_ray()
    if blocking:  # `kill`, `docker stop`, systemd: the same clean stop as Ctrl-C, not Ray's stack dump
        signal.signal(signal.SIGTERM, stop_on_sigterm)
    logging.getLogger("ray.serve").setLevel(cfg.log_level)  # this driver's own Serve lines too
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config={"log_level": cfg.log_level})
        serve.run(build(cfg), name=cfg.name, route_prefix=cfg.route_prefix, blocking=False)
        print(f"ms-ray serve: ready at {url}  (WebSocket {url.replace('http', 'ws', 1)}/v1/sessions, "
              f"protocol: serve/PROTOCOL.md; Ctrl-C stops)", flush=True)
        while blocking:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("ms-ray serve: stopping", flush=True)
        serve.shutdown()
    return url
