"""preflight, prepare, train and submit across two real Ray nodes (network namespaces).

The drivers run inside node a, as on a real cluster's head; storage is the machine's file system,
which both nodes share (except where a test gives node b a private mount). Training runs one
rank per node (scaling.placement=strict_spread) on the skill data that the prepare test builds.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from ms_ray.tracking import read_metrics

from .conftest import PY, ROOT, cli, restore
from .netns import TOKEN

pytestmark = pytest.mark.slow
NODE_B = "10.201.0.12"


# ---- prepare -----------------------------------------------------------------------------
# 6 shards, 5 CPUs (3 + 2): node a cannot hold them all at once, so both nodes get some
SKILLS = ["sources=[{kind: skills, examples: 600, shards: 6}]"]


def files_digest(folder: Path) -> dict[str, str]:
    """sha256 of every shard file (the manifest is compared parsed, without its timings)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def comparable_manifest(folder: Path) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    drop = {"created", "elapsed_s", "output", "prepare_seconds", "seconds"}
    return {k: v for k, v in manifest.items() if k not in drop}


@pytest.fixture(scope="module")
def cluster_data(cluster, tmp_path_factory):
    """Skill data prepared ON the cluster (read/convert/write tasks spread over both nodes)."""
    restore(cluster)
    out = tmp_path_factory.mktemp("cluster_data") / "skills"
    started = time.perf_counter()
    run = cli(cluster, "prepare", "jobs/data-skills.yaml", f"output={out}", *SKILLS, timeout=300)
    return out, run, time.perf_counter() - started


def test_prepare_on_two_nodes_gives_the_same_shards_as_one_node(two_nodes, cluster_data, ray_local, tmp_path):
    from ms_ray.config import PrepareConfig, load_config
    from ms_ray.data.pipeline import prepare  # after ray_local: Ray Data reads its environment at import

    out, run, _ = cluster_data
    tasks = two_nodes.run("a", [PY, "-c", TASK_NODES], timeout=60, cwd=ROOT).stdout
    nodes = json.loads(tasks.strip().splitlines()[-1])
    assert set(nodes) == {"10.201.0.11", NODE_B}, f"process_shard tasks ran on {nodes}"

    one = tmp_path / "one_node"  # the same config on this process's own local one-node Ray
    prepare(load_config(PrepareConfig, ROOT / "jobs/data-skills.yaml", [f"output={one}", *SKILLS]),
            log=lambda _: None, progress=lambda _: None)
    assert files_digest(out) == files_digest(one) and len(files_digest(one)) >= 6
    assert comparable_manifest(out) == comparable_manifest(one)


TASK_NODES = """
import json, ray
from ray.util.state import list_tasks
ray.init(logging_level="ERROR", log_to_driver=False)
ip = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
done = [t for t in list_tasks(limit=10000, raise_on_missing_output=False, detail=True)
        if "process_shard" in t.name and t.state == "FINISHED"]
counts = {}
for t in done:
    counts[ip.get(t.node_id, t.node_id)] = counts.get(ip.get(t.node_id, t.node_id), 0) + 1
print(json.dumps(counts))
"""


# ---- preflight ---------------------------------------------------------------------------
def test_preflight_sees_every_node_and_fails_on_storage_one_node_does_not_share(two_nodes, tmp_path):
    ok = cli(two_nodes, "preflight", "jobs/tiny.yaml", f"run.storage={tmp_path}/runs", "wandb.mode=offline",
             timeout=180, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr[-3000:]
    assert "2 node(s)" in ok.stdout and "2 of 2 listed alive answered" in ok.stdout
    network = next(line for line in ok.stdout.splitlines() if line.split()[1:2] == ["network"])
    assert "eth0 (10.201.0.11)" in network and f"eth0 ({NODE_B})" in network, network  # not loopback

    private = tmp_path / "private"  # node b gets its own empty tmpfs here: storage the head does not see
    private.mkdir()
    two_nodes.kill("b")
    two_nodes.wait_alive(1, 60)
    two_nodes.start_node("b", private=[str(private)])
    two_nodes.wait_alive(2, 90)
    bad = cli(two_nodes, "preflight", "jobs/tiny.yaml", f"run.storage={private}/runs", "wandb.mode=offline",
              timeout=180, check=False)
    assert bad.returncode == 1, bad.stdout + bad.stderr[-3000:]
    assert "FAIL  storage" in bad.stdout and "is not shared" in bad.stdout and "does not see" in bad.stdout
    assert "Traceback" not in bad.stderr


def test_preflight_right_after_a_node_death_reports_instead_of_crashing(two_nodes, tmp_path):
    two_nodes.kill("b")  # the GCS still lists b alive for a few seconds: its probe cannot be scheduled
    run = cli(two_nodes, "preflight", "jobs/tiny.yaml", f"run.storage={tmp_path}/runs", "wandb.mode=offline",
              timeout=180, check=False)
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    print(f"\npreflight right after the death: exit {run.returncode}")
    if run.returncode == 1:  # b was listed: the nodes check names it, the rest covers node a
        assert "FAIL  nodes" in run.stdout and NODE_B in run.stdout and "1 of 2 listed alive answered" in run.stdout
    else:  # the GCS had already marked b dead before preflight listed the nodes
        assert run.returncode == 0 and "1 node(s)" in run.stdout, run.stdout


# ---- train -------------------------------------------------------------------------------
def train_args(data: Path, storage: Path, name: str, *extra: str) -> list[str]:
    return ["train", "jobs/tiny.yaml", f"data.path={data}", "data.prepare=null", "data.batch_size=2",
            f"run.storage={storage}", f"run.name={name}", "optim.max_steps=40", "optim.warmup_steps=5",
            "run.log_every=1", "checkpoint.every=10", "eval.every=1000", "eval.examples_per_task=0",
            "wandb.mode=offline", "scaling.placement=strict_spread", *extra]


def losses(run_dir: Path, steps) -> list[float]:
    metrics = read_metrics(run_dir)
    return [metrics[s]["train/loss"] for s in steps]


def checkpoint_step(run_dir: Path) -> int:
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return int(snapshot["latest_checkpoint_result"]["metrics"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def wait_for(condition, seconds: float, what: str, proc=None, log: Path | None = None):
    deadline = time.monotonic() + seconds
    while not condition():
        if proc is not None and proc.poll() is not None and not condition():
            raise AssertionError(f"{what}: the run ended first ({proc.returncode})\n" + log.read_text()[-3000:])
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {seconds:g} s\n" + (log.read_text()[-3000:] if log else ""))
        time.sleep(0.2)


@pytest.fixture(scope="module")
def uninterrupted(cluster, cluster_data, tmp_path_factory):
    restore(cluster)  # module fixtures come before two_nodes: a test before may have left b dead
    storage = tmp_path_factory.mktemp("runs")
    run = cli(cluster, *train_args(cluster_data[0], storage, "z2"), timeout=600)
    return storage / "z2", run.stdout


def test_zero2_runs_one_rank_per_node(two_nodes, uninterrupted):
    run_dir, stdout = uninterrupted
    assert "2 workers on 2 node(s): rank 0 on " in stdout and NODE_B in stdout, stdout[-3000:]
    assert "training loop" in stdout and max(read_metrics(run_dir)) == 40


def test_node_killed_mid_run_and_re_added_resumes_with_identical_losses(two_nodes, cluster_data, uninterrupted,
                                                                         tmp_path):
    log = tmp_path / "train.log"
    proc = two_nodes.popen("a", [PY, "-m", "ms_ray.cli", *train_args(cluster_data[0], tmp_path, "z2",
                                                                      "run.max_failures=2")], log, cwd=ROOT)
    try:
        wait_for(lambda: checkpoint_step(tmp_path / "z2") >= 10, 240, "first checkpoint", proc, log)
        killed = time.monotonic()
        two_nodes.kill("b")  # one rank dies with its node
        two_nodes.wait_alive(1, 60)
        metrics = tmp_path / "z2" / "metrics.jsonl"
        logged = metrics.read_text().count("\n")  # the old group can log no step without b's rank
        two_nodes.start_node("b")  # the node comes back: the run restarts on it
        # training runs again: steps are logged again (the workers' log lines reach the driver late)
        wait_for(lambda: metrics.read_text().count("\n") > logged, 120, "a step after the restart", proc, log)
        recovery_s = time.monotonic() - killed
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        proc.kill()
    text = log.read_text()
    print(f"\nnode death -> training running again: {recovery_s:.1f} s")
    assert recovery_s <= 60
    resumed = int(text.split("resumed from step ")[1].split()[0])
    assert resumed >= 10 and text.count("2 workers on 2 node(s)") == 2
    steps = list(range(resumed + 1, 41))
    assert losses(tmp_path / "z2", steps) == losses(uninterrupted[0], steps)  # bit-identical


def test_node_that_never_returns_fails_the_run_within_the_bound_naming_it(two_nodes, cluster_data, tmp_path):
    log = tmp_path / "train.log"
    bound = ["run.startup_timeout_s=8", "run.startup_retries=1", "run.max_failures=2"]
    proc = two_nodes.popen("a", [PY, "-m", "ms_ray.cli", *train_args(cluster_data[0], tmp_path, "gone", *bound)],
                           log, cwd=ROOT)
    try:
        wait_for(lambda: checkpoint_step(tmp_path / "gone") >= 10, 240, "first checkpoint", proc, log)
        killed = time.monotonic()
        two_nodes.kill("b")
        code = proc.wait(timeout=180)
        failed_after = time.monotonic() - killed
    finally:
        proc.kill()
    text = log.read_text()
    assert code == 1, text[-3000:]
    assert f"node(s) {NODE_B}" in text and "did not come back" in text and "run.startup_timeout_s=8" in text
    assert "re-run the same command: it resumes from the checkpoint of step" in text
    print(f"\nnode gone -> run failed after {failed_after:.1f} s (bound: 2 x 8 s + detection)")
    assert failed_after < 2 * 8 + 45


# ---- submit ------------------------------------------------------------------------------
def test_submit_with_token_runs_zero3_with_ranks_on_both_nodes(two_nodes, cluster_data, tmp_path):
    run = cli(two_nodes, "submit", *train_args(cluster_data[0], tmp_path, "z3", "deepspeed.zero_stage=3",
                                               "optim.max_steps=12", "checkpoint.every=6")[1:],
              "--address", two_nodes.dashboard, "--token", TOKEN, "--follow", timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "SUCCEEDED" in run.stdout + run.stderr
    assert "2 workers on 2 node(s)" in run.stdout and NODE_B in run.stdout
    assert max(read_metrics(tmp_path / "z3")) == 12 and (tmp_path / "z3" / "export").is_dir()
