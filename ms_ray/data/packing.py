"""Packing: whole examples into fixed-length sequences of rows, with document ids.

An example is never split: it goes whole into one sequence or, when longer than the sequence,
is dropped or truncated as configured (a counted, reported decision either way). Sequences
are filled first-fit decreasing, deterministically (ties broken by example id). Padding rows
hold the pad token and document id -1; the model's document mask keeps documents apart and
the loss ignores padding and the last row of every document.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .tables import Dropped, Example


@dataclass
class Pack:
    tokens: np.ndarray  # [max_rows, C] int32
    doc_ids: np.ndarray  # [max_rows] int32, -1 = padding
    example_ids: list[str] = field(default_factory=list)

    @property
    def used_rows(self) -> int:
        return int((self.doc_ids >= 0).sum())


def fit_length(example: Example, max_rows: int, overflow: str) -> Example | Dropped:
    """Examples longer than a sequence: dropped, or truncated to its first max_rows rows."""
    if example.num_rows <= max_rows:
        return example
    if overflow == "truncate":
        meta = {**example.meta, "truncated_from_rows": example.num_rows}
        return Example(example.id, example.source, example.group, example.policy, example.rows[:max_rows], meta)
    return Dropped(example.meta.get("origin", example.source), None,
                   f"example {example.id} has {example.num_rows} rows, over packing.max_rows={max_rows}")


def pack_examples(examples: list[Example], max_rows: int, pad_id: int) -> list[Pack]:
    """First-fit decreasing over whole examples; every example must fit (see fit_length)."""
    order = sorted(examples, key=lambda e: (-e.num_rows, e.id))
    free: list[int] = []  # rows left in each pack
    members: list[list[Example]] = []
    for ex in order:
        if ex.num_rows > max_rows:
            raise ValueError(f"example {ex.id} ({ex.num_rows} rows) does not fit max_rows={max_rows}")
        slot = next((i for i, f in enumerate(free) if f >= ex.num_rows), None)
        if slot is None:
            free.append(max_rows)
            members.append([])
            slot = len(free) - 1
        free[slot] -= ex.num_rows
        members[slot].append(ex)
    packs = []
    for group in members:
        C = group[0].rows.shape[1]
        tokens = np.full((max_rows, C), pad_id, dtype=np.int32)
        doc_ids = np.full(max_rows, -1, dtype=np.int32)
        row = 0
        for doc, ex in enumerate(group):
            tokens[row : row + ex.num_rows] = ex.rows
            doc_ids[row : row + ex.num_rows] = doc
            row += ex.num_rows
        packs.append(Pack(tokens, doc_ids, [ex.id for ex in group]))
    return packs
