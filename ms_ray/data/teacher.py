"""Teacher policy: a teacher LLM rewrites a reply chunk by chunk while the user text arrives.

For input chunk t = 1..T the teacher (any OpenAI-compatible endpoint) is shown the user text up
to and including chunk t only, the reply written so far and the reference reply (the content
target), and writes the next part of the reply; one last call, told the input is complete,
writes the rest. Prompt (system + user message, see `build_messages`):

    <input>\\n{user text so far}\\n</input>
    <status>input may continue</status>        (last call: <status>input complete</status>)
    <reply_so_far>\\n{reply so far}\\n</reply_so_far>
    <reference>\\n{reference reply}\\n</reference>
    {instruction}                               answer "[silent]" to write nothing yet

Causality check (lexical, cheap): reply chunk t leaks when one of its content words (lowercased,
edge punctuation and a plural "s" stripped, stopwords ignored) occurs in input chunks > t but in
no input chunk <= t. Words found nowhere in the input (the reference's own words) are allowed.
Words of the reply so far need no exemption: each passed this check against a smaller seen input.
Synonyms and computed values (a sum of later numbers) are not caught; this is a filter, not a judge.

Placement: user tokens on the input stream from row 0 (+ its end token). Reply chunk t starts at
max(end of the previous chunk, row of the last token of input chunk t + 2); the final chunk and
the output end token wait for the last input token (the input end token, when there is one) + 2,
because the teacher was told the input is complete.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass

import httpx

from .tables import Conversation, Dropped, Example, Timeline

SILENT = "[silent]"
SYSTEM_PROMPT = (
    "You turn a finished chat reply into a streaming reply. The user's message arrives in pieces "
    "while the reply is being written. You see only the part of the user's message that has "
    "arrived so far, the reply written so far, and a reference reply written after the whole "
    "message was known. Continue the reply so far, following the reference reply's content and "
    "wording, but write only what the input seen so far justifies: nothing that depends on input "
    f"that has not arrived. If nothing can be written yet, answer exactly {SILENT}. Answer with "
    "the new text only: no quotes, no commentary, do not repeat the reply so far."
)
NEXT = "Write the next part of the reply that can be written knowing only the input above."
REST = "The user's message is complete. Write the rest of the reply."
STOPWORDS = frozenset(
    "a an the and or but if then so of to in on at by for with from as is are was were be been it "
    "its this that these those i you he she we they me him her us them my your our their what "
    "which who how why when where do does did not no yes can will would should could".split()
)


class TeacherError(RuntimeError):
    """The endpoint gave no usable answer within the allowed attempts."""


@dataclass
class TeacherConfig:
    base_url: str  # e.g. "http://127.0.0.1:8000/v1"; requests go to {base_url}/chat/completions
    model: str = "teacher"
    api_key: str | None = None
    chunk_words: int | None = None  # None: one chunk per sentence
    temperature: float = 0.0
    timeout_s: float = 30
    max_retries: int = 2  # attempts = max_retries + 1
    max_tokens: int = 256


class TeacherClient:
    def __init__(self, cfg: TeacherConfig):
        self.cfg = cfg
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        # trust_env=False: proxy variables must never reroute a (loopback) endpoint elsewhere.
        self._http = httpx.Client(timeout=httpx.Timeout(cfg.timeout_s), headers=headers, trust_env=False)

    def complete(self, messages: list[dict]) -> str:
        body = {"model": self.cfg.model, "messages": messages,
                "temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens}
        url = self.cfg.base_url.rstrip("/") + "/chat/completions"
        errors: list[str] = []
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                time.sleep(min(1.0, 0.1 * 2 ** (attempt - 1)))  # short, bounded backoff
            try:
                resp = self._http.post(url, json=body)
            except httpx.HTTPError as e:  # refused, timed out, reset
                errors.append(f"{type(e).__name__}: {e or 'no detail'}")
                continue
            if resp.status_code != 200:
                errors.append(f"HTTP {resp.status_code}: {resp.text[:200]!r}")
                if resp.status_code < 500 and resp.status_code != 429:
                    break  # auth or request errors do not get better by retrying
                continue
            try:
                content = resp.json()["choices"][0]["message"]["content"]
                if not isinstance(content, str):
                    raise TypeError(f"content is {type(content).__name__}")
                return content
            except (ValueError, KeyError, IndexError, TypeError) as e:
                errors.append(f"malformed response ({type(e).__name__}: {e}): {resp.text[:200]!r}")
        raise TeacherError(f"{url}: {len(errors)} attempt(s) failed; last: {errors[-1]}")

    def close(self) -> None:
        self._http.close()


# ---- chunks, prompts, causality ----------------------------------------------------------
def split_chunks(text: str, chunk_words: int | None = None) -> list[str]:
    """Contiguous pieces of `text` ("".join(chunks) == text.strip()): a chunk ends after a
    sentence end (.!? possibly followed by quotes/brackets), or every `chunk_words` words.
    Whitespace before a word belongs to the chunk of that word, so prefixes are exact text."""
    text = text.strip()
    ends, n = [], 0
    for m in re.finditer(r"\S+", text):
        n += 1
        if chunk_words and n % chunk_words == 0 or not chunk_words and re.search(r"[.!?][\"')\]]*$", m.group()):
            ends.append(m.end())
    if text and (not ends or ends[-1] != len(text)):
        ends.append(len(text))
    return [text[a:b] for a, b in zip([0, *ends[:-1]], ends)]


def build_messages(seen: str, so_far: str, reference: str, final: bool) -> list[dict]:
    status = "input complete" if final else "input may continue"
    user = (f"<input>\n{seen}\n</input>\n<status>{status}</status>\n"
            f"<reply_so_far>\n{so_far}\n</reply_so_far>\n<reference>\n{reference}\n</reference>\n"
            f"{REST if final else NEXT}")
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def content_words(text: str) -> set[str]:
    words = set()
    for w in text.lower().split():
        w = re.sub(r"^\W+|\W+$", "", w)
        w = re.sub(r"'s$", "", w)
        w = w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w  # plural
        if w and w not in STOPWORDS:
            words.add(w)
    return words


def leaked_words(reply: str, seen_chunks: list[str], later_chunks: list[str]) -> set[str]:
    """Content words of `reply` present only in input the teacher had not been shown."""
    return content_words(reply) & (content_words(" ".join(later_chunks)) - content_words(" ".join(seen_chunks)))


def clean_reply(text: str, so_far: str) -> str:
    text = " ".join(text.split())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":  # the whole answer quoted
        text = text[1:-1].strip()
    if text.lower() in (SILENT, SILENT.strip("[]")):
        return ""
    if so_far and text.startswith(so_far):  # LLMs often repeat what is already written
        text = text[len(so_far):].strip()
    return text


# ---- the conversion ----------------------------------------------------------------------
def teacher_convert(conv: Conversation, schema, encode, client, input_stream="user", output_stream="output"):
    """Example(policy="teacher") or Dropped. `schema` must be bound (special-token ids)."""
    def drop(reason):
        return Dropped(conv.file, conv.line, f"teacher: {reason}")

    ins = [t.text for t in conv.turns if t.stream == input_stream]
    outs = [t.text for t in conv.turns if t.stream == output_stream]
    if len(ins) != 1 or len(outs) != 1 or len(conv.turns) != 2 or conv.turns[0].stream != input_stream:
        return drop(f"needs one {input_stream!r} turn then one {output_stream!r} turn, "
                    f"got {[t.stream for t in conv.turns]}")
    user_text, reference = ins[0].strip(), outs[0].strip()
    if not user_text or not reference:
        return drop("empty user text or reference reply")
    chunks = split_chunks(user_text, getattr(getattr(client, "cfg", None), "chunk_words", None))
    replies: list[str] = []
    for t in range(1, len(chunks) + 2):  # T input chunks, then the "rest of the reply" call
        final = t > len(chunks)
        so_far = " ".join(r for r in replies if r)
        try:
            answer = client.complete(build_messages("".join(chunks[:t]), so_far, reference, final))
        except TeacherError as e:
            return drop(f"endpoint failed at step {t}/{len(chunks) + 1}: {e}")
        reply = clean_reply(answer, so_far)
        leaked = leaked_words(reply, chunks[:t], chunks[t:])
        if leaked:
            return drop(f"causality: reply chunk {t} {reply!r} uses {sorted(leaked)}, which appear only "
                        f"in input chunks > {t} (not shown to the teacher)")
        replies.append(reply)
    if not any(replies):
        return drop("the teacher wrote an empty reply")
    return place(conv, schema, encode, chunks, replies, input_stream, output_stream,
                 getattr(getattr(client, "cfg", None), "model", "teacher"))


def place(conv, schema, encode, chunks, replies, input_stream, output_stream, model) -> Example:
    """Token-space table; see the module docstring for the rows."""
    tl, ends = Timeline(schema), schema.end_ids()
    user_ids = list(encode("".join(chunks)))
    n_user = tl.put(input_stream, 0, user_ids)
    last_input_row = n_user - 1
    if input_stream in ends:
        last_input_row = n_user
        tl.put(input_stream, n_user, [ends[input_stream]])
    row, records, first = 0, [], True
    for t, reply in enumerate(replies, 1):
        final = t > len(chunks)
        # Prefix token count; exact for word tokenizers, at whitespace boundaries ~exact for BPE.
        upto = n_user if final else min(len(encode("".join(chunks[:t]))), n_user)
        ids = list(encode(reply if first else " " + reply)) if reply else []
        start = None
        if ids:
            start = max(row, (last_input_row if final else upto - 1) + 2)
            row, first = tl.put(output_stream, start, ids), False
        records.append({"input_upto_token": upto, "reply": reply, "start_row": start})
    if output_stream in ends:
        tl.put(output_stream, max(row, last_input_row + 2), [ends[output_stream]])
    key = json.dumps([conv.source, conv.group, conv.file, conv.line, [t.text for t in conv.turns]])
    return Example(
        id=f"teacher-{hashlib.sha1(key.encode()).hexdigest()[:16]}", source=conv.source, group=conv.group,
        policy="teacher", rows=tl.to_rows(), meta={"teacher_model": model, "chunks": records})
