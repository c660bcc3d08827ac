"""Loading what `MultiStreamLM.save_pretrained` wrote: the model, its tokenizer, on a device.

Every consumer of an export (serving, evaluation, `ms-ray export`) loads it here, so device
and dtype defaults and the tokenizer's special tokens are decided once.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from .model import MultiStreamLM
from .streams import StreamSchema

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_tokenizer(path: str | Path, schema: StreamSchema):
    """A HF tokenizer folder, with the schema's special tokens added where missing."""
    if not Path(path).exists():
        raise FileNotFoundError(f"tokenizer folder {path} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    schema.add_special_tokens(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = schema.pad_token
    return tokenizer


@contextlib.contextmanager
def hf_bars_on_terminals_only():
    """transformers' progress bars ("Loading weights", "Writing model shards") only where they
    can redraw in place; in a worker or a log they are a line of carriage returns each."""
    shown = hf_logging.is_progress_bar_enabled()
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def load_export(folder, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer) of an exported MultiStreamLM folder, in eval mode. device auto: CUDA
    when there is one; dtype auto: bf16 on CUDA, fp32 on the CPU."""
    device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = DTYPES.get(dtype) or (torch.bfloat16 if device == "cuda" else torch.float32)
    with hf_bars_on_terminals_only():  # "Loading weights"
        model = MultiStreamLM.from_pretrained(folder, dtype=torch_dtype).to(device).eval()
    return model, load_tokenizer(folder, model.schema)
