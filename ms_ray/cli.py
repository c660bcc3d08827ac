"""`ms-ray`: one command per task, each a function over a typed config."""

from __future__ import annotations

import argparse
import os
import sys

from .config import (CompareConfig, ConfigError, DemoConfig, EvalJobConfig, PrepareConfig, TokenizerTrainConfig, TrainConfig,
                     load_config, load_serve_file)
from .core.streams import SchemaError
from .data.pipeline import PrepareError
from .ray_env import RayAddressError, set_environment
from .submit import SubmitError
from .tracking import TrainingDiverged

REFUSED = (ConfigError, FileNotFoundError, SchemaError, RayAddressError, SubmitError)
FAILED = (PrepareError, TrainingDiverged)  # the work ran and stopped for a stated reason; what was kept is said


def demo(cfg: DemoConfig) -> list:
    """Decode a scripted session with a tiny random model and print the streams side by side.
    Inputs are injected word by word from their scripted row on; outputs are sampled."""
    from .core.decode import RowDecoder
    from .core.families import build_model
    from .core.streams import format_table
    from .data.tokenizer import word_tokenizer

    schema = cfg.schema_.build()
    words = [w for event in cfg.script for w in event.text.split()]
    words += "yes no maybe hello there sure okay thinking ready done".split()
    model, tokenizer = build_model(cfg.model, schema, word_tokenizer(words, schema))
    for event in cfg.script:
        if event.stream not in schema.names:
            raise ConfigError(f"script: unknown stream {event.stream!r}; the schema has {schema.names}")
        if schema.role(event.stream) != "input":
            raise ConfigError(f"script: stream {event.stream!r} is an output stream; scripts write input streams")

    decoder = RowDecoder(model, seed=cfg.decode.seed)
    sid = decoder.open(sampling=cfg.decode.sampling_by_stream(), stop=cfg.decode.stop_rules())
    rows, done = [], None
    while done is None:
        for event in cfg.script:
            if event.row == len(rows):
                decoder.push(sid, event.stream, tokenizer.convert_tokens_to_ids(event.text.split()))
        (row,) = decoder.step()
        rows.append(row.tokens)
        done = row.done
    print(f"ms-ray demo: {cfg.model.family} model, {sum(p.numel() for p in model.parameters()):,} parameters "
          f"(random weights), streams {schema.describe()}")
    print(format_table(rows, model.schema, tokenizer.convert_ids_to_tokens))
    print(f"session ended after {len(rows)} rows: {done}")
    return rows


def tokenizer_train(cfg: TokenizerTrainConfig):
    """Train a byte-level BPE on shipped text and save it as a HF tokenizer folder."""
    import time

    from .data.tokenizer import corpus_texts, tokenizer_hash, train_bpe

    start = time.perf_counter()
    schema = cfg.schema_.build()
    tokenizer = train_bpe(corpus_texts(cfg.chitchat_limit, cfg.skills, cfg.files), schema, cfg.vocab_size, cfg.min_frequency)
    tokenizer.save_pretrained(cfg.output)
    print(f"ms-ray tokenizer train: {len(tokenizer)} tokens, hash {tokenizer_hash(tokenizer)}, "
          f"saved to {cfg.output} in {time.perf_counter() - start:.1f} s")
    return tokenizer


def prepare(cfg: PrepareConfig):
    from .data.pipeline import prepare as run_prepare

    return run_prepare(cfg)


def train(cfg: TrainConfig, address: str | None = None):
    from .train.run import train as run_train

    return run_train(cfg.model_copy(update={"address": address}) if address else cfg)


def export(cfg: TrainConfig, checkpoint: str | None = None, out: str | None = None):
    from .train.run import export as run_export

    return run_export(cfg, checkpoint, out)


def serve(cfg, blocking: bool = True):
    """`ms-ray serve CHECKPOINT`: the Serve app on an embedded local Ray (127.0.0.1 unless told)."""
    from .serving.app import serve_local

    return serve_local(cfg, blocking)


def eval_command(cfg: EvalJobConfig):
    from .evaluation.run import eval_checkpoint

    return eval_checkpoint(cfg)


def compare(cfg: CompareConfig):
    from .experiments.compare import compare as run_compare

    return run_compare(cfg)


COMMANDS = {  # name: (function, config class, default config, help)
    "demo": (demo, DemoConfig, "jobs/demo.yaml", "decode a scripted session with a tiny random model"),
    "prepare": (prepare, PrepareConfig, "jobs/data-skills.yaml", "build packed stream-table shards on Ray Data"),
    "tokenizer": (tokenizer_train, TokenizerTrainConfig, "jobs/tokenizer.yaml", "train: a byte-level BPE tokenizer"),
    "train": (train, TrainConfig, "jobs/tiny.yaml", "train with Ray Train + DeepSpeed ZeRO (+ W&B); re-run to resume"),
    "export": (export, TrainConfig, "jobs/tiny.yaml", "consolidate a run's checkpoint into a HF folder"),
    "serve": (serve, None, "serve/local.yaml", "serve a checkpoint on Ray Serve (WebSocket/HTTP, serve/PROTOCOL.md)"),
    "eval": (eval_command, EvalJobConfig, "jobs/eval.yaml", "score a skills checkpoint: exact match, latency, behaviours"),
    "compare": (compare, CompareConfig, "jobs/compare-tiny.yaml", "multi-stream vs single-stream baseline, same budget"),
}
WITH_CHECKPOINT = ("serve", "eval")  # CHECKPOINT is positional, the config file is --config


DASHBOARD = os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265")
SUBMITTABLE = "train, prepare, tokenizer, eval or compare"


def add_cluster_commands(sub) -> None:
    """Commands that talk to a running cluster (Ray Jobs, preflight): not config-shaped."""
    p = sub.add_parser("submit", help=f"run a {SUBMITTABLE} config as a Ray Job on a cluster")
    p.add_argument("config", help=f"a {SUBMITTABLE} config file inside --working-dir")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, passed to the job's command")
    p.add_argument("--address", default=DASHBOARD, help=f"the head's dashboard (default {DASHBOARD})")
    p.add_argument("--follow", action="store_true", help="print the logs and exit with the job's status")
    p.add_argument("--name", help="submission id (default: Ray's)")
    p.add_argument("--working-dir", default=".", help="uploaded as the job's working directory (default: .)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment of the job")
    p.add_argument("--token", help="cluster token (default: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")
    p = sub.add_parser("jobs", help="list, logs or stop Ray Jobs")
    p.add_argument("action", choices=["list", "logs", "stop"])
    p.add_argument("job_id", nargs="?", help="a submission id (see `ms-ray jobs list`)")
    p.add_argument("--address", default=DASHBOARD, help=f"the head's dashboard (default {DASHBOARD})")
    p.add_argument("--follow", action="store_true")
    p.add_argument("--token")
    p = sub.add_parser("preflight", help="check storage, versions, GPUs, backend and W&B on every node")
    p.add_argument("config", nargs="?", default="jobs/tiny.yaml", help="the training config to check for (default jobs/tiny.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    p.add_argument("--address", help="a running cluster (GCS address or 'auto'; default: RAY_ADDRESS or local)")
    p.add_argument("--token")


def run_cluster_command(args, extra: list[str]) -> int:
    from .submit import jobs_command, submit, use_token

    if args.command == "submit":
        return submit(args.config, [*args.overrides, *extra], args.address, args.follow, args.token,
                      args.working_dir, args.name, args.env)
    if args.command == "jobs":
        return jobs_command(args.action, args.address, args.job_id, args.follow, args.token)
    from .preflight import preflight

    use_token(args.token)
    cfg = load_config(TrainConfig, args.config, [*args.overrides, *extra], check_paths=False)
    set_environment(args.address)
    return preflight(cfg, args.address)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ms-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, _, default, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == "tokenizer":
            p.add_argument("action", choices=["train"])
        if name == "train":
            p.add_argument("--address", help="join a running Ray cluster (HOST:PORT or auto) instead of starting a local one")
        if name == "export":
            p.add_argument("--checkpoint", help="a checkpoint folder (default: the run's latest)")
            p.add_argument("--out", help="output folder (default: {storage}/{name}/export)")
        if name in WITH_CHECKPOINT:
            p.add_argument("checkpoint", nargs="?", help="an exported model folder (default: the config's `checkpoint`)")
            p.add_argument("--config", default=default, help=f"a config file (default {default})")
        else:
            p.add_argument("config", nargs="?", default=default, help=f"a config file (default {default})")
        p.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. optim.max_steps=500")
    add_cluster_commands(sub)
    return parser


def load_command_config(args):
    """The command's typed config from its file and overrides (ConfigError names what is wrong)."""
    _, config_class, default, _ = COMMANDS[args.command]
    first = "checkpoint" if args.command in WITH_CHECKPOINT else "config"
    if getattr(args, first) and "=" in getattr(args, first):  # only overrides were given
        args.overrides = [getattr(args, first), *args.overrides]
        setattr(args, first, None if first == "checkpoint" else default)
    if args.command not in WITH_CHECKPOINT:
        return load_config(config_class, args.config, args.overrides)
    overrides = [f"checkpoint={args.checkpoint}", *args.overrides] if args.checkpoint else args.overrides
    if args.command == "serve":
        return load_serve_file(args.config, overrides)[0]
    return load_config(config_class, args.config, overrides)


def what_was_kept(command: str, cfg) -> str:
    """One line for Ctrl-C: what survives the interruption."""
    if command == "train" and cfg is not None:
        from .train.run import latest_checkpoint

        found = latest_checkpoint(cfg)
        if found is None:
            return "no checkpoint was written yet; run the same command to start again"
        return f"checkpoint of step {found[1]} kept in {found[0]}; run the same command to resume from it"
    if command == "prepare" and cfg is not None:
        return f"the data set in {cfg.output} is as it was before (a new one is swapped in only when complete)"
    if command == "compare" and cfg is not None:
        return f"finished training runs and their checkpoints are kept under {cfg.output}/train; run it again to resume"
    return "nothing half-written was kept"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # overrides may also follow an --option
    if any(a.startswith("-") or "=" not in a for a in extra) or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    prog, cfg = f"ms-ray {args.command}", None
    try:
        if args.command in ("submit", "jobs", "preflight"):
            return run_cluster_command(args, extra)
        args.overrides = [*args.overrides, *extra]
        cfg = load_command_config(args)
        # Before anything imports Ray: it reads part of its environment (e.g. which address
        # to bind) once, at import.
        set_environment(getattr(args, "address", None) or getattr(cfg, "address", None))
        run, extra_args = COMMANDS[args.command][0], {k: v for k, v in vars(args).items() if k in ("address", "out")}
        if args.command == "export":
            extra_args["checkpoint"] = args.checkpoint
        run(cfg, **extra_args)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; {what_was_kept(args.command, cfg)}", file=sys.stderr, flush=True)
        return 130
    except REFUSED as e:  # bad input: named, nothing started or nothing lost
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except FAILED as e:  # the work ran and failed for a stated reason (what was kept is named)
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
