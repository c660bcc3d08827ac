import numpy as np
import pytest

from ms_ray.data.packing import fit_length, pack_examples
from ms_ray.data.tables import Dropped, Example


def example(i, n, C=3):
    rows = np.arange(n * C, dtype=np.int32).reshape(n, C) + 100 * i
    return Example(f"e{i:02d}", "src", f"g{i}", "task", rows, {})


def test_packs_hold_whole_examples_in_order_of_their_doc_ids():
    examples = [example(i, n) for i, n in enumerate([5, 3, 8, 2, 7, 1, 4])]
    packs = pack_examples(examples, max_rows=10, pad_id=9)
    seen = []
    for p in packs:
        assert p.tokens.shape == (10, 3) and p.doc_ids.shape == (10,)
        row = 0
        for doc, eid in enumerate(p.example_ids):
            ex = next(e for e in examples if e.id == eid)
            assert (p.doc_ids[row : row + ex.num_rows] == doc).all()  # one contiguous document
            assert np.array_equal(p.tokens[row : row + ex.num_rows], ex.rows)  # never split or changed
            row += ex.num_rows
        assert (p.doc_ids[row:] == -1).all() and (p.tokens[row:] == 9).all()
        assert p.used_rows == row
        seen += p.example_ids
    assert sorted(seen) == sorted(e.id for e in examples)  # every example exactly once
    assert len(packs) == 3  # 30 rows into 10-row packs, first-fit decreasing fills them


def test_packing_is_deterministic_whatever_the_input_order():
    examples = [example(i, n) for i, n in enumerate([4, 4, 2, 6, 3, 3])]
    a = pack_examples(examples, 8, 0)
    b = pack_examples(examples[::-1], 8, 0)
    assert [p.example_ids for p in a] == [p.example_ids for p in b]


def test_overflow_is_a_counted_decision():
    long = example(1, 12)
    d = fit_length(long, 10, "drop")
    assert isinstance(d, Dropped) and "has 12 rows, over packing.max_rows=10" in d.reason
    t = fit_length(long, 10, "truncate")
    assert t.num_rows == 10 and t.meta["truncated_from_rows"] == 12
    assert fit_length(example(2, 10), 10, "drop").num_rows == 10
    with pytest.raises(ValueError, match="does not fit"):
        pack_examples([long], 10, 0)
