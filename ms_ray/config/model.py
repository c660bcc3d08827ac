"""`model:` of a training job: the model's family and sizes, or a pretrained folder, and LoRA;
and how a model's output streams are sampled (decoding, serving, evaluation)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator

from .base import Strict

if TYPE_CHECKING:
    from ..core.decode import Sampling

# the attention and MLP projections of Llama, Qwen2/3 and Mistral: LoRA's usual targets
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraConfig(Strict):
    """`model.lora`: train low-rank adapters (peft LoRA) instead of the whole base model; null: full
    fine-tuning. The per-stream embedding always trains; ms_ray/core/lora.py says what else does
    and why. The export merges the adapters into the weights: a plain model folder."""

    rank: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)  # the update B A is scaled by alpha / rank
    dropout: float = Field(0.0, ge=0, lt=1)  # on the adapters' input
    target_modules: list[str] = Field(list(PROJECTIONS), min_length=1)  # linear layers that get adapters
    trainable: list[str] = []  # modules of the base trained in full as well, e.g. [norm] or [embed_tokens]
    # the schema's special tokens (silence, pad, end) train their rows of the token embedding and
    # output head: added at the mean of the old rows, they would stay indistinguishable otherwise
    special_token_rows: bool = True

    @field_validator("target_modules", "trainable")
    @classmethod
    def _module_names(cls, v: list[str]) -> list[str]:
        bad = [n for n in v if not n.isidentifier()]
        if bad:
            raise ValueError(f"{bad} are not module names (the last part of a module's path, e.g. q_proj)")
        if len(set(v)) != len(v):
            raise ValueError(f"repeated names in {v}")
        if "stream_embed" in v:
            raise ValueError("stream_embed always trains in full and gets no adapter; leave it out")
        return v

    @model_validator(mode="after")
    def _apart(self):
        both = sorted(set(self.trainable) & set(self.target_modules))
        if both:
            raise ValueError(f"trainable: {both} also in target_modules; a module either trains in full or gets "
                             "an adapter")
        return self


class ModelConfig(Strict):
    family: Literal["llama", "qwen2", "qwen3", "mistral"] = "llama"
    pretrained: str | None = None  # a HF folder; when set, the sizes below are ignored
    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    tie_embeddings: bool = True
    attention: Literal["auto", "sdpa", "flex"] = "auto"
    # a cell sees at most this many earlier rows (null: its whole document). Training and decoding
    # share it (it is saved with the model); a served session then needs a constant memory and may
    # run for hours
    window_rows: int | None = Field(None, gt=0)
    gradient_checkpointing: bool = False  # recompute each layer in backward: less memory, ~30 % more compute
    # the loss projects hidden states to the vocabulary this many MiB of fp32 logits at a time, its
    # gradients taken on the way (core/model.py WeightedLinearCE): never [B, R, C, V] logits at once
    # (at 8k cells x 152k words that is ~5 GB); null: the whole logits, then the loss
    loss_chunk_mb: float | None = Field(256, gt=0)
    compile: bool = False  # torch.compile the model (inductor; on CPU too): the first steps pay the compile
    lora: LoraConfig | None = None  # null: every weight trains
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.pretrained is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads}): "
                             f"change model.hidden_size or model.num_heads")
        kv = self.num_kv_heads
        if self.pretrained is None and kv is not None and (kv <= 0 or self.num_heads % kv):
            raise ValueError(f"num_kv_heads ({kv}) must be positive and divide num_heads ({self.num_heads})")
        return self


class SamplingConfig(Strict):
    temperature: float = Field(0.0, ge=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    silence_penalty: float = 0.0
    repetition_penalty: float = Field(1.0, ge=1.0)  # > 1: a stream's tokens of its current turn are less likely again

    def build(self) -> Sampling:
        from ..core.decode import Sampling  # torch is imported only where a model runs (not in the ingress)

        return Sampling(**self.model_dump())
