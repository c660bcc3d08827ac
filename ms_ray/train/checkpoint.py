"""Checkpoints (every rank's ZeRO shard + where each rank was) and the consolidated HF export.

A checkpoint folder, as Ray Train merges it from all ranks:
  ds/                 DeepSpeed's save_checkpoint (tag "ckpt"): model states, each rank's ZeRO shard
  rank{r}.json        step, data position (epoch, batch), W&B run id
  rank{r}_rng.pt      torch / numpy / python RNG states of rank r
Ray Train registers a checkpoint only once every rank has reported it, so a half-written one
never counts. The export is one MultiStreamLM folder (HF safetensors + schema + tokenizer).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

TAG = "ckpt"


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
    """Write a consolidated MultiStreamLM folder from a full state dict (rank 0)."""
    model = make_model()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = {"base.lm_head.weight"} if model.base.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"export: state dict does not match the model (missing {missing}, unexpected {unexpected})")
    model.base.tie_weights()
    return model.save_pretrained(out, tokenizer)


def export_checkpoint(checkpoint_dir: str | Path, out: str | Path, make_model, tokenizer) -> Path:
    """`ms-ray export`: consolidate a saved ZeRO checkpoint offline (any stage) into a folder."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(Path(checkpoint_dir) / "ds"), tag=TAG)
    return export_model(sd, make_model, tokenizer, Path(out))


def load_export(folder, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer) of an exported MultiStreamLM folder, in eval mode. device auto: CUDA
    when there is one; dtype auto: bf16 on CUDA, fp32 on the CPU."""
    from ..core.model import MultiStreamLM
    from ..data.tokenizer import load_tokenizer

    device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    model = MultiStreamLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    return model, load_tokenizer(folder, model.schema)
