"""`ms-ray prepare` on a real local Ray cluster (127.0.0.1)."""

import json

import pyarrow.parquet as pq
import pytest
from teacher_endpoint import serve_local_teacher

from ms_ray.config import PrepareConfig, load_config
from ms_ray.core.streams import SchemaError, StreamSchema, StreamSpec
from ms_ray.data.pipeline import PrepareError, prepare
from ms_ray.data.tokenizer import word_tokenizer
from ms_ray.manifest import load_manifest

SCHEMA = {"streams": [
    {"name": "user", "role": "input"}, {"name": "think", "role": "output"},
    {"name": "output", "role": "output", "end_token": "<|end|>"},
    {"name": "tool", "role": "input"}, {"name": "tool_call", "role": "output"},
]}
GOOD = [{"messages": [{"role": "user", "content": "what is 2"},
                      {"role": "assistant", "content": "2"}]}] * 30  # skills words


def write_jsonl(path, objects, raw_lines=()):
    with open(path, "w") as f:
        for obj in objects:
            f.write(json.dumps(obj) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return str(path)


def config(tmp_path, out, jsonl, **extra):
    data = {
        "schema": SCHEMA, "tokenizer": "skills", "output": str(tmp_path / out), "seed": 0,
        "sources": [
            {"kind": "skills", "examples": 60, "shards": 2},
            {"kind": "jsonl", "name": "chat", "path": jsonl, "policy": "wait_k(2)", "shards": 2},
        ],
        "split": {"validation_fraction": 0.2}, "packing": {"max_rows": 64},
        **extra,
    }
    return load_config(PrepareConfig, data=data)


def shards(folder):
    manifest = load_manifest(folder)
    return {f: pq.read_table(folder / f).to_pylist() for s in manifest["splits"].values() for f in s["files"]}


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    bad = ['{"messages": [', '[1, 2]', '{"messages": [{"role": "user", "content": ""}]}',
           '{"messages": [{"role": "wizard", "content": "hi"}]}']
    return write_jsonl(tmp_path_factory.mktemp("in") / "chat.jsonl", GOOD, bad)


def test_prepare_is_deterministic_and_keeps_splits_apart(ray_local, tmp_path, chat_file, capsys):
    first = prepare(config(tmp_path, "a", chat_file, max_drop_share=0.5))
    second = prepare(config(tmp_path, "b", chat_file, max_drop_share=0.5))
    a, b = shards(tmp_path / "a"), shards(tmp_path / "b")
    assert a and a == b  # the same shards, pack for pack
    assert first["splits"] == second["splits"]
    for name, src in first["sources"].items():
        assert not set(src["groups"]["train"]) & set(src["groups"]["validation"]), name
    assert first["counts"]["examples"] == 60 + 30 and first["counts"]["dropped"] == 4
    ids = {split: {e for f in s["files"] for row in a[f] for e in row["example_ids"]}
           for split, s in first["splits"].items()}
    assert not ids["train"] & ids["validation"] and len(ids["train"] | ids["validation"]) == 90
    for rows in a.values():
        for pack in rows:
            docs = [d for d in pack["doc_ids"] if d >= 0]
            assert docs == sorted(docs) and len(set(docs)) == len(pack["example_ids"])  # whole, in order
            assert len(pack["tokens"]) == 64 * 5
    assert first["tokenizer"]["hash"] and (tmp_path / "a" / "tokenizer" / "tokenizer.json").exists()
    out = capsys.readouterr().out
    assert "prepared 90 examples, dropped 4" in out and "silence share per stream" in out
    assert f"{chat_file}:31: " in out and f"{chat_file}:34: " in out  # file:line: reason
    prepare(config(tmp_path, "c", chat_file, max_drop_share=0.5, seed=1))
    assert shards(tmp_path / "c") != a


def test_too_many_drops_fail_after_writing(ray_local, tmp_path, chat_file):
    with pytest.raises(PrepareError, match=r"4 of 94 inputs dropped \(4.3%\), over max_drop_share=1.0%"):
        prepare(config(tmp_path, "d", chat_file, max_drop_share=0.01))
    lines = (tmp_path / "d" / "dropped.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["reason"] for line in lines)


def test_manifest_schema_is_checked_against_a_model(ray_local, tmp_path, chat_file):
    prepare(config(tmp_path, "e", chat_file, max_drop_share=0.5, sources=[{"kind": "skills", "examples": 8}]))
    other = StreamSchema((StreamSpec("user", "input"), StreamSpec("output", "output")))
    with pytest.raises(SchemaError, match="between model ckpt and data set"):
        load_manifest(tmp_path / "e", other, "model ckpt")
    with pytest.raises(FileNotFoundError, match="not a prepared data set"):
        load_manifest(tmp_path / "nothing")


def test_teacher_policy_through_the_pipeline(ray_local, tmp_path):
    """A jsonl source converted by the teacher policy against our own loopback endpoint, from
    inside the Ray Data tasks."""
    chat = [{"messages": [{"role": "user", "content": "count one two three. then four five."},
                          {"role": "assistant", "content": "one two three four five"}]}] * 4
    path = write_jsonl(tmp_path / "teach.jsonl", chat)
    server, base_url = serve_local_teacher()
    try:
        schema = {"streams": [{"name": "user", "role": "input"},
                              {"name": "output", "role": "output", "end_token": "<|end|>"}]}
        words = "count one two three four five then".split()
        tok_dir = tmp_path / "tok"
        word_tokenizer(words + ["three.", "five."], StreamSchema.from_dict(schema)).save_pretrained(tok_dir)
        cfg = load_config(PrepareConfig, data={
            "schema": schema, "tokenizer": str(tok_dir), "output": str(tmp_path / "out"),
            "sources": [{"kind": "jsonl", "name": "teach", "path": path, "policy": "teacher",
                         "teacher": {"base_url": base_url, "timeout_s": 10}}],
            "split": {"validation_fraction": 0.0},
        })
        manifest = prepare(cfg)
    finally:
        server.shutdown()
        server.server_close()
    assert manifest["counts"] == {"examples": 4, "dropped": 0}
    assert manifest["sources"]["teach"]["policies"] == {"teacher": 4}
    assert len(server.requests) >= 4 * 3  # chunks per example, every one answered over loopback
