"""`ms-ray`: one command per task.

A job command is `ms-ray COMMAND [CONFIG] [key=value ...]`: a YAML config file (each command has
a default) and dotted overrides make the command's typed config, and one function runs over it.
A checkpoint, an address or an output folder is a field like any other: checkpoint=PATH,
address=auto, out=DIR. The cluster commands (submit, jobs, preflight) talk to a running cluster
and keep options of their own (--address, --follow, --token, ...); so does `ms-ray import SRC OUT`.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import shlex
import sys
import typing
from pathlib import Path
from typing import Callable, NamedTuple

from .config import (
    CompareConfig,
    ConfigError,
    DemoConfig,
    EvalJobConfig,
    ExportConfig,
    ImportConfig,
    PrepareConfig,
    ServeConfig,
    TokenizerTrainConfig,
    TrainConfig,
    load_config,
    load_serve_file,
)
from .core.streams import SchemaError
from .data.staging import PrepareError
from .ray_env import NodesLost, RayAddressError, set_environment
from .submit import SubmitError
from .tracking import TrainingDiverged

REFUSED = (ConfigError, FileNotFoundError, SchemaError, RayAddressError, SubmitError)  # exit 2: bad input, nothing run
# exit 1: the work ran and stopped for a stated reason; what was kept is said
FAILED = (PrepareError, TrainingDiverged, NodesLost)
INTERRUPTED = 130  # Ctrl-C (and SIGTERM where a command turns it into Ctrl-C: serve)


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
    texts = corpus_texts(cfg.chitchat_limit, cfg.skills, cfg.files)
    tokenizer = train_bpe(texts, schema, cfg.vocab_size, cfg.min_frequency)
    tokenizer.save_pretrained(cfg.output)
    print(f"ms-ray tokenizer: {len(tokenizer)} tokens, hash {tokenizer_hash(tokenizer)}, "
          f"saved to {cfg.output} in {time.perf_counter() - start:.1f} s")
    return tokenizer


def import_command(src: str, out: str, overrides: list[str]) -> int:
    """`ms-ray import SRC OUT [overwrite=true] [dtype=bfloat16]`: a GGUF file or a HF model folder
    becomes a plain HF folder (safetensors, config, tokenizer, chat template) at OUT."""
    from .core.importing import ImportRefused, import_model

    cfg = load_config(ImportConfig, data={"src": src, "out": out}, overrides=overrides, source="ms-ray import")
    try:
        done = import_model(cfg.src, cfg.out, cfg.overwrite, cfg.dtype)
    except ImportRefused as e:  # bad SRC or OUT: refused like any other bad input (exit 2)
        raise ConfigError(str(e)) from None
    print(f"ms-ray import: {cfg.src} -> {cfg.out}: {done['architecture']}, {done['parameters']:,} parameters, "
          f"vocab {done['vocab']:,}, {done['dtype']}, chat template {'yes' if done['chat_template'] else 'no'}, "
          f"{done['seconds']:.1f} s")
    return 0


class Command(NamedTuple):
    """One row of the table. `function` is "module:function" (or a function of this file), imported
    only when the command runs, after ray_env.set_environment: Ray reads part of its environment
    (e.g. which address to bind) once, at import. A job command's function takes its typed config;
    a command with options of its own (config None: the cluster commands, import) takes its parsed
    options as keywords and returns the exit code."""

    function: str | Callable
    config: type | None  # the typed config of `COMMAND [CONFIG] [key=value ...]`; None: options of its own
    default: str | None  # the config file when none is given
    help: str
    example: str = ""  # key=value words shown in the command's --help


COMMANDS = {
    "demo": Command(demo, DemoConfig, "jobs/demo.yaml", "decode a scripted session with a tiny random model",
                    "model.family=qwen3 decode.max_new_rows=32"),
    "prepare": Command("ms_ray.data.pipeline:prepare", PrepareConfig, "jobs/data-skills.yaml",
                       "build packed stream-table shards on Ray Data", "output=runs/data/x address=auto"),
    "tokenizer": Command(tokenizer_train, TokenizerTrainConfig, "jobs/tokenizer.yaml",
                         "train a byte-level BPE tokenizer on shipped text", "vocab_size=4096 output=runs/tok"),
    "train": Command("ms_ray.train.run:train", TrainConfig, "jobs/tiny.yaml",
                     "train with Ray Train + DeepSpeed ZeRO (+ W&B); re-run to resume",
                     "optim.max_steps=500 address=auto"),
    "export": Command("ms_ray.train.run:export", ExportConfig, "jobs/tiny.yaml",
                      "consolidate a run's checkpoint into a HF folder", "checkpoint=PATH out=DIR"),
    "serve": Command("ms_ray.serving.app:serve_local", ServeConfig, "serve/local.yaml",
                     "serve a checkpoint on Ray Serve (WebSocket/HTTP, serve/PROTOCOL.md)",
                     "checkpoint=runs/train/tiny/export port=8001"),
    "eval": Command("ms_ray.evaluation.run:eval_checkpoint", EvalJobConfig, "jobs/eval.yaml",
                    "score a skills checkpoint (exact match, latency, behaviours) or, with chat.data, a chat one",
                    "checkpoint=runs/train/tiny/export eval.examples_per_task=10"),
    "compare": Command("ms_ray.experiments.compare:compare", CompareConfig, "jobs/compare-tiny.yaml",
                       "multi-stream vs single-stream baseline, same budget", "output=runs/compare/x"),
    # options of their own (CLUSTER_OPTIONS): bring a pretrained model in; talk to a running cluster
    "import": Command(import_command, None, None, "import a GGUF file or HF model folder as a plain HF folder"),
    "submit": Command("ms_ray.submit:submit", None, None,
                      "run a train, prepare, tokenizer, eval or compare config as a Ray Job on a cluster"),
    "jobs": Command("ms_ray.submit:jobs_command", None, None, "list, logs or stop Ray Jobs"),
    "preflight": Command("ms_ray.preflight:preflight_command", None, "jobs/tiny.yaml",
                         "check storage, versions, GPUs, backend and W&B on every node"),
}
FORM = "ms-ray {} [CONFIG] [key=value ...]"
DASHBOARD = os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265")
ADDRESS = f"the head's dashboard (default {DASHBOARD})"
OVERRIDES = dict(nargs="*", metavar="key=value", help="dotted.key=value, e.g. optim.max_steps=500")
CLUSTER_OPTIONS = {  # (flags, argparse keywords) per command with options of its own
    "import": [(["src"], dict(metavar="SRC", help="a .gguf file or a local Hugging Face model folder")),
               (["out"], dict(metavar="OUT", help="the HF folder to write (refused if not empty, unless "
                                                  "overwrite=true)")),
               (["overrides"], dict(OVERRIDES, help="a field of ImportConfig: overwrite=true, dtype=bfloat16"))],
    "submit": [(["config"], dict(metavar="CONFIG", help="a train, prepare, tokenizer, eval or compare config file "
                                                        "inside --working-dir")),
               (["overrides"], dict(OVERRIDES, help="dotted.key=value, passed to the job's command")),
               (["--address"], dict(default=DASHBOARD, help=ADDRESS)),
               (["--follow"], dict(action="store_true", help="print the logs and exit with the job's status")),
               (["--name"], dict(help="submission id (default: Ray's)")),
               (["--working-dir"], dict(default=".", help="uploaded as the job's working directory (default: .)")),
               (["--env"], dict(action="append", default=[], metavar="KEY=VALUE", help="environment of the job")),
               (["--token"], dict(help="cluster token (default: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, "
                                       "~/.ray/auth_token)"))],
    "jobs": [(["action"], dict(choices=["list", "logs", "stop"])),
             (["job_id"], dict(nargs="?", help="a submission id (see `ms-ray jobs list`)")),
             (["--address"], dict(default=DASHBOARD, help=ADDRESS)),
             (["--follow"], dict(action="store_true", help="logs: follow them until the job ends")),
             (["--token"], dict(help="cluster token (as for submit)"))],
    "preflight": [(["config"], dict(nargs="?", default="jobs/tiny.yaml", metavar="CONFIG",
                                    help="the training config to check for (default jobs/tiny.yaml)")),
                  (["overrides"], OVERRIDES),
                  (["--address"], dict(help="a running cluster (GCS HOST:PORT or auto; default: the config's "
                                            "address, RAY_ADDRESS, or a local Ray)")),
                  (["--token"], dict(help="cluster token (as for submit)"))],
}


def fields(config: type) -> list[str]:
    """The top-level keys of a config type, as written in its file (aliases: `schema`)."""
    return [f.alias or name for name, f in config.model_fields.items()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ms-ray", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        if cmd.config is None:
            p = sub.add_parser(name, help=cmd.help, description=cmd.help)
            for flags, options in CLUSTER_OPTIONS[name]:
                p.add_argument(*flags, **options)
            continue
        epilog = (f"key=value sets a field of {cmd.config.__name__} (dotted for a nested one); its top-level "
                  f"fields: {', '.join(fields(cmd.config))}. E.g. ms-ray {name} {cmd.default} {cmd.example}")
        p = sub.add_parser(name, help=cmd.help, description=cmd.help, epilog=epilog)
        p.add_argument("config", nargs="?", default=cmd.default, metavar="CONFIG",
                       help=f"a YAML config file (default {cmd.default})")
        p.add_argument("overrides", nargs="*", metavar="key=value", help=f"a field of the config, e.g. {cmd.example}")
    return parser


def takes_a_checkpoint_path(config: type) -> bool:
    """Whether the config's `checkpoint` is a folder (serve, eval, export), not train's section."""
    field = config.model_fields.get("checkpoint")
    return field is not None and (field.annotation is str or str in typing.get_args(field.annotation))


def not_a_config_file(word: str, first: bool) -> str | None:
    """Why `word` is a checkpoint given where CONFIG goes (the old `serve CHECKPOINT`): a folder,
    or (in first place) a missing path not named like a config file; None when it may be CONFIG."""
    path = Path(word)
    if path.is_dir():
        return f"{word} is a folder, not a config file"
    if first and not path.exists() and path.suffix not in (".yaml", ".yml", ".json"):
        return f"{word} does not exist and is not named like a config file"
    return None


def old_form(name: str, words: list[str]) -> str | None:
    """One line when the words after a job command are in a form the CLI no longer takes (an
    --option, a checkpoint or action word where CONFIG goes), showing the command in the form it
    takes now; None when they are in that form. Nothing is run either way."""
    keys, checkpoints = fields(COMMANDS[name].config), takes_a_checkpoint_path(COMMANDS[name].config)
    config, settings, problems, rest = [], [], [], list(words)
    while rest:
        word = rest.pop(0)
        if word in ("-h", "--help"):
            return None
        if word.startswith("-"):
            flag, has_value, value = word.partition("=")
            if not has_value and rest and not rest[0].startswith("-") and "=" not in rest[0]:
                value = rest.pop(0)
            key = flag.lstrip("-").replace("-", "_")
            if key == "config":
                config = [value]
                problems.append(f"{flag} {value} is CONFIG, the first word after the command")
            elif key in keys:
                settings.append(f"{key}={value}")
                problems.append(f"{flag} is the config field {key}= now")
            else:
                close = difflib.get_close_matches(key, keys, n=1)
                settings += [f"{close[0]}={value}"] if close else []
                problems.append(f"unrecognized arguments: {flag} {value}".rstrip()
                                + (f" (did you mean {close[0]}=?)" if close else ""))
        elif "=" in word:
            settings.append(word)
        elif name == "tokenizer" and word == "train" and not config and not Path(word).is_file():
            problems.append("`tokenizer train` is `tokenizer` now")
        elif checkpoints and (why := not_a_config_file(word, first=not config)):
            settings.insert(0, f"checkpoint={word}")
            problems.append(f"{why}: a checkpoint is given as checkpoint=PATH")
        elif config:
            settings.append(word)  # not key=value: the config loader says so
        else:
            config = [word]
    if not problems:
        return None
    now = shlex.join(["ms-ray", name, *config, *settings])
    return f"{'; '.join(problems)}. The form is `{FORM.format(name)}`: {now}"


def load_command_config(cmd: Command, path: str, overrides: list[str]):
    """The command's typed config from its file and overrides (ConfigError names what is wrong)."""
    if cmd.config is ServeConfig:  # a Serve config file: ours is applications[0].args
        return load_serve_file(path, overrides)[0]
    return load_config(cmd.config, path, overrides)


def imported(function: str | Callable) -> Callable:
    if callable(function):
        return function
    module, _, name = function.partition(":")
    return getattr(importlib.import_module(module), name)


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
    if command in ("submit", "jobs"):
        return "a job already submitted keeps running on the cluster (ms-ray jobs list, ms-ray jobs stop JOB)"
    return "nothing half-written was kept"


def run(args: argparse.Namespace) -> int:
    """Run the parsed command; the exit code says how it ended (0, 1 FAILED, 2 REFUSED, 130)."""
    name, cmd, cfg = args.command, COMMANDS[args.command], None
    try:
        if cmd.config is None:
            return imported(cmd.function)(**{k: v for k, v in vars(args).items() if k != "command"})
        cfg = load_command_config(cmd, args.config, args.overrides)
        # Before anything imports Ray: it reads part of its environment (e.g. which address
        # to bind) once, at import. That is why the command's module is imported only now.
        set_environment(getattr(cfg, "address", None))
        imported(cmd.function)(cfg)
    except KeyboardInterrupt:
        print(f"\nms-ray {name}: interrupted; {what_was_kept(name, cfg)}", file=sys.stderr, flush=True)
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()  # the local Ray stops now, not in the interpreter's teardown
        return INTERRUPTED
    except REFUSED as e:  # bad input: named, nothing started or nothing lost
        print(f"ms-ray {name}: {e}", file=sys.stderr)
        return 2
    except FAILED as e:  # the work ran and failed for a stated reason (what was kept is named)
        print(f"ms-ray {name}: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS and COMMANDS[argv[0]].config is not None:
        if problem := old_form(argv[0], argv[1:]):
            print(f"ms-ray {argv[0]}: {problem}", file=sys.stderr)
            return 2
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # a cluster command's overrides may also follow an --option
    if extra and (not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *extra]
    default = COMMANDS[args.command].default
    if default and "=" in args.config:  # no CONFIG, only key=value
        args.config, args.overrides = default, [args.config, *args.overrides]
    return run(args)


def entry() -> None:
    """The `ms-ray` program. After Ctrl-C (Ray already stopped, what was kept said) it exits
    without the interpreter's teardown: a thread Ray Data or pyarrow left behind can crash it
    there (seen as exit -11 instead of 130 after an interrupted prepare)."""
    code = main()
    if code == INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
