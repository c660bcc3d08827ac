import pytest

from ms_ray.cli import main


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


def test_tokenizer_train_command(tmp_path, capsys):
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "jobs/tokenizer.yaml", f"output={out}", "vocab_size=600",
                 "chitchat_limit=300"]) == 0
    assert "ms-ray tokenizer train: 600 tokens" in capsys.readouterr().out
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
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "checkpoint" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--config", "serve/local.yaml", "model.max_replicas=0"]) == 2
    err = capsys.readouterr().err
    assert "serve/local.yaml" in err and "model.max_replicas" in err


@pytest.mark.slow
def test_serve_command_runs_the_app_and_stops_on_ctrl_c(tmp_path, tok, sch):
    """`ms-ray serve CHECKPOINT` in its own process: embedded Ray on 127.0.0.1, a live session,
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
        [sys.executable, "-m", "ms_ray.cli", "serve", str(tmp_path / "ckpt"), f"port={port}",
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
    proc = subprocess.Popen([sys.executable, "-m", "ms_ray.cli", "serve", str(tmp_path / "ckpt"), f"port={port}",
                             "model.num_cpus=0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
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
