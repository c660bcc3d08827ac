"""Stream schema and the table format shared by data, training, decoding and serving.

A sample is a table of R rows (time steps) x C streams, one token per cell; an empty cell
holds the silence token. The schema names the streams in order, gives each a role and a loss
weight, and records the silence token. It is saved with every model and every data set and
checked whenever the two meet.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch


SCHEMA_FILE = "ms_schema.json"
DEFAULT_SILENCE = "<|silence|>"
DEFAULT_PAD = "<|pad|>"

Role = Literal["input", "output"]


class SchemaError(ValueError):
    """A schema is malformed, or two schemas that must agree do not."""


class TableError(ValueError):
    """A stream table has the wrong shape, dtype or contents."""


@dataclass(frozen=True)
class StreamSpec:
    """One stream. `input` streams are written from outside (system, user, tool results) and
    never sampled; `output` streams are sampled (output, think, tool calls)."""

    name: str
    role: Role
    loss_weight: float | None = None  # None: 1.0 for output streams, 0.0 for input streams
    end_token: str | None = None  # special token that ends a turn on this stream, if any

    @property
    def weight(self) -> float:
        if self.loss_weight is not None:
            return float(self.loss_weight)
        return 1.0 if self.role == "output" else 0.0


@dataclass(frozen=True)
class StreamSchema:
    streams: tuple[StreamSpec, ...]
    silence_token: str = DEFAULT_SILENCE
    pad_token: str = DEFAULT_PAD
    # Token ids of the special tokens, filled in by `bind` once a tokenizer is known.
    token_ids: dict[str, int] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        streams = tuple(s if isinstance(s, StreamSpec) else StreamSpec(**s) for s in self.streams)
        object.__setattr__(self, "streams", streams)
        if not streams:
            raise SchemaError("a stream schema needs at least one stream")
        names = [s.name for s in streams]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SchemaError(f"stream names must be unique; repeated: {dupes}")
        for s in streams:
            if s.role not in ("input", "output"):
                raise SchemaError(f"stream {s.name!r}: role must be 'input' or 'output', got {s.role!r}")
            if s.weight < 0:
                raise SchemaError(f"stream {s.name!r}: loss_weight must be >= 0, got {s.weight}")
        if not any(s.role == "output" for s in streams):
            raise SchemaError(f"schema {names} has no output stream: nothing would be generated")

    # ---- lookups -------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [s.name for s in self.streams]

    @property
    def num_streams(self) -> int:
        return len(self.streams)

    def index(self, name: str) -> int:
        for i, s in enumerate(self.streams):
            if s.name == name:
                return i
        raise KeyError(f"unknown stream {name!r}; this schema has streams {self.names}")

    def role(self, name: str) -> Role:
        return self.streams[self.index(name)].role

    @property
    def output_mask(self) -> list[bool]:
        return [s.role == "output" for s in self.streams]

    @property
    def loss_weights(self) -> list[float]:
        return [s.weight for s in self.streams]

    @property
    def special_tokens(self) -> list[str]:
        """Every special token the tokenizer must hold for this schema, in a stable order."""
        tokens = [self.silence_token, self.pad_token]
        for s in self.streams:
            if s.end_token and s.end_token not in tokens:
                tokens.append(s.end_token)
        return tokens

    @property
    def silence_id(self) -> int:
        return self._id(self.silence_token)

    @property
    def pad_id(self) -> int:
        return self._id(self.pad_token)

    def end_ids(self) -> dict[str, int]:
        """Stream name -> id of its end token, for the streams that have one."""
        return {s.name: self._id(s.end_token) for s in self.streams if s.end_token}

    def _id(self, token: str) -> int:
        if token not in self.token_ids:
            raise SchemaError(
                f"schema is not bound to a tokenizer: no id for {token!r} "
                "(call schema.bind(tokenizer) or load the schema saved with the model)"
            )
        return self.token_ids[token]

    # ---- tokenizer binding ---------------------------------------------------------------
    def bind(self, tokenizer) -> "StreamSchema":
        """Return a copy whose special-token ids come from `tokenizer` (a HF tokenizer).
        The tokens must already be in the vocabulary (see `add_special_tokens`)."""
        ids = {}
        for tok in self.special_tokens:
            tid = tokenizer.convert_tokens_to_ids(tok)
            if tid is None or tid == tokenizer.unk_token_id and tok != tokenizer.unk_token:
                raise SchemaError(f"tokenizer has no token {tok!r}; add the schema's special tokens first")
            ids[tok] = int(tid)
        return StreamSchema(self.streams, self.silence_token, self.pad_token, ids)

    def add_special_tokens(self, tokenizer) -> int:
        """Add the schema's special tokens to a HF tokenizer where missing; returns how many."""
        vocab = tokenizer.get_vocab()
        missing = [t for t in self.special_tokens if t not in vocab]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing})
        return len(missing)

    # ---- comparison ----------------------------------------------------------------------
    def check_same(self, other: "StreamSchema", mine: str = "model", theirs: str = "data") -> None:
        """Raise a SchemaError naming both sides when `other` describes different streams."""
        diffs = []
        if self.names != other.names:
            diffs.append(f"streams {self.names} vs {other.names}")
        else:
            for a, b in zip(self.streams, other.streams):
                if a.role != b.role:
                    diffs.append(f"stream {a.name!r} role {a.role} vs {b.role}")
                if a.end_token != b.end_token:
                    diffs.append(f"stream {a.name!r} end_token {a.end_token!r} vs {b.end_token!r}")
        if self.silence_token != other.silence_token:
            diffs.append(f"silence token {self.silence_token!r} vs {other.silence_token!r}")
        if self.token_ids and other.token_ids:
            for tok in set(self.token_ids) & set(other.token_ids):
                if self.token_ids[tok] != other.token_ids[tok]:
                    diffs.append(f"id of {tok!r} {self.token_ids[tok]} vs {other.token_ids[tok]}")
        if diffs:
            raise SchemaError(
                f"stream schemas differ between {mine} and {theirs}: " + "; ".join(diffs)
                + f"\n  {mine}: {self.describe()}\n  {theirs}: {other.describe()}"
            )

    def describe(self) -> str:
        return ", ".join(f"{s.name}({s.role}, w={s.weight:g})" for s in self.streams)

    # ---- persistence ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "streams": [asdict(s) for s in self.streams],
            "silence_token": self.silence_token,
            "pad_token": self.pad_token,
            "token_ids": dict(self.token_ids),
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "schema") -> "StreamSchema":
        try:
            return cls(
                tuple(StreamSpec(**s) for s in d["streams"]),
                d.get("silence_token", DEFAULT_SILENCE),
                d.get("pad_token", DEFAULT_PAD),
                {k: int(v) for k, v in d.get("token_ids", {}).items()},
            )
        except (KeyError, TypeError) as e:
            raise SchemaError(f"{source}: malformed stream schema ({e})") from e

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / SCHEMA_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "StreamSchema":
        path = Path(folder)
        path = path / SCHEMA_FILE if path.is_dir() else path
        if not path.exists():
            raise SchemaError(f"no stream schema at {path}")
        return cls.from_dict(json.loads(path.read_text()), source=str(path))


# ---- tables ------------------------------------------------------------------------------
def check_table(tokens: torch.Tensor, schema: StreamSchema, vocab_size: int, what: str = "tokens") -> None:
    """Validate a batch of tables [B, R, C]: integer dtype, C == len(schema), ids in range."""
    import torch  # here, not at the top: configs and the ingress read schemas without torch

    if tokens.dim() != 3:
        raise TableError(f"{what}: expected a table batch [B, R, C], got shape {tuple(tokens.shape)}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise TableError(f"{what}: expected integer token ids, got {tokens.dtype}")
    if tokens.shape[2] != schema.num_streams:
        raise TableError(
            f"{what}: table has {tokens.shape[2]} streams but the schema has "
            f"{schema.num_streams} ({schema.names})"
        )
    if tokens.numel():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            b, r, c = (tokens == bad).nonzero()[0].tolist()
            raise TableError(
                f"{what}: token id {bad} out of range [0, {vocab_size}) at batch {b}, row {r}, "
                f"stream {schema.names[c]!r}"
            )


def next_row_labels(tokens: torch.Tensor, doc_ids: torch.Tensor | None = None, ignore: int = -100) -> torch.Tensor:
    """Label of cell (r, s) = token of cell (r+1, s): next row, same stream.

    tokens [B, R, C], doc_ids [B, R] (-1 = padding). The last row of every document, and
    padding rows, get `ignore`.
    """
    import torch

    labels = torch.full_like(tokens, ignore)
    labels[:, :-1] = tokens[:, 1:]
    if doc_ids is not None:
        same_doc = doc_ids[:, :-1] == doc_ids[:, 1:]  # [B, R-1]
        valid = torch.zeros_like(doc_ids, dtype=torch.bool)
        valid[:, :-1] = same_doc & (doc_ids[:, :-1] >= 0)
        labels[~valid] = ignore
    else:
        labels[:, -1] = ignore
    return labels


def format_table(rows: list[list[int]], schema: StreamSchema, id_to_token, first_row: int = 0, width: int = 14) -> str:
    """Render rows side by side, one column per stream; silent cells shown as '·'."""
    silence = schema.token_ids.get(schema.silence_token)
    head = f"{'row':>4} | " + " | ".join(f"{n:<{width}}" for n in schema.names)
    lines = [head, "-" * len(head)]
    for r, row in enumerate(rows, start=first_row):
        cells = ["·" if t == silence else id_to_token(t) for t in row]
        lines.append(f"{r:>4} | " + " | ".join(f"{c[:width]:<{width}}" for c in cells))
    return "\n".join(lines)


def unicode_problem(value, where: str) -> str | None:
    """Where a parsed JSON value holds a string that is not Unicode text, or None. JSON may say
    "\\ud800" (half of a surrogate pair) alone: Python reads it into a str that no UTF-8 encoder,
    tokenizer or hash takes, so such a value must not become cells. Walks without recursion."""
    stack = [(where, value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                return f"{path} holds an unpaired surrogate {v[e.start]!r} at character {e.start} (not valid Unicode)"
        elif isinstance(v, dict):
            for k, x in v.items():
                bad = unicode_problem(k, f"a key of {path}")
                if bad:
                    return bad
                stack.append((f"{path}.{k}", x))
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", x) for i, x in enumerate(v))
    return None
