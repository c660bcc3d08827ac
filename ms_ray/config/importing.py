"""`ms-ray import SRC OUT [key=value ...]`: a pretrained model brought in as a plain HF folder."""

from __future__ import annotations

from typing import Literal

from .base import Strict


class ImportConfig(Strict):
    src: str  # a .gguf file or a local Hugging Face model folder
    out: str  # the HF folder to write; refused when it exists and is not empty, unless overwrite
    overwrite: bool = False  # replace a non-empty OUT (the new folder is swapped in only when complete)
    dtype: Literal["float32", "bfloat16"] = "float32"  # of the stored weights (a GGUF is dequantised to it)
