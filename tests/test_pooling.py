import numpy as np
import pytest

from retrieval.descriptors import pooling


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


# --------------------------------------------------------------------------- GeM


def test_gem_by_hand_and_its_limits():
    # channel 0: (1 + 8 + 27 + 64) / 4 = 25 -> 25 ** (1/3); channel 1 clamps to eps except 5: (125 + 3 eps^3) / 4
    out = pooling.gem_pool(maps())
    np.testing.assert_allclose(out, [[25 ** (1 / 3), (125 / 4) ** (1 / 3)]], rtol=1e-6)
    np.testing.assert_allclose(pooling.gem_pool(maps(), p=1.0), [[2.5, 1.25]], rtol=1e-5)  # mean of the clamped maps
    np.testing.assert_allclose(pooling.gem_pool(maps(), p=500.0), [[4, 5]], rtol=1e-2)  # tends to max, no overflow
    np.testing.assert_allclose(pooling.pool("gem", maps(), p=1), [[2.5, 1.25]], rtol=1e-5)
    assert out.dtype == np.float32 and out.shape == (1, 2)
    with pytest.raises(ValueError, match="positive"):
        pooling.gem_pool(maps(), p=0)


# --------------------------------------------------------------------------- R-MAC


def test_rmac_regions_square_7x7_by_hand():
    # side 7 at level 1; side floor(14/3)=4 at corners {0, 3}; side floor(14/4)=3 at corners {0, 2, 4}
    expected = [(0, 0, 7, 7)]
    expected += [(y, x, 4, 4) for y in (0, 3) for x in (0, 3)]
    expected += [(y, x, 3, 3) for y in (0, 2, 4) for x in (0, 2, 4)]
    assert pooling.rmac_regions(7, 7, 3) == expected


def test_rmac_regions_landscape_5x8_by_hand():
    # short side 5, long 8: gaps 3/(steps-1) = 3, 1.5, ...; overlap 1 - gap/5 closest to 0.4 at the first -> 1 extra
    # region along the width. Level 1: side 5, x corners floor(1 + i*3) - 1 = {0, 3}, y {0}.
    # Level 2: side 3, x step 5/2 -> {0, 2, 5}, y step 2 -> {0, 2}. Level 3: side 2, x step 2 -> {0, 2, 4, 6},
    # y step 1.5 -> {0, 1, 3}.
    expected = [(0, x, 5, 5) for x in (0, 3)]
    expected += [(y, x, 3, 3) for y in (0, 2) for x in (0, 2, 5)]
    expected += [(y, x, 2, 2) for y in (0, 1, 3) for x in (0, 2, 4, 6)]
    assert pooling.rmac_regions(5, 8, 3) == expected
    # portrait is the transpose
    assert pooling.rmac_regions(8, 5, 3) == sorted((x, y, h, w) for y, x, h, w in expected[:2]) + sorted(
        (x, y, h, w) for y, x, h, w in expected[2:8]) + sorted((x, y, h, w) for y, x, h, w in expected[8:])


def test_rmac_regions_stay_inside_and_tiny_maps():
    for h, w in [(1, 1), (2, 3), (7, 7), (14, 9), (30, 40)]:
        for y, x, rh, rw in pooling.rmac_regions(h, w, 4):
            assert 0 <= y and y + rh <= h and 0 <= x and x + rw <= w and rh == rw >= 1
    assert pooling.rmac_regions(1, 1, 3) == [(0, 0, 1, 1)]  # levels 2 and 3 have side 0 and are dropped
    with pytest.raises(ValueError, match="at least one level"):
        pooling.rmac_regions(7, 7, 0)


def test_rmac_pool_by_hand_on_2x2():
    # 2x2 map, levels=1: full map + one region = the full 2x2 square -> 2 * l2n(MAC) = 2 * [4, 5] / sqrt(41)
    out = pooling.rmac_pool(maps(), levels=1)
    np.testing.assert_allclose(out, 2 * np.array([[4, 5]]) / np.sqrt(41), rtol=1e-6)
    # levels=3 on 2x2: level 2 has side floor(4/3)=1 at corners {0, 1}: the four cells. Level 3 has side 1 with
    # 3 corners per side: floor(-1 + i * 0.5) + 1 = {0, 0, 1}, so cells repeat (as in the reference code):
    # (0,0) x4, (0,1) x2, (1,0) x2, (1,1) x1.
    cells = maps()[0].reshape(4, 2)
    unit = cells / np.linalg.norm(cells, axis=1, keepdims=True)
    regions = pooling.rmac_regions(2, 2, 3)
    assert regions == [(0, 0, 2, 2), (0, 0, 1, 1), (0, 1, 1, 1), (1, 0, 1, 1), (1, 1, 1, 1)] + [
        (y, x, 1, 1) for y in (0, 0, 1) for x in (0, 0, 1)]
    expected = 2 * np.array([4, 5]) / np.sqrt(41) + unit.sum(axis=0) + unit.T @ np.array([4, 2, 2, 1])
    np.testing.assert_allclose(pooling.pool("rmac", maps()), [expected], rtol=1e-5)


# --------------------------------------------------------------------------- CroW


def test_crow_by_hand_with_a1_b1():
    # clamped channel 1 = [[0, 0], [5, 0]]; channel sum A = [[1, 2], [8, 4]], ||A||_1 = 15, S = A / 15
    # Q = [1, 1/4], sum 5/4 -> weights [log 1.25, log 5]
    # out0 = log 1.25 * (1*1 + 2*2 + 3*8 + 4*4) / 15 = 3 log 1.25; out1 = log 5 * 5 * 8 / 15
    out = pooling.crow_pool(maps(), a=1, b=1)
    np.testing.assert_allclose(out, [[3 * np.log(1.25), np.log(5) * 8 / 3]], rtol=1e-6)


def test_crow_default_a2_b2_and_zero_map():
    # A = [[1, 2], [8, 4]], ||A||_2 = sqrt(85), S = sqrt(A / sqrt(85))
    s = np.sqrt(np.array([[1, 2], [8, 4]]) / np.sqrt(85))
    expected = [[np.log(1.25) * (1 * s[0, 0] + 2 * s[0, 1] + 3 * s[1, 0] + 4 * s[1, 1]), np.log(5) * 5 * s[1, 0]]]
    np.testing.assert_allclose(pooling.pool("crow", maps()), expected, rtol=1e-6)
    zero = pooling.crow_pool(np.zeros((2, 3, 3, 4), np.float32))
    assert zero.shape == (2, 4) and not zero.any()


# --------------------------------------------------------------------------- registry, params, scales


def test_every_pooling_has_defaults_and_gives_float32_n_by_c():
    rng = np.random.default_rng(0)
    x = np.maximum(rng.normal(size=(3, 5, 7, 6)), 0).astype(np.float32)
    assert set(pooling.POOLINGS) == set(pooling.POOLING_DEFAULTS) - set(pooling.CODEBOOK_POOLINGS)
    for name in pooling.POOLINGS:
        out = pooling.pool(name, x, **pooling.POOLING_DEFAULTS[name])
        assert out.shape == (3, 6) and out.dtype == np.float32 and np.isfinite(out).all(), name
        np.testing.assert_allclose(pooling.pool(name, x[1:2]), out[1:2], rtol=1e-5)  # images pooled independently


def test_resolve_pooling_params():
    assert pooling.resolve_pooling_params("gem", {"p": 4}) == {"p": 4.0}
    assert pooling.resolve_pooling_params("rmac") == {"levels": 3}
    assert pooling.resolve_pooling_params("max", {}) == {}
    with pytest.raises(ValueError, match="takes no parameter p"):
        pooling.resolve_pooling_params("max", {"p": 3})
    with pytest.raises(ValueError, match="must be an integer"):
        pooling.resolve_pooling_params("rmac", {"levels": 2.5})
    with pytest.raises(ValueError, match="must be a number"):
        pooling.resolve_pooling_params("crow", {"a": "2"})
    with pytest.raises(ValueError, match="positive"):
        pooling.resolve_pooling_params("gem", {"p": float("nan")})
    with pytest.raises(ValueError, match="unknown pooling"):
        pooling.resolve_pooling_params("nope")
    with pytest.raises(ValueError, match="takes no parameter"):
        pooling.pool("gem", maps(), q=2)


def test_combine_scales_normalises_each_scale_then_sums():
    a = np.array([[3, 4], [1, 0]], dtype=np.float32)
    b = np.array([[0, 2], [0, 0]], dtype=np.float32)
    np.testing.assert_allclose(pooling.combine_scales([a, b]), [[0.6, 1.8], [1, 0]], rtol=1e-6)
    np.testing.assert_allclose(pooling.combine_scales([a]), pooling.l2_normalize(a))
    with pytest.raises(ValueError, match="one shape"):
        pooling.combine_scales([a, np.ones((2, 3))])
    with pytest.raises(ValueError, match="at least one"):
        pooling.combine_scales([])


# --------------------------------------------------------------------------- the seed article's AVE vs SUM guess


def test_avg_and_sum_give_identical_cosines_after_l2_normalisation_and_differ_only_when_mixed_before():
    """AVE = SUM / (h * w): a positive factor per image that L2 normalisation removes, at any input size (the seed
    article guessed AVE would beat SUM once images are resized 224 -> 448). Mixing raw vectors before the
    normalisation (summing a 224 and a 448 map, or centring over maps of several sizes) keeps the factor, and there
    they differ."""
    rng = np.random.default_rng(5)
    big = np.maximum(rng.normal(size=(6, 14, 14, 8)), 0).astype(np.float32)  # a 448 input's 14 x 14 maps
    small = big[:, ::2, ::2]  # 7 x 7, as from a 224 input
    n = pooling.l2_normalize

    def cosines(vectors):
        return vectors @ vectors.T

    for maps in (small, big):
        np.testing.assert_allclose(cosines(n(pooling.pool("sum", maps))), cosines(n(pooling.pool("avg", maps))), atol=1e-6)
    # maps of several sizes (aspect-preserving resize), each image normalised on its own: still identical
    shapes = [(14, 14), (14, 9), (10, 14), (14, 12), (7, 14), (14, 14)]
    sums = n(np.concatenate([pooling.pool("sum", big[i : i + 1, :h, :w]) for i, (h, w) in enumerate(shapes)]))
    avgs = n(np.concatenate([pooling.pool("avg", big[i : i + 1, :h, :w]) for i, (h, w) in enumerate(shapes)]))
    np.testing.assert_allclose(cosines(sums), cosines(avgs), atol=1e-6)
    # centring over maps of one size: still identical (one common factor)
    raw_sum, raw_avg = pooling.pool("sum", big), pooling.pool("avg", big)
    np.testing.assert_allclose(cosines(n(raw_sum - raw_sum.mean(0))), cosines(n(raw_avg - raw_avg.mean(0))), atol=1e-5)
    # mixed before L2: 224 + 448 summed (SUM weighs the 448 map 4x), or centred over maps of several sizes
    mixed_sum = n(pooling.pool("sum", small) + pooling.pool("sum", big))
    mixed_avg = n(pooling.pool("avg", small) + pooling.pool("avg", big))
    assert np.abs(cosines(mixed_sum) - cosines(mixed_avg)).max() > 1e-3
    raw_sums = np.concatenate([pooling.pool("sum", big[i : i + 1, :h, :w]) for i, (h, w) in enumerate(shapes)])
    raw_avgs = np.concatenate([pooling.pool("avg", big[i : i + 1, :h, :w]) for i, (h, w) in enumerate(shapes)])
    centred_sum, centred_avg = n(raw_sums - raw_sums.mean(0)), n(raw_avgs - raw_avgs.mean(0))
    assert np.abs(cosines(centred_sum) - cosines(centred_avg)).max() > 1e-3
