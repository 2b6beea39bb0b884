import numpy as np
import pytest

from retrieval.rerank import alpha_query_expansion, average_query_expansion, expand_queries, expand_query


def unit(*rows):
    """Rows scaled to unit length; one row gives a (D,) vector."""
    array = np.asarray(rows, dtype=np.float64)
    array = (array / np.linalg.norm(array, axis=-1, keepdims=True)).astype(np.float32)
    return array[0] if len(rows) == 1 else array


# database: rows 0..3; cosine with the query (1, 0, 0): 0.8, 0.6, 0, -1
DB = unit([0.8, 0.6, 0], [0.6, 0.8, 0], [0, 0, 1], [-1, 0, 0])
Q = np.array([1, 0, 0], dtype=np.float32)


def test_average_query_expansion_by_hand():
    # top-2 = rows 0, 1: (1 + 0.8 + 0.6, 0 + 0.6 + 0.8, 0) = (2.4, 1.4, 0)
    np.testing.assert_allclose(average_query_expansion(Q, DB, 2), unit([2.4, 1.4, 0]), rtol=1e-6)
    np.testing.assert_allclose(average_query_expansion(Q, DB, 0), Q)
    out = average_query_expansion(Q, DB, 50)  # more than N: all rows, incl. the negative one
    np.testing.assert_allclose(out, unit([1 + 0.8 + 0.6 - 1, 1.4, 1]), rtol=1e-6)
    assert out.dtype == np.float32 and out.shape == (3,)


def test_exclude_skips_rows():
    # excluding row 0, the top-2 are rows 1 and 2: (1.6, 0.8, 1)
    np.testing.assert_allclose(average_query_expansion(Q, DB, 2, exclude=[0]), unit([1.6, 0.8, 1]), rtol=1e-6)


def test_alpha_query_expansion_by_hand():
    # weights 0.8^3 = 0.512, 0.6^3 = 0.216 -> (1 + 0.512*0.8 + 0.216*0.6, 0.512*0.6 + 0.216*0.8, 0)
    expected = unit([1 + 0.4096 + 0.1296, 0.3072 + 0.1728, 0])
    np.testing.assert_allclose(alpha_query_expansion(Q, DB, 2, alpha=3.0), expected, rtol=1e-6)
    # alpha = 0 is AQE; negative similarities get weight 0
    np.testing.assert_allclose(alpha_query_expansion(Q, DB, 2, alpha=0.0), average_query_expansion(Q, DB, 2), rtol=1e-6)
    np.testing.assert_allclose(alpha_query_expansion(Q, DB, 4, alpha=1.0), unit([1 + 0.64 + 0.36, 0.48 + 0.48, 0]), rtol=1e-6)


def test_dispatch_batch_and_errors():
    np.testing.assert_allclose(expand_query("none", 2 * Q, DB), Q)
    np.testing.assert_allclose(expand_query("avg", Q, DB, 2), average_query_expansion(Q, DB, 2))
    batch = expand_queries("alpha", np.stack([Q, DB[2]]), DB, 2, exclude=[0, None])
    np.testing.assert_allclose(batch[0], alpha_query_expansion(Q, DB, 2, exclude=[0]), rtol=1e-6)
    np.testing.assert_allclose(batch[1], alpha_query_expansion(DB[2], DB, 2), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown query expansion"):
        expand_query("dqe", Q, DB)
    with pytest.raises(ValueError, match="does not fit"):
        expand_query("avg", np.ones(4), DB)
    with pytest.raises(ValueError, match="alpha"):
        alpha_query_expansion(Q, DB, 2, alpha=-1)
    with pytest.raises(ValueError, match="exclude has 1 entries"):
        expand_queries("avg", np.stack([Q, Q]), DB, exclude=[None])
