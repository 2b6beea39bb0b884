"""The compiled kernels of verification (retrieval.search.matching) against the numpy expressions they replace, and
the stretch's RANSAC pairs (verification.sample_pairs)."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.search.matching import best_correlation, inside_convex, most_inliers, near_any, two_nearest
from retrieval.search.verification import STRETCH_SAMPLES, sample_pairs, stretch_inliers


def numpy_two_nearest(similarity: np.ndarray, width: int):
    """What verification computed before the kernel: argmax, max, and the max with the argmax set to -1."""
    blocks = similarity.reshape(-1, width, similarity.shape[1]).copy()  # (k, width, nq)
    nearest = blocks.argmax(axis=1)
    first = np.take_along_axis(blocks, nearest[:, None, :], axis=1)[:, 0]
    np.put_along_axis(blocks, nearest[:, None, :], -1.0, axis=1)
    return nearest, first, blocks.max(axis=1)


@pytest.mark.parametrize("candidates, width, queries", [(1, 2, 1), (3, 2, 7), (5, 17, 33), (16, 256, 512)])
def test_two_nearest_is_numpy_s(candidates, width, queries):
    rng = np.random.default_rng(width)
    # few distinct values: many ties, where the first index must win and the second best equal the best
    similarity = (rng.integers(0, 6, (candidates * width, queries)) / 5).astype(np.float32)
    similarity[: width // 2] = 0.0  # zero padding rows, as a candidate with fewer keypoints than the block's width
    got = two_nearest(similarity, width)
    for mine, theirs in zip(got, numpy_two_nearest(similarity, width)):
        assert mine.shape == (candidates, queries)
        np.testing.assert_array_equal(mine, theirs)


def test_two_nearest_second_is_minus_one_for_one_keypoint():
    similarity = np.array([[0.5, 0.25], [0.0, 0.0]], np.float32)  # one real keypoint, one padding row
    nearest, first, second = two_nearest(similarity, 2)
    assert nearest.tolist() == [[0, 0]] and first.tolist() == [[0.5, 0.25]] and second.tolist() == [[0.0, 0.0]]
    nearest, first, second = two_nearest(np.array([[0.5, 0.25]], np.float32), 1)
    assert second.tolist() == [[-1.0, -1.0]]


def test_most_inliers_is_numpy_s():
    rng = np.random.default_rng(1)
    query = rng.uniform(0, 500, (60, 2))
    candidate = np.c_[1.5 * query[:, 0] + 20, 0.7 * query[:, 1] - 5] + rng.normal(0, 2, (60, 2))
    candidate[40:] = rng.uniform(0, 500, (20, 2))  # a third are outliers
    scales = rng.uniform(0.5, 2, (300, 2))
    scales[[17, 250]] = (1.5, 0.7)  # the true model twice: the first one wins
    shifts = rng.uniform(-30, 30, (300, 2))
    shifts[[17, 250]] = (20, -5)
    across = scales[:, :1] * query[None, :, 0] + shifts[:, :1] - candidate[None, :, 0]
    down = scales[:, 1:] * query[None, :, 1] + shifts[:, 1:] - candidate[None, :, 1]
    counts = (across * across + down * down < 6.0**2).sum(axis=1)
    assert most_inliers(query, candidate, scales, shifts, 6.0) == np.argmax(counts) == 17
    assert most_inliers(query, candidate, np.zeros((1, 2)), np.zeros((1, 2)), 6.0) == 0


def test_sample_pairs_every_pair_or_a_fixed_draw():
    first, second = sample_pairs(5, STRETCH_SAMPLES)
    assert sorted(zip(first.tolist(), second.tolist())) == [(i, j) for i in range(5) for j in range(i + 1, 5)]
    drawn = sample_pairs(300, STRETCH_SAMPLES)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(drawn[0], rng.integers(0, 300, STRETCH_SAMPLES))
    np.testing.assert_array_equal(drawn[1], rng.integers(0, 300, STRETCH_SAMPLES))
    with pytest.raises(ValueError):  # shared between calls: nobody may change them
        drawn[0][0] = 1


def test_stretch_inliers_finds_a_stretch_among_outliers():
    rng = np.random.default_rng(4)
    query = rng.uniform(0, 400, (80, 2))
    candidate = np.c_[2.0 * query[:, 0] + 10, 1.2 * query[:, 1] + 40]
    candidate[60:] = rng.uniform(0, 800, (20, 2))
    mask = stretch_inliers(query, candidate, threshold=3.0)
    assert mask is not None and mask[:60].all() and mask[60:].sum() <= 1


def numpy_inside(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    edges = np.roll(polygon, -1, axis=0) - polygon
    offsets = points[:, None, :] - polygon[None, :, :]
    cross = edges[None, :, 0] * offsets[..., 1] - edges[None, :, 1] * offsets[..., 0]
    return (cross >= -1e-6).all(axis=1) | (cross <= 1e-6).all(axis=1)


@pytest.mark.parametrize("clockwise", [False, True])
def test_inside_convex_is_numpy_s(clockwise):
    import cv2

    rng = np.random.default_rng(7)
    corners = rng.uniform(0, 100, (40, 2))
    polygon = cv2.convexHull(corners.astype(np.float32), clockwise=clockwise).reshape(-1, 2).astype(np.float64)
    points = np.concatenate([rng.uniform(-20, 120, (500, 2)), polygon, (polygon + np.roll(polygon, -1, 0)) / 2])
    inside = inside_convex(points, polygon)
    np.testing.assert_array_equal(inside, numpy_inside(points, polygon))
    assert inside[500:].all() and 0 < inside[:500].sum() < 500  # vertices and edge midpoints are on it
    square = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    assert inside_convex(np.array([[0.5, 0.5], [1.5, 0.5], [1.0, 1.0 + 1e-9]]), square).tolist() == [True, False, True]


def test_near_any_is_a_brute_force_distance_test():
    rng = np.random.default_rng(9)
    points, others = rng.uniform(0, 50, (300, 2)), rng.uniform(0, 50, (40, 2))
    distances = np.hypot(*(points[:, None, :] - others[None, :, :]).transpose(2, 0, 1))
    np.testing.assert_array_equal(near_any(points, others, 3.0), (distances <= 3.0).any(axis=1))
    assert near_any(np.array([[3.0, 4.0]]), np.array([[0.0, 0.0]]), 5.0).tolist() == [True]  # inclusive
    assert near_any(points, np.zeros((0, 2)), 3.0).sum() == 0


def test_best_correlation_is_opencv_s_match_template():
    """The photometric check's normalised cross-correlation (three channels, each mean taken out) against
    ``cv2.matchTemplate(..., TM_CCOEFF_NORMED).max()``: smooth and noisy thumbnails, a crop of the image itself (1 at
    its place), a flat window (0, as OpenCV), the template as large as the image (one placement)."""
    import cv2

    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:24, 0:32].astype(np.float32)
    smooth = np.stack([x * 7, y * 9, (x + y) * 3], axis=-1) + rng.normal(0, 4, (24, 32, 3)).astype(np.float32)
    noisy = rng.uniform(0, 255, (24, 32, 3)).astype(np.float32)
    half_flat = noisy.copy()
    half_flat[:, :16] = 77.0
    cases = [(smooth[3:18, 5:27], smooth), (noisy[:13, :19] + 1, noisy), (smooth[::-1][:20, :30], noisy),
             (noisy[:10, :10], half_flat), (smooth, noisy), (np.ascontiguousarray(smooth[:, ::-1]), smooth)]
    for template, image in cases:
        template, image = np.ascontiguousarray(template, np.float32), np.ascontiguousarray(image, np.float32)
        theirs = float(np.nan_to_num(cv2.matchTemplate(image, template, cv2.TM_CCOEFF_NORMED), nan=0.0).max())
        assert best_correlation(template, image) == pytest.approx(theirs, abs=1e-4)
    assert best_correlation(np.ascontiguousarray(smooth[3:18, 5:27]), smooth) == pytest.approx(1.0, abs=1e-5)
    flat = np.full((24, 32, 3), 50, np.float32)
    assert best_correlation(np.ascontiguousarray(noisy[:10, :10]), flat) == 0.0


def test_best_correlation_of_a_real_pair_with_flat_windows():
    """Two colour thumbnails from the AugLy bench (a query, 11 x 32, and a reference whose top third is one flat grey
    above a black shape, 21 x 32) at every scale of the photometric check: OpenCV's values, not the 0.72 that numba's
    whole ``fastmath`` made of the query at 60 % over the flat rows."""
    import cv2
    from pathlib import Path

    from retrieval.search.photometric import SCALES

    pair = np.load(Path(__file__).with_name("flat_band_thumbnails.npz"))
    query, candidate = pair["query"].astype(np.float32), pair["candidate"].astype(np.float32)
    for scale in SCALES:
        size = (round(query.shape[1] * scale), round(query.shape[0] * scale))
        template = np.ascontiguousarray(cv2.resize(query, size, interpolation=cv2.INTER_AREA))
        theirs = float(np.nan_to_num(cv2.matchTemplate(candidate, template, cv2.TM_CCOEFF_NORMED), nan=0.0).max())
        assert best_correlation(template, candidate) == pytest.approx(theirs, abs=2e-3), scale
