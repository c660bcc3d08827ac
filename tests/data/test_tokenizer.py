from ms_ray.data.tokenizer import word_tokenizer


def test_word_tokenizer_round_trip_and_specials(schema, tmp_path):
    tok = word_tokenizer(["hi", "there", "hi"], schema)
    ids = tok("hi there hi")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["hi", "there", "hi"]
    assert tok.convert_tokens_to_ids(schema.special_tokens) == [0, 1, 2]
    assert tok.pad_token == "<|pad|>"
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("hi there")["input_ids"] == ids[:2]
    assert schema.bind(again).token_ids == schema.bind(tok).token_ids


def test_bpe_round_trip_digits_and_specials(schema):
    from ms_ray.data.tokenizer import tokenizer_hash, train_bpe

    texts = ["hello there, how are you?", "I paid 1234 dollars for 56 apples", "naïve café — ok"] * 40
    tok = train_bpe(texts, schema, vocab_size=400, min_frequency=2)
    assert tok.convert_tokens_to_ids(schema.special_tokens) == [0, 1, 2]  # first ids, one token each
    for text in ["I paid 98765 dollars", "naïve café — ok 🙂", "  spaced\ttabs\nlines "]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text  # byte-level: exact round trip, even unseen characters
    pieces = tok.convert_ids_to_tokens(tok("paid 2024", add_special_tokens=False)["input_ids"])
    assert [p for p in pieces if any(c.isdigit() for c in p)] == ["2", "0", "2", "4"]  # one token per digit
    assert tokenizer_hash(tok) != tokenizer_hash(train_bpe(texts[:60], schema, vocab_size=300))


def test_any_hf_tokenizer_gets_the_schema_tokens(schema, tmp_path):
    from ms_ray.core.loading import load_tokenizer
    from ms_ray.core.streams import StreamSchema, StreamSpec

    other = StreamSchema((StreamSpec("x", "output"),), silence_token="<|q|>", pad_token="<|p|>")
    word_tokenizer(["a", "b"], other).save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path, schema)
    assert all(len(tok(t, add_special_tokens=False)["input_ids"]) == 1 for t in schema.special_tokens)
    assert schema.bind(tok).silence_id == tok.convert_tokens_to_ids("<|silence|>")
    import pytest

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "none", schema)
