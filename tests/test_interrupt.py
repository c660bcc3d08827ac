"""Ctrl-C as a person presses it (SIGINT to the command's whole process group, as a terminal
sends it): exit code 130 and, as the last line, what was kept."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ms_ray.data.staging import sibling
from ms_ray.manifest import load_manifest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def start(args: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return subprocess.Popen([sys.executable, "-m", "ms_ray.cli", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def ctrl_c(proc: subprocess.Popen) -> tuple[int, str]:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def wait_for(predicate, proc, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def data(ray_local, tmp_path_factory):
    """The data set the commands below train on and fail to replace: made on the session's
    in-process test Ray (already up in a full run), not by a command of its own with a Ray to
    start (~15 s); the commands under test run in their own processes."""
    from ms_ray.config import PrepareConfig, load_config
    from ms_ray.data.pipeline import prepare  # after ray_local: Ray Data reads its environment at import

    out = tmp_path_factory.mktemp("interrupt") / "data"
    prepare(load_config(PrepareConfig, ROOT / "jobs/data-skills.yaml",
                        [f"output={out}", "sources=[{kind: skills, examples: 300}]"]),
            log=lambda _: None, progress=lambda _: None)
    return out


def test_ctrl_c_during_training_keeps_the_last_checkpoint_and_resumes(data, tmp_path):
    args = ["train", "jobs/tiny.yaml", f"data.path={data}", "data.prepare=null", "data.batch_size=1",
            "optim.max_steps=100000", "optim.warmup_steps=1", "checkpoint.every=3", "eval.every=100000",
            "eval.examples_per_task=0", f"run.storage={tmp_path}", "run.name=ctrlc", "wandb.mode=disabled"]
    proc = start(args)
    # a checkpoint counts once Ray Train has registered it (every rank reported), not when rank 0 wrote it
    snapshot = tmp_path / "ctrlc" / "checkpoint_manager_snapshot.json"
    wait_for(lambda: '"checkpoint_dir_name"' in read_text(snapshot), proc, 300)
    code, out = ctrl_c(proc)
    last = out.strip().splitlines()[-1]
    assert code == 130, out[-3000:]
    assert last.startswith("ms-ray train: interrupted; checkpoint of step ")
    assert "run the same command to resume" in last
    kept = int(last.split("checkpoint of step ")[1].split()[0])
    assert kept >= 3 and kept % 3 == 0
    # the same command resumes from it
    proc = start([a.replace("max_steps=100000", f"max_steps={kept + 2}") for a in args])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert f"resumed from step {kept}" in out


def test_ctrl_c_during_prepare_leaves_the_old_data_set(data):
    before = load_manifest(data)
    proc = start(["prepare", "jobs/data-skills.yaml", f"output={data}",
                  "sources=[{kind: skills, examples: 50000, shards: 2}]"])
    # prepare makes its staging folder once its Ray is up, right before the shards are written:
    # Ctrl-C then, instead of after a fixed 12 s sleep (Ray's start-up alone is ~6-10 s)
    staging = sibling(data, "staging", proc.pid)
    wait_for(staging.exists, proc, 120)
    code, out = ctrl_c(proc)
    assert code == 130, out[-3000:]
    assert out.strip().splitlines()[-1] == (f"ms-ray prepare: interrupted; the data set in {data} is as it was "
                                            "before (a new one is swapped in only when complete)")
    assert load_manifest(data) == before and not staging.exists()  # its half-written set is gone too
    for split in ("train", "validation"):
        for name in before["splits"][split]["files"]:
            assert (data / name).is_file()
