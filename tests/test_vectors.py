import numpy as np
import pytest

from retrieval.vectors import l2_normalize
from retrieval.vectors import top_k


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


def test_batched_search_equals_one_query_at_a_time_and_float16_blocks(monkeypatch):
    from retrieval import vectors

    rng = np.random.default_rng(1)
    db = l2_normalize(rng.normal(size=(500, 16)))
    db[10] = db[20]  # an exact tie across the partition boundary
    queries = l2_normalize(rng.normal(size=(37, 16)))
    queries[0] = db[10]
    monkeypatch.setattr(vectors, "SCORE_BLOCK", 500 * 5)  # 5 queries per block: the blocks must not matter
    rows, scores = top_k(db, queries, 7)
    assert rows.shape == (37, 7) and scores.dtype == np.float32
    for i, query in enumerate(queries):
        one_rows, one_scores = top_k(db, query, 7)
        np.testing.assert_array_equal(rows[i], one_rows)
        np.testing.assert_allclose(scores[i], one_scores, rtol=1e-6)
    assert list(rows[0][:2]) == [10, 20]
    half_rows, _ = top_k(db.astype(np.float16), queries, 7)
    assert (half_rows[:, 0] == rows[:, 0]).mean() > 0.9


def test_l2_normalize_keeps_zero_rows():
    out = l2_normalize(np.array([[3, 4], [0, 0]], dtype=np.float32))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0, 0]])
