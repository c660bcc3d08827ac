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
