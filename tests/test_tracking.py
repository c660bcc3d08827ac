"""Console lines, progress and how a diverged run reaches the driver: no cluster needed."""

import io
import math
import pickle
import warnings

import pytest
import torch
from conftest import make_model

from ms_ray.tracking import (
    DIVERGED,
    Progress,
    TrainingDiverged,
    divergence_message,
    duration,
    non_finite,
    read_divergence,
    step_line,
    write_divergence,
)
from ms_ray.train.checkpoint import NonFiniteWeights, export_model
from ms_ray.train.run import fit


def test_step_line_shows_the_total_rate_and_eta():
    m = {"train/loss": 0.12345, "train/lr": 2e-3, "train/grad_norm": 0.5, "train/tokens_per_s": 10432.4}
    line = step_line(300, m, 73.2, total=2200, rate=4.1, eta=463.4)
    assert line == "step 300/2200 | loss 0.1235 | lr 2.00e-03 | gn 0.500 | 10,432 tok/s | 4.10 step/s | eta 7m43s | 73s"
    assert step_line(2200, {}, 10.0, total=2200, rate=12.34, eta=0.0) == "step 2200/2200 | 12.3 step/s | 10s"
    assert step_line(5, {"val/loss": 1.0}, 3.0) == "step 5 | val 1.0000 | 3s"  # no total: as before


def test_duration():
    assert [duration(s) for s in (0, 44.6, 60, 490, 3599, 3600, 7530)] == ["0s", "45s", "1m00s", "8m10s", "59m59s",
                                                                            "1h00m", "2h05m"]


def test_progress_prints_plain_lines_with_eta_when_not_a_terminal(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("ms_ray.tracking.time.perf_counter", lambda: now[0])
    out = io.StringIO()
    p = Progress(200, "eval (streams)", file=out, every_s=30)  # StringIO: not a terminal
    for t, done in ((10, 10), (31, 62), (40, 80), (100, 200)):
        now[0] = t
        p.update(done)  # a line at t=31 only: every 30 s, and none once all are done
    p.close()  # the final line
    assert out.getvalue().splitlines() == [
        "eval (streams): 62/200 examples | 2.0 examples/s | eta 1m09s",
        "eval (streams): 200/200 examples | 2.0 examples/s | done in 1m40s",
    ]


def test_progress_draws_a_bar_on_a_terminal():
    out = io.StringIO()
    p = Progress(4, "eval", file=out, tty=True)
    for done in (1, 3, 4):
        p.update(done)
    p.close()
    assert "4/4" in out.getvalue() and "\r" in out.getvalue()


def test_divergence_message_is_one_line():
    record = {"step": 5, "what": "loss", "value": "nan", "lr": 5e8, "base_lr": 1e10, "checkpoint": 4}
    assert divergence_message(record) == ("training diverged at step 5: loss nan (lr 5.00e+08, optim.lr 1e+10); "
                                          "last good checkpoint at step 4 kept; lower optim.lr")
    record.update(what="grad norm", value="inf", checkpoint=None)
    assert divergence_message(record).endswith("grad norm inf (lr 5.00e+08, optim.lr 1e+10); "
                                               "no checkpoint was saved before it; lower optim.lr")
    e = pickle.loads(pickle.dumps(TrainingDiverged(record)))
    assert str(e) == divergence_message(record) and "\n" not in str(e)
    assert [non_finite(v) for v in (1.0, math.nan, math.inf, -math.inf, torch.tensor(math.nan))] == [
        None, "nan", "inf", "-inf", "nan"]


class FakeTrainer:
    def __init__(self, run_dir, write=None, error=None):
        self.run_dir, self.write, self.error = run_dir, write, error

    def fit(self):
        assert not (self.run_dir / DIVERGED).exists()  # a stale file is gone before the run starts
        if self.write:
            write_divergence(self.run_dir, self.write)
        if self.error:
            raise self.error
        return "result"


def test_fit_turns_the_marker_into_one_exception(tmp_path):
    record = {"step": 3, "what": "loss", "value": "nan", "lr": 1.0, "base_lr": 1.0, "checkpoint": 2}
    write_divergence(tmp_path, record)  # left by an earlier, diverged session
    assert fit(FakeTrainer(tmp_path), tmp_path) == "result"  # resumed with a lower lr: fine
    with pytest.raises(TrainingDiverged, match=r"^training diverged at step 3: loss nan") as info:
        fit(FakeTrainer(tmp_path, write=record), tmp_path)  # the workers returned normally
    assert info.value.record == record and read_divergence(tmp_path).record == record
    with pytest.raises(TrainingDiverged) as info:  # a worker failed after writing it: still the one line
        fit(FakeTrainer(tmp_path, write=record, error=RuntimeError("worker group failed")), tmp_path)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    with pytest.raises(RuntimeError, match="worker group failed"):  # any other failure passes through
        fit(FakeTrainer(tmp_path, error=RuntimeError("worker group failed")), tmp_path)


def test_export_refuses_non_finite_weights(bound, tokenizer, tmp_path):
    model = make_model(bound, len(tokenizer))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    export_model(sd, lambda: make_model(bound, len(tokenizer)), tokenizer, tmp_path / "good")
    assert (tmp_path / "good" / "model.safetensors").exists()
    name = next(k for k, v in sd.items() if v.is_floating_point())
    sd[name].view(-1)[0] = math.nan
    refused = rf"export refused: 1 of {len(sd)} weight tensors are not finite \({name}\)"
    with pytest.raises(NonFiniteWeights, match=refused):
        export_model(sd, lambda: make_model(bound, len(tokenizer)), tokenizer, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    assert isinstance(NonFiniteWeights({"what": "x"}), TrainingDiverged)  # the CLI shows both as one line


def test_worker_noise_is_dropped_and_real_output_kept(capsys):
    from ms_ray.train.quiet import NOISY_PRINTS, dropping_prints, quiet_worker

    quiet_worker()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_worker()  # re-applies its filters on top
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("a real warning", FutureWarning)
    assert [str(w.message) for w in caught] == ["a real warning"]
    with dropping_prints(NOISY_PRINTS):
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("something that matters")
    assert capsys.readouterr().out == "something that matters\n"
