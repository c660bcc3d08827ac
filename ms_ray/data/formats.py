"""Readers that turn files into Conversations (and our stream tables into Examples), reporting
every line they leave out as a `Dropped` with file, 1-based line and a reason naming the field.

Chat JSONL, one conversation per line; `fmt="auto"` picks the format per line by its keys:

  openai    {"id": "c1", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
  alpaca    {"instruction": "Add the numbers.", "input": "2 3", "output": "5"}
  sharegpt  {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}

Roles go to schema streams through DEFAULT_ROLE_MAP (plus `role_map`, which adds to or overrides
it). Alpaca gives role "user" (instruction, then "\\n\\n" + input when input is not blank) and
role "assistant" (output). Texts are kept exactly as written. A line with any bad message is
dropped whole (never a conversation with a hole in it); blank lines are skipped; extra keys
(e.g. "name", "tool_calls") are ignored. `max_chars` applies to each turn's text. A string
that is not Unicode text (an unpaired surrogate escape such as "\\ud800": no tokenizer takes
it) drops its line; so do JSON nested too deeply and integers Python will not read.

Our own stream tables (exact round trip of `Example`), one table per line; a cell is the token
string (`tokenizer.convert_ids_to_tokens`) or null for silence, every stream has R cells:

  table     {"id": "e1", "source": "chat.jsonl", "group": "c1", "policy": "wait_k(3)", "meta": {},
             "streams": {"user": ["hello", null], "output": [null, "yes"]}}

Table rows in reasons are 0-based (as in `format_table`); lines are 1-based.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from ..core.streams import StreamSchema, TableError, unicode_problem
from .tables import Conversation, Dropped, Example, Turn

DEFAULT_ROLE_MAP = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user",
    "assistant": "output", "gpt": "output", "model": "output",
    "tool": "tool", "function": "tool", "observation": "tool",
    "function_call": "tool_call", "tool_call": "tool_call",
    "think": "think", "reasoning": "think",
}
FORMAT_KEYS = {"openai": "messages", "sharegpt": "conversations", "alpaca": "instruction"}  # auto: first match
TABLE_FIELDS = ("id", "source", "group", "policy")

# (role_field, role, text_field, text): one message, with the names reasons use for its fields
Message = tuple[str, Any, str, Any]


def _kind(value: Any) -> str:
    """The JSON name of a value's type, for reasons."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__)


def _json_lines(path: str | Path) -> Iterator[tuple[int, Any] | Dropped]:
    """(line number, parsed JSON object) per non-blank line, or a Dropped for a line that is not
    valid UTF-8, not valid JSON (nested too deeply, a number Python will not read) or not a JSON
    object."""
    file = str(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield Dropped(file, lineno, f"line is not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text.rstrip())
            except json.JSONDecodeError as e:
                yield Dropped(file, lineno, f"malformed JSON: {e.msg} at column {e.colno}")
                continue
            except RecursionError:
                yield Dropped(file, lineno, "malformed JSON: nested too deeply")
                continue
            except ValueError as e:  # valid JSON Python refuses, e.g. an integer of over 4300 digits
                yield Dropped(file, lineno, f"malformed JSON: {str(e).split(';')[0]}")
                continue
            if not isinstance(obj, dict):
                yield Dropped(file, lineno, f"line is {_kind(obj)}, not a JSON object")
                continue
            yield lineno, obj


def _require_file(path: str | Path, what: str) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")


# ---- chat formats -------------------------------------------------------------------------
def detect_format(obj: dict) -> str | None:
    """'openai', 'sharegpt' or 'alpaca' by the line's keys; None when no key matches."""
    return next((fmt for fmt, key in FORMAT_KEYS.items() if key in obj), None)


def _list_messages(obj: dict, list_key: str, role_key: str, text_key: str) -> list[Message] | str:
    """Messages of an openai/sharegpt line, or the reason the line is malformed."""
    if list_key not in obj:
        return f"no '{list_key}' field"
    items = obj[list_key]
    if not isinstance(items, list):
        return f"{list_key} is {_kind(items)}, not a list"
    if not items:
        return f"{list_key} is empty"
    messages = []
    for i, item in enumerate(items):
        where = f"{list_key}[{i}]"
        if not isinstance(item, dict):
            return f"{where} is {_kind(item)}, not an object"
        for key in (role_key, text_key):
            if key not in item:
                return f"{where} has no '{key}' field"
        messages.append((f"{where}.{role_key}", item[role_key], f"{where}.{text_key}", item[text_key]))
    return messages


def _alpaca_messages(obj: dict) -> list[Message] | str:
    """User (instruction [+ input]) and assistant (output) messages, or the reason."""
    for key in ("instruction", "output"):
        if key not in obj:
            return f"no '{key}' field"
    instruction, extra, output = obj["instruction"], obj.get("input"), obj["output"]
    if not isinstance(instruction, str):
        return f"instruction is {_kind(instruction)}, not a string"
    if extra is not None and not isinstance(extra, str):
        return f"input is {_kind(extra)}, not a string"
    if not instruction.strip():
        return "instruction is empty"
    if extra and extra.strip():
        prompt, prompt_field = instruction + "\n\n" + extra, "instruction + input"
    else:
        prompt, prompt_field = instruction, "instruction"
    return [("role of instruction", "user", prompt_field, prompt), ("role of output", "assistant", "output", output)]


def _line_messages(obj: dict, fmt: str) -> list[Message] | str:
    if fmt == "openai":
        return _list_messages(obj, "messages", "role", "content")
    if fmt == "sharegpt":
        return _list_messages(obj, "conversations", "from", "value")
    return _alpaca_messages(obj)


def _turns(messages: list[Message], role_map: dict, schema: StreamSchema, max_chars: int) -> list[Turn] | str:
    """One Turn per message, or the reason of the first bad message."""
    turns = []
    for role_field, role, text_field, text in messages:
        if not isinstance(role, str):
            return f"{role_field} is {_kind(role)}, not a string"
        stream = role_map.get(role)
        if stream not in schema.names:
            how = f"the role map sends it to {stream!r}" if stream else "it is not in the role map"
            return f"{role_field} {role!r} has no stream in the schema (streams: {schema.names}; {how})"
        if not isinstance(text, str):
            return f"{text_field} is {_kind(text)}, not a string"
        if not text.strip():
            return f"{text_field} is empty"
        bad = unicode_problem(text, text_field)
        if bad:
            return bad
        if len(text) > max_chars:
            return f"{text_field} has {len(text)} characters, over max_chars={max_chars} (dropped, not truncated)"
        turns.append(Turn(stream, text))
    return turns


def read_jsonl(path: str | Path, schema: StreamSchema, fmt: str = "auto", role_map: dict | None = None,
               max_chars: int = 20000) -> Iterator[Conversation | Dropped]:
    """One Conversation per good line of a chat JSONL file (openai, alpaca or sharegpt; "auto"
    detects per line), one Dropped per bad line. Raises FileNotFoundError for a missing file and
    ValueError for an unknown `fmt`; bad lines never raise."""
    if fmt != "auto" and fmt not in FORMAT_KEYS:
        raise ValueError(f"unknown format {fmt!r}; use 'auto' or one of {sorted(FORMAT_KEYS)}")
    _require_file(path, "chat JSONL file")
    roles = {**DEFAULT_ROLE_MAP, **(role_map or {})}
    return _read_chat_lines(path, schema, fmt, roles, max_chars)


def _each_line(path, parse) -> Iterator:
    """`parse(file, lineno, obj)` over the JSON objects of a file; lines that are not JSON
    objects come through as the Dropped records `_json_lines` made of them."""
    file = str(path)
    for item in _json_lines(path):
        yield item if isinstance(item, Dropped) else parse(file, *item)


def _read_chat_lines(path, schema, fmt, roles, max_chars) -> Iterator[Conversation | Dropped]:
    def parse(file, lineno, obj) -> Conversation | Dropped:
        line_fmt = detect_format(obj) if fmt == "auto" else fmt
        if line_fmt is None:
            keys = {f"'{key}' ({name})" for name, key in FORMAT_KEYS.items()}
            return Dropped(file, lineno, f"unknown format: none of the keys {sorted(keys)} is present "
                                         f"(keys: {sorted(obj)})")
        messages = _line_messages(obj, line_fmt)
        turns = messages if isinstance(messages, str) else _turns(messages, roles, schema, max_chars)
        if isinstance(turns, str):
            return Dropped(file, lineno, f"{line_fmt} line: {turns}")
        line_id = obj.get("id")
        if isinstance(line_id, float):
            return Dropped(file, lineno, f"id is {line_id!r}, not a string or a whole number")
        if line_id is not None and (isinstance(line_id, bool) or not isinstance(line_id, (str, int))):
            return Dropped(file, lineno, f"id is {_kind(line_id)}, not a string or number")
        bad = unicode_problem(line_id, "id")
        if bad:
            return Dropped(file, lineno, bad)
        group = str(line_id) if line_id is not None else f"{path}:{lineno}"
        return Conversation(source=file, group=group, turns=turns, file=file, line=lineno)

    return _each_line(path, parse)


# ---- chitchat -----------------------------------------------------------------------------
def read_chitchat(limit: int | None = None, user_stream: str = "user",
                  output_stream: str = "output") -> Iterator[Conversation]:
    """Adjacent turn pairs of the Chit Chat Challenge corpus (`pip install chitchat-dataset`,
    read from the installed package, never downloaded): turn i -> `user_stream`, turn i+1 ->
    `output_stream`, one two-turn Conversation per pair, at most `limit` of them. Conversations
    come in sorted id order, pairs in turn order; group = the conversation id.

    A turn is one speaker's consecutive messages, stripped and joined with " ". Empty texts are
    skipped: 33 blank messages, which leaves 12 turns empty; a pair with an empty turn is not
    yielded. The full corpus: 7168 conversations (3150 of them with a single turn), 131569
    adjacent pairs, of which 131548 are yielded, from 4017 conversations."""
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the chitchat corpus needs the chitchat-dataset package: pip install chitchat-dataset")
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset.json"
    _require_file(path, "chitchat corpus")
    return _chitchat_pairs(path, limit, user_stream, output_stream)


def _chitchat_pairs(path: Path, limit, user_stream, output_stream) -> Iterator[Conversation]:
    if limit is not None and limit <= 0:
        return
    with open(path, encoding="utf-8") as f:
        corpus = json.load(f)
    count = 0
    for conv_id in sorted(corpus):
        turn_texts = [" ".join(m["text"].strip() for m in turn if m.get("text", "").strip())
                      for turn in corpus[conv_id]["messages"]]
        for said, answer in zip(turn_texts, turn_texts[1:]):
            if not said or not answer:
                continue
            yield Conversation(source="chitchat", group=conv_id,
                               turns=[Turn(user_stream, said), Turn(output_stream, answer)], file=str(path))
            count += 1
            if limit is not None and count >= limit:
                return


# ---- our stream tables --------------------------------------------------------------------
def table_line(example: Example, schema: StreamSchema, tokenizer) -> dict:
    """The JSON object of one Example; raises TableError when a cell would not read back as is."""
    rows = np.asarray(example.rows)
    if rows.ndim != 2 or rows.shape[1] != schema.num_streams:
        raise TableError(f"example {example.id!r}: rows have shape {rows.shape}, expected [R, {schema.num_streams}] "
                         f"for streams {schema.names}")
    silence, vocab, vocab_size = schema.silence_id, tokenizer.get_vocab(), len(tokenizer)
    streams = {}
    for s, name in enumerate(schema.names):
        ids = [int(t) for t in rows[:, s]]
        for r, tid in enumerate(ids):
            if not 0 <= tid < vocab_size:
                raise TableError(f"example {example.id!r}: stream {name!r} row {r}: id {tid} is outside "
                                 f"the tokenizer's vocabulary [0, {vocab_size})")
        tokens = tokenizer.convert_ids_to_tokens(ids)
        for r, (tid, tok) in enumerate(zip(ids, tokens)):
            if tid != silence and vocab.get(tok) != tid:
                raise TableError(f"example {example.id!r}: stream {name!r} row {r}: id {tid} is written as "
                                 f"{tok!r}, which would read back as {vocab.get(tok)}")
        streams[name] = [None if tid == silence else tok for tid, tok in zip(ids, tokens)]
    try:
        meta = json.loads(json.dumps(example.meta))
    except (TypeError, ValueError) as e:
        raise TableError(f"example {example.id!r}: meta is not JSON-serialisable ({e})") from e
    return {"id": example.id, "source": example.source, "group": example.group, "policy": example.policy,
            "meta": meta, "streams": streams}


def write_table_jsonl(examples: Iterable[Example], path: str | Path, schema: StreamSchema, tokenizer) -> int:
    """Write one table line per Example (parent folders created); returns how many."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps(table_line(example, schema, tokenizer), ensure_ascii=False) + "\n")
            count += 1
    return count


def read_table_jsonl(path: str | Path, schema: StreamSchema, tokenizer) -> Iterator[Example | Dropped]:
    """One Example per good line of a table JSONL file, one Dropped per bad line. The schema must
    be bound (its silence id is checked now); a missing file raises FileNotFoundError."""
    silence = schema.silence_id
    _require_file(path, "table JSONL file")
    return _read_table_lines(path, schema, tokenizer.get_vocab(), silence)


def _table_rows(streams: Any, schema: StreamSchema, vocab: dict, silence: int) -> np.ndarray | str:
    """The [R, C] int32 table of a line's "streams", or the reason it is malformed."""
    if not isinstance(streams, dict):
        return f"streams is {_kind(streams)}, not an object"
    unknown = [name for name in streams if name not in schema.names]
    if unknown:
        return f"unknown stream {unknown[0]!r} (schema streams: {schema.names})"
    missing = [name for name in schema.names if name not in streams]
    if missing:
        return f"missing stream {missing[0]!r} (schema streams: {schema.names})"
    for name in schema.names:
        if not isinstance(streams[name], list):
            return f"stream {name!r} is {_kind(streams[name])}, not a list"
    lengths = {name: len(streams[name]) for name in schema.names}
    if len(set(lengths.values())) > 1:
        return f"ragged streams: lengths {lengths} differ (every stream needs the same number of rows)"
    rows = np.full((next(iter(lengths.values())), schema.num_streams), silence, dtype=np.int32)
    for s, name in enumerate(schema.names):
        for r, cell in enumerate(streams[name]):
            if cell is None:
                continue
            if not isinstance(cell, str):
                return f"stream {name!r} row {r}: cell {cell!r} is {_kind(cell)}, not a token string or null"
            if cell not in vocab:
                return f"stream {name!r} row {r}: cell {cell!r} is not a single token of the tokenizer"
            rows[r, s] = vocab[cell]
    return rows


def _read_table_lines(path, schema, vocab, silence) -> Iterator[Example | Dropped]:
    def parse(file, lineno, obj) -> Example | Dropped:
        reason = next((f"no '{key}' field" for key in (*TABLE_FIELDS, "streams") if key not in obj), None)
        reason = reason or next((f"{key} is {_kind(obj[key])}, not a string" for key in TABLE_FIELDS
                                 if not isinstance(obj[key], str)), None)
        meta = obj.get("meta", {})
        if reason is None and not isinstance(meta, dict):
            reason = f"meta is {_kind(meta)}, not an object"
        reason = reason or next(filter(None, (unicode_problem(obj[key], key) for key in TABLE_FIELDS)), None)
        reason = reason or unicode_problem(meta, "meta")
        rows = reason or _table_rows(obj["streams"], schema, vocab, silence)
        if isinstance(rows, str):
            return Dropped(file, lineno, f"table line: {rows}")
        return Example(id=obj["id"], source=obj["source"], group=obj["group"], policy=obj["policy"],
                       rows=rows, meta=meta)

    return _each_line(path, parse)
