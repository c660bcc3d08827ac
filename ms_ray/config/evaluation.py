"""`ms-ray eval`'s `chat:` section: a chat model scored on the held-out conversations of the data
it was trained on (ms_ray/evaluation/chat.py says what each number is)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator, model_validator

from ..manifest import MANIFEST
from .base import Strict, check_paths
from .model import SamplingConfig


class ChatEvalConfig(Strict):
    """Set, `ms-ray eval` scores a chat model (one input stream, one reply stream with an end token)
    instead of running the skill evaluation (`eval:` is then ignored)."""

    data: str  # a folder `ms-ray prepare` wrote; its validation split is held out
    conversations: int = Field(40, gt=0)  # the first N held-out examples, in file order
    samples: int = Field(5, ge=0)  # the first N of those, shown in the report as sessions
    # the HF folder the checkpoint was converted from: the loss before training (from_base) and the
    # original model on the same replies in its own chat format; null: neither
    reference: str | None = None
    start_within: int = Field(4, ge=0)  # a reply starts in time: at most this many rows after the user's last token
    slack_rows: int = Field(16, ge=0)  # rows decoded after the reference conversation's last row
    batch_sessions: int = Field(1, gt=0)  # 1: each conversation decoded alone (rows/s of one session)
    sampling: SamplingConfig = SamplingConfig()  # of the reply stream (default: greedy)

    @field_validator("data")
    @classmethod
    def _prepared(cls, value: str, info: ValidationInfo) -> str:
        if check_paths(info) and not (Path(value) / MANIFEST).is_file():
            raise ValueError(f"{value} is not a prepared data set (no {MANIFEST}); run `ms-ray prepare` first")
        return value

    @field_validator("reference")
    @classmethod
    def _hf_folder(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and check_paths(info) and not (Path(value) / "config.json").is_file():
            what = "has no config.json" if Path(value).is_dir() else "does not exist"
            raise ValueError(f"{value} {what}: give the Hugging Face model folder the checkpoint was made from "
                             "(e.g. runs/models/smollm2), or null")
        return value

    @model_validator(mode="after")
    def _samples_fit(self):
        if self.samples > self.conversations:
            raise ValueError(f"samples ({self.samples}) must be at most conversations ({self.conversations}): "
                             "the samples are the first of the scored conversations")
        return self
