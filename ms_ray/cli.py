"""`ms-ray`: one command per task, each a function over a typed config."""

from __future__ import annotations

import argparse
import os
import sys

from .core.streams import SchemaError
from .data.pipeline import PrepareError

from .config import (CompareConfig, ConfigError, DemoConfig, EvalJobConfig, PrepareConfig, TokenizerTrainConfig, TrainConfig,
                     load_config, load_serve_file)


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
    from .evaluation.run import compare as run_compare

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


def add_cluster_commands(sub) -> None:
    """Commands that talk to a running cluster (Ray Jobs, preflight): not config-shaped."""
    p = sub.add_parser("submit", help="run a train/prepare/tokenizer config as a Ray Job on a cluster")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, passed to the job's command")
    p.add_argument("--address", default=DASHBOARD, help=f"the head's dashboard (default {DASHBOARD})")
    p.add_argument("--follow", action="store_true", help="print the logs and exit with the job's status")
    p.add_argument("--name", help="submission id (default: Ray's)")
    p.add_argument("--working-dir", default=".", help="uploaded as the job's working directory")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment of the job")
    p.add_argument("--token", help="cluster token (default: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")
    p = sub.add_parser("jobs", help="list, logs or stop Ray Jobs")
    p.add_argument("action", choices=["list", "logs", "stop"])
    p.add_argument("job_id", nargs="?")
    p.add_argument("--address", default=DASHBOARD)
    p.add_argument("--follow", action="store_true")
    p.add_argument("--token")
    p = sub.add_parser("preflight", help="check storage, versions, GPUs, backend and W&B on every node")
    p.add_argument("config", nargs="?", default="jobs/tiny.yaml", help="the training config to check for")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--address", help="a running cluster (GCS address or 'auto'; default: RAY_ADDRESS or local)")
    p.add_argument("--token")


def run_cluster_command(args, extra: list[str]) -> int:
    from .submit import SubmitError, jobs_command, submit, use_token

    try:
        if args.command == "submit":
            return submit(args.config, [*args.overrides, *extra], args.address, args.follow, args.token,
                          args.working_dir, args.name, args.env)
        if args.command == "jobs":
            return jobs_command(args.action, args.address, args.job_id, args.follow, args.token)
        from .preflight import preflight

        use_token(args.token)
        return preflight(load_config(TrainConfig, args.config, [*args.overrides, *extra], check_paths=False), args.address)
    except (SubmitError, ConfigError) as e:
        print(f"ms-ray {args.command}: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ms-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, _, default, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == "tokenizer":
            p.add_argument("action", choices=["train"])
        if name == "train":
            p.add_argument("--address", help="join a running Ray cluster instead of starting a local one")
        if name == "export":
            p.add_argument("--checkpoint", help="a checkpoint folder (default: the run's latest)")
            p.add_argument("--out", help="output folder (default: {storage}/{name}/export)")
        if name in WITH_CHECKPOINT:
            p.add_argument("checkpoint", nargs="?", help="a MultiStreamLM folder (default: the config's)")
            p.add_argument("--config", default=default, help=f"a config file (default {default})")
        else:
            p.add_argument("config", nargs="?", default=default)
        p.add_argument("overrides", nargs="*", help="dotted.key=value")
    add_cluster_commands(sub)
    args, extra = parser.parse_known_args(argv)  # overrides may also follow an --option
    if any(a.startswith("-") or "=" not in a for a in extra) or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in ("submit", "jobs", "preflight"):
        return run_cluster_command(args, extra)
    args.overrides = [*args.overrides, *extra]
    run, config_class, default, _ = COMMANDS[args.command]
    first = "checkpoint" if args.command in WITH_CHECKPOINT else "config"
    if getattr(args, first) and "=" in getattr(args, first):  # only overrides were given
        args.overrides = [getattr(args, first), *args.overrides]
        setattr(args, first, None if first == "checkpoint" else default)
    extra = {k: v for k, v in vars(args).items() if k in ("address", "checkpoint", "out")}
    try:
        if args.command in WITH_CHECKPOINT:
            checkpoint = extra.pop("checkpoint", None)
            overrides = [f"checkpoint={checkpoint}", *args.overrides] if checkpoint else args.overrides
            if args.command == "serve":
                cfg = load_serve_file(args.config, overrides)[0]
            else:
                cfg = load_config(config_class, args.config, overrides)
        else:
            cfg = load_config(config_class, args.config, args.overrides)
        run(cfg, **extra)
    except (ConfigError, FileNotFoundError, SchemaError) as e:
        print(f"ms-ray {args.command}: {e}", file=sys.stderr)
        return 2
    except PrepareError as e:  # written, but too much input was dropped
        print(f"ms-ray {args.command}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
