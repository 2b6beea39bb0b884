import numpy as np
import pytest

from retrieval import pooling


def maps():
    # N=1, H=2, W=2, C=2: channel 0 = [[1, 2], [3, 4]], channel 1 = [[0, -1], [5, 0]]
    return np.array([[[[1, 0], [2, -1]], [[3, 5], [4, 0]]]], dtype=np.float32)


def test_max_avg_sum_by_hand():
    np.testing.assert_allclose(pooling.max_pool(maps()), [[4, 5]])
    np.testing.assert_allclose(pooling.sum_pool(maps()), [[10, 4]])
    np.testing.assert_allclose(pooling.avg_pool(maps()), [[2.5, 1.0]])


def test_pool_by_name_and_unknown_name():
    np.testing.assert_allclose(pooling.pool("max", maps()), [[4, 5]])
    with pytest.raises(ValueError, match="unknown pooling 'nope'"):
        pooling.pool("nope", maps())


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        pooling.max_pool(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="no spatial extent"):
        pooling.max_pool(np.zeros((1, 0, 3, 4)))


def test_l2_normalize_unit_rows_and_zero_row_stays_zero():
    out = pooling.l2_normalize(np.array([[3, 4], [0, 0]], dtype=np.float32))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0, 0]])
    assert out.dtype == np.float32 and not np.isnan(out).any()
