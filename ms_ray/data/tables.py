"""The records every data stage passes along.

  Conversation  what a reader found in a file: turns (stream, text) in order, before timing
  Timeline      places token ids into rows, one token per row per stream, never overwriting
  Example       one stream table [R, C] with where it came from and how it was made
  Dropped       a line or example that was left out, with file, line and reason
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..core.streams import StreamSchema


@dataclass
class Turn:
    stream: str  # a stream of the schema (readers map roles to streams)
    text: str


@dataclass
class Conversation:
    source: str  # e.g. "chitchat", "data/chat.jsonl"
    group: str  # the source conversation: train/validation split key, never split apart
    turns: list[Turn]
    file: str | None = None
    line: int | None = None  # 1-based line in `file`


@dataclass
class Dropped:
    file: str | None
    line: int | None
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else (self.file or "<generated>")
        return f"{where}: {self.reason}"


@dataclass
class Example:
    id: str  # unique and stable for a seed
    source: str
    group: str
    policy: str  # which conversion produced it: "wait_k(3)", "after_input", "teacher", "task"
    rows: np.ndarray  # [R, C] int32 token ids
    meta: dict = field(default_factory=dict)  # JSON-serialisable (task answers, timings, ...)

    @property
    def num_rows(self) -> int:
        return int(self.rows.shape[0])


class TimelineConflict(ValueError):
    """Two tokens were placed in the same cell."""


class Timeline:
    """Builds one table: `put` writes token ids into a stream one per row from a start row."""

    def __init__(self, schema: StreamSchema):
        self.schema = schema
        self.cells: dict[tuple[int, int], int] = {}
        self.end = {name: 0 for name in schema.names}  # first free row after the last put

    def put(self, stream: str, row: int, ids) -> int:
        """Place `ids` on `stream` at rows row, row+1, ...; returns the row after the last one."""
        s = self.schema.index(stream)
        if row < 0:
            raise TimelineConflict(f"stream {stream!r}: negative start row {row}")
        for i, tok in enumerate(ids):
            key = (row + i, s)
            if key in self.cells:
                raise TimelineConflict(f"stream {stream!r}: row {row + i} is already filled")
            self.cells[key] = int(tok)
        end = row + len(ids)
        self.end[stream] = max(self.end[stream], end)
        return end

    @property
    def num_rows(self) -> int:
        return max(self.end.values())

    def to_rows(self, min_rows: int = 0) -> np.ndarray:
        """The table [R, C] with silence in every empty cell."""
        R = max(self.num_rows, min_rows)
        rows = np.full((R, self.schema.num_streams), self.schema.silence_id, dtype=np.int32)
        for (r, s), tok in self.cells.items():
            rows[r, s] = tok
        return rows


def stream_tokens(rows: np.ndarray, schema: StreamSchema, stream: str) -> list[int]:
    """The non-silent tokens of one stream of a table, in order."""
    col = rows[:, schema.index(stream)]
    return [int(t) for t in col if t != schema.silence_id]
