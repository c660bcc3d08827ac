"""Tokenizers that carry a stream schema's special tokens.

`word_tokenizer` builds a whole-word vocabulary from a list of words (tiny demos and tests,
skill tasks with a closed vocabulary); the result is a standard HF tokenizer folder format.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ..core.streams import StreamSchema

UNK = "<|unk|>"


def word_tokenizer(words, schema: StreamSchema) -> PreTrainedTokenizerFast:
    """Whitespace-split word-level tokenizer: the schema's special tokens first, then `words`
    (deduplicated, order kept). Unknown words map to <|unk|>."""
    vocab: dict[str, int] = {}
    for w in [*schema.special_tokens, UNK, *words]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=UNK, pad_token=schema.pad_token)
    fast.add_special_tokens({"additional_special_tokens": [t for t in schema.special_tokens if t != schema.pad_token]})
    return fast
