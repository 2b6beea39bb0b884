import numpy as np
import pytest

from retrieval import vectors
from retrieval.vectors import l2_normalize, top_k, top_k_of_scores


def test_matches_a_full_sort():
    rng = np.random.default_rng(0)
    db = l2_normalize(rng.normal(size=(1000, 32)))
    query = db[17] + 0.1 * rng.normal(size=32)
    rows, scores = top_k(db, query, 10)
    full = np.argsort(-(db @ query.astype(np.float32)), kind="stable")[:10]
    np.testing.assert_array_equal(rows, full)
    assert rows[0] == 17
    assert np.all(np.diff(scores) <= 0)


def full_sort(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((np.broadcast_to(np.arange(scores.shape[1]), scores.shape), -scores), axis=1)[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


@pytest.mark.parametrize("width", [500, 1_024, 5_000, 20_037])
def test_wide_rows_take_the_floor_path_and_match_a_full_sort(width, monkeypatch):
    rng = np.random.default_rng(width)
    scores = rng.standard_normal((64, width)).astype(np.float32)
    scores[1::3] = np.round(scores[1::3] * 2) / 2  # many ties around the k-th score
    scores[2, :] = 0.25  # every score tied: more candidates than FLOOR_MAX_CANDIDATES -> argpartition
    scores[5, width // 2 :] = 3.0  # a block of ties at the top
    used = []
    partition = vectors._top_k_by_partition
    monkeypatch.setattr(vectors, "_top_k_by_partition", lambda s, k: used.append(len(s)) or partition(s, k))
    for k in (1, 10, 100):
        used.clear()
        rows, values = top_k_of_scores(scores, k)
        expected_rows, expected_values = full_sort(scores, k)
        np.testing.assert_array_equal(rows, expected_rows)
        np.testing.assert_array_equal(values, expected_values)
        if width >= max(vectors.FLOOR_MIN_CHUNKS, k) * vectors.FLOOR_CHUNK:
            # the floor settled every row but those with more tied candidates than it sorts: the all-tied row 2,
            # and row 5 when its tied half reaches the floor
            fallbacks = sum(used)
            assert 1 <= fallbacks <= 2 if width > vectors.FLOOR_MAX_CANDIDATES else fallbacks == 0
    nan_row = scores.copy()
    nan_row[0] = np.nan
    rows, _ = top_k_of_scores(nan_row, 10)  # a NaN row has an answer of the right shape, the others stay exact
    np.testing.assert_array_equal(rows[1:], full_sort(scores[1:], 10)[0])


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
    monkeypatch.setattr(vectors, "QUERY_BLOCK", 8)  # 5 < 8 queries per block: 8 queries against tiles of 312 rows
    tiled_rows, tiled_scores = top_k(db, queries, 7)
    np.testing.assert_array_equal(tiled_rows, rows)
    np.testing.assert_allclose(tiled_scores, scores, rtol=1e-6)
    monkeypatch.setattr(vectors, "SCORE_BLOCK", 8 * 3)  # tiles of 3 rows, fewer than k: tiles as wide as k
    np.testing.assert_array_equal(top_k(db, queries, 7)[0], rows)


def test_l2_normalize_keeps_zero_rows():
    out = l2_normalize(np.array([[3, 4], [0, 0]], dtype=np.float32))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0, 0]])
