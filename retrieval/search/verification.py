"""Geometric verification of search candidates with local features: does the query contain a transformed copy of the
candidate (or of a part of it)? Numpy for the matching, OpenCV only for the robust fit.

``verify(query, candidates)`` is the one entry point (the search pipeline calls it on its top ``VERIFY_TOP``
candidates; a duplicates finder can call it on any pairs): ``query`` is a ``QueryLocalFeatures`` (the picture and its
mirror image), ``candidates`` a list of ``LocalFeatures`` (a database image's stored ones), and the result says for
every candidate how many inliers a plausible transform has, and how much of that evidence is *specific* to it.

Per candidate and per orientation (direct, mirrored):

1. **tentative matches**: RootSIFT nearest neighbour of each query keypoint among the candidate's keypoints, kept
   when it passes Lowe's ratio test (``RATIO``) and no other query keypoint claims the same candidate keypoint with a
   closer descriptor (one-to-one);
2. **a plausible transform**: a similarity transform (rotation, uniform scale, translation: ``cv2.
   estimateAffinePartial2D`` with RANSAC) fitted to the matches; its scale must lie within ``SCALE_RANGE``. A
   similarity has 4 degrees of freedom against a homography's 8: random matches agree with it far less often, and the
   copies users make (crops, resizes, rotations, pasting into a frame, padding) are similarities. A mirrored copy is
   found by the mirrored query, matched against the first ``MIRROR_TOP`` candidates;
3. **specific evidence**: an inlier keypoint of the query that is also an inlier with many *other* candidates is not
   evidence of a copy: it lies in something those images share with the query (the frame of a screenshot template,
   an avatar, a caption's glyphs, a watermark). Each inlier counts ``1 / n`` where ``n`` is the number of candidates
   for which that query keypoint is an inlier: the ``strength``. Measured on the copy-detection set, plain inlier
   counts made verification worse than none (mAP 0.67): two unrelated screenshots of one template share ~465 inliers.
   Candidates whose shared evidence was split this way keep only what is theirs alone. The sum is then weighted
   by the match's **hull density** (``FULL_DENSITY``): the inliers over the keypoints inside their convex hull, how
   much of the region the match spans it explains. A shared frame spans a whole page whose picture does not match.
   It is the query's density, or the candidate's where that is higher and the match covers a part of the candidate
   (its hull there at most ``PART_AREA`` of the picture): a database image that holds the query as a part of itself
   (the original of a small crop, a collage searched with one of its photos) keeps few keypoints of that part, and
   the detailed query has many there with nothing to match. A shared frame covers the whole candidate, so only the
   query's density counts for it. On the copy-detection set this lifted seed 1's small crops from AP 0.949 to 0.963,
   its µAP from 0.945 to 0.967 and seed 0's from 0.964 to 0.977; all-vs-all went from 0.893 / 0.940 to 0.896 / 0.944.

A candidate is ``verified`` when it has at least ``MIN_INLIERS`` inliers and a strength of at least ``MIN_STRENGTH``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..descriptors.local_features import LocalFeatures, as_root_sift

VERIFY_TOP = 100  # candidates verified per query by default
# ... and against the mirrored query, the first ones only: max pooling is nearly mirror-invariant, so a mirrored copy
# ranks near the top before verification (mirrored copies: AP 1.000 without it on the copy-detection set)
MIRROR_TOP = 20
RATIO = 0.8  # Lowe's ratio test on descriptor distances
MIN_TENTATIVE = 6  # matches needed before a transform is fitted
MIN_INLIERS = 8
MIN_STRENGTH = 5.0
SCALE_RANGE = (1 / 8, 8.0)  # candidate / query scale of the fitted similarity
REPROJECTION = 0.015  # RANSAC threshold, a fraction of the candidate image's longest side
RANSAC_ITERATIONS = 1000
FULL_DENSITY = 0.6  # hull density at which inliers count fully; below it they count (density / 0.6) ** 3
DENSITY_POWER = 3
PART_AREA = 0.5  # a match whose hull on the candidate covers at most this share of it is a part of the candidate
STRENGTH_HALF = 15.0  # the strength at which a verified score is half-way between 1 and 2
BLOCK_KEYPOINTS = 16_384  # candidate keypoints matched per matrix product (bounded memory)


@dataclass(frozen=True)
class QueryLocalFeatures:
    """A query's local features and its mirror image's (``retrieval.descriptors.local_features.query_local_features``)."""

    direct: LocalFeatures
    mirrored: LocalFeatures

    def __len__(self) -> int:
        return len(self.direct)


@dataclass(frozen=True)
class Verification:
    """Per candidate: raw ``inliers`` of the better orientation, ``strength`` (inliers weighted by how specific they
    are to this candidate), ``mirrored`` (the mirrored query matched), ``verified``."""

    inliers: np.ndarray  # int64 (K,)
    strength: np.ndarray  # float64 (K,)
    mirrored: np.ndarray  # bool (K,)
    verified: np.ndarray  # bool (K,)

    def scores(self) -> np.ndarray:
        """The fused score of verified candidates, in (1, 2): above every cosine, growing with the strength."""
        return 1.0 + self.strength / (self.strength + STRENGTH_HALF)


def _tentative_all(query: np.ndarray, candidates: Sequence[LocalFeatures]) -> list[tuple[np.ndarray, np.ndarray]]:
    """RootSIFT query (nq, 128) against every candidate -> per candidate (query indices, candidate indices) that pass
    the ratio test, one-to-one. The candidates are padded into blocks and matched with one matrix product per block."""
    out: list[tuple[np.ndarray, np.ndarray]] = []
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    width = max((len(c) for c in candidates), default=0)
    if width < 2 or len(query) == 0:
        return [empty] * len(candidates)
    per_block = max(1, BLOCK_KEYPOINTS // width)
    for start in range(0, len(candidates), per_block):
        block = candidates[start : start + per_block]
        # padding rows are zero: similarity 0, below every real RootSIFT pair (non-negative unit vectors), so it is never
        # a nearest neighbour and, as a second one, only for a candidate with one keypoint (which never has enough)
        padded = np.zeros((len(block), width, query.shape[1]), np.float32)
        for i, candidate in enumerate(block):
            padded[i, : len(candidate)] = as_root_sift(candidate.descriptors)
        similarity = (query @ padded.reshape(-1, query.shape[1]).T).reshape(len(query), len(block), width)
        nearest = similarity.argmax(axis=2)  # (nq, k)
        s1 = np.take_along_axis(similarity, nearest[..., None], axis=2)[..., 0]
        np.put_along_axis(similarity, nearest[..., None], -1.0, axis=2)
        s2 = similarity.max(axis=2)
        d1 = np.sqrt(np.maximum(2.0 - 2.0 * s1, 0.0))
        d2 = np.sqrt(np.maximum(2.0 - 2.0 * s2, 0.0))
        passed = d1 < RATIO * d2
        for i in range(len(block)):
            rows = np.flatnonzero(passed[:, i])
            if rows.size < MIN_TENTATIVE:
                out.append(empty)
                continue
            # one-to-one: of the query keypoints claiming one candidate keypoint, the closest keeps it
            order = rows[np.argsort(-s1[rows, i], kind="stable")]
            _, first_claim = np.unique(nearest[order, i], return_index=True)
            kept = np.sort(order[first_claim])
            out.append((kept, nearest[kept, i].astype(np.int64)))
    return out


def _fit(query_points: np.ndarray, candidate_points: np.ndarray, candidate_side: float) -> np.ndarray | None:
    """Inlier mask of a plausible similarity transform from query to candidate points, or None."""
    import cv2

    matrix, mask = cv2.estimateAffinePartial2D(
        query_points.astype(np.float32), candidate_points.astype(np.float32), method=cv2.RANSAC,
        ransacReprojThreshold=max(2.0, REPROJECTION * candidate_side), maxIters=RANSAC_ITERATIONS, confidence=0.995,
    )
    if matrix is None or mask is None:
        return None
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    if not SCALE_RANGE[0] <= scale <= SCALE_RANGE[1]:
        return None
    return mask.ravel().astype(bool)


def inside_hull(points: np.ndarray, hull: np.ndarray) -> np.ndarray:
    """Which of ``points`` (n, 2) lie inside (or on) the convex polygon ``hull`` (m, 2), vertices in order."""
    if len(hull) < 3:
        return np.zeros(len(points), bool)
    edges = np.roll(hull, -1, axis=0) - hull  # (m, 2)
    offsets = points[:, None, :] - hull[None, :, :]  # (n, m, 2)
    cross = edges[None, :, 0] * offsets[..., 1] - edges[None, :, 1] * offsets[..., 0]
    return (cross >= -1e-6).all(axis=1) | (cross <= 1e-6).all(axis=1)


def hull_density(points: np.ndarray, inliers: np.ndarray) -> tuple[float, float]:
    """(inliers / keypoints inside the convex hull of the inliers, the hull's area in square pixels), on one side of
    a match (``points`` (n, 2) that side's keypoints, ``inliers`` the indices of its inliers): how much of the region
    the match spans is explained by it. A copy pasted into a frame explains its own region; a shared frame spans the
    whole picture, whose other content does not match."""
    import cv2

    inlier_points = points[inliers]
    if len(inlier_points) < 3:
        return 0.0, 0.0
    hull = cv2.convexHull(inlier_points.astype(np.float32)).reshape(-1, 2).astype(np.float64)
    inside = int(inside_hull(points.astype(np.float64), hull).sum())
    return min(1.0, len(inlier_points) / max(inside, 1)), float(cv2.contourArea(hull.astype(np.float32)))


def match_density(query_points: np.ndarray, query_inliers: np.ndarray, candidate: LocalFeatures,
                  candidate_inliers: np.ndarray) -> float:
    """The hull density of a match: the query's, or the candidate's where that is higher and its hull covers at most
    ``PART_AREA`` of the candidate picture (see the module docstring)."""
    query_density, _ = hull_density(query_points, query_inliers)
    candidate_density, area = hull_density(np.asarray(candidate.keypoints[:, :2], np.float32), candidate_inliers)
    width, height = candidate.size
    return max(query_density, candidate_density) if area <= PART_AREA * width * height else query_density


def _inliers(query: LocalFeatures, candidates: Sequence[LocalFeatures]) -> list[tuple[np.ndarray, int, float]]:
    """Per candidate: (the query keypoint indices that are inliers of its transform, inlier count, hull density)."""
    out: list[tuple[np.ndarray, int, float]] = [(np.zeros(0, np.int64), 0, 0.0)] * len(candidates)
    if len(query) < MIN_TENTATIVE:
        return out
    points = np.asarray(query.keypoints[:, :2], np.float32)
    for i, (q_idx, c_idx) in enumerate(_tentative_all(as_root_sift(query.descriptors), candidates)):
        if len(q_idx) < MIN_TENTATIVE:
            continue
        candidate = candidates[i]
        mask = _fit(points[q_idx], np.asarray(candidate.keypoints[c_idx, :2], np.float32), max(candidate.size))
        if mask is None or mask.sum() < MIN_TENTATIVE:
            continue
        density = match_density(points, q_idx[mask], candidate, c_idx[mask])
        out[i] = (q_idx[mask], int(mask.sum()), density)
    return out


def _strength(per_candidate: list[tuple[np.ndarray, int, float]], query_count: int) -> np.ndarray:
    """Each inlier weighted 1 / (how many candidates that query keypoint is an inlier of), times
    ``min(1, hull density / FULL_DENSITY) ** DENSITY_POWER``."""
    counts = np.zeros(max(query_count, 1), np.float64)
    for indices, _, _ in per_candidate:
        counts[indices] += 1.0
    return np.array([
        float(np.sum(1.0 / counts[indices])) * min(1.0, density / FULL_DENSITY) ** DENSITY_POWER if len(indices) else 0.0
        for indices, _, density in per_candidate
    ])


def verify(query: QueryLocalFeatures, candidates: Sequence[LocalFeatures], mirror_top: int = MIRROR_TOP) -> Verification:
    """Verify every candidate against the query, and the first ``mirror_top`` against its mirror image (see the
    module docstring)."""
    count = len(candidates)
    inliers = np.zeros(count, np.int64)
    strength = np.zeros(count, np.float64)
    mirrored = np.zeros(count, bool)
    for is_mirror, side in ((False, query.direct), (True, query.mirrored)):
        checked = candidates[:mirror_top] if is_mirror else candidates
        found = _inliers(side, checked)
        found += [(np.zeros(0, np.int64), 0, 0.0)] * (count - len(checked))
        weighted = _strength(found, len(side))
        raw = np.array([n for _, n, _ in found], np.int64) if count else np.zeros(0, np.int64)
        better = weighted > strength
        strength = np.where(better, weighted, strength)
        inliers = np.where(better, raw, inliers)
        mirrored = np.where(better, is_mirror, mirrored)
    verified = (inliers >= MIN_INLIERS) & (strength >= MIN_STRENGTH)
    return Verification(inliers, strength, mirrored, verified)
