"""LoRA over the base model of a MultiStreamLM (peft): parameter-efficient training as a model option.

    model = MultiStreamLM(base, schema)
    apply_lora(model, settings)         # model.base becomes a peft model; most weights frozen
    ... train ...
    model = merge_lora(model)           # the adapters folded into the weights: a plain MultiStreamLM again

`settings` is duck-typed (rank, alpha, dropout, target_modules, trainable, special_token_rows: the
`model.lora` section of a job config); core knows nothing of configs, Ray or DeepSpeed.

What trains, everything else is frozen:
  - the LoRA matrices A [r, in] and B [out, r] beside every `target_modules` linear layer W [out, in]:
    y = W x + (alpha / r) B A x. B starts at zero, so the wrapped model starts equal to the base;
  - the per-stream embedding, always: it sits beside the base model (peft never sees it), starts at
    zero and is the only place the model learns which stream a cell belongs to;
  - the rows of the schema's special tokens (silence, pad, end tokens) in the token embedding and in
    an untied output head (`special_token_rows`, on by default). `from_base` adds these tokens at the
    mean of the old rows (transformers' mean resizing spreads them by 1e-9 of the covariance), so they
    all start as one vector: frozen, the model could not tell silence from <|end|>, neither reading
    nor writing them (a tied head scores both with that one row). A gradient hook zeroes the gradient
    of every other row and the optimizer gives these tensors no weight decay (`rows_only`), so the
    pretrained vocabulary stays exactly as it was. Cost: Adam keeps states for the whole matrix
    (DeepSpeed partitions whole tensors), not for the few rows;
  - the modules named in `trainable`, in full (e.g. `norm`, or `embed_tokens` for a new language).
    `embed_tokens` is not trained in full by default: it is the largest matrix of a small model
    (Qwen2.5-0.5B: 136M of 494M weights) and, tied to the output head, it moves the score of every
    token: the drift away from the pretrained model that LoRA is chosen to avoid.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .model import MultiStreamLM

ROWS_ATTR = "ms_ray_rows_only"  # on a parameter: the only rows that train (LongTensor of token ids)


def is_lora(model: MultiStreamLM) -> bool:
    return hasattr(model.base, "peft_config")


def rows_only(param: nn.Parameter) -> bool:
    """True for a tensor of which only some rows train (the optimizer must not decay the others)."""
    return hasattr(param, ROWS_ATTR)


def apply_lora(model: MultiStreamLM, settings) -> MultiStreamLM:
    """Wrap model.base with LoRA adapters in place and freeze what does not train (module
    docstring). Errors name the `model.lora` field at fault. Returns the model."""
    import peft  # here, not at the top: only LoRA runs pay for importing peft

    peft_config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                                  target_modules=list(settings.target_modules), bias="none")
    base_type = type(model.base).__name__
    try:
        with warnings.catch_warnings():  # peft reads a property transformers 5 deprecates: noise in every worker
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model.base = peft.get_peft_model(model.base, peft_config)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(f"model.lora.target_modules: {list(settings.target_modules)} do not name linear layers of "
                         f"{base_type} ({str(e).splitlines()[0]})") from None
    model.stream_embed.requires_grad_(True)
    train_in_full(model, settings.trainable, base_type)
    if settings.special_token_rows:
        train_special_rows(model)
    return model


def train_in_full(model: MultiStreamLM, names, base_type: str = "the base model") -> None:
    """Unfreeze every module of the base whose own name (the last part of its path) is in `names`."""
    found = set()
    for path, module in model.base.named_modules():
        name = path.rpartition(".")[2]
        if name in names:
            module.requires_grad_(True)
            found.add(name)
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"model.lora.trainable: {missing} name no module of {base_type}")


def train_special_rows(model: MultiStreamLM) -> None:
    """Let only the schema's special-token rows of the (still frozen) token embedding and output head
    train: a hook zeroes the other rows' gradients before DeepSpeed or the optimizer sees them."""
    ids = torch.tensor(sorted(set(model.schema.token_ids.values())), dtype=torch.long)
    heads = [model.base.get_input_embeddings(), model.base.get_output_embeddings()]
    weights = {id(w): w for m in heads if m is not None for w in [getattr(m, "base_layer", m).weight]}
    hooks = []
    for weight in weights.values():  # a tied head is the embedding's own tensor: one hook
        if weight.requires_grad:
            continue  # already trained in full (`trainable`)
        keep = torch.zeros(weight.shape[0], 1, dtype=torch.bool)  # [V, 1]
        keep[ids] = True
        weight.requires_grad_(True)
        setattr(weight, ROWS_ATTR, ids)
        hooks.append(weight.register_hook(lambda grad, keep=keep: grad * keep.to(grad.device)))
    model.lora_hooks = hooks


def merge_lora(model: MultiStreamLM) -> MultiStreamLM:
    """Fold the adapters into the base weights (W + (alpha / r) B A) and drop peft: the result is a
    plain MultiStreamLM, saved as the one folder that serving and `load_export` read without peft.
    A model without LoRA is returned as it is. Changes `model` in place; returns it."""
    if not is_lora(model):
        return model
    model.base = model.base.merge_and_unload()
    for hook in getattr(model, "lora_hooks", []):
        hook.remove()
    model.lora_hooks = []
    for param in model.parameters():
        if rows_only(param):
            delattr(param, ROWS_ATTR)
        param.requires_grad_(True)  # as from_pretrained gives it
    return model


def trainable_share(model: nn.Module) -> tuple[int, int]:
    """(trainable weights, all weights); a rows-only tensor counts its training rows only.
    Call it before DeepSpeed partitions the model (ZeRO-3 empties the tensors)."""
    total = trainable = 0
    for param in model.parameters():
        total += param.numel()
        if rows_only(param):
            trainable += len(getattr(param, ROWS_ATTR)) * param[0].numel()
        elif param.requires_grad:
            trainable += param.numel()
    return trainable, total
