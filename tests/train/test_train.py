"""Training on a real local Ray cluster with real DeepSpeed (2 CPU workers, gloo)."""

from pathlib import Path

import pytest
import torch

from ms_ray.cli import main
from ms_ray.config import TrainConfig, load_config
from ms_ray.core.model import MultiStreamLM
from ms_ray.tracking import read_metrics

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def job(data_dir, storage, name, *overrides):
    return load_config(TrainConfig, ROOT / "jobs/tiny.yaml", [
        f"data.path={data_dir}", "data.prepare=null", "data.batch_size=2", f"run.storage={storage}", f"run.name={name}",
        "optim.max_steps=20", "optim.warmup_steps=5", "run.log_every=1", "checkpoint.every=5", "eval.every=1000",
        "eval.examples_per_task=4", "wandb.mode=offline", *overrides,
    ])


def losses(run_dir, steps):
    metrics = read_metrics(run_dir)
    return [metrics[s]["train/loss"] for s in steps]


def probe_matches_export(run_dir):
    probe = torch.load(run_dir / "export_probe.pt")
    model = MultiStreamLM.from_pretrained(run_dir / "export")
    with torch.no_grad():
        logits = model(probe["tokens"], probe["doc_ids"]).logits
    torch.testing.assert_close(logits, probe["logits"], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def zero2_run(data_dir, tmp_path_factory):
    from ms_ray.train.run import train

    storage = tmp_path_factory.mktemp("runs")
    metrics = train(job(data_dir, storage, "z2"))
    return storage / "z2", metrics


def test_zero2_trains_evaluates_and_exports(zero2_run):
    run_dir, metrics = zero2_run
    first, last = losses(run_dir, [1, 20])
    assert last < first * 0.7  # the loss falls
    assert metrics["step"] == 20 and "val/loss" in metrics and "skills/all/accuracy" in metrics
    tasks = ("wait_k", "running_sum", "count_stop", "tool_call")
    # 4 sessions per task and condition (15 cells), one record per task of each
    assert metrics["skills/all/n"] >= 60 and {f"skills/{t}/n" for t in tasks} <= set(metrics)
    assert "skills/count_stop@mid_answer/accuracy" in metrics
    assert metrics["skills/eval_seconds"] > 0
    assert {"train/loss_output", "train/lr", "train/grad_norm", "train/tokens_per_s"} <= set(read_metrics(run_dir)[20])
    probe_matches_export(run_dir)


def test_wandb_offline_files_hold_the_metrics(zero2_run):
    run_dir, _ = zero2_run
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    (offline,) = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    blob = next(offline.glob("*.wandb")).read_bytes()
    for key in (b"train/loss", b"train/loss_output", b"val/loss", b"skills/all/accuracy"):
        assert key in blob, key


def test_zero3_trains_and_exports(data_dir, tmp_path):
    from ms_ray.train.run import train

    metrics = train(job(data_dir, tmp_path, "z3", "deepspeed.zero_stage=3", "optim.max_steps=12", "checkpoint.every=6"))
    first, last = losses(tmp_path / "z3", [1, 12])
    assert last < first * 0.8 and metrics["step"] == 12
    probe_matches_export(tmp_path / "z3")
    # `ms-ray export` consolidates the saved ZeRO-3 checkpoint offline: same weights
    out = tmp_path / "offline_export"
    assert main(["export", "jobs/tiny.yaml", f"data.path={data_dir}", f"run.storage={tmp_path}", "run.name=z3",
                 f"out={out}"]) == 0
    a, b = MultiStreamLM.from_pretrained(out), MultiStreamLM.from_pretrained(tmp_path / "z3" / "export")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)


def test_fault_resumes_and_matches_an_uninterrupted_run(data_dir, zero2_run, tmp_path):
    """A worker raises at step 13 once; the run resumes from step 10 and its losses from then
    on are bit-identical to the uninterrupted run (fp32, same data order, exact restore)."""
    from ms_ray.train.run import train

    metrics = train(job(data_dir, tmp_path, "z2", "run.fail_at_step=13", "run.max_failures=1"))
    assert metrics["step"] == 20 and (tmp_path / "z2" / ".fault_injected").exists()
    steps = list(range(11, 21))
    assert losses(tmp_path / "z2", steps) == losses(zero2_run[0], steps)


def test_stopped_run_continues_with_the_same_command(data_dir, zero2_run, tmp_path, capsys):
    """The first invocation dies at step 13 (no retries); running the same command again
    resumes from its last checkpoint and continues the same W&B run."""
    from ms_ray.train.run import train

    cfg = job(data_dir, tmp_path, "z2", "run.fail_at_step=13", "run.max_failures=0")
    with pytest.raises(Exception, match="injected fault at step 13"):
        train(cfg)
    run_dir = tmp_path / "z2"
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    metrics = train(cfg)
    assert metrics["step"] == 20
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # two sessions, one run
    assert losses(run_dir, range(11, 21)) == losses(zero2_run[0], range(11, 21))


@pytest.mark.parametrize("override, message", [
    ("model.hiden_size=3", "model.hiden_size: Extra inputs are not permitted"),
    ("optim.lr=fast", "optim.lr: Input should be a valid number"),
    ("data.path=/no/such/data", "data.path: /no/such/data has no manifest.json"),
])
def test_bad_configs_fail_before_any_worker(data_dir, tmp_path, capsys, override, message):
    args = ["train", "jobs/tiny.yaml", f"data.path={data_dir}", "data.prepare=null", f"run.storage={tmp_path}",
            override]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing started


def test_schema_that_does_not_match_the_data_fails_before_any_worker(data_dir, tmp_path, capsys):
    schema = "schema={streams: [{name: user, role: input}, {name: output, role: output}]}"
    args = ["train", "jobs/tiny.yaml", f"data.path={data_dir}", "data.prepare=null", f"run.storage={tmp_path}", schema]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "stream schemas differ between train config tiny and data set" in err and "['user', 'output']" in err
    assert not list(tmp_path.iterdir())


def test_divergence_stops_at_once_keeps_the_last_checkpoint_and_exports_nothing(data_dir, tmp_path, capsys):
    """Weight decay 1e9 at lr 1 (the largest the config allows) blows the weights up after the
    first update, so the loss / gradient norm is non-finite from step 2 on. Every rank stops at
    the same step; the CLI prints one line and exits 1; Ray Train does not retry (max_failures
    2: one W&B session only); the checkpoint of step 1 stays, nothing is exported."""
    import json

    args = ["train", "jobs/tiny.yaml", f"data.path={data_dir}", "data.prepare=null", "data.batch_size=2",
            f"run.storage={tmp_path}", "run.name=nan", "optim.max_steps=20", "optim.warmup_steps=5", "run.log_every=1",
            "checkpoint.every=1", "eval.every=1000", "eval.examples_per_task=4", "wandb.mode=offline",
            "optim.lr=1.0", "optim.weight_decay=1e9", "run.max_failures=2"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    run_dir = tmp_path / "nan"
    record = json.loads((run_dir / "diverged.json").read_text())
    step = record["step"]  # 2, or 3 when the first blown-up forward still gives a finite loss
    assert step in (2, 3) and record["what"] in ("loss", "grad norm") and record["value"] in ("nan", "inf")
    assert err[0].startswith(f"ms-ray train: training diverged at step {step}: ") and err[0].endswith(
        f"(lr {step * 0.2:.2e}, optim.lr 1); last good checkpoint at step {step - 1} kept; lower optim.lr"), err[0]
    assert not (run_dir / "export").exists() and not (run_dir / "export_probe.pt").exists()
    kept = [p for p in run_dir.glob("checkpoint_*") if (p / "ds").is_dir()]
    assert max(json.loads((p / "rank0.json").read_text())["step"] for p in kept) == step - 1
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1  # no retry
    assert set(read_metrics(run_dir)) == set(range(1, step))  # nothing logged after the last good step
