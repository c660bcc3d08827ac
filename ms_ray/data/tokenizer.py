"""Tokenizers that carry a stream schema's special tokens.

  train_bpe       byte-level BPE trained on text we ship (exact round trip, digits split one per
                  token so arithmetic does not depend on merges), saved as a HF tokenizer folder;
  word_tokenizer  a whole-word vocabulary (skill tasks with a closed vocabulary, tiny demos);
"""

from __future__ import annotations

import hashlib

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..core.streams import StreamSchema
from .formats import read_chitchat
from .skills import SKILL_STREAMS, vocabulary

UNK = "<|unk|>"


def _wrap(tok: Tokenizer, schema: StreamSchema, **kwargs) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=schema.pad_token, **kwargs)
    fast.add_special_tokens({"additional_special_tokens": [t for t in schema.special_tokens if t != schema.pad_token]})
    return fast


def word_tokenizer(words, schema: StreamSchema) -> PreTrainedTokenizerFast:
    """Whitespace-split word-level tokenizer: the schema's special tokens first, then `words`
    (deduplicated, order kept). Unknown words map to <|unk|>."""
    vocab: dict[str, int] = {}
    for w in [*schema.special_tokens, UNK, *words]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return _wrap(tok, schema, unk_token=UNK)


def train_bpe(texts, schema: StreamSchema, vocab_size: int = 4096, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Byte-level BPE over an iterable of strings; the schema's special tokens get the first ids."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=schema.special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return _wrap(tok, schema)


def skill_tokenizer():
    """A word-level tokenizer over `vocabulary()` with SKILL_STREAMS' special tokens: one
    token per word, so the rows match the skills module docstring exactly."""
    return word_tokenizer(vocabulary(), SKILL_STREAMS)


# ---- layout helpers ------------------------------------------------------------------------
def encoder(tokenizer):
    """text -> token ids with `tokenizer`, no special tokens added: how tables are encoded."""
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenizer_hash(tokenizer) -> str:
    """A fingerprint of the vocabulary, merges and special tokens (short sha256)."""
    blob = tokenizer.backend_tokenizer.to_str() + "|" + ",".join(tokenizer.all_special_tokens)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def corpus_texts(chitchat_limit: int | None = None, skills: bool = True, files=()):
    """Text that ships with the project, for `ms-ray tokenizer`: chitchat-dataset turns,
    the skill tasks' words, and plain-text files (one document per line)."""
    for conv in read_chitchat(limit=chitchat_limit):
        for turn in conv.turns:
            yield turn.text
    if skills:
        yield " ".join(vocabulary())
    for path in files:
        with open(path, encoding="utf-8") as f:
            yield from (line.rstrip("\n") for line in f if line.strip())
