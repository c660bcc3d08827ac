"""Pieces of the training loop that need no cluster: the schedule, the DeepSpeed config, the
order of the batches on resume, and the recipe's step / divergence logic on one rank (a
one-process gloo group and a stand-in for DeepSpeed's engine)."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ms_ray.config import DeepSpeedConfig, OptimConfig, TrainConfig, load_config
from ms_ray.train.loop import TrainRecipe
from ms_ray.train.optim import deepspeed_config, lr_lambda
from ms_ray.train.packs import batches, micro_batches

ROOT = Path(__file__).resolve().parents[2]


def test_schedules():
    cos = OptimConfig(max_steps=100, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_lambda(0, cos) == pytest.approx(0.1) and lr_lambda(9, cos) == pytest.approx(1.0)
    assert lr_lambda(10, cos) == pytest.approx(1.0) and lr_lambda(100, cos) == pytest.approx(0.1)
    assert lr_lambda(55, cos) == pytest.approx(0.1 + 0.9 * 0.5)
    const = OptimConfig(max_steps=100, warmup_steps=0, schedule="constant")
    assert {lr_lambda(s, const) for s in (0, 50, 99)} == {1.0}
    wsd = OptimConfig(max_steps=100, warmup_steps=10, schedule="wsd", cooldown_steps=20, min_lr_ratio=0.0)
    assert lr_lambda(79, wsd) == 1.0 and lr_lambda(90, wsd) == pytest.approx(0.5) and lr_lambda(100, wsd) == 0.0


def test_deepspeed_config():
    cpu = SimpleNamespace(use_gpu=False)
    zero3 = DeepSpeedConfig(zero_stage=3, grad_accum=2, clip=0.5)
    ds = deepspeed_config(SimpleNamespace(deepspeed=zero3, optim=OptimConfig(), scaling=cpu), 4)
    assert ds["optimizer"]["params"]["torch_adam"] is True  # inside params, or FusedAdam gets JIT-built
    assert ds["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (
        4, 2, 0.5)
    offload = DeepSpeedConfig(offload_optimizer=True)
    off = deepspeed_config(SimpleNamespace(deepspeed=offload, optim=OptimConfig(), scaling=cpu), 1)
    assert "torch_adam" not in off["optimizer"]["params"]
    assert off["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    with pytest.raises(ValueError, match="offload_params needs zero_stage: 3"):
        DeepSpeedConfig(zero_stage=2, offload_params=True)


def test_a_resumed_stream_continues_with_the_same_batches():
    tokens = np.arange(10 * 2 * 3).reshape(10, 2, 3)
    docs = np.zeros((10, 2), np.int64)
    whole = micro_batches(tokens, docs, 3, 7, 0, 0, "cpu")
    seen = [next(whole) for _ in range(8)]  # 3 batches per epoch: epochs 0, 1 and part of 2
    assert [(e, b) for e, b, _, _ in seen] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]
    resumed = micro_batches(tokens, docs, 3, 7, 1, 2, "cpu")  # saved after batch 1 of epoch 1
    for (e, b, tok, doc), (e2, b2, tok2, doc2) in zip(seen[5:], resumed):
        assert (e, b) == (e2, b2) and torch.equal(tok, tok2) and torch.equal(doc, doc2)
    first_epoch = [tok for _, tok, _ in batches(tokens, docs, 3, 7, 0)]
    assert not torch.equal(first_epoch[0], next(iter(batches(tokens, docs, 3, 7, 1)))[1])  # reshuffled per epoch


# ---- the recipe on one rank, with a stand-in engine -------------------------------------------
@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """A one-process gloo group: the recipe's all-reduces run for real."""
    if dist.is_initialized():
        yield
        return
    store = tmp_path_factory.mktemp("group") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class Engine:
    """Stands in for DeepSpeed's engine: the i-th forward's loss sum is losses[i]; the gradient
    norm after optimizer step s is grad_norms.get(s, 1.0)."""

    def __init__(self, losses, grad_norms, grad_accum, num_streams):
        self.losses, self.grad_norms, self.grad_accum, self.C = list(losses), grad_norms, grad_accum, num_streams
        self.normalisers, self.supervised, self.micro_steps = [], [], 0

    def __call__(self, tokens, docs, labels, normaliser, check=True, layout_key=None):
        assert check is False  # the packs were checked where they entered (rank_packs)
        loss = self.losses[len(self.normalisers)]
        self.normalisers.append(normaliser)
        self.supervised.append(int((labels[..., 1:3] != -100).sum()))  # think and output: the weighted streams
        stream_count = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0][: self.C])
        return SimpleNamespace(loss=torch.tensor(loss), loss_sum=torch.tensor(loss),
                               stream_loss_sum=stream_count * loss / 2, stream_count=stream_count)

    def backward(self, loss):
        pass

    def step(self):
        self.micro_steps += 1

    def get_global_grad_norm(self):
        return self.grad_norms.get(self.micro_steps // self.grad_accum, 1.0)

    def train(self):
        pass


class Tracker:
    run_id = None

    def __init__(self):
        self.logged, self.exit_code = {}, None

    def begin(self, step):
        pass

    def log(self, step, metrics):
        self.logged[step] = metrics

    def finish(self, exit_code=0):
        self.exit_code = exit_code


def recipe(tmp_path, losses, grad_norms=None, *overrides) -> TrainRecipe:
    """A recipe past setup(): its engine, data, tracker, evaluation and checkpoints stood in for."""
    cfg = load_config(TrainConfig, ROOT / "jobs/tiny.yaml", [
        "optim.max_steps=4", "optim.warmup_steps=1", "deepspeed.grad_accum=2", "run.log_every=100",
        "eval.every=100", "checkpoint.every=100", "data.batch_size=2", *overrides], check_paths=False)
    config = {"cfg": cfg.model_dump_json(by_alias=True), "run_dir": str(tmp_path), "data_dir": str(tmp_path)}
    r = TrainRecipe(config, rank=0, world=1)
    schema = cfg.schema_.build()
    # streams user, think, output, tool, tool_call; only think and output carry loss here
    schema = SimpleNamespace(num_streams=5, names=schema.names, loss_weights=[0.0, 1.0, 1.0, 0.0, 0.0])
    r.schema, r.loss_weights, r.device = schema, torch.tensor(schema.loss_weights), "cpu"
    r.global_step = r.start_step = r.epoch = r.batch = 0
    r.last_checkpoint = None
    tokens, docs = np.ones((6, 4, 5), np.int64), np.zeros((6, 4), np.int64)
    r.data = micro_batches(tokens, docs, 2, 0, 0, 0, "cpu")
    r.engine = Engine(losses, grad_norms or {}, cfg.deepspeed.grad_accum, 5)
    r.scheduler = SimpleNamespace(get_last_lr=lambda: [1e-3])
    r.tracker = Tracker()
    r.saved, r.finished = [], []
    r.evaluate = lambda: {"val/loss": 0.5}

    def checkpoint(metrics):
        r.saved.append(metrics)
        r.last_checkpoint = r.global_step

    r.checkpoint = checkpoint
    r.finish = lambda: r.finished.append(r.global_step)
    return r


def diverged(tmp_path) -> dict:
    return json.loads((tmp_path / "diverged.json").read_text())


def test_a_run_normalises_by_the_global_supervised_count_with_one_all_reduce_per_micro_batch(
        one_rank, tmp_path, monkeypatch):
    calls = []
    reduce = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: (calls.append(t.numel()), reduce(t, *a, **k))[1])
    r = recipe(tmp_path, [1.0] * 8, None, "run.log_every=2")
    r.run()
    # 8 micro-batches (one all-reduce each: cells + the previous loss); at steps 2 and 4 one for
    # the last micro-batch's loss and one for the logged window
    assert calls == [2, 2, 2, 2, 1, 11, 2, 2, 2, 2, 1, 11]
    assert r.engine.normalisers == r.engine.supervised == [2 * 3 * 2] * 8  # batch 2 x 3 labelled rows x 2 streams
    assert sorted(r.tracker.logged) == [2, 4] and r.tracker.logged[4]["train/loss"] == pytest.approx(4 / (4 * 2))
    assert r.tracker.logged[4]["val/loss"] == 0.5 and r.saved == [{"step": 4, **r.tracker.logged[4]}]
    assert r.finished == [4] and not (tmp_path / "diverged.json").exists()
    assert (r.epoch, r.batch) == (2, 2)  # 3 batches per epoch: the next one is epoch 2's third


def test_a_nan_loss_stops_at_the_next_micro_batch_without_a_checkpoint(one_rank, tmp_path):
    r = recipe(tmp_path, [1.0, 1.0, math.nan, 1.0, 1.0, 1.0], None, "checkpoint.every=1", "run.log_every=1")
    r.run()
    assert len(r.engine.normalisers) == 3  # the 4th micro-batch's all-reduce carried the NaN: no forward
    lr = r.cfg.optim.lr  # jobs/tiny.yaml's; warmup is over at step 2 here
    assert diverged(tmp_path) == {"step": 2, "what": "loss", "value": "nan", "lr": pytest.approx(lr),
                                  "base_lr": lr, "checkpoint": 1}
    assert [m["step"] for m in r.saved] == [1] and sorted(r.tracker.logged) == [1]  # nothing after step 1
    assert r.tracker.exit_code == 1 and r.finished == []


def test_a_nan_on_the_last_micro_batch_is_caught_before_the_checkpoint(one_rank, tmp_path):
    r = recipe(tmp_path, [1.0, math.nan, 1.0, 1.0], None, "deepspeed.grad_accum=1", "checkpoint.every=2")
    r.run()
    assert len(r.engine.normalisers) == 2 and r.saved == [] and r.tracker.logged == {}
    assert diverged(tmp_path)["step"] == 2 and diverged(tmp_path)["what"] == "loss"


def test_a_non_finite_grad_norm_stops_and_names_the_norm(one_rank, tmp_path):
    r = recipe(tmp_path, [1.0] * 8, {3: math.inf}, "run.log_every=1")
    r.run()
    record = diverged(tmp_path)
    assert (record["step"], record["what"], record["value"]) == (3, "grad norm", "inf")
    assert record["lr"] == pytest.approx(r.cfg.optim.lr * lr_lambda(2, r.cfg.optim))
    assert sorted(r.tracker.logged) == [1, 2] and r.finished == [] and r.tracker.exit_code == 1


def test_packs_are_checked_once_where_they_enter(tmp_path):
    """rank_packs checks every pack against the schema (the training forward then skips the check);
    a bad token id is named with its pack, row and stream."""
    from ms_ray.core.streams import TableError
    from ms_ray.data.skills import SKILL_STREAMS
    from ms_ray.train.packs import rank_packs

    class Shard:
        def __init__(self, tokens):
            self.tokens = tokens

        def iter_batches(self, batch_size, batch_format):
            yield {"pack_id": np.array(["a", "b"]), "tokens": list(self.tokens.reshape(2, -1)),
                   "doc_ids": list(np.zeros((2, 3), np.int64))}

    tokens = np.ones((2, 3, 5), np.int64)
    assert rank_packs(Shard(tokens), 0, 1, SKILL_STREAMS, 10)[0].shape == (2, 3, 5)
    tokens[1, 2, 4] = 10
    with pytest.raises(TableError, match="prepared packs: token id 10 out of range \\[0, 10\\) at batch 1, row 2, "
                                         "stream 'tool_call'"):
        rank_packs(Shard(tokens), 0, 1, SKILL_STREAMS, 10)
