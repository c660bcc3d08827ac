"""`ms-ray prepare`: read -> convert -> tokenize -> pack -> write, on Ray Data.

  1. one Ray Data task per (source, shard) reads, converts and tokenizes: readers yield
     Conversations or Dropped lines, a policy times them into tables, and each example gets
     its split from a hash of its source conversation (group), so one conversation never
     lands in both splits;
  2. the same task packs its examples of each split (whole examples, first-fit decreasing, into
     sequences of `packing.max_rows` rows) and writes one parquet file per split with a fixed
     name: no shuffle, so the work scales with the shards and costs no start-up on one node;
  3. the driver writes the manifest: schema, tokenizer hash, counts, silence share per stream,
     source -> split, and every dropped line with its reason (also in dropped.jsonl).
Deterministic for a seed: ids, splits and packing order depend on content only, never on
scheduling. It fails at the end (after writing) only if more than `max_drop_share` of the
inputs were dropped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from ..core.streams import StreamSchema
from .convert import convert
from .packing import fit_length, pack_examples
from .tables import Dropped, Example

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: packs carry pack_id
SPLITS = ("train", "validation")


class PrepareError(RuntimeError):
    """Too much input was dropped; the message names the reasons."""


def stable_fraction(*parts) -> float:
    """A number in [0, 1) from a hash of `parts`: the same on every machine and run."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@functools.lru_cache(maxsize=4)
def schema_and_tokenizer(schema_json: str, tokenizer_spec: str):
    """(bound schema, tokenizer), cached per worker process."""
    schema = StreamSchema.from_dict(json.loads(schema_json))
    if tokenizer_spec == "skills":
        from .skills import skill_tokenizer

        tokenizer = skill_tokenizer()
        schema.add_special_tokens(tokenizer)
    else:
        from .tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_spec, schema)
    return schema.bind(tokenizer), tokenizer


def encoder(tokenizer):
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


# ---- stage 1: read and convert -----------------------------------------------------------
def source_items(cfg, src_index: int, shard: int, schema, tokenizer):
    """Yield Examples and Dropped lines of one shard of one source."""
    src = cfg.sources[src_index]
    encode = encoder(tokenizer)
    if src.kind == "skills":
        from .skills import SKILL_STREAMS, TASKS, generate_examples, to_sequential

        n = src.examples // src.shards + (shard < src.examples % src.shards)
        seed = cfg.seed * 1_000_003 + src_index * 1009 + shard
        tasks = tuple(src.tasks or TASKS)
        if src.rendering == "streams":
            yield from generate_examples(n, seed, schema, encode, tasks)
        else:  # the same draws, laid out as tables first, then rendered as one sequence
            table_schema, table_tok = schema_and_tokenizer(json.dumps(SKILL_STREAMS.to_dict()), cfg.tokenizer)
            for example in generate_examples(n, seed, table_schema, encoder(table_tok), tasks):
                yield to_sequential(example, schema, encode)
        return
    if src.kind == "chitchat":
        from .formats import read_chitchat

        items = read_chitchat(limit=src.limit)
    elif src.format == "table":
        from .formats import read_table_jsonl

        items = read_table_jsonl(src.path, schema, tokenizer)
    else:
        from .formats import read_jsonl

        items = read_jsonl(src.path, schema, fmt=src.format, role_map=src.role_map, max_chars=src.max_chars)
    client = None
    if src.policy == "teacher":
        from .teacher import TeacherClient, TeacherConfig

        client = TeacherClient(TeacherConfig(**teacher_kwargs(src.teacher)))
    for n, item in enumerate(items):
        if src.kind == "jsonl" and src.limit is not None and n >= src.limit:
            break
        if n % src.shards != shard:
            continue
        if isinstance(item, (Dropped, Example)):
            yield item
        elif client is not None:
            from .teacher import teacher_convert

            result = teacher_convert(item, schema, encode, client)
            if isinstance(result, Example):
                result.id = f"{src.label}#{n}"
            yield result
        else:
            yield convert(item, schema, encode, src.policy, f"{src.label}#{n}")


def teacher_kwargs(settings) -> dict:
    import os

    kwargs = settings.model_dump(exclude={"api_key_env"})
    kwargs["api_key"] = os.environ.get(settings.api_key_env) if settings.api_key_env else None
    return kwargs


def process_shard(task: dict, cfg_json: str, out_dir: str) -> dict:
    """Ray Data map over read tasks: read, convert, split, pack and write one source shard.
    Returns what the manifest needs (JSON, to keep the row schema flat)."""
    from ..config import PrepareConfig

    cfg = PrepareConfig.model_validate_json(cfg_json)
    schema, tokenizer = schema_and_tokenizer(json.dumps(cfg.schema_.build().to_dict()), cfg.tokenizer)
    label = cfg.sources[task["source"]].label
    by_split: dict[str, list[Example]] = {s: [] for s in SPLITS}
    dropped, index = [], []
    for item in source_items(cfg, task["source"], task["shard"], schema, tokenizer):
        if isinstance(item, Example):
            item = fit_length(item, cfg.packing.max_rows, cfg.packing.overflow)
        if isinstance(item, Dropped):
            dropped.append({"source": label, "file": item.file or "", "line": -1 if item.line is None else item.line,
                            "reason": item.reason})
            continue
        split = "validation" if stable_fraction(cfg.seed, item.source, item.group) < cfg.split.validation_fraction else "train"
        by_split[split].append(item)
        index.append({"source": label, "group": item.group, "split": split, "policy": item.policy,
                      "truncated": "truncated_from_rows" in item.meta})
    files = [write_packs(by_split[s], Path(out_dir), s, f"{task['source']:02d}-{task['shard']:04d}", cfg.packing.max_rows, schema)
             for s in SPLITS if by_split[s]]
    return {"report": json.dumps({"dropped": dropped, "index": index, "files": files})}


def write_packs(examples: list[Example], out: Path, split: str, name: str, max_rows: int, schema) -> dict:
    """Pack one split of one shard into `out/split/name.parquet`; returns its statistics."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    packs = pack_examples(examples, max_rows, schema.pad_id)
    table = pa.table({
        "pack_id": [f"{split}/{name}/{i:06d}" for i in range(len(packs))],  # a stable sort key
        "tokens": [p.tokens.reshape(-1) for p in packs],  # [max_rows * C], row-major
        "doc_ids": [p.doc_ids for p in packs],  # [max_rows], -1 = padding
        "example_ids": [p.example_ids for p in packs],
        "used_rows": [p.used_rows for p in packs],
    })
    path = out / split / f"{name}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    cells = np.concatenate([e.rows for e in examples])  # [rows, C], padding excluded
    return {"split": split, "file": f"{split}/{path.name}", "packs": len(packs), "examples": len(examples),
            "rows": int(cells.shape[0]), "silent": (cells == schema.silence_id).sum(axis=0).tolist()}


# ---- the whole pipeline ------------------------------------------------------------------
def prepare(cfg, log=print) -> dict:
    """Run the pipeline for a PrepareConfig; returns the manifest (also written to disk)."""
    from ..ray_env import init_ray

    ray = init_ray(cfg.address)
    schema, tokenizer = schema_and_tokenizer(json.dumps(cfg.schema_.build().to_dict()), cfg.tokenizer)
    out = Path(cfg.output)
    for stale in [*(out / s for s in SPLITS), out / "tokenizer"]:
        shutil.rmtree(stale, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    tasks = [{"source": i, "shard": k} for i, src in enumerate(cfg.sources) for k in range(src.shards)]
    reports = ray.data.from_items(tasks, override_num_blocks=len(tasks)).map(
        process_shard, fn_kwargs={"cfg_json": cfg.model_dump_json(by_alias=True), "out_dir": str(out)}
    ).take_all()
    reports = [json.loads(r["report"]) for r in sorted(reports, key=lambda r: r["report"])]
    dropped = [d for r in reports for d in r["dropped"]]
    index = [i for r in reports for i in r["index"]]
    stats = sorted((f for r in reports for f in r["files"]), key=lambda f: f["file"])

    tokenizer.save_pretrained(out / "tokenizer")
    manifest = build_manifest(cfg, schema, tokenizer, index, stats, dropped)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    with open(out / "dropped.jsonl", "w") as f:
        for d in dropped:
            f.write(json.dumps(d) + "\n")
    log(format_summary(manifest, dropped))
    total = manifest["counts"]["examples"] + len(dropped)
    if total and len(dropped) / total > cfg.max_drop_share:
        raise PrepareError(
            f"{len(dropped)} of {total} inputs dropped ({len(dropped) / total:.1%}), over max_drop_share="
            f"{cfg.max_drop_share:.1%}; reasons in {out / 'dropped.jsonl'}"
        )
    return manifest


def build_manifest(cfg, schema, tokenizer, index, stats, dropped) -> dict:
    from .tokenizer import tokenizer_hash

    splits = {}
    for s in SPLITS:
        mine = [st for st in stats if st["split"] == s]
        rows = sum(st["rows"] for st in mine)
        silent = np.sum([st["silent"] for st in mine], axis=0) if mine else np.zeros(schema.num_streams)
        splits[s] = {
            "examples": sum(st["examples"] for st in mine), "packs": sum(st["packs"] for st in mine),
            "rows": rows, "tokens": rows * schema.num_streams,
            "silence_share": {n: round(float(x) / max(rows, 1), 4) for n, x in zip(schema.names, silent)},
            "files": sorted(st["file"] for st in mine),
        }
    sources = {}
    for r in index:
        src = sources.setdefault(r["source"], {"examples": 0, "policies": Counter(), "truncated": 0, "groups": {s: set() for s in SPLITS}})
        src["examples"] += 1
        src["policies"][r["policy"]] += 1
        src["truncated"] += r["truncated"]
        src["groups"][r["split"]].add(r["group"])
    for src in sources.values():
        src["policies"] = dict(src["policies"])
        src["groups"] = {s: sorted(g) for s, g in src["groups"].items()}
    return {
        "format_version": FORMAT_VERSION,
        "schema": schema.to_dict(),
        "tokenizer": {"spec": cfg.tokenizer, "hash": tokenizer_hash(tokenizer), "vocab_size": len(tokenizer), "path": "tokenizer"},
        "seed": cfg.seed, "max_rows": cfg.packing.max_rows, "overflow": cfg.packing.overflow,
        "counts": {"examples": len(index), "dropped": len(dropped)},
        "splits": splits,
        "sources": sources,
        "dropped_reasons": dict(Counter(reason_kind(d["reason"]) for d in dropped).most_common()),
    }


def reason_kind(reason: str) -> str:
    """Dropped reasons grouped for the summary: ids, quoted values and numbers blanked out."""
    kind = re.sub(r"\S+#\S+", "…", reason)
    kind = re.sub(r"'[^']*'", "'…'", kind)
    return re.sub(r"\d+", "N", kind)[:100]


def format_summary(manifest: dict, dropped: list[dict], show: int = 10) -> str:
    lines = [f"prepared {manifest['counts']['examples']} examples, dropped {manifest['counts']['dropped']}"]
    lines.append(f"{'split':<11} {'examples':>9} {'packs':>6} {'rows':>8} {'tokens':>9}  silence share per stream")
    for s, v in manifest["splits"].items():
        share = " ".join(f"{n}={x:.0%}" for n, x in v["silence_share"].items())
        lines.append(f"{s:<11} {v['examples']:>9} {v['packs']:>6} {v['rows']:>8} {v['tokens']:>9}  {share}")
    for name, src in manifest["sources"].items():
        trunc = f", {src['truncated']} truncated" if src["truncated"] else ""
        lines.append(f"source {name}: {src['examples']} examples {src['policies']}{trunc}")
    if dropped:
        lines.append("dropped:")
        lines += [f"  {kind}: {n}" for kind, n in manifest["dropped_reasons"].items()]
        lines += [f"  {d['file'] or d['source']}:{d['line']}: {d['reason']}" if d["line"] >= 0 else f"  {d['file'] or d['source']}: {d['reason']}"
                  for d in dropped[:show]]
        if len(dropped) > show:
            lines.append(f"  ... {len(dropped) - show} more in dropped.jsonl")
    return "\n".join(lines)


def read_pack_file(item: dict) -> list[dict]:
    """Ray Data flat_map: the packs of one shard file (plain pyarrow: read_parquet's discovery
    cost ~15 s per call on a 2-core node for a few small files)."""
    import pyarrow.parquet as pq

    table = pq.read_table(item["file"], columns=["pack_id", "tokens", "doc_ids"])
    return [{"pack_id": p, "tokens": np.asarray(t, dtype=np.int32), "doc_ids": np.asarray(d, dtype=np.int32)}
            for p, t, d in zip(*(table.column(c).to_pylist() for c in ("pack_id", "tokens", "doc_ids")))]


def pack_dataset(folder: str | Path, split: str, manifest: dict):
    """A Ray Dataset of the packs of one split: one read task per shard file."""
    import ray.data

    files = [str(Path(folder).resolve() / f) for f in manifest["splits"][split]["files"]]
    if not files:
        return None
    return ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files)).flat_map(read_pack_file)


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
    if schema is not None:
        schema.check_same(StreamSchema.from_dict(manifest["schema"], str(path)), what, f"data set {folder}")
    return manifest
