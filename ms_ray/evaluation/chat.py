"""The chat evaluation: a chat model (one input stream, the user; one reply stream with an end token)
on the held-out conversations of the data it was trained on (`ms-ray eval` with a `chat:` section).

What is scored: the validation split of a prepared data set, in file order (files as the manifest
lists them, packs in file order, documents in pack order), its first `conversations` examples that
are one user turn then one reply (after_input turn pairs; any other example is skipped and counted).
Each number is defined once, in METRICS below; per conversation:
  loss          the checkpoint's mean cross-entropy over the reply stream's label cells that hold the
                reply (its text tokens and its end token; never silence), teacher-forced on the example's
                table alone (the rule of MultiStreamLM.forward: cell (r, s) predicts (r+1, s))
  loss_before   the same for MultiStreamLM.from_base(reference): the converted, untrained model
                (zero stream embedding, new special-token rows at the mean of the old ones)
  loss_sequential  the reference itself (a plain causal LM) on the same reply in its own chat format:
                apply_chat_template([user, assistant]) with the user's and the reply's text, the loss
                over the assistant reply's tokens and its end-of-turn token (<|im_end|> for SmolLM2),
                located by rendering the prompt alone with add_generation_prompt=True
  live decoding the checkpoint, greedy, with nothing but the user's tokens, each injected at its row
                (RowDecoder), for the conversation's rows plus slack_rows; then score_reply
Why the per-token losses compare: the multi-stream vocabulary is the reference's plus the schema's special
tokens, so a reply is the same token ids in both formats (both counts are reported: they differ only where
the BPE splits a text differently after "assistant\\n"), and each counts the reply's end once (<|end|> in
streams, the end-of-turn token in the chat format; the newline the template writes after it is not counted).
The contexts differ, and so the numbers need not agree even before training: the sequential model reads
its system prompt and the whole user message before the reply; the multi-stream model reads the user's
tokens interleaved with silent output cells and, for the first reply token, must also know that it is time
to speak (silence is the other candidate), with no role header to tell it.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..config import ConfigError
from ..core.loading import hf_bars_on_terminals_only, load_export
from ..core.model import IGNORE, MultiStreamLM
from ..core.streams import SchemaError, StreamSchema, next_row_labels
from ..manifest import load_manifest
from ..tracking import Progress
from .harness import Episode, run_episodes

# (key, format, scale, definition): the report's table, summary.json and W&B use these keys
METRICS = (
    ("conversations", ".0f", 1, "held-out conversations scored (one user turn, one reply)"),
    ("reply_tokens", ".0f", 1, "reply tokens scored by the multi-stream losses: text tokens + the end token"),
    ("loss", ".3f", 1, "reply loss per token of this checkpoint, teacher-forced on the stream table"),
    ("loss_before", ".3f", 1, "the same before training: MultiStreamLM.from_base(reference)"),
    ("loss_sequential", ".3f", 1, "the reference in its own chat format, over the reply and its end-of-turn "
                                  "token"),
    ("sequential_tokens", ".0f", 1, "reply tokens scored by the sequential reference"),
    ("start_rows", "+.2f", 1, "first reply token, rows after the user's last token (mean over replies)"),
    ("start_rows_data", "+.2f", 1, "the same in the held-out data (after_input: +2)"),
    ("started_within", ".1f", 100, "replies whose first token comes 1 to start_within rows after the user's last "
                                   "token, %"),
    ("early", ".1f", 100, "replies whose first token comes at or before the user's last token, %"),
    ("no_reply", ".1f", 100, "conversations with no reply token at all, %"),
    ("ends_cleanly", ".1f", 100, "replies that end with the end token, then silence on the reply stream until the "
                                 "session's end, %"),
    ("written_tokens", ".1f", 1, "tokens the model wrote on the reply stream (mean, end token included)"),
    ("data_tokens", ".1f", 1, "the same in the held-out data"),
    ("rows_per_s", ".2f", 1, "rows decoded per second (all conversations' rows / decoding wall time)"),
)


@dataclass
class HeldOut:
    id: str
    rows: np.ndarray  # [R, C] the example's table
    user_end: int  # row of the user's last token (its end token)
    reply_start: int  # row of the reply's first token in the data


def chat_streams(schema: StreamSchema) -> tuple[int, int]:
    """(user stream, reply stream): the one input stream and the one output stream with an end token."""
    inputs = [i for i, s in enumerate(schema.streams) if s.role == "input"]
    replies = [i for i, s in enumerate(schema.streams) if s.role == "output" and s.end_token]
    if len(inputs) != 1 or len(replies) != 1:
        raise SchemaError(f"the chat evaluation needs one input stream (the user) and one output stream with an "
                          f"end token (the reply); this model has {schema.describe()}")
    return inputs[0], replies[0]


def turn_pair(rows: np.ndarray, schema: StreamSchema) -> tuple[int, int] | None:
    """(user_end, reply_start) of a table holding one user turn then one reply, else None."""
    user, reply = chat_streams(schema)
    ends = schema.end_ids()
    said = [np.flatnonzero(rows[:, s] != schema.silence_id) for s in (user, reply)]
    if not len(said[0]) or not len(said[1]) or said[0][-1] >= said[1][0]:
        return None  # a stream says nothing, or the reply starts before the user has finished
    for s, at in zip((user, reply), said):
        ended = np.flatnonzero(rows[at, s] == ends.get(schema.names[s], -1))
        if len(ended) > 1 or (len(ended) == 1 and ended[0] != len(at) - 1):
            return None  # an end token before the turn's last token: more than one turn
    return int(said[0][-1]), int(said[1][0])


def held_out(folder, schema: StreamSchema, n: int) -> tuple[list[HeldOut], int]:
    """The first `n` turn pairs of the data's validation split, in file order, and how many other
    examples were skipped before they were found. The data's schema must be the model's."""
    manifest = load_manifest(folder, schema, "checkpoint")
    found, skipped, C = [], 0, schema.num_streams
    for name in manifest["splits"].get("validation", {}).get("files", []):
        table = pq.read_table(f"{folder}/{name}", columns=["tokens", "doc_ids", "example_ids"]).to_pylist()
        for pack in table:
            tokens = np.asarray(pack["tokens"], dtype=np.int64).reshape(-1, C)
            docs = np.asarray(pack["doc_ids"])
            for doc, example_id in enumerate(pack["example_ids"]):
                rows = tokens[docs == doc]
                pair = turn_pair(rows, schema)
                if pair is None:
                    skipped += 1
                    continue
                found.append(HeldOut(example_id, rows, *pair))
                if len(found) == n:
                    return found, skipped
    if not found:
        raise ConfigError(f"chat.data: {folder} holds no held-out turn pair (validation split: "
                          f"{manifest['splits'].get('validation', {}).get('examples', 0)} examples)")
    return found, skipped


@torch.no_grad()
def reply_losses(model: MultiStreamLM, conversations: list[HeldOut]) -> list[tuple[float, int]]:
    """(summed cross-entropy, cells) over each conversation's reply label cells (see the module)."""
    _, reply = chat_streams(model.schema)
    out = []
    for conv in conversations:
        tokens = torch.as_tensor(conv.rows, device=model.device)[None]  # [1, R, C]
        labels = next_row_labels(tokens)[0, :, reply]  # [R]
        labels[labels == model.schema.silence_id] = IGNORE
        logits = model(tokens).logits[0, :, reply]  # [R, V]
        ce = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")
        out.append((float(ce), int((labels != IGNORE).sum())))
    return out


def texts(conv: HeldOut, schema: StreamSchema, tokenizer) -> tuple[str, str]:
    """The user's and the reply's text, end tokens left out."""
    ends = set(schema.end_ids().values())
    return tuple(tokenizer.decode([int(t) for t in conv.rows[:, s] if t != schema.silence_id and t not in ends])
                 for s in chat_streams(schema))


def sequential_reply(tokenizer, user: str, reply: str) -> tuple[list[int], int, int]:
    """(ids of the chat, first reply position, position after its end-of-turn token) in the
    reference's chat format (the module says why this counts like the streams' reply)."""
    if not tokenizer.chat_template:
        raise ConfigError(f"chat.reference: the tokenizer of {tokenizer.name_or_path} has no chat template")
    chat = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    prompt = tokenizer.apply_chat_template(chat[:1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(chat, tokenize=False)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    start = next((i for i, (a, _) in enumerate(offsets) if a >= len(prompt)), len(ids))
    special = set(tokenizer.all_special_ids)
    end = next((i for i in range(start + 1, len(ids)) if ids[i] in special), None)  # the end-of-turn token
    if not full.startswith(prompt) or not full[len(prompt):].startswith(reply) or end is None:
        raise ConfigError(f"chat.reference: the chat template of {tokenizer.name_or_path} does not write the reply "
                          "right after the generation prompt, followed by a special end-of-turn token")
    return ids, start, end + 1


@torch.no_grad()
def sequential_losses(base, tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[float, int]]:
    """(summed cross-entropy, tokens) of a plain causal LM over each reply and its end-of-turn token."""
    out = []
    for user, reply in pairs:
        ids, start, end = sequential_reply(tokenizer, user, reply)
        x = torch.tensor([ids], device=base.device)
        logits = base(input_ids=x).logits[0, start - 1 : end - 1]  # position p predicts token p + 1
        out.append((float(F.cross_entropy(logits.float(), x[0, start:end], reduction="sum")), end - start))
    return out


def score_reply(written: list[int], user_end: int, silence: int, end_id: int, start_within: int) -> dict:
    """What one decoded reply stream shows (written: its token at every row of the session)."""
    said = [r for r, t in enumerate(written) if t != silence]
    start = said[0] - user_end if said else None
    first_end = next((r for r in said if written[r] == end_id), None)
    return {"start_rows": start, "started_within": start is not None and 0 < start <= start_within,
            "early": start is not None and start <= 0, "no_reply": not said,
            "ends_cleanly": first_end is not None and said[-1] == first_end,
            "written_tokens": len(said)}


def decode(model: MultiStreamLM, conversations: list[HeldOut], slack_rows: int, batch_sessions: int,
           progress=None, sampling=None) -> tuple[list[list[int]], float]:
    """Live sessions (greedy unless `sampling`, a Sampling of the reply stream), the user's tokens
    pushed at their rows, nothing else: the reply stream's token at every row of each, and the
    seconds it took."""
    user, reply = chat_streams(model.schema)
    name, silence = model.schema.names[user], model.schema.silence_id
    episodes = [Episode(str(i), len(c.rows) + slack_rows,
                        {r: [(name, [int(t)])] for r, t in enumerate(c.rows[:, user]) if t != silence}, [])
                for i, c in enumerate(conversations)]
    started = time.perf_counter()
    run_episodes(model, episodes, batch_sessions, progress,
                 None if sampling is None else {model.schema.names[reply]: sampling})
    return [[row[reply] for row in ep.rows] for ep in episodes], time.perf_counter() - started


def evaluate_chat(checkpoint, cfg) -> tuple[list[dict], dict]:
    """Records (one per conversation, held-out order) and the summary (METRICS' keys, plus what to
    say about the run) of one exported chat model; cfg: a ChatEvalConfig."""
    model, tokenizer = load_export(checkpoint, dtype="float32")  # scored in fp32 on any device
    schema, silence = model.schema, model.schema.silence_id
    _, reply = chat_streams(schema)
    end_id = schema.end_ids()[schema.names[reply]]
    conversations, skipped = held_out(cfg.data, schema, cfg.conversations)
    losses = reply_losses(model, conversations)
    bar = Progress(len(conversations), "chat eval", "conversations")
    written, seconds = decode(model, conversations, cfg.slack_rows, cfg.batch_sessions, bar.update,
                              cfg.sampling.build())
    bar.close()
    records = []
    for conv, (ce, n), out in zip(conversations, losses, written):
        user_text, reply_text = texts(conv, schema, tokenizer)
        records.append({"id": conv.id, "rows": len(conv.rows), "user_end": conv.user_end, "user": user_text,
                        "reply": reply_text, "loss_sum": ce, "reply_tokens": n,
                        "data_start_rows": conv.reply_start - conv.user_end,
                        "data_tokens": int((conv.rows[:, reply] != silence).sum()),
                        **score_reply(out, conv.user_end, silence, end_id, cfg.start_within),
                        "written": tokenizer.decode([t for t in out if t != silence]),
                        "data_written": tokenizer.decode([t for t in conv.rows[:, reply] if t != silence])})
    info = {"checkpoint": str(checkpoint), "streams": schema.names, "skipped": skipped,
            "parameters": sum(p.numel() for p in model.parameters()), "decode_seconds": seconds,
            "decoded_rows": sum(len(w) for w in written)}
    del model
    if cfg.reference:
        add_reference_losses(cfg.reference, schema, conversations, records)
    return records, {**summarize_chat(records), "rows_per_s": info["decoded_rows"] / seconds, **info}


def add_reference_losses(reference, schema: StreamSchema, conversations: list[HeldOut], records: list[dict]):
    """loss_before and loss_sequential sums into the records, one reference model in memory at a time."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plain = StreamSchema(schema.streams, schema.silence_token, schema.pad_token)
    torch.manual_seed(0)  # from_base draws the new special-token rows (mean resizing): the same every run
    with hf_bars_on_terminals_only():
        before, _ = MultiStreamLM.from_base(str(reference), plain)
    schema.check_same(before.schema, "checkpoint", f"reference {reference} (from_base)")
    before = before.to(device=device, dtype=torch.float32).eval()
    for rec, (ce, n) in zip(records, reply_losses(before, conversations)):
        rec.update(before_sum=ce, before_tokens=n)
    del before
    gc.collect()
    tokenizer = AutoTokenizer.from_pretrained(str(reference))
    with hf_bars_on_terminals_only():
        base = AutoModelForCausalLM.from_pretrained(str(reference), dtype=torch.float32).to(device).eval()
    pairs = [(r["user"], r["reply"]) for r in records]
    for rec, (ce, n) in zip(records, sequential_losses(base, tokenizer, pairs)):
        rec.update(sequential_sum=ce, sequential_tokens=n)


def summarize_chat(records: list[dict]) -> dict:
    """METRICS over the records (NaN where nothing was measured: no reference, no reply started).
    Losses are per token over all conversations' reply tokens together, not a mean of means."""
    def total(key: str) -> float:
        return sum(r[key] for r in records) if all(key in r for r in records) else float("nan")

    def mean(values) -> float:
        values = [float(v) for v in values if v is not None]
        return sum(values) / len(values) if values else float("nan")

    return {"conversations": len(records), "reply_tokens": total("reply_tokens"),
            "loss": total("loss_sum") / total("reply_tokens"),
            "loss_before": total("before_sum") / total("before_tokens"),
            "loss_sequential": total("sequential_sum") / total("sequential_tokens"),
            "sequential_tokens": total("sequential_tokens"),
            "start_rows": mean(r["start_rows"] for r in records),
            "start_rows_data": mean(r["data_start_rows"] for r in records),
            **{k: mean(r[k] for r in records) for k in ("started_within", "early", "no_reply", "ends_cleanly")},
            "written_tokens": mean(r["written_tokens"] for r in records),
            "data_tokens": mean(r["data_tokens"] for r in records)}
