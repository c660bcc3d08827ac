"""Tiny random-initialised base models from a config, for tests, demos and from-scratch runs.

Real runs load a pretrained folder instead (MultiStreamLM.from_base); the wrapper itself
works with any decoder-only causal LM whose attention goes through transformers'
attention interface and takes position_ids (Llama, Qwen2, Qwen3, Mistral, ...).
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from .lora import apply_lora
from .model import MultiStreamLM

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def tiny_base_model(
    family: str,
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    tie_embeddings: bool = True,
    max_rows: int = 4096,
    seed: int = 0,
):
    """A randomly initialised HF causal LM of the given family (fp32, sdpa attention)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    config = AutoConfig.for_model(
        family,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        head_dim=hidden_size // num_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        tie_word_embeddings=tie_embeddings,
        max_position_embeddings=max_rows,  # positions are rows, not cells
        sliding_window=None,
        use_sliding_window=False,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def build_model(cfg, schema, tokenizer):
    """A MultiStreamLM from a ModelConfig: a pretrained HF folder converted in one call, or a
    tiny random model of the given family; with `cfg.lora` set, LoRA adapters over its base
    (core/lora.py). Returns (model, tokenizer)."""
    if cfg.pretrained:
        model, tokenizer = MultiStreamLM.from_base(cfg.pretrained, schema, tokenizer, cfg.attention, cfg.window_rows)
    else:
        schema.add_special_tokens(tokenizer)
        base = tiny_base_model(
            cfg.family, len(tokenizer), cfg.hidden_size, cfg.num_layers, cfg.num_heads,
            cfg.num_kv_heads, cfg.intermediate_size, cfg.tie_embeddings, seed=cfg.seed,
        )
        model = MultiStreamLM(base, schema.bind(tokenizer), cfg.attention, cfg.window_rows)
    model.loss_chunk_mb = cfg.loss_chunk_mb
    if cfg.lora is not None:
        apply_lora(model, cfg.lora)
    return model, tokenizer
