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
scheduling.

Safe by default: the new set is written into a hidden staging folder beside `output`
(`.NAME.staging-PID`, manifest last) and swapped in only when complete, in one atomic
exchange where Linux allows it (else two renames, with a backup a killed run's successor
restores). So `output` is always the complete old set or the complete new one, whatever
kills the run; leftovers of killed runs are tidied by the next one. Refused before anything
is read or written (PrepareRefused): an output that is a file, lies under a file, or is a
non-empty folder other than a data set of ours; an empty input file; a source whose first
conversations are mostly unknown to the tokenizer. Failed after reading, with the old set left
as it was (PrepareError): a source that gave no examples or too many unknown tokens. Too many
dropped inputs (over `max_drop_share`) fail after the set is swapped in, as before.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import os
import re
import shutil
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data  # Ray reads its environment at import: the CLI imports this module after ray_env.set_environment

from ..config import PrepareConfig
from ..core.loading import load_tokenizer
from ..core.streams import StreamSchema
from ..manifest import FORMAT_VERSION, MANIFEST, read_pack_file
from ..ray_env import init_ray
from .convert import convert
from .formats import read_chitchat, read_jsonl, read_table_jsonl
from .packing import fit_length, pack_examples
from .skill_sessions import generate_sessions
from .skills import SKILL_STREAMS, TASKS, generate_examples, to_sequential
from .staging import PrepareError, PrepareRefused, check_output, parent_lock, recover, sibling, swap_in
from .tables import Conversation, Dropped, Example
from .teacher import TeacherClient, TeacherConfig, teacher_convert
from .tokenizer import encoder, skill_tokenizer, tokenizer_hash

SPLITS = ("train", "validation")
UNKNOWN_SAMPLE = 200  # input lines per source tokenized before Ray starts, to refuse early
HEARTBEAT_S = 30.0  # a progress line at least this often while shards run (a shard can take minutes)


def stable_fraction(*parts) -> float:
    """A number in [0, 1) from a hash of `parts`: the same on every machine and run."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@functools.lru_cache(maxsize=4)
def schema_and_tokenizer(schema_json: str, tokenizer_spec: str):
    """(bound schema, tokenizer), cached per worker process."""
    schema = StreamSchema.from_dict(json.loads(schema_json))
    if tokenizer_spec == "skills":
        tokenizer = skill_tokenizer()
        schema.add_special_tokens(tokenizer)
    else:
        tokenizer = load_tokenizer(tokenizer_spec, schema)
    return schema.bind(tokenizer), tokenizer


# ---- stage 1: read and convert -----------------------------------------------------------
def source_items(cfg, src_index: int, shard: int, schema, tokenizer):
    """Yield Examples and Dropped lines of one shard of one source."""
    src = cfg.sources[src_index]
    encode = encoder(tokenizer)
    if src.kind == "skills":
        n = src.examples // src.shards + (shard < src.examples % src.shards)
        seed = cfg.seed * 1_000_003 + src_index * 1009 + shard
        if src.rendering == "streams":
            yield from skill_examples(src, n, seed, schema, encode)
        else:  # the same draws, laid out as tables first, then rendered as one sequence
            table_schema, table_tok = schema_and_tokenizer(json.dumps(SKILL_STREAMS.to_dict()), cfg.tokenizer)
            for example in skill_examples(src, n, seed, table_schema, encoder(table_tok)):
                yield to_sequential(example, schema, encode)
        return
    if src.kind == "chitchat":
        items = read_chitchat(limit=src.limit)
    elif src.format == "table":
        items = read_table_jsonl(src.path, schema, tokenizer)
    else:
        items = read_jsonl(src.path, schema, fmt=src.format, role_map=src.role_map, max_chars=src.max_chars)
    client = None
    if src.policy == "teacher":
        client = TeacherClient(TeacherConfig(**teacher_kwargs(src.teacher)))
    for n, item in enumerate(items):
        if src.kind == "jsonl" and src.limit is not None and n >= src.limit:
            break
        if n % src.shards != shard:
            continue
        if isinstance(item, (Dropped, Example)):
            yield item
        elif client is not None:
            result = teacher_convert(item, schema, encode, client)
            if isinstance(result, Example):
                result.id = f"{src.label}#{n}"
            yield result
        else:
            yield convert(item, schema, encode, src.policy, f"{src.label}#{n}", src.session)


def skill_examples(src, n: int, seed: int, schema, encode) -> list[Example]:
    """A skills source's draws: `n` sessions (src.session) or single tasks from row 0."""
    tasks = tuple(src.tasks or TASKS)
    if src.session is None:
        return generate_examples(n, seed, schema, encode, tasks)
    unknown = set(src.task_weights or ()) - set(tasks)
    if unknown:
        raise ValueError(f"source {src.label}: task_weights names unknown tasks {sorted(unknown)}; tasks: {tasks}")
    weights = [(src.task_weights or {}).get(t, 1.0) for t in tasks] if src.task_weights else None
    return generate_sessions(n, seed, schema, encode, src.session, tasks, weights)


def teacher_kwargs(settings) -> dict:
    kwargs = settings.model_dump(exclude={"api_key_env"})
    kwargs["api_key"] = os.environ.get(settings.api_key_env) if settings.api_key_env else None
    return kwargs


def process_shard(task: dict, cfg_json: str, out_dir: str) -> dict:
    """Ray Data map over read tasks: read, convert, split, pack and write one source shard.
    Returns what the manifest needs (JSON, to keep the row schema flat)."""
    cfg = PrepareConfig.model_validate_json(cfg_json)
    schema, tokenizer = schema_and_tokenizer(json.dumps(cfg.schema_.build().to_dict()), cfg.tokenizer)
    label = cfg.sources[task["source"]].label
    unk = tokenizer.unk_token_id  # None: the tokenizer cannot produce unknown tokens
    by_split: dict[str, list[Example]] = {s: [] for s in SPLITS}
    dropped, index, tokens, unknown = [], [], 0, 0
    for item in source_items(cfg, task["source"], task["shard"], schema, tokenizer):
        if isinstance(item, Example):
            item = fit_length(item, cfg.packing.max_rows, cfg.packing.overflow)
        if isinstance(item, Dropped):
            dropped.append({"source": label, "file": item.file or "", "line": -1 if item.line is None else item.line,
                            "reason": item.reason})
            continue
        text = item.rows[item.rows != schema.silence_id]  # the cells that carry a token
        tokens += int(text.size)
        unknown += 0 if unk is None else int((text == unk).sum())
        held_out = stable_fraction(cfg.seed, item.source, item.group) < cfg.split.validation_fraction
        split = "validation" if held_out else "train"
        by_split[split].append(item)
        index.append({"source": label, "group": item.group, "split": split, "policy": item.policy,
                      "truncated": "truncated_from_rows" in item.meta})
    name = f"{task['source']:02d}-{task['shard']:04d}"
    files = [write_packs(by_split[s], Path(out_dir), s, name, cfg.packing.max_rows, schema)
             for s in SPLITS if by_split[s]]
    return {"report": json.dumps({"source": label, "source_index": task["source"], "shard": task["shard"],
                                  "tokens": tokens, "unknown": unknown, "dropped": dropped, "index": index,
                                  "files": files})}


def write_packs(examples: list[Example], out: Path, split: str, name: str, max_rows: int, schema) -> dict:
    """Pack one split of one shard into `out/split/name.parquet`; returns its statistics."""
    packs = pack_examples(examples, max_rows, schema.pad_id)
    table = pa.table({
        "pack_id": [f"{split}/{name}/{i:06d}" for i in range(len(packs))],  # a stable sort key
        "tokens": [p.tokens.reshape(-1) for p in packs],  # [max_rows * C], row-major
        "doc_ids": [p.doc_ids for p in packs],  # [max_rows], -1 = padding
        "example_ids": [p.example_ids for p in packs],
        "used_rows": [p.used_rows for p in packs],
    })
    path = out / split / f"{name}.parquet"
    path.parent.mkdir(exist_ok=True)  # not parents: a task outliving a killed run must not recreate its staging folder
    pq.write_table(table, path)
    cells = np.concatenate([e.rows for e in examples])  # [rows, C], padding excluded
    return {"split": split, "file": f"{split}/{path.name}", "packs": len(packs), "examples": len(examples),
            "rows": int(cells.shape[0]), "silent": (cells == schema.silence_id).sum(axis=0).tolist()}


# ---- the whole pipeline ------------------------------------------------------------------
def prepare(cfg, log=print, progress=None) -> dict:
    """Run the pipeline for a PrepareConfig; returns the manifest (also written to disk).
    `log` gets the final summary, `progress` one plain line per event (default: stderr)."""
    progress = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    out = Path(cfg.output).expanduser().resolve()  # a symlinked output: replace what it points to
    # everything that can refuse does so here, before Ray starts and before a byte is written
    check_output(out, cfg.output)
    check_inputs(cfg)
    schema, tokenizer = schema_and_tokenizer(json.dumps(cfg.schema_.build().to_dict()), cfg.tokenizer)
    check_unknown_sample(cfg, schema, tokenizer, cfg.max_unknown_share)  # e.g. chat text with a word vocabulary
    init_ray(cfg.address)  # before any folder is made: a cluster that does not answer changes nothing

    created = [p for p in out.parents if not p.exists()]  # deepest first; removed again if the run fails
    out.parent.mkdir(parents=True, exist_ok=True)
    with parent_lock(out.parent):
        recover(out, progress)
    staging = sibling(out, "staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        reports = run_shards(cfg, staging, progress)
        per_source = check_sources(cfg, reports, cfg.max_unknown_share)
        dropped = [d for r in reports for d in r["dropped"]]
        index = [i for r in reports for i in r["index"]]
        stats = sorted((f for r in reports for f in r["files"]), key=lambda f: f["file"])
        tokenizer.save_pretrained(staging / "tokenizer")
        with open(staging / "dropped.jsonl", "w") as f:
            for d in dropped:
                f.write(json.dumps(d) + "\n")
        manifest = build_manifest(cfg, schema, tokenizer, index, stats, dropped, per_source)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")  # last: the set is complete
        with parent_lock(out.parent):
            swap_in(staging, out, cfg.output)
    except BaseException:  # Ctrl-C included: the old set was never touched
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:
            with contextlib.suppress(OSError):  # not empty (anymore): someone else's now
                folder.rmdir()
        raise
    log(format_summary(manifest, dropped))
    total = manifest["counts"]["examples"] + len(dropped)
    if total and len(dropped) / total > cfg.max_drop_share:
        raise PrepareError(
            f"{len(dropped)} of {total} inputs dropped ({len(dropped) / total:.1%}), over max_drop_share="
            f"{cfg.max_drop_share:.1%}; reasons in {out / 'dropped.jsonl'}"
        )
    return manifest


def run_shards(cfg, staging: Path, progress) -> list[dict]:
    """Run every (source, shard) task, writing into `staging`; a progress line as each one
    finishes (streamed, not take_all, so they come in completion order) and a heartbeat between.
    Returns the tasks' reports in (source, shard) order."""
    tasks = [{"source": i, "shard": k} for i, src in enumerate(cfg.sources) for k in range(src.shards)]
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks)).map(
        process_shard, fn_kwargs={"cfg_json": cfg.model_dump_json(by_alias=True), "out_dir": str(staging)})
    progress(f"prepare: {len(tasks)} shard(s) from {len(cfg.sources)} source(s) -> {cfg.output}")
    start, reports = time.monotonic(), []

    def beat():
        progress(f"prepare: {len(reports)}/{len(tasks)} shards done, {time.monotonic() - start:.0f} s")

    with heartbeat(beat, HEARTBEAT_S):
        for row in ds.iter_rows():
            r = json.loads(row["report"])
            reports.append(r)
            progress(f"prepare: shard {len(reports)}/{len(tasks)} done ({r['source']} {r['shard'] + 1}/"
                     f"{cfg.sources[r['source_index']].shards}): {len(r['index'])} examples, "
                     f"{len(r['dropped'])} dropped, {time.monotonic() - start:.0f} s")
    return sorted(reports, key=lambda r: (r["source_index"], r["shard"]))


@contextlib.contextmanager
def heartbeat(say, every: float):
    """Call `say` every `every` seconds until the block ends (so a long shard is not silence)."""
    stop = threading.Event()

    def run():
        while not stop.wait(every):
            say()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# ---- input checks: before Ray where cheap, else after reading (the old set kept) -----------
def where(src) -> str:
    return f"source {src.label!r}" + (f" (file {src.path})" if src.path and src.path != src.label else "")


def check_inputs(cfg) -> None:
    """An empty (or blank) jsonl file would give a data set of nothing: refuse it up front."""
    for src in cfg.sources:
        if src.kind == "jsonl" and Path(src.path).is_file() and is_blank(src.path):
            raise PrepareRefused(f"{where(src)} is empty (no JSON lines); give a file with data or remove the source")


def is_blank(path: str, chunk: int = 1 << 20) -> bool:
    """Only whitespace (and a UTF-8 BOM) in the file; stops at the first other byte."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if block.strip(b" \t\r\n\x0b\x0c\xef\xbb\xbf"):
                return False
    return True


def unknown_message(src, share: float, limit: float, spec: str, seen: str) -> str:
    return (f"{where(src)}: {share:.1%} of its tokens{seen} are unknown to tokenizer {spec!r}, over "
            f"max_unknown_share={limit:.1%}; use a tokenizer that covers this text, e.g. a BPE from "
            f"`ms-ray tokenizer jobs/tokenizer.yaml` (then tokenizer=<its output folder>)")


def check_unknown_sample(cfg, schema, tokenizer, limit: float) -> None:
    """Tokenize the first lines of each chat source before Ray starts: text the tokenizer does
    not cover (chat with the skills word vocabulary) is refused in seconds, not after the run."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return  # byte-level BPE and the like cannot produce unknown tokens
    encode = encoder(tokenizer)
    for src in cfg.sources:
        if src.kind == "skills" or src.format == "table":
            continue  # skills: a closed vocabulary; tables: unknown cells are dropped lines, reported
        items = (read_chitchat(limit=UNKNOWN_SAMPLE) if src.kind == "chitchat" else
                 read_jsonl(src.path, schema, fmt=src.format, role_map=src.role_map, max_chars=src.max_chars))
        sample = [c for c in itertools.islice(items, UNKNOWN_SAMPLE) if isinstance(c, Conversation)]
        ids = [i for c in sample for turn in c.turns for i in encode(turn.text)]
        share = ids.count(unk) / max(len(ids), 1)
        if share > limit:
            seen = f" (first {len(sample)} conversations)"
            raise PrepareRefused(unknown_message(src, share, limit, cfg.tokenizer, seen))


def check_sources(cfg, reports: list[dict], limit: float) -> dict:
    """Per source: examples, dropped, tokens, unknown. A source that gave no examples, or whose
    tokens are more than `limit` unknown, fails the run before the swap (the old set stays)."""
    per = {src.label: Counter() for src in cfg.sources}
    reasons = {src.label: Counter() for src in cfg.sources}
    for r in reports:
        per[r["source"]].update(examples=len(r["index"]), dropped=len(r["dropped"]), tokens=r["tokens"],
                                unknown=r["unknown"])
        reasons[r["source"]].update(reason_kind(d["reason"]) for d in r["dropped"])
    kept = f"; nothing written, {cfg.output} left as it was"
    for src in cfg.sources:
        c = per[src.label]
        if not c["examples"]:
            why = f", most for: {reasons[src.label].most_common(1)[0][0]}" if c["dropped"] else ""
            raise PrepareError(f"{where(src)} gave 0 examples ({c['dropped']} inputs dropped{why}){kept}")
        share = c["unknown"] / max(c["tokens"], 1)
        if share > limit:
            raise PrepareError(unknown_message(src, share, limit, cfg.tokenizer, "") + kept)
    return {label: dict(c) for label, c in per.items()}


def build_manifest(cfg, schema, tokenizer, index, stats, dropped, per_source=None) -> dict:
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
        src = sources.setdefault(r["source"], {"examples": 0, "policies": Counter(), "truncated": 0,
                                               "groups": {s: set() for s in SPLITS}})
        src["examples"] += 1
        src["policies"][r["policy"]] += 1
        src["truncated"] += r["truncated"]
        src["groups"][r["split"]].add(r["group"])
    for name, src in sources.items():
        src["policies"] = dict(src["policies"])
        src["groups"] = {s: sorted(g) for s, g in src["groups"].items()}
        counts = (per_source or {}).get(name, {})
        src["tokens"], src["unknown_tokens"] = counts.get("tokens", 0), counts.get("unknown", 0)
        src["unknown_share"] = round(src["unknown_tokens"] / max(src["tokens"], 1), 4)
    return {
        "format_version": FORMAT_VERSION,
        "schema": schema.to_dict(),
        "tokenizer": {"spec": cfg.tokenizer, "hash": tokenizer_hash(tokenizer), "vocab_size": len(tokenizer),
                      "path": "tokenizer", "unk_token": tokenizer.unk_token},
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
        unk = f", unknown tokens {src.get('unknown_share', 0):.1%}" if manifest["tokenizer"].get("unk_token") else ""
        lines.append(f"source {name}: {src['examples']} examples {src['policies']}{trunc}{unk}")
    if dropped:
        lines.append("dropped:")
        lines += [f"  {kind}: {n}" for kind, n in manifest["dropped_reasons"].items()]
        lines += [f"  {d['file'] or d['source']}{'' if d['line'] < 0 else ':' + str(d['line'])}: {d['reason']}"
                  for d in dropped[:show]]
        if len(dropped) > show:
            lines.append(f"  ... {len(dropped) - show} more in dropped.jsonl")
    return "\n".join(lines)


def pack_dataset(folder: str | Path, split: str, manifest: dict):
    """A Ray Dataset of the packs of one split: one read task per shard file."""
    files = [str(Path(folder).resolve() / f) for f in manifest["splits"][split]["files"]]
    if not files:
        return None
    return ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files)).flat_map(read_pack_file)
