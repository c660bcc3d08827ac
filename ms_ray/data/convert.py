"""Conversion policies: a Conversation (turns in order) becomes a timed stream table.

  after_input   a classic turn written in streams: a reply starts when its input has ended
                (two rows after the last input token: the earliest it can react, see below);
  wait_k(k)     a reply starts k tokens after its input turn starts and runs on one token per
                row: truthful only where the reply depends on a prefix of the input (word-by-word
                transformations), so use it for such data only;
  teacher       a teacher model rewrites the reply chunk by chunk while the input arrives
                (teacher.py; it needs an endpoint, so it is not in this module).

The 2-row rule: cells of one row never see each other and row r predicts row r+1, so an input
token at row t can first influence an output token at row t+2. Both policies respect it:
after_input leaves one silent row, and wait_k requires k >= 2.
Every turn ends with its stream's end token when the schema gives one.
"""

from __future__ import annotations

import random

from ..config import parse_policy
from ..core.streams import StreamSchema
from .tables import Conversation, Dropped, Example, Timeline


def convert(conv: Conversation, schema: StreamSchema, encode, policy: str, example_id: str,
            session=None) -> Example | Dropped:
    """Place the turns of `conv` in rows under `policy` (after_input or wait_k(k)). session (a
    SkillSessionConfig, its lead_zero / lead_silence / gap): time it as a live session, drawn from
    the example id: silent rows before the first turn and before every input turn that follows a
    reply, and after the last turn, so the model learns to wait and to fall silent."""
    name, k = parse_policy(policy)
    rng = random.Random(f"session/{example_id}") if session is not None else None
    if name == "teacher":
        raise ValueError("the teacher policy needs an endpoint: use ms_ray.data.teacher.teacher_convert")
    timeline = Timeline(schema)
    cursor = 0  # the row after everything placed so far: the next turn starts no earlier
    input_start = input_end = None  # rows of the latest input turn
    placed = []
    end_ids = schema.end_ids()
    for i, turn in enumerate(conv.turns):
        if turn.stream not in schema.names:
            return Dropped(conv.file, conv.line,
                           f"turns[{i}]: stream {turn.stream!r} is not in the schema {schema.names}")
        ids = list(encode(turn.text))
        if not ids:
            return Dropped(conv.file, conv.line, f"turns[{i}] ({turn.stream}): text encodes to no tokens")
        if turn.stream in end_ids:
            ids.append(end_ids[turn.stream])
        if schema.role(turn.stream) == "input":
            after_reply = placed and schema.role(placed[-1][0]) == "output"
            start = cursor + (_pause(rng, session, first=not placed) if not placed or after_reply else 0)
            input_start, input_end = start, start + len(ids)
        elif input_start is None:  # a reply with no input before it (e.g. a greeting)
            start = cursor
        elif name == "after_input":
            start = max(cursor, input_end + 1)  # last input row + 2
        else:  # wait_k: k tokens after the input turn starts, after any earlier reply
            start = max(timeline.end[turn.stream], input_start + k)
        cursor = max(cursor, timeline.put(turn.stream, start, ids))
        placed.append([turn.stream, start, start + len(ids)])
    if not placed:
        return Dropped(conv.file, conv.line, "conversation has no turns")
    rows = timeline.to_rows(cursor + _pause(rng, session, first=False))
    meta = {"turns": placed}
    if conv.file is not None:  # where a later stage's report points (packing overflow)
        meta["origin"] = conv.file if conv.line is None else f"{conv.file}:{conv.line}"
    return Example(example_id, conv.source, conv.group, policy, rows, meta)


def _pause(rng, session, first: bool) -> int:
    """Silent rows: before the first turn (none with probability lead_zero), else a gap; 0 without a session."""
    if session is None:
        return 0
    if first:
        return 0 if rng.random() < session.lead_zero else rng.randint(*session.lead_silence)
    return rng.randint(*session.gap)
