"""The folder an export is (what `MultiStreamLM.save_pretrained` writes), checked without
torch: a wrong path, an empty folder or a truncated file is refused by name before a Serve
replica or an evaluation tries to load it.

  ms_ray.json                     format marker          config.json, model*.safetensors   the HF base model
  ms_schema.json                  the stream schema      stream_embeddings.safetensors     the stream embedding
  tokenizer.json, tokenizer_config.json                  the tokenizer
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from .streams import StreamSchema

STREAM_EMBED_FILE = "stream_embeddings.safetensors"
FORMAT_FILE = "ms_ray.json"
def export_window(folder: str | Path) -> int | None:
    """The attention window (rows) an export was trained with; None: none (the whole history)."""
    return json.loads((Path(folder) / FORMAT_FILE).read_text()).get("window")


class ExportError(ValueError):
    """A folder is not a whole, readable MultiStreamLM export; the message names the file."""


def check_export(folder: str | Path) -> None:
    """Check, without loading any weights, that `folder` is a complete export (what
    `save_pretrained` writes): the format marker, HF config, schema, every weight file's header
    and the tokenizer. Catches a wrong path, an empty folder and truncated or corrupt files."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ExportError(f"{folder} {what}: give an exported model folder "
                          "(`ms-ray train` writes one, `ms-ray export` too)")
    if not (folder / FORMAT_FILE).exists():
        raise ExportError(f"{folder} is not a multi-stream export (no {FORMAT_FILE}); export one with `ms-ray export`")
    index = folder / "model.safetensors.index.json"
    try:
        json.loads((folder / FORMAT_FILE).read_text())
        json.loads((folder / "config.json").read_text())
        StreamSchema.load(folder)
        shards = ["model.safetensors"]
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        for name in (*shards, STREAM_EMBED_FILE):
            if not (folder / name).is_file():
                raise ExportError(f"{folder} is incomplete: {name} is missing; export it again")
            with safe_open(str(folder / name), framework="numpy") as f:
                if not list(f.keys()):
                    raise ExportError(f"{folder / name} holds no tensors")
    except ExportError:
        raise
    except FileNotFoundError as e:
        missing = Path(e.filename or "?").name
        raise ExportError(f"{folder} is incomplete: {missing} is missing; export it again") from None
    except Exception as e:  # corrupt JSON, truncated safetensors, a bad schema: name the folder and what failed
        first_line = str(e).splitlines()[0][:200] if str(e) else "?"
        raise ExportError(f"{folder} is corrupt ({type(e).__name__}: {first_line}); "
                          "export it again") from None
    if not any((folder / n).exists() for n in ("tokenizer.json", "tokenizer_config.json")):
        raise ExportError(f"{folder} has no tokenizer (tokenizer.json); export it with its tokenizer")
