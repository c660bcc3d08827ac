"""The optimiser side of training: the learning-rate schedule, the DeepSpeed config, the
parameter groups."""

from __future__ import annotations

import math

from ..core.lora import rows_only


def lr_lambda(step: int, optim) -> float:
    """Multiplier of the base learning rate: linear warmup, then cosine / constant / WSD."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    floor = optim.min_lr_ratio
    if optim.schedule == "constant":
        return 1.0
    if optim.schedule == "wsd":  # warmup, stable, then a linear cooldown to the floor
        cool_start = optim.max_steps - optim.cooldown_steps
        if step < cool_start:
            return 1.0
        return 1.0 - (1.0 - floor) * (step - cool_start) / max(optim.cooldown_steps, 1)
    progress = min(1.0, (step - optim.warmup_steps) / max(optim.max_steps - optim.warmup_steps, 1))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def deepspeed_config(cfg, micro_batch: int) -> dict:
    ds, opt = cfg.deepspeed, cfg.optim
    zero = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    params = {"lr": opt.lr, "betas": list(opt.betas), "eps": 1e-8, "weight_decay": opt.weight_decay}
    if not ds.offload_optimizer:
        params["torch_adam"] = True  # inside params, or DeepSpeed JIT-builds FusedAdam (~70 s)
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": ds.grad_accum,
        "gradient_clipping": ds.clip or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "optimizer": {"type": "AdamW", "params": params},
        "steps_per_print": 10**9,
    }


def param_groups(model, optim) -> list[dict]:
    """The trainable parameters only: with LoRA most of the model is frozen, and DeepSpeed keeps
    gradients, optimizer states and fp32 copies only for what it is given. The stream embedding
    gets its own learning rate and no weight decay; a tensor of which only some rows train
    (LoRA's special-token rows) gets no weight decay either, as decay would shrink the frozen rows."""
    stream = [model.stream_embed.weight]
    trainable = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("stream_embed")]
    groups = [{"params": [p for p in trainable if not rows_only(p)]},
              {"params": stream, "lr": optim.stream_embed_lr or optim.lr, "weight_decay": 0.0}]
    rows = [p for p in trainable if rows_only(p)]
    return groups + ([{"params": rows, "weight_decay": 0.0}] if rows else [])
