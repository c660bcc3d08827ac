"""The prepared-data format, shared by `ms-ray prepare` (which writes it) and training and
evaluation (which read it); no Ray, no torch.

A data set is one folder:
  manifest.json            schema, tokenizer (path, hash), splits -> files and counts, sources,
                           dropped lines; written last, so a folder without it is not a set
  tokenizer/               the HF tokenizer folder the packs were encoded with
  train/*.parquet, validation/*.parquet
                           one file per shard: columns pack_id (str), tokens (R*C int32,
                           row-major cells), doc_ids (R int32; -1 = padding)
  dropped.jsonl            every dropped input line with its reason
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from .core.streams import StreamSchema

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: packs carry pack_id
WRITTEN = {MANIFEST, "dropped.jsonl", "tokenizer", "train", "validation"}  # all prepare puts in an output


def load_manifest(folder: str | Path, schema: StreamSchema | None = None, what: str = "model") -> dict:
    """Read a prepared data set's manifest; with `schema`, check that the two agree."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{folder} is not a prepared data set (no {MANIFEST}); run `ms-ray prepare` first")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FileNotFoundError(
            f"{folder} was prepared in data format {manifest.get('format_version')}, this version reads "
            f"{FORMAT_VERSION}: run `ms-ray prepare` again"
        )
    # a set damaged by hand or by a version before staged writes: say so here, not mid-training
    missing = [f for s in manifest["splits"].values() for f in s["files"] if not (Path(folder) / f).is_file()]
    missing += [] if (Path(folder) / manifest["tokenizer"]["path"]).is_dir() else [manifest["tokenizer"]["path"]]
    if missing:
        raise FileNotFoundError(f"{folder} is an incomplete data set ({len(missing)} missing, e.g. {missing[0]}); "
                                f"run `ms-ray prepare` again")
    if schema is not None:
        schema.check_same(StreamSchema.from_dict(manifest["schema"], str(path)), what, f"data set {folder}")
    return manifest


def read_pack_file(item: dict) -> list[dict]:
    """The packs of one shard file {"file": path} (a Ray Data flat_map in training). Plain
    pyarrow: read_parquet's discovery costs ~15 s per call on a 2-core node for a few small files."""
    table = pq.read_table(item["file"], columns=["pack_id", "tokens", "doc_ids"])
    return [{"pack_id": p, "tokens": np.asarray(t, dtype=np.int32), "doc_ids": np.asarray(d, dtype=np.int32)}
            for p, t, d in zip(*(table.column(c).to_pylist() for c in ("pack_id", "tokens", "doc_ids")))]
