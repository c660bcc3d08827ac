import pytest
import torch

from ms_ray.core.streams import (
    SchemaError,
    StreamSchema,
    StreamSpec,
    TableError,
    check_table,
    format_table,
    next_row_labels,
)


def test_roles_and_default_weights(schema):
    assert schema.names == ["user", "think", "output"]
    assert schema.output_mask == [False, True, True]
    assert schema.loss_weights == [0.0, 0.5, 1.0]  # input streams are not trained by default
    assert schema.special_tokens == ["<|silence|>", "<|pad|>", "<|end|>"]


@pytest.mark.parametrize("streams, message", [
    ((), "at least one stream"),
    ((StreamSpec("a", "input"), StreamSpec("a", "output")), "repeated: ['a']"),
    ((StreamSpec("a", "writer"),), "role must be"),
    ((StreamSpec("a", "input"),), "no output stream"),
    ((StreamSpec("a", "output", loss_weight=-1),), "loss_weight must be >= 0"),
])
def test_malformed_schema(streams, message):
    with pytest.raises(SchemaError, match=message.replace("[", r"\[").replace("]", r"\]")):
        StreamSchema(streams)


def test_unknown_stream_names_the_streams(schema):
    with pytest.raises(KeyError, match=r"unknown stream 'tool'.*\['user', 'think', 'output'\]"):
        schema.index("tool")


def test_bind_and_round_trip(tmp_path, schema, tokenizer):
    with pytest.raises(SchemaError, match="not bound"):
        schema.silence_id
    bound = schema.bind(tokenizer)
    assert bound.silence_id == tokenizer.convert_tokens_to_ids("<|silence|>")
    assert bound.end_ids() == {"output": tokenizer.convert_tokens_to_ids("<|end|>")}
    bound.save(tmp_path)
    loaded = StreamSchema.load(tmp_path)
    assert loaded == bound and loaded.token_ids == bound.token_ids


def test_mismatch_names_both_sides(bound):
    other = StreamSchema((StreamSpec("user", "input"), StreamSpec("output", "output")), token_ids=bound.token_ids)
    bound.check_same(bound, "model", "data")  # equal: no error
    with pytest.raises(SchemaError) as e:
        bound.check_same(other, mine="model /ckpt", theirs="data set /shards")
    msg = str(e.value)
    assert "model /ckpt" in msg and "data set /shards" in msg
    assert "['user', 'think', 'output'] vs ['user', 'output']" in msg
    moved = StreamSchema(bound.streams, token_ids={**bound.token_ids, "<|silence|>": 99})
    with pytest.raises(SchemaError, match="id of '<\\|silence\\|>' 0 vs 99"):
        bound.check_same(moved)


def test_next_row_labels_same_stream_and_documents():
    tokens = torch.arange(1, 13).view(1, 4, 3)  # rows [1,2,3],[4,5,6],[7,8,9],[10,11,12]
    labels = next_row_labels(tokens)
    assert labels[0, :3].tolist() == [[4, 5, 6], [7, 8, 9], [10, 11, 12]]
    assert (labels[0, 3] == -100).all()
    docs = torch.tensor([[0, 0, 1, -1]])  # row 1 ends doc 0, row 3 is padding
    labels = next_row_labels(tokens, docs)
    assert labels[0].tolist() == [[4, 5, 6], [-100] * 3, [-100] * 3, [-100] * 3]


def test_check_table_errors(bound):
    check_table(torch.zeros(2, 4, 3, dtype=torch.long), bound, 10)
    with pytest.raises(TableError, match=r"expected a table batch \[B, R, C\]"):
        check_table(torch.zeros(4, 3, dtype=torch.long), bound, 10)
    with pytest.raises(TableError, match="table has 2 streams but the schema has 3"):
        check_table(torch.zeros(1, 4, 2, dtype=torch.long), bound, 10)
    bad = torch.zeros(1, 4, 3, dtype=torch.long)
    bad[0, 2, 1] = 10
    with pytest.raises(TableError, match="token id 10 out of range .* row 2, stream 'think'"):
        check_table(bad, bound, 10)
    with pytest.raises(TableError, match="integer token ids"):
        check_table(bad.float(), bound, 10)


def test_format_table(bound, tokenizer):
    ids = tokenizer.convert_tokens_to_ids
    text = format_table([[ids("hello"), bound.silence_id, ids("yes")]], bound, tokenizer.convert_ids_to_tokens)
    assert text.splitlines()[0].split("|")[1].strip() == "user"
    assert text.splitlines()[2].split("|")[1:] == [" hello          ", " ·              ", " yes           "]
