"""`ms-ray prepare` is safe by default: it replaces only a data set of its own, never leaves a
half-written one at the output path (even when killed), and refuses input that would give
nothing or mostly unknown tokens, leaving the old set as it was."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from ms_ray.config import PrepareConfig, load_config
from ms_ray.data.pipeline import PrepareError, PrepareRefused, heartbeat, prepare
from ms_ray.data.staging import check_output, exchange, recover, sibling, swap_in
from ms_ray.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = {"streams": [{"name": "user", "role": "input"}, {"name": "output", "role": "output", "end_token": "<|end|>"}]}
KNOWN = {"messages": [{"role": "user", "content": "what is 2"}, {"role": "assistant", "content": "2"}]}  # skills words


def chat(text: str) -> dict:
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "2"}]}


def write_jsonl(path: Path, objects) -> str:
    path.write_text("".join(json.dumps(o) + "\n" for o in objects))
    return str(path)


def config(out, *sources, **extra):
    return load_config(PrepareConfig, data={"schema": SCHEMA, "tokenizer": "skills", "output": str(out),
                                            "sources": list(sources), "split": {"validation_fraction": 0.2},
                                            "packing": {"max_rows": 64}, **extra})


SKILLS = {"kind": "skills", "examples": 40, "shards": 2, "tasks": ["wait_k"]}


def digest(folder: Path) -> dict:
    """Every file under `folder` (relative path -> sha256): equal digests, identical sets."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def assert_complete(out: Path) -> dict:
    """`out` is a whole data set: its manifest loads, every shard it lists reads, and no shard
    is there that it does not list."""
    manifest = load_manifest(out)
    listed = {f for s in manifest["splits"].values() for f in s["files"]}
    assert listed and listed == {str(p.relative_to(out)) for p in out.glob("*/*.parquet")}
    for f in listed:
        assert pq.read_table(out / f).num_rows > 0
    assert (out / "tokenizer" / "tokenizer.json").is_file() and (out / "dropped.jsonl").is_file()
    return manifest


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# ---- refused before anything is touched (no Ray) ---------------------------------------
def test_a_folder_that_is_not_a_data_set_is_refused_untouched(tmp_path):
    out = tmp_path / "tests"  # the accident this guards against: output=tests
    (out / "train").mkdir(parents=True)
    (out / "train" / "test_x.py").write_text("assert True\n")
    (out / "conftest.py").write_text("# mine\n")
    before = digest(tmp_path)
    refused = rf"output={out} is a folder that is not a data set .*'conftest.py', 'train'"
    with pytest.raises(PrepareRefused, match=refused):
        prepare(config(out, SKILLS))
    assert digest(tmp_path) == before and leftovers(out) == []


def test_an_output_at_or_under_a_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("keep\n")
    for given in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "data"):
        with pytest.raises(PrepareRefused, match=rf"output={given}: {tmp_path / 'notes.txt'} is a file, not a folder"):
            prepare(config(given, SKILLS))
    assert (tmp_path / "notes.txt").read_text() == "keep\n" and len(list(tmp_path.iterdir())) == 1


def test_a_data_set_with_files_we_did_not_write_is_refused(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format_version": 2}))
    (out / "README.md").write_text("my notes\n")
    with pytest.raises(PrepareRefused, match=r"is a data set but also holds 'README.md', which prepare did not write"):
        check_output(out, str(out))
    (out / "README.md").unlink()
    check_output(out, str(out))  # ours alone: may be replaced
    check_output(tmp_path / "empty", "empty")  # missing: to be created


def test_empty_input_files_are_refused_before_ray(tmp_path):
    for name, text in {"empty.jsonl": "", "blank.jsonl": "\n  \n\t\n", "bom.jsonl": "\ufeff\n"}.items():
        (tmp_path / name).write_text(text)
        refused = rf"source 'chat' \(file {tmp_path / name}\) is empty \(no JSON lines\)"
        with pytest.raises(PrepareRefused, match=refused):
            prepare(config(tmp_path / "out", {"kind": "jsonl", "name": "chat", "path": str(tmp_path / name)}))
    assert not (tmp_path / "out").exists() and leftovers(tmp_path / "out") == []


def test_text_the_tokenizer_does_not_cover_is_refused_up_front(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [chat("hello there how are you")] * 5)  # 5 of 6 words unknown
    with pytest.raises(PrepareRefused, match=r"source 'chat' \(file .*chat.jsonl\): 83.3% of its tokens \(first 5 "
                                             r"conversations\) are unknown to tokenizer 'skills', "
                                             r"over max_unknown_share=1.0%; .*ms-ray tokenizer jobs/tokenizer.yaml"):
        prepare(config(tmp_path / "out", {"kind": "jsonl", "name": "chat", "path": path}))
    assert not (tmp_path / "out").exists()


def test_the_cli_refuses_with_exit_2_and_starts_no_ray(tmp_path):
    out = tmp_path / "src"
    out.mkdir()
    (out / "main.py").write_text("print('mine')\n")
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": str(tmp_path / "ray")}
    proc = subprocess.run([sys.executable, "-m", "ms_ray.cli", "prepare", "jobs/data-skills.yaml", f"output={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"ms-ray prepare: output={out} is a folder that is not a data set of ms-ray prepare (no manifest.json; "
        f"it holds 'main.py'); prepare replaces the whole folder, so choose a new or empty output"]
    assert (out / "main.py").read_text() == "print('mine')\n" and not (tmp_path / "ray").exists()  # Ray never started


# ---- the swap and recovery on real folders ----------------------------------------------
def fake_set(folder: Path, tag: str) -> Path:
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"format_version": 2, "tag": tag}))
    return folder


def tag(folder: Path) -> str:
    return json.loads((folder / "manifest.json").read_text())["tag"]


def test_swap_in_replaces_the_old_set_and_leaves_nothing_beside_it(tmp_path):
    out = fake_set(tmp_path / "data", "old")
    assert exchange(fake_set(tmp_path / "a", "a"), out) and tag(out) == "a" and tag(tmp_path / "a") == "old"
    swap_in(fake_set(sibling(out, "staging"), "new"), out, "data")
    assert tag(out) == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a", "data"]
    swap_in(fake_set(sibling(tmp_path / "fresh", "staging"), "first"), tmp_path / "fresh", "fresh")
    assert tag(tmp_path / "fresh") == "first"


def test_recover_puts_back_a_backup_and_removes_dead_runs_staging(tmp_path):
    """The state a kill between the fallback swap's two renames leaves: no output, the old set
    as a backup, the new one staged. The next run puts the old set back; folders of a live
    prepare (here: this test's parent process) and names we never write are left alone."""
    out = tmp_path / "data"
    gone = dead_pid()
    fake_set(sibling(out, "backup", gone), "old")
    fake_set(sibling(out, "staging", gone), "new")
    live = fake_set(sibling(out, "staging", os.getppid()), "running")
    odd = fake_set(tmp_path / ".data.staging-mine", "odd")
    messages = []
    recover(out, messages.append)
    assert tag(out) == "old" and live.exists() and odd.exists()
    assert leftovers(out) == sorted([live.name, odd.name])
    backup = sibling(out, "backup", gone).name
    assert messages == [f"prepare: put back {out} from {backup}, left by a run killed while swapping"]
    fake_set(sibling(out, "backup", gone), "older")
    recover(out)  # the output exists: a stale backup is only removed
    assert tag(out) == "old" and leftovers(out) == sorted([live.name, odd.name])


def test_an_incomplete_data_set_is_not_trusted(tmp_path):
    """A manifest whose shards are gone (what an interrupted prepare used to leave)."""
    fake_set(tmp_path / "data", "x")
    (tmp_path / "data" / "manifest.json").write_text(json.dumps(
        {"format_version": 2, "splits": {"train": {"files": ["train/00-0000.parquet"]}},
         "tokenizer": {"path": "tokenizer"}}))
    (tmp_path / "data" / "tokenizer").mkdir()
    with pytest.raises(FileNotFoundError,
                       match=r"data is an incomplete data set \(1 missing, e.g. train/00-0000.parquet\)"):
        load_manifest(tmp_path / "data")


def test_heartbeat_speaks_while_the_block_runs_and_stops_after():
    beats = []
    with heartbeat(lambda: beats.append(time.monotonic()), 0.05):
        time.sleep(0.4)
    n = len(beats)
    time.sleep(0.15)
    assert 2 <= n <= 9 and len(beats) == n  # ~7, fewer on a loaded machine


# ---- on Ray: failures after reading keep the old set ------------------------------------
@pytest.fixture
def old_set(ray_local, tmp_path):
    out = tmp_path / "data"
    prepare(config(out, SKILLS), log=lambda _: None, progress=lambda _: None)
    return out, digest(out)


def test_re_prepare_replaces_the_set_reports_progress_and_unknown_tokens(old_set, tmp_path):
    out, before = old_set
    path = write_jsonl(tmp_path / "chat.jsonl", [KNOWN] * 39 + [chat("what is zebra")])
    events = []
    cfg = config(out, SKILLS, {"kind": "jsonl", "name": "chat", "path": path})
    manifest = prepare(cfg, events.append, events.append)
    assert_complete(out)
    assert digest(out) != before and leftovers(out) == []
    # 40 chat examples of 5 tokens (3 user, answer, end): one unknown word in all
    assert {k: manifest["sources"]["chat"][k] for k in ("tokens", "unknown_tokens", "unknown_share")} == \
        {"tokens": 200, "unknown_tokens": 1, "unknown_share": 0.005}
    assert manifest["sources"]["skills"]["unknown_tokens"] == 0 and manifest["tokenizer"]["unk_token"] == "<|unk|>"
    assert events[0] == f"prepare: 3 shard(s) from 2 source(s) -> {out}"
    assert sorted(e.split(" done")[0] for e in events[1:4]) == [f"prepare: shard {i}/3" for i in (1, 2, 3)]
    assert events[-1].startswith("prepared 80 examples, dropped 0") and "source chat: 40 examples" in events[-1]
    assert "unknown tokens 0.5%" in events[-1]
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare(config(empty, SKILLS), log=lambda _: None, progress=lambda _: None)  # an empty folder is fine
    assert_complete(empty)


def test_a_source_that_gives_nothing_fails_and_keeps_the_old_set(old_set, tmp_path):
    out, before = old_set
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": [\n[1, 2]\n')  # lines, but not one usable
    with pytest.raises(PrepareError, match=rf"source 'bad' \(file {path}\) gave 0 examples \(2 inputs dropped, "
                                           rf"most for: .*\); nothing written, {out} left as it was"):
        prepare(config(out, SKILLS, {"kind": "jsonl", "name": "bad", "path": str(path)}, max_drop_share=1.0))
    assert digest(out) == before and leftovers(out) == []
    with pytest.raises(PrepareError, match="gave 0 examples"):  # a new output: the folders made for it go too
        prepare(config(tmp_path / "new" / "deeper" / "data", {"kind": "jsonl", "name": "bad", "path": str(path)},
                       max_drop_share=1.0))
    assert not (tmp_path / "new").exists()


def test_unknown_tokens_found_after_reading_fail_and_keep_the_old_set(old_set, tmp_path):
    """The up-front sample (first 200 conversations) is clean; the rest is not."""
    out, before = old_set
    # 200 x 5 known tokens, then 100 x 7 tokens (with the answer and its end) of which 5 unknown: 500 / 1700
    path = write_jsonl(tmp_path / "chat.jsonl", [KNOWN] * 200 + [chat("hello there how are you")] * 100)
    with pytest.raises(PrepareError, match=rf"source 'chat' \(file {path}\): 29.4% of its tokens are unknown to "
                                           rf"tokenizer 'skills', over max_unknown_share=1.0%; .*; "
                                           rf"nothing written, {out} left as it was"):
        prepare(config(out, {"kind": "jsonl", "name": "chat", "path": path}))
    assert digest(out) == before and leftovers(out) == []


# ---- SIGKILL anywhere in a re-prepare ---------------------------------------------------
def run_prepare(out: Path, seed: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen(
        [sys.executable, "-m", "ms_ray.cli", "prepare", "jobs/data-skills.yaml", f"output={out}", f"seed={seed}",
         "sources=[{kind: skills, examples: 2000, shards: 2}]"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_at(proc: subprocess.Popen, delay: float, sig=signal.SIGKILL, when=None) -> None:
    """Send `sig` to `proc` after `delay` s or as soon as `when()` holds (if still running;
    SIGINT is Ctrl-C, given a minute to clean up), then end by pid whatever it started that
    outlived it (a local Ray's raylet and GCS die with their driver, its agents later)."""
    family: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + delay
    while proc.poll() is None and time.monotonic() < deadline and not (when and when()):
        try:  # collected all along: the children a kill orphans cannot be found afterwards
            family.update({p.pid: p for p in psutil.Process(proc.pid).children(recursive=True)})
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()  # reaped: its pid is dead to the next run's recovery
    # a second for what dies with its driver (raylet, gcs_server); Ray's dashboard and runtime-env
    # agents outlive a SIGKILLed driver by tens of seconds, so waiting 10 s for them cost ~40 s a test
    _, alive = psutil.wait_procs(list(family.values()), timeout=1)
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=10)


KILLS = 3  # at random points; each prepare costs ~20 s on an idle 2-core machine, most of it start-up


@pytest.mark.slow
def test_a_re_prepare_killed_anywhere_leaves_the_old_or_the_new_set(tmp_path):
    """SIGKILL at seeded random points of re-prepares over a good set, then once the moment a
    shard file is being written (so the staging window is always hit), then Ctrl-C (SIGINT)
    mid-run: the output is always the complete old set or the complete new one, and a normal
    prepare afterwards succeeds and tidies every leftover."""
    out = tmp_path / "data"
    start = time.monotonic()
    first = run_prepare(out, seed=0)
    assert first.communicate(timeout=180)[0] is not None and first.returncode == 0
    duration = time.monotonic() - start
    old = digest(out)
    assert_complete(out)
    seen = []
    rng = random.Random(12)
    for i in range(KILLS):  # one kill in each third of a run, at a seeded point within it
        kill_at(run_prepare(out, seed=1), duration * (i + rng.random()) / KILLS)
        seen.append(digest(out))
        assert_complete(out)
    before, proc = digest(out), run_prepare(out, seed=1)  # before: old, or new if a kill came after the swap
    staging = sibling(out, "staging", proc.pid)
    kill_at(proc, 180, when=lambda: any(staging.glob("*/*.parquet")))  # mid-write, for sure
    assert digest(out) == before and staging.exists()  # the set as it was, the half-written one beside it
    assert_complete(out)
    proc = run_prepare(out, seed=1)
    staging = sibling(out, "staging", proc.pid)  # appears after the earlier leftovers are tidied
    kill_at(proc, 180, signal.SIGINT, when=staging.exists)
    assert proc.returncode == 130 and digest(out) == before
    assert leftovers(out) == []  # an interrupted run removes its own staging folder
    final = run_prepare(out, seed=1)
    log = final.communicate(timeout=180)[0]
    assert final.returncode == 0, log
    assert "prepared 2000 examples" in log
    new = digest(out)
    assert_complete(out)
    assert new != old
    print(f"after each random kill: {['old' if d == old else 'new' if d == new else 'neither' for d in seen]}")
    assert all(d in (old, new) for d in seen)
    assert leftovers(out) == []  # the killed runs' staging folders are gone
