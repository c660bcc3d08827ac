"""`ms-ray`: the table of commands, one form for every job command (`ms-ray CMD [CONFIG]
[key=value ...]`), old forms refused with the new one shown, help without torch or Ray, the
command lines written anywhere in the repo, and the commands themselves."""

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ms_ray import cli
from ms_ray.cli import COMMANDS, main, old_form
from ms_ray.config import ServeConfig, load_config, load_serve_file

ROOT = Path(__file__).resolve().parents[1]
JOB_COMMANDS = [name for name, cmd in COMMANDS.items() if cmd.config is not None]


def test_the_table_names_a_function_a_config_and_a_default_file_that_loads():
    assert JOB_COMMANDS == ["demo", "prepare", "tokenizer", "train", "export", "serve", "eval", "compare"]
    assert [n for n in COMMANDS if n not in JOB_COMMANDS] == ["import", "submit", "jobs", "preflight"]
    for name, cmd in COMMANDS.items():
        assert cmd.help, name
        if callable(cmd.function):  # one of cli.py's own
            assert cmd.function.__module__ == "ms_ray.cli", name
            continue
        module, _, function = cmd.function.partition(":")
        spec = importlib.util.find_spec(module)  # found, not imported: nothing may import Ray before its run
        defined = {n.name for n in ast.parse(Path(spec.origin).read_text()).body if isinstance(n, ast.FunctionDef)}
        assert function in defined, f"{name}: {cmd.function} is not a function of {spec.origin}"
    for name in JOB_COMMANDS:
        cmd = COMMANDS[name]
        assert (ROOT / cmd.default).is_file(), name
        if cmd.config is ServeConfig:
            load_serve_file(ROOT / cmd.default, check_paths=False)
        else:
            load_config(cmd.config, ROOT / cmd.default, check_paths=False)


@pytest.fixture
def ran(monkeypatch):
    """main() up to the command's function: the config it gets and the address Ray would get."""
    seen = {}
    monkeypatch.setattr(cli, "set_environment", lambda address=None: seen.setdefault("address", address))
    monkeypatch.setattr(cli, "imported", lambda function: lambda cfg: seen.setdefault("cfg", cfg))
    return seen


@pytest.mark.parametrize("argv, field, value", [
    (["train"], "run.name", "tiny"),  # the default config
    (["train", "optim.max_steps=700"], "optim.max_steps", 700),  # key=value only: the default config too
    (["train", "jobs/tiny.yaml", "address=auto"], "address", "auto"),
    (["demo", "jobs/demo.yaml", "model.family=qwen3"], "model.family", "qwen3"),
    (["tokenizer", "jobs/tokenizer.yaml", "vocab_size=600"], "vocab_size", 600),
    (["tokenizer", "vocab_size=600"], "vocab_size", 600),
    (["compare", "output=/tmp/x"], "output", "/tmp/x"),
    (["prepare", "jobs/data-skills.yaml", "address=10.0.0.1:6379"], "address", "10.0.0.1:6379"),
])
def test_every_job_command_takes_config_then_key_value(ran, argv, field, value):
    assert main(argv) == 0
    cfg = ran["cfg"]
    for part in field.split("."):
        cfg = getattr(cfg, part)
    assert cfg == value
    assert ran["address"] == getattr(ran["cfg"], "address", None)  # the config's own address reaches Ray


def test_checkpoint_and_out_are_fields(ran, tmp_path):
    """export takes checkpoint=PATH and out=DIR; its train config's `checkpoint:` section (how
    often to save) means nothing to an export."""
    assert main(["export", "jobs/tiny.yaml", f"checkpoint={tmp_path}", f"out={tmp_path / 'o'}"]) == 0
    assert (ran["cfg"].checkpoint, ran["cfg"].out) == (str(tmp_path), str(tmp_path / "o"))
    assert ran["cfg"].run.name == "tiny" and ran["cfg"].address is None


def test_export_reads_checkpoint_and_out_from_its_config(monkeypatch, tmp_path):
    import ms_ray.train.run

    calls = []
    monkeypatch.setattr(cli, "set_environment", lambda address=None: None)
    monkeypatch.setattr(ms_ray.train.run, "export", lambda cfg: calls.append((cfg.checkpoint, cfg.out)))
    assert main(["export", f"checkpoint={tmp_path}", f"out={tmp_path / 'o'}"]) == 0
    assert main(["export", "jobs/tiny.yaml"]) == 0
    assert calls == [(str(tmp_path), str(tmp_path / "o")), (None, None)]


def test_export_refuses_a_missing_checkpoint(capsys):
    assert main(["export", "jobs/tiny.yaml", "checkpoint=/no/such/checkpoint"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ms-ray export: ") and "/no/such/checkpoint does not exist" in err and "\n" not in err


OLD_FORMS = [  # (what a user of the previous release types, the command line the refusal shows)
    (["serve", "runs/no/such/export"], "ms-ray serve checkpoint=runs/no/such/export"),
    (["serve", "ms_ray", "port=8001"], "ms-ray serve checkpoint=ms_ray port=8001"),  # a folder where CONFIG goes
    (["serve", "ms_ray", "--config", "serve/local.yaml"], "ms-ray serve serve/local.yaml checkpoint=ms_ray"),
    (["eval", "runs/no/such/export", "eval.examples_per_task=2"],
     "ms-ray eval checkpoint=runs/no/such/export eval.examples_per_task=2"),
    (["eval", "ms_ray", "--config", "jobs/eval.yaml"], "ms-ray eval jobs/eval.yaml checkpoint=ms_ray"),
    (["train", "jobs/tiny.yaml", "--address", "auto"], "ms-ray train jobs/tiny.yaml address=auto"),
    (["train", "jobs/tiny.yaml", "--address=10.0.0.1:6379", "optim.max_steps=5"],
     "ms-ray train jobs/tiny.yaml address=10.0.0.1:6379 optim.max_steps=5"),
    (["export", "jobs/tiny.yaml", "--checkpoint", "runs/x/checkpoint_1", "--out", "/tmp/o"],
     "ms-ray export jobs/tiny.yaml checkpoint=runs/x/checkpoint_1 out=/tmp/o"),
    (["tokenizer", "train", "jobs/tokenizer.yaml", "vocab_size=600"],
     "ms-ray tokenizer jobs/tokenizer.yaml vocab_size=600"),
    (["tokenizer", "train"], "ms-ray tokenizer"),
    (["prepare", "jobs/data-skills.yaml", "--address", "auto"], "ms-ray prepare jobs/data-skills.yaml address=auto"),
    (["train", "jobs/tiny.yaml", "--adress", "auto"], "ms-ray train jobs/tiny.yaml address=auto"),  # a typo
]


@pytest.mark.parametrize("argv, now", OLD_FORMS, ids=[" ".join(a) for a, _ in OLD_FORMS])
def test_an_old_form_is_refused_in_one_line_showing_the_new_one(argv, now, capsys, monkeypatch):
    monkeypatch.setattr(cli, "set_environment", lambda *a: pytest.fail("nothing may start"))
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert not out and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"ms-ray {argv[0]}: ") and f"The form is `ms-ray {argv[0]} [CONFIG] [key=value ...]`" in err
    assert err.strip().endswith(": " + now), err
    assert old_form(argv[0], now.split()[2:]) is None  # what it shows is in the form it asks for


def test_a_folder_for_train_is_a_bad_config_not_a_checkpoint(capsys):
    assert main(["train", "jobs"]) == 2  # train's `checkpoint` is a section of settings, not a folder
    assert capsys.readouterr().err.strip() == "ms-ray train: jobs is a folder, not a config file"


def test_the_cluster_commands_keep_their_options():
    parser = cli.build_parser()
    args = parser.parse_args(["submit", "jobs/tiny.yaml", "a=1", "--address", "http://h:8265", "--follow", "--name",
                              "n", "--working-dir", "w", "--env", "K=V", "--token", "t"])
    assert vars(args) == dict(command="submit", config="jobs/tiny.yaml", overrides=["a=1"], address="http://h:8265",
                              follow=True, name="n", working_dir="w", env=["K=V"], token="t")
    args = parser.parse_args(["jobs", "logs", "j1", "--follow", "--address", "a"])
    assert (args.action, args.job_id, args.follow, args.address) == ("logs", "j1", True, "a")
    args = parser.parse_args(["preflight", "--address", "auto"])
    assert (args.config, args.overrides, args.address) == ("jobs/tiny.yaml", [], "auto")


def test_cluster_commands_get_their_options_as_keywords(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "imported", lambda function: lambda **kw: seen.append((function, kw)) or 0)
    assert main(["submit", "jobs/tiny.yaml", "--address", "http://h:8265", "optim.max_steps=5"]) == 0
    assert main(["preflight", "run.storage=/x", "--address", "auto"]) == 0  # no CONFIG: the default one
    assert main(["jobs", "stop", "j1"]) == 0
    assert seen == [
        ("ms_ray.submit:submit", dict(config="jobs/tiny.yaml", overrides=["optim.max_steps=5"], address="http://h:8265",
                                      follow=False, name=None, working_dir=".", env=[], token=None)),
        ("ms_ray.preflight:preflight_command",
         dict(config="jobs/tiny.yaml", overrides=["run.storage=/x"], address="auto", token=None)),
        ("ms_ray.submit:jobs_command", dict(action="stop", job_id="j1", address=cli.DASHBOARD, follow=False,
                                            token=None)),
    ]


def test_help_is_fast_and_imports_neither_torch_nor_ray():
    code = ("import sys\nfrom ms_ray.cli import COMMANDS, main\n"
            "for argv in [['--help'], *([n, '--help'] for n in COMMANDS)]:\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, argv\n"
            "print('HEAVY', sorted(m for m in ('torch', 'ray', 'transformers', 'deepspeed') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "HEAVY []" in done.stdout
    text = " ".join(done.stdout.split())
    for name, cmd in COMMANDS.items():
        assert f"{name} {' '.join(cmd.help.split()[:3])}" in text  # listed with its help
    assert "key=value sets a field of ServeConfig" in text and "fields: checkpoint, name" in text
    assert "ms-ray export jobs/tiny.yaml checkpoint=PATH out=DIR" in text


SHOWN = ["README.md", "Makefile", "cluster", "jobs", "serve", "docs", "ms_ray"]
COMMAND_LINE = re.compile(r"ms-ray ((?:%s)\b(?:[ \t]+[^\s`'\"#|&;()]+)*)" % "|".join(JOB_COMMANDS))


def command_lines(path: Path) -> list[list[str]]:
    """Every `ms-ray JOB_COMMAND ...` written in a file, as words ([placeholders] left out)."""
    found = []
    for line in COMMAND_LINE.findall(path.read_text(errors="replace")):
        words = [w.rstrip(".,:;") for w in line.split()]
        found.append([w for w in words if w and not w.startswith("[") and not w.endswith("]") and w != "..."])
    return found


@pytest.mark.parametrize("where", SHOWN)
def test_every_command_line_shown_or_run_is_in_the_current_form(where):
    """README, Makefile, cluster manifests, job and Serve configs, docs and our own messages."""
    path = ROOT / where
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in (".md", ".yaml", ".yml", ".py", "")
        and p != ROOT / "ms_ray" / "cli.py")
    old = [f"{p.relative_to(ROOT)}: ms-ray {' '.join(words)}: {problem}" for p in files for words in command_lines(p)
           if (problem := old_form(words[0], words[1:]))]
    assert not old, "\n".join(old)


def test_demo_prints_streams_side_by_side(capsys):
    assert main(["demo", "jobs/demo.yaml", "decode.max_new_rows=12"]) == 0
    out = capsys.readouterr().out
    table = [line.split("|") for line in out.splitlines() if line[:5].strip().isdigit()]
    assert len(table) == 12 and [int(r[0]) for r in table] == list(range(12))
    user = [r[1].strip() for r in table]
    # the scripted user text goes in word by word from row 1, then silence
    assert user[:8] == ["·", "hello", "there", "how", "are", "you", "today", "·"]
    assert user[10:12] == ["are", "you"]
    assert "session ended after 12 rows: max_rows" in out


def test_demo_rejects_a_bad_config(capsys):
    assert main(["demo", "jobs/demo.yaml", "model.num_heads=0"]) == 2
    assert "model.num_heads" in capsys.readouterr().err
    assert main(["demo", "jobs/demo.yaml", "script=[{row: 0, stream: output, text: hi}]"]) == 2
    assert "'output' is an output stream" in capsys.readouterr().err
    assert main(["demo", "jobs/demo.yaml", "script=[{row: 0, stream: tool, text: hi}]"]) == 2
    assert "unknown stream 'tool'" in capsys.readouterr().err


def test_tokenizer_command(tmp_path, capsys):
    out = tmp_path / "tok"
    assert main(["tokenizer", "jobs/tokenizer.yaml", f"output={out}", "vocab_size=600", "chitchat_limit=300"]) == 0
    assert "ms-ray tokenizer: 600 tokens" in capsys.readouterr().out
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok("hello 42 there", add_special_tokens=False)["input_ids"]) == "hello 42 there"
    assert tok.convert_tokens_to_ids("<|silence|>") == 0


def test_prepare_command(ray_local, tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["prepare", "jobs/data-skills.yaml", f"output={out}", "sources=[{kind: skills, examples: 40}]"]) == 0
    assert "prepared 40 examples, dropped 0" in capsys.readouterr().out
    assert (out / "manifest.json").exists() and list((out / "train").glob("*.parquet"))
    # a bad config fails before any work, naming the field
    assert main(["prepare", "jobs/data-skills.yaml", "sources=[{kind: jsonl, path: /no/such.jsonl}]"]) == 2
    assert "source file(s) do not exist: ['/no/such.jsonl']" in capsys.readouterr().err
    assert main(["prepare", "jobs/data-skills.yaml", "sources=[{kind: skills, policy: wait_k(1)}]"]) == 2
    assert "k must be >= 2" in capsys.readouterr().err


def test_serve_refuses_a_bad_checkpoint_or_config(capsys, tmp_path):
    assert main(["serve", f"checkpoint={tmp_path / 'missing'}"]) == 2
    assert "checkpoint" in capsys.readouterr().err
    assert main(["serve", "serve/local.yaml", f"checkpoint={tmp_path}", "model.max_replicas=0"]) == 2
    err = capsys.readouterr().err
    assert "serve/local.yaml" in err and "model.max_replicas" in err


@pytest.mark.slow
def test_serve_command_runs_the_app_and_stops_on_ctrl_c(tmp_path, tok, sch):
    """`ms-ray serve checkpoint=PATH` in its own process: embedded Ray on 127.0.0.1, a live session,
    then Ctrl-C shuts it down."""
    import asyncio
    import os
    import signal
    import socket
    import subprocess
    import sys

    from ms_ray.core.families import tiny_base_model
    from ms_ray.core.model import MultiStreamLM
    from ms_ray.serving.client import connect_session, wait_ready

    MultiStreamLM(tiny_base_model("llama", len(tok)), sch).save_pretrained(tmp_path / "ckpt", tok)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ms_ray.cli", "serve", f"checkpoint={tmp_path / 'ckpt'}", f"port={port}",
         "session.row_interval_s=0.02", "log_level=WARNING", "model.num_cpus=0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}", 180)

        async def session():
            async with connect_session(f"ws://127.0.0.1:{port}") as s:  # local config: no key needed
                await s.append("user", " 7 8")
                words = []
                while words[-2:] != ["7", "8"]:
                    frame = await s.recv(30)
                    words += frame.get("cells", {}).get("user", "").split()
                return s.first, await s.close()

        first, rest = asyncio.run(asyncio.wait_for(session(), 60))
        assert first["role"] == "user" and rest[-1] == {"type": "end", "reason": "closed"}
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, out[-3000:]
        assert f"at http://127.0.0.1:{port}" in out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_serve_stops_cleanly_on_sigterm(tmp_path, tok, sch):
    """`kill`, `docker stop` and systemd send SIGTERM: the same clean stop as Ctrl-C (Ray's own
    handler printed a stack dump instead), and the local config keeps Serve's INFO lines off."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    from ms_ray.core.families import tiny_base_model
    from ms_ray.core.model import MultiStreamLM
    from ms_ray.serving.client import wait_ready

    MultiStreamLM(tiny_base_model("llama", len(tok)), sch).save_pretrained(tmp_path / "ckpt", tok)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.Popen([sys.executable, "-m", "ms_ray.cli", "serve", f"checkpoint={tmp_path / 'ckpt'}",
                             f"port={port}", "model.num_cpus=0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", 180)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, out[-3000:]
        assert "ms-ray serve: stopping" in out and "SIGTERM received" not in out
        assert " INFO " not in out, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
