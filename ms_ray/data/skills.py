"""Built-in skill tasks: small, exact, seeded tables that exercise what one stream cannot do.

Five streams (SKILL_STREAMS): user (input), think (output), output (output, ends with <|end|>),
tool (input), tool_call (output). The 2-row rule: cells of one row never see each other and
row r predicts row r+1, so an input token at row t can first influence an output token at row
t+2. Every timing below is "last token of the word it depends on + 2" (REACTION); with a
one-token-per-word tokenizer (tokenizer.skill_tokenizer) the rows are:

  wait_k       answer while reading. The user streams 4-10 dictionary words at rows 0..n-1;
               output writes the translation of word i at row i+2, then <|end|> at row n+2
               (two rows after the first silent user row: that silence says "done").
  running_sum  think while reading. The user streams `d + d + ... =` (3-8 digits; digit i at
               row 2i, `=` at 2n-1); think writes the running total after digit i at row 2i+2;
               output writes the final total at row 2n+1 (`=` + 2), then <|end|>.
  count_stop   react while writing. The user says `count A to B` (rows 0-3); output counts
               A..B one number per row from row 5. In about half the examples the user says
               `stop` at a row t once the count has begun; output then writes <|end|> at
               exactly t+2 (numbers up to row t+1: they could not know), instead of finishing.
  tool_call    act while talking. The user says `what is A times B` (rows 0-4, factors 2-12);
               from row 6 tool_call writes `mul A B` while output says `let me check`; the
               product arrives on the tool stream 3 rows after the last call token (row 11);
               output repeats it two rows later (row 13), then <|end|>.

Layout happens in token space through Timeline, so a tokenizer that splits a word (numbers
into digits, say) still gets correct timings: each dependent word starts at the dependency's
LAST token + 2, and never overlaps what its stream already holds. Every number any task can
emit (0-144: sums <= 72, counts <= 99, products <= 144) is one word of `vocabulary()`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import numpy as np

from ..core.streams import StreamSchema, StreamSpec
from .tables import Example, Timeline, stream_tokens

SKILL_STREAMS = StreamSchema((
    StreamSpec("user", "input"),
    StreamSpec("think", "output"),
    StreamSpec("output", "output", end_token="<|end|>"),
    StreamSpec("tool", "input"),
    StreamSpec("tool_call", "output"),
))
TASKS = ("wait_k", "running_sum", "count_stop", "tool_call")
# The single-stream baseline's schema: one trained stream holding `sequential_text`. With one
# stream the multi-stream rule is plain causal attention with positions 0, 1, 2, ...
SEQUENTIAL_STREAMS = StreamSchema((StreamSpec("text", "output", end_token="<|end|>"),))

REACTION = 2  # an input at row t can first change an output at row t + 2
TOOL_DELAY = 3  # the tool answers 3 rows after the last token of the call
MAX_NUMBER = 144  # 12 x 12, the largest product; sums and counts stay below 100
FACTORS = (2, 12)
DICTIONARY = {  # the fixed "translation" wait_k applies word by word
    "cat": "chat", "dog": "chien", "bird": "oiseau", "fish": "poisson", "red": "rouge", "blue": "bleu",
    "green": "vert", "sun": "soleil", "moon": "lune", "tree": "arbre", "house": "maison", "water": "eau",
}
KEYWORDS = ("+", "=", "count", "to", "stop", "what", "is", "times", "mul", "let", "me", "check")
# Order of the parts in the single-stream rendering: a sequential chat has the whole user
# message first, then reasoning, the tool call, its result and finally the answer.
SEQUENTIAL_ORDER = ("user", "think", "tool_call", "tool", "output")


def vocabulary() -> list[str]:
    """Every word any task (or its sequential rendering) can emit, in a fixed order:
    the numbers 0..144, keywords, dictionary source words, their translations, part labels."""
    return ([str(n) for n in range(MAX_NUMBER + 1)] + list(KEYWORDS) + list(DICTIONARY)
            + list(DICTIONARY.values()) + [f"{s}:" for s in SEQUENTIAL_ORDER])


def _put_words(tl: Timeline, stream: str, row: int, words, enc) -> list[int]:
    """Write `words` on `stream` one token per row from `row`; returns each word's last row
    (what anything depending on that word is timed from)."""
    lasts = []
    for i, w in enumerate(words):
        row = tl.put(stream, row, enc(w, first=(i == 0)))
        lasts.append(row - 1)
    return lasts


def _put_after(tl: Timeline, stream: str, after: int, word: str, enc) -> int:
    """Write one word that depends on an input whose last token is at row `after`: at
    after + REACTION, or later if the stream is still busy; returns the word's last row."""
    first = tl.end[stream] == 0
    return tl.put(stream, max(after + REACTION, tl.end[stream]), enc(word, first=first)) - 1


# ---- the four tasks: each fills the timeline and returns the text parts --------------------
def _wait_k(rng: random.Random, tl: Timeline, enc, end: int, at: int = 0) -> dict:
    src = [rng.choice(list(DICTIONARY)) for _ in range(rng.randint(4, 10))]
    lasts = _put_words(tl, "user", at, src, enc)
    for w, last in zip(src, lasts):
        _put_after(tl, "output", last, DICTIONARY[w], enc)
    # The user is known to be done only at the first silent row after the last word.
    tl.put("output", max(lasts[-1] + 1 + REACTION, tl.end["output"]), [end])
    return {"user": " ".join(src), "output": " ".join(DICTIONARY[w] for w in src)}


def _running_sum(rng: random.Random, tl: Timeline, enc, end: int, at: int = 0, long: bool = False) -> dict:
    # long: 5-8 digits of 3-9, totals mostly 25-60, which the usual draw (3-8 digits of 0-9,
    # total ~25) rarely reaches: the trained model's errors were in exactly those totals.
    (n_lo, n_hi), (d_lo, d_hi) = ((5, 8), (3, 9)) if long else ((3, 8), (0, 9))
    digits = [rng.randint(d_lo, d_hi) for _ in range(rng.randint(n_lo, n_hi))]
    words = " + ".join(map(str, digits)).split() + ["="]
    lasts = _put_words(tl, "user", at, words, enc)
    totals = [sum(digits[: i + 1]) for i in range(len(digits))]
    for total, last in zip(totals, lasts[0::2]):  # digits sit at even word positions
        _put_after(tl, "think", last, str(total), enc)
    last = _put_after(tl, "output", lasts[-1], str(totals[-1]), enc)  # `=` is the last word
    tl.put("output", last + 1, [end])
    return {"user": " ".join(words), "think": " ".join(map(str, totals)), "output": str(totals[-1])}


def _count_stop(rng: random.Random, tl: Timeline, enc, end: int, at: int = 0, stop: bool | None = None) -> dict:
    """stop: whether the user says `stop` mid-count (None: half the time, where the count is long enough)."""
    length = rng.randint(3, 10)
    a = rng.randint(0, 99 - length + 1)
    numbers = [str(k) for k in range(a, a + length)]
    user = ["count", numbers[0], "to", numbers[-1]]
    start = _put_words(tl, "user", at, user, enc)[-1] + REACTION
    pieces = [enc(w, first=(i == 0)) for i, w in enumerate(numbers)]
    stop_ids = enc("stop", first=False)
    # Cut after word j (p tokens written): `stop` ends at start + p - 2 so that <|end|> lands
    # exactly two rows later, and must begin once the count has begun (row >= start).
    cuts, p = [], 0
    for j, piece in enumerate(pieces[:-1]):
        p += len(piece)
        if start + p - REACTION - (len(stop_ids) - 1) >= start:
            cuts.append((j + 1, p))
    stopped = (rng.random() < 0.5 if stop is None else stop) and bool(cuts)
    if stopped:
        kept, p = rng.choice(cuts)
        stop_row = start + p - REACTION
        tl.put("user", stop_row - len(stop_ids) + 1, stop_ids)
        user.append("stop")
        numbers = numbers[:kept]
    row = start
    for piece in pieces[: len(numbers)]:
        row = tl.put("output", row, piece)
    tl.put("output", row, [end])
    return {"user": " ".join(user), "output": " ".join(numbers)}


def _tool_call(rng: random.Random, tl: Timeline, enc, end: int, at: int = 0) -> dict:
    a, b = rng.randint(*FACTORS), rng.randint(*FACTORS)
    user = ["what", "is", str(a), "times", str(b)]
    start = _put_words(tl, "user", at, user, enc)[-1] + REACTION
    call_last = _put_words(tl, "tool_call", start, ["mul", str(a), str(b)], enc)[-1]
    _put_words(tl, "output", start, ["let", "me", "check"], enc)  # talk while the call goes out
    result_last = _put_words(tl, "tool", call_last + TOOL_DELAY, [str(a * b)], enc)[-1]
    last = _put_after(tl, "output", result_last, str(a * b), enc)
    tl.put("output", last + 1, [end])
    return {"user": " ".join(user), "tool_call": f"mul {a} {b}", "tool": str(a * b),
            "output": f"let me check {a * b}"}


_TASK_FNS = {"wait_k": _wait_k, "running_sum": _running_sum, "count_stop": _count_stop, "tool_call": _tool_call}


# ---- public API ------------------------------------------------------------------------------
def word_encoder(encode):
    """enc(word, first): a word's token ids, with a leading space unless it opens its turn (as it
    appears in running text); a word that encodes to nothing raises."""
    def enc(word: str, first: bool = True) -> list[int]:
        ids = list(encode(word if first else " " + word))
        if not ids:
            raise ValueError(f"encode({word!r}) gave no tokens")
        return ids
    return enc


def generate(task: str, rng: random.Random, schema: StreamSchema, encode, *, uid: str | None = None) -> Example:
    """One example of `task` drawn from `rng`.

    `schema` must be bound (schema.bind(tokenizer)) and hold the task's streams; `encode(text)`
    returns token ids (words after the first of a turn are encoded with a leading space, as
    they appear in running text). `uid` names the example (id f"skills/{task}/{uid}", group
    f"{task}-{uid}" with '/' -> '-'); by default it is drawn from `rng`.
    meta: kind "task", tasks (one entry, described as a session's: data/skill_sessions.py), task,
    input_end_row, answer (output-stream tokens incl. end), answer_stream,
    first_output_row, inputs {input stream: [[row, id], ...]}, sequential (token ids of
    `sequential_text`), parts {stream: text}.
    """
    if task not in _TASK_FNS:
        raise ValueError(f"unknown skill task {task!r}; choose from {TASKS}")
    end = schema.end_ids()["output"]  # raises if the schema is not bound
    end_token = schema.streams[schema.index("output")].end_token
    enc = word_encoder(encode)
    tl = Timeline(schema)
    parts = _TASK_FNS[task](rng, tl, enc, end)
    parts["output"] = f"{parts['output']} {end_token}"
    rows = tl.to_rows()
    uid = f"{rng.getrandbits(32):08x}" if uid is None else uid
    silence = schema.silence_id
    inputs = {s.name: [[r, int(t)] for r, t in enumerate(rows[:, i]) if t != silence]
              for i, s in enumerate(schema.streams) if s.role == "input"}
    out_col = rows[:, schema.index("output")]
    answer = stream_tokens(rows, schema, "output")
    user_end = max(r for r, _ in inputs["user"])
    task_meta = {"task": task, "condition": "row0", "start": 0, "user_end": user_end, "window": [0, len(rows)],
                 "answer": answer, "end_row": int(np.flatnonzero(out_col == end)[-1]),
                 "stopped": "stop" in parts["user"].split(), "interrupted": False, "parts": parts}
    meta = {
        "kind": "task",
        "tasks": [task_meta],
        "task": task,
        "input_end_row": max(r for cells in inputs.values() for r, _ in cells),
        "answer": answer,
        "answer_stream": "output",
        "first_output_row": int(next(r for r, t in enumerate(out_col) if t != silence)),
        "inputs": inputs,
        "sequential": [int(t) for t in encode(sequential_text(parts))],
        "parts": parts,
    }
    return Example(f"skills/{task}/{uid}", f"skills/{task}", f"{task}-{uid.replace('/', '-')}", "task", rows, meta)


def generate_examples(n: int, seed: int, schema: StreamSchema, encode, tasks=TASKS) -> list[Example]:
    """`n` examples, tasks in round robin (equal mix), ids f"skills/{task}/{seed}/{i}".

    Example i draws from its own generator seeded by (seed, i), so it does not depend on `n`
    and the same seed always gives the same tables."""
    tasks = tuple(tasks)
    if not tasks:
        raise ValueError("generate_examples needs at least one task")
    for t in tasks:
        if t not in _TASK_FNS:
            raise ValueError(f"unknown skill task {t!r}; choose from {TASKS}")
    # A string seed is hashed with sha512 by `random`: stable across runs and PYTHONHASHSEED.
    return [generate(tasks[i % len(tasks)], random.Random(f"skills/{seed}/{i}"), schema, encode, uid=f"{seed}/{i}")
            for i in range(n)]


def sequential_text(example_or_parts) -> str:
    """The same content for a single-stream model: labelled parts in chat order, joined by
    spaces, empty parts left out:

        "user: <user words> think: <totals> tool_call: mul A B tool: <product> output: <answer> <|end|>"

    e.g. running_sum -> "user: 3 + 4 = think: 3 7 output: 7 <|end|>". The user message is
    complete before anything else (a sequential chat cannot interleave), so count_stop's `stop`
    comes before the count it interrupts. Accepts an Example (uses meta["parts"]) or a mapping
    stream -> text; streams outside SEQUENTIAL_ORDER follow in the mapping's order."""
    parts = example_or_parts.meta["parts"] if isinstance(example_or_parts, Example) else example_or_parts
    if not isinstance(parts, Mapping):
        raise TypeError(f"sequential_text needs an Example or a mapping stream -> text, got {type(parts).__name__}")
    order = [s for s in SEQUENTIAL_ORDER if s in parts] + [s for s in parts if s not in SEQUENTIAL_ORDER]
    return " ".join(f"{s}: {parts[s]}" for s in order if parts[s])


def sequential_turn(task: dict) -> str:
    """One task of an example or session (meta["tasks"][k]) as a chat turn for the single-stream
    baseline. A sequential chat cannot hear a question while it writes, so a count that a later
    question interrupted is written as a count the user stopped (`count 3 to 9 stop`), as
    count_stop's own `stop` is (sequential_text)."""
    parts = dict(task["parts"])
    if task["interrupted"]:
        parts["user"] = f"{parts['user']} stop"
    return sequential_text(parts)


def to_sequential(example: Example, schema: StreamSchema, encode) -> Example:
    """The same example or session for a single-stream model: one column holding its turns'
    `sequential_turn` texts (one token per row; a transcript that grows turn by turn), same id,
    source and group, so it lands in the same split."""
    if schema.num_streams != 1:
        raise ValueError(f"the sequential rendering needs a one-stream schema, got streams {schema.names}")
    ids = list(encode(" ".join(sequential_turn(t) for t in example.meta["tasks"])))
    rows = np.asarray(ids, dtype=np.int32)[:, None]
    meta = {k: example.meta[k] for k in ("task", "parts", "tasks") if k in example.meta}
    return Example(example.id, example.source, example.group, "sequential", rows, meta)
