"""Pieces of the training loop that need no cluster."""

import math
from types import SimpleNamespace

import pytest

from ms_ray.config import OptimConfig
from ms_ray.train.loop import combine_skill_metrics, deepspeed_config, lr_lambda


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
    from ms_ray.config import DeepSpeedConfig

    cpu = SimpleNamespace(use_gpu=False)
    cfg = SimpleNamespace(deepspeed=DeepSpeedConfig(zero_stage=3, grad_accum=2, clip=0.5), optim=OptimConfig(), scaling=cpu)
    ds = deepspeed_config(cfg, 4)
    assert ds["optimizer"]["params"]["torch_adam"] is True  # inside params, or FusedAdam gets JIT-built
    assert ds["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (4, 2, 0.5)
    off = deepspeed_config(SimpleNamespace(deepspeed=DeepSpeedConfig(offload_optimizer=True), optim=OptimConfig(), scaling=cpu), 1)
    assert "torch_adam" not in off["optimizer"]["params"] and off["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    with pytest.raises(ValueError, match="offload_params needs zero_stage: 3"):
        DeepSpeedConfig(zero_stage=2, offload_params=True)


def test_skill_metrics_combine_by_example_count():
    rank0 = {"skills/a/accuracy": 1.0, "skills/a/n": 3, "skills/all/accuracy": 1.0, "skills/all/n": 3}
    rank1 = {"skills/a/accuracy": 0.0, "skills/a/n": 1, "skills/b/accuracy": 0.5, "skills/b/n": 2,
             "skills/b/ttft_rows": math.nan, "skills/all/accuracy": 1 / 3, "skills/all/n": 3}
    out = combine_skill_metrics([rank0, rank1])
    assert out["skills/a/accuracy"] == 0.75 and out["skills/a/n"] == 4
    assert out["skills/b/accuracy"] == 0.5 and math.isnan(out["skills/b/ttft_rows"])
    assert out["skills/all/accuracy"] == pytest.approx(4 / 6) and out["skills/all/n"] == 6
