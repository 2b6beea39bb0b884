import numpy as np
import pytest

from retrieval.pooling import l2_normalize
from retrieval.search import top_k


def test_matches_a_full_sort():
    rng = np.random.default_rng(0)
    db = l2_normalize(rng.normal(size=(1000, 32)))
    query = db[17] + 0.1 * rng.normal(size=32)
    rows, scores = top_k(db, query, 10)
    full = np.argsort(-(db @ query.astype(np.float32)), kind="stable")[:10]
    np.testing.assert_array_equal(rows, full)
    assert rows[0] == 17
    assert np.all(np.diff(scores) <= 0)


def test_ties_break_by_lower_index_and_k_larger_than_n():
    db = np.array([[1, 0], [0, 1], [1, 0], [1, 0]], dtype=np.float32)
    rows, scores = top_k(db, np.array([1, 0]), 2)
    np.testing.assert_array_equal(rows, [0, 2])
    rows, _ = top_k(db, np.array([1, 0]), 50)
    np.testing.assert_array_equal(rows, [0, 2, 3, 1])


def test_empty_database_and_bad_arguments():
    rows, scores = top_k(np.empty((0, 4), np.float32), np.ones(4), 3)
    assert rows.size == 0 and scores.size == 0
    with pytest.raises(ValueError, match="dimension"):
        top_k(np.ones((3, 4), np.float32), np.ones(5), 1)
    with pytest.raises(ValueError, match="at least 1"):
        top_k(np.ones((3, 4), np.float32), np.ones(4), 0)
