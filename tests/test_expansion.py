"""Query expansion maths (pure numpy) and query expansion through the pipeline's own backend."""

import numpy as np
import pytest

from retrieval.search.backends.memory import MemoryBackend
from retrieval.search.expansion import QueryExpansion, alpha_query_expansion, average_query_expansion, expand
from retrieval.search.pipeline import QueryPipeline


def unit(*rows):
    """Rows scaled to unit length; one row gives a (D,) vector."""
    array = np.asarray(rows, dtype=np.float64)
    array = (array / np.linalg.norm(array, axis=-1, keepdims=True)).astype(np.float32)
    return array[0] if len(rows) == 1 else array


# database: rows 0..3; cosine with the query (1, 0, 0): 0.8, 0.6, 0, -1
DB = unit([0.8, 0.6, 0], [0.6, 0.8, 0], [0, 0, 1], [-1, 0, 0])
Q = np.array([[1, 0, 0]], dtype=np.float32)


def neighbours(rows):
    rows = np.asarray([rows])
    return DB[rows], (DB[rows] @ Q[0]), np.ones(rows.shape, bool)


def test_average_query_expansion_by_hand():
    # top-2 = rows 0, 1: (1 + 0.8 + 0.6, 0 + 0.6 + 0.8, 0) = (2.4, 1.4, 0)
    vectors, _, valid = neighbours([0, 1])
    np.testing.assert_allclose(average_query_expansion(Q, vectors, valid)[0], unit([2.4, 1.4, 0]), rtol=1e-6)
    # an invalid slot (a backend found fewer) counts for nothing
    np.testing.assert_allclose(average_query_expansion(Q, vectors, np.array([[True, False]]))[0], unit([1.8, 0.6, 0]), rtol=1e-6)
    out = average_query_expansion(Q, *neighbours([0, 1, 2, 3])[::2])
    np.testing.assert_allclose(out[0], unit([1 + 0.8 + 0.6 - 1, 1.4, 1]), rtol=1e-6)
    assert out.dtype == np.float32 and out.shape == (1, 3)


def test_alpha_query_expansion_by_hand():
    # weights 0.8^3 = 0.512, 0.6^3 = 0.216 -> (1 + 0.512*0.8 + 0.216*0.6, 0.512*0.6 + 0.216*0.8, 0)
    vectors, scores, valid = neighbours([0, 1])
    expected = unit([1 + 0.4096 + 0.1296, 0.3072 + 0.1728, 0])
    np.testing.assert_allclose(alpha_query_expansion(Q, vectors, scores, valid, 3.0)[0], expected, rtol=1e-6)
    # alpha = 0 is AQE; negative similarities get weight 0
    np.testing.assert_allclose(
        alpha_query_expansion(Q, vectors, scores, valid, 0.0), average_query_expansion(Q, vectors, valid), rtol=1e-6
    )
    vectors, scores, valid = neighbours([0, 1, 2, 3])
    np.testing.assert_allclose(alpha_query_expansion(Q, vectors, scores, valid, 1.0)[0], unit([1 + 0.64 + 0.36, 0.48 + 0.48, 0]), rtol=1e-6)


def test_dispatch_and_errors():
    vectors, scores, valid = neighbours([0, 1])
    np.testing.assert_allclose(expand(QueryExpansion("none"), 2 * Q, vectors, scores, valid), Q)
    np.testing.assert_allclose(expand(QueryExpansion("avg"), Q, vectors, scores, valid), average_query_expansion(Q, vectors, valid))
    with pytest.raises(ValueError, match="unknown query expansion"):
        QueryExpansion("dqe")
    with pytest.raises(ValueError, match="top_n"):
        QueryExpansion("avg", 0)
    with pytest.raises(ValueError, match="alpha"):
        QueryExpansion("alpha", 3, -1)
    with pytest.raises(ValueError, match="do not fit"):
        average_query_expansion(np.ones((1, 4)), vectors, valid)


class CountingBackend(MemoryBackend):
    """The exact backend, counting its calls: query expansion must go through the pipeline's own backend."""

    calls = 0

    def search_batch(self, queries, k):
        CountingBackend.calls += 1
        return super().search_batch(queries, k)


def test_pipeline_expands_through_its_backend_in_batches():
    backend = CountingBackend(DB)
    pipeline = QueryPipeline(backend, DB)
    CountingBackend.calls = 0
    rows, scores = pipeline.search(np.stack([Q[0], DB[2]]), 2, QueryExpansion("avg", 2))
    assert CountingBackend.calls == 2  # one batched neighbour search, one batched final search, for both queries
    expanded = unit([2.4, 1.4, 0])
    np.testing.assert_allclose(scores[0], np.sort(DB @ expanded)[::-1][:2], rtol=1e-6)
    single_rows, single_scores = pipeline.search(Q[0], 2, QueryExpansion("avg", 2))
    np.testing.assert_array_equal(single_rows, rows[0])
    np.testing.assert_allclose(single_scores, scores[0])


def test_query_row_is_never_its_own_neighbour():
    pipeline = QueryPipeline(MemoryBackend(DB), DB)
    # database image 0 as the query: its neighbours are rows 1 and 2, not itself
    _, scores = pipeline.search(DB[0], 4, QueryExpansion("avg", 2), query_rows=[0])
    expanded = unit(DB[0] + DB[1] + DB[2])
    np.testing.assert_allclose(scores, np.sort(DB @ expanded)[::-1], rtol=1e-5)
    with pytest.raises(ValueError, match="query_rows"):
        pipeline.search(DB[:2], 2, query_rows=[0])
