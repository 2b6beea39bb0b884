"""Compiled kernels of local-feature verification (numba; they release the interpreter lock): the loops that numpy
would run as several passes over large temporary arrays. ``two_nearest``, ``most_inliers`` and ``inside_convex`` give
exactly what the numpy expressions in their docstrings give, ``near_any`` a direct distance test
(tests/test_matching.py compares each with numpy).
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, fastmath=True)
def two_nearest(similarity: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Similarities float32 (k * width, nq) of k candidates' ``width`` keypoints (rows, candidate by candidate) to nq
    query keypoints -> per candidate and query keypoint (each (k, nq)): the nearest candidate keypoint (int64, the
    first of equal ones), its similarity, and the best similarity of the others (-1 where the candidate has one).
    As numpy on ``s = similarity.reshape(k, width, nq)``: ``s.argmax(1)``, ``s.max(1)`` and the max of ``s`` with
    the argmax set to -1; one pass, vectorised over the query keypoints."""
    rows, count = similarity.shape
    candidates = rows // width
    nearest = np.empty((candidates, count), np.int64)
    first = np.empty((candidates, count), np.float32)
    second = np.empty((candidates, count), np.float32)
    for j in range(candidates):
        top = first[j]
        runner = second[j]
        at = nearest[j]
        start = similarity[j * width]
        for q in range(count):
            top[q] = start[q]
            runner[q] = np.float32(-1.0)
            at[q] = 0
        for i in range(1, width):
            row = similarity[j * width + i]
            for q in range(count):
                value = row[q]
                best = top[q]
                runner[q] = max(runner[q], min(best, value))
                if value > best:
                    at[q] = i
                top[q] = max(best, value)
    return nearest, first, second


@numba.njit(cache=True, nogil=True)
def most_inliers(query: np.ndarray, candidate: np.ndarray, scales: np.ndarray, shifts: np.ndarray, threshold: float) -> int:
    """The first of the s axis-wise models ``candidate = scales * query + shifts`` (scales, shifts float64 (s, 2))
    with the most inliers among the n point pairs (query, candidate float64 (n, 2)): squared distance below
    ``threshold ** 2``. As numpy: ``argmax(((scales[:, :1] * query[:, 0] + shifts[:, :1] - candidate[:, 0]) ** 2 +
    (... axis 1 ...) ** 2 < threshold ** 2).sum(1))``, with the same float64 operations (no fused multiply-adds)."""
    limit = threshold * threshold
    best, best_count = 0, -1
    for s in range(scales.shape[0]):
        sx, sy, tx, ty = scales[s, 0], scales[s, 1], shifts[s, 0], shifts[s, 1]
        inliers = 0
        for n in range(query.shape[0]):
            across = sx * query[n, 0] + tx - candidate[n, 0]
            down = sy * query[n, 1] + ty - candidate[n, 1]
            if across * across + down * down < limit:
                inliers += 1
        if inliers > best_count:
            best, best_count = s, inliers
    return best


@numba.njit(cache=True, nogil=True)
def inside_convex(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Which of ``points`` float64 (n, 2) lie inside (or on, within 1e-6) the convex ``polygon`` float64 (m, 2),
    vertices in order (either way round), m >= 3: on the same side of every edge. As numpy: with ``edges =
    roll(polygon, -1, 0) - polygon`` and ``cross = edges[:, 0] * (p - v)[1] - edges[:, 1] * (p - v)[0]`` per vertex v,
    ``all(cross >= -1e-6) | all(cross <= 1e-6)``; a point stops at the first edge it is outside of."""
    count, corners = points.shape[0], polygon.shape[0]
    inside = np.zeros(count, np.bool_)
    for n in range(count):
        left = right = True
        for j in range(corners):
            k = j + 1 if j + 1 < corners else 0
            edge_x, edge_y = polygon[k, 0] - polygon[j, 0], polygon[k, 1] - polygon[j, 1]
            cross = edge_x * (points[n, 1] - polygon[j, 1]) - edge_y * (points[n, 0] - polygon[j, 0])
            if cross < -1e-6:
                left = False
            if cross > 1e-6:
                right = False
            if not (left or right):
                break
        inside[n] = left or right
    return inside


@numba.njit(cache=True, nogil=True)
def near_any(points: np.ndarray, others: np.ndarray, radius: float) -> np.ndarray:
    """Which of ``points`` float64 (n, 2) lie within ``radius`` (Euclidean, inclusive) of at least one of ``others``
    float64 (m, 2); a point stops at the first one near it."""
    limit = radius * radius
    near = np.zeros(points.shape[0], np.bool_)
    for n in range(points.shape[0]):
        x, y = points[n, 0], points[n, 1]
        for m in range(others.shape[0]):
            dx, dy = others[m, 0] - x, others[m, 1] - y
            if dx * dx + dy * dy <= limit:
                near[n] = True
                break
    return near


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})  # vectorised sums; exact division and root
def best_correlation(template: np.ndarray, image: np.ndarray) -> float:
    """The best zero-mean normalised cross-correlation of ``template`` float32 (h, w, 3) over every placement inside
    ``image`` float32 (H, W, 3), h <= H and w <= W, the three channels together: OpenCV's ``matchTemplate(image,
    template, TM_CCOEFF_NORMED).max()`` (each channel's mean taken out of the template and of the window; 0 where
    either is flat), within float rounding, without its per-call cost on a photometric thumbnail (~26 us a call,
    most of it set-up). Window sums from integral images; the cross term, a dot product along each row. Only
    reassociation and fused multiply-adds are allowed to the compiler: with numba's whole ``fastmath`` a window of
    one flat colour beside a black shape read 0.72 for OpenCV's 0.17 (tests/test_matching.py keeps that pair), and a
    flat window counts 0 whatever the rounding of its variance."""
    rows, cols = template.shape[0], template.shape[1]
    height, width = image.shape[0], image.shape[1]
    area = rows * cols
    centred = np.empty((rows, cols * 3), np.float32)
    spread = 0.0
    for channel in range(3):
        total = 0.0
        for i in range(rows):
            for j in range(cols):
                total += template[i, j, channel]
        mean = total / area
        for i in range(rows):
            for j in range(cols):
                value = template[i, j, channel] - mean
                centred[i, j * 3 + channel] = value
                spread += value * value
    flat = image.reshape(height, width * 3)
    sums = np.zeros((height + 1, width + 1, 3))  # integral images of the pixels and their squares
    squares = np.zeros((height + 1, width + 1, 3))
    for y in range(height):
        for x in range(width):
            for channel in range(3):
                value = np.float64(image[y, x, channel])
                sums[y + 1, x + 1, channel] = value + sums[y, x + 1, channel] + sums[y + 1, x, channel] - sums[y, x, channel]
                squares[y + 1, x + 1, channel] = (value * value + squares[y, x + 1, channel] + squares[y + 1, x, channel]
                                                  - squares[y, x, channel])
    best = -1.0
    for y in range(height - rows + 1):
        for x in range(width - cols + 1):
            cross = 0.0
            for i in range(rows):
                row = flat[y + i, x * 3 : (x + cols) * 3]
                part = np.float32(0.0)
                for j in range(cols * 3):
                    part += centred[i, j] * row[j]
                cross += part
            variance = 0.0
            for channel in range(3):
                total = (sums[y + rows, x + cols, channel] - sums[y, x + cols, channel] - sums[y + rows, x, channel]
                         + sums[y, x, channel])
                total2 = (squares[y + rows, x + cols, channel] - squares[y, x + cols, channel]
                          - squares[y + rows, x, channel] + squares[y, x, channel])
                variance += max(total2 - total * total / area, 0.0)
            scale = np.sqrt(variance * spread)
            value = 0.0
            if variance < 0.25:  # a flat window (of uint8 values: any other has squared deviations of 0.5 or more)
                value = 0.0
            elif abs(cross) < scale:
                value = cross / scale
            elif abs(cross) < scale * 1.125:  # rounding past +-1, as OpenCV
                value = 1.0 if cross > 0 else -1.0
            best = max(best, value)
    return best


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel, as ``sift.warm_up``."""
    two_nearest(np.zeros((4, 3), np.float32), 2)
    points = np.zeros((3, 2))
    most_inliers(points, points, np.ones((2, 2)), np.zeros((2, 2)), 1.0)
    inside_convex(points, points)
    near_any(points, points, 1.0)
    best_correlation(np.zeros((2, 2, 3), np.float32), np.zeros((3, 3, 3), np.float32))
