"""Checkpoints (every rank's ZeRO shard + where each rank was) and the consolidated HF export.

A checkpoint folder, as Ray Train merges it from all ranks:
  ds/                 DeepSpeed's save_checkpoint (tag "ckpt"): model states, each rank's ZeRO shard
  rank{r}.json        step, data position (epoch, batch), W&B run id
  rank{r}_rng.pt      torch / numpy / python RNG states of rank r
Ray Train registers a checkpoint only once every rank has reported it, so a half-written one
never counts. The export is one MultiStreamLM folder (HF safetensors + schema + tokenizer); a
state dict with a NaN or an infinity is never exported (`NonFiniteWeights`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from ..core.loading import hf_bars_on_terminals_only
from ..core.lora import merge_lora
from ..tracking import TrainingDiverged

TAG = "ckpt"


class NonFiniteWeights(TrainingDiverged):
    """A state dict holds NaN or infinite values: the run diverged; refused for export."""

    def __init__(self, record: dict):
        self.record = record
        RuntimeError.__init__(self, f"export refused: {record['what']}; the run diverged: export an earlier "
                                    "checkpoint (`ms-ray export` with checkpoint=PATH) or retrain with a lower "
                                    "optim.lr")


def non_finite_tensors(state_dict: dict) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity."""
    return [k for k, v in state_dict.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def check_finite(state_dict: dict) -> None:
    bad = non_finite_tensors(state_dict)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteWeights({"what": f"{len(bad)} of {len(state_dict)} weight tensors are not finite ({shown})",
                                "tensors": bad})


def save_state(folder: Path, engine, rank: int, state: dict) -> None:
    """Collective: every rank writes its ZeRO shard and its own position into `folder`."""
    engine.save_checkpoint(str(folder / "ds"), tag=TAG)
    (folder / f"rank{rank}.json").write_text(json.dumps(state))
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
               folder / f"rank{rank}_rng.pt")


def load_state(folder: Path, engine, rank: int) -> dict:
    """Collective: restore weights, optimizer, scheduler and this rank's position and RNG."""
    path, _ = engine.load_checkpoint(str(folder / "ds"), tag=TAG)
    if path is None:
        raise RuntimeError(f"checkpoint {folder} has no DeepSpeed state under ds/{TAG}")
    rng = torch.load(folder / f"rank{rank}_rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    return json.loads((folder / f"rank{rank}.json").read_text())


def full_state_dict(engine, zero_stage: int) -> dict | None:
    """Collective for ZeRO-3 (parameters are gathered from every rank); the full fp32/bf16
    state dict on rank 0, None elsewhere."""
    if zero_stage == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()  # returns the params' own dtype
    else:
        sd = engine.module.state_dict() if engine.global_rank == 0 else None
    return sd if engine.global_rank == 0 else None


def export_model(state_dict: dict, make_model, tokenizer, out: Path) -> Path:
    """Write a consolidated MultiStreamLM folder from a full state dict (rank 0); refuses one
    with non-finite values (NonFiniteWeights) before writing anything.

    A LoRA model (model.lora) is exported merged (core/lora.py merge_lora): W + (alpha / r) B A in
    one plain folder, because serving and `load_export` read one plain MultiStreamLM folder and
    need no peft. Weights the run froze may be missing from the state dict (DeepSpeed's ZeRO-1
    checkpoints leave them out): make_model() rebuilds them as the run started, and they never
    changed."""
    check_finite(state_dict)
    model = make_model()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    tied = {n for n in missing if n.endswith("lm_head.weight")} if model.base.config.tie_word_embeddings else set()
    if set(missing) - tied - frozen or unexpected:
        raise RuntimeError(f"export: state dict does not match the model (missing {missing}, unexpected {unexpected})")
    model.base.tie_weights()
    model = merge_lora(model)
    with hf_bars_on_terminals_only():  # "Writing model shards"
        return model.save_pretrained(out, tokenizer)


def export_checkpoint(checkpoint_dir: str | Path, out: str | Path, make_model, tokenizer) -> Path:
    """`ms-ray export`: consolidate a saved ZeRO checkpoint offline (any stage) into a folder."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(Path(checkpoint_dir) / "ds"), tag=TAG)
    return export_model(sd, make_model, tokenizer, Path(out))
