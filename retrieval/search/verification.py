"""Geometric verification of search candidates with local features: does the query contain a transformed copy of the
candidate (or of a part of it)? Numpy and compiled kernels (``matching``) for the matching, OpenCV for the similarity fit.

``verify(query, candidates)`` is the one entry point (the search pipeline calls it on its top ``VERIFY_TOP``
candidates; a duplicates finder can call it on any pairs): ``query`` is a ``QueryLocalFeatures`` (the picture and its
mirror image), ``candidates`` a list of ``LocalFeatures`` (a database image's stored ones), and the result says for
every candidate how many inliers a plausible transform has, and how much of that evidence is *specific* to it.

Per candidate and per orientation (direct, mirrored):

1. **tentative matches**: RootSIFT nearest neighbour of each query keypoint among the candidate's keypoints, kept
   when it passes Lowe's ratio test (``RATIO``) and no other query keypoint claims the same candidate keypoint with a
   closer descriptor (one-to-one);
2. **a plausible transform**, the one of two 4-degree-of-freedom models, both fitted with RANSAC, whose inliers count
   most (their number times the weight of step 3):
   a similarity (rotation, uniform scale, translation: ``cv2.estimateAffinePartial2D``), and a *stretch* (a scale
   per image axis and a translation: ``stretch_inliers``), what a resize to another aspect ratio makes (a picture
   squashed into a square grid cell, a banner stretched to a card); its scale must lie within ``SCALE_RANGE``, a
   stretch's two scales within ``STRETCH_LIMIT`` of each other. 4 degrees of freedom against a homography's 8 or an
   affine map's 6: random matches agree with them far less often, and the copies users make (crops, resizes,
   rotations, pasting into a frame, padding, aspect changes) are one or the other. A mirrored copy is found by the
   mirrored query, matched against the first ``MIRROR_TOP`` candidates and those the mirrored query's visual words
   found (``copies.verified_ranking``);
3. **specific evidence**: an inlier keypoint of the query that is also an inlier with many *other* candidates is not
   evidence of a copy: it lies in something those images share with the query (the frame of a screenshot template,
   an avatar, a caption's glyphs, a watermark). Each inlier counts ``1 / n`` where ``n`` is the number of candidates
   for which that query keypoint is an inlier: the ``strength``. Measured on the copy-detection set, plain inlier
   counts made verification worse than none (mAP 0.67): two unrelated screenshots of one template share ~465 inliers.
   Candidates whose shared evidence was split this way keep only what is theirs alone. Copies of the whole query
   are the exception (``WHOLE_QUERY``: the match covers at least half of the query's keypoint hull and leaves no
   hole in it, no cell of a 4 x 4 grid over the query with keypoints and no inlier): a database with five copies of
   a photo split its keypoints five ways, and three of them went unverified. A screenshot frame shared by two
   screenshots leaves a hole where their pictures differ, so it is still split. Nor are *verified* copies counted
   against the candidates they leave unverified (those are weighed a second time without them): a keypoint that
   verified copies reproduce is the query's own content, not an element unrelated pictures share. A photo searched
   where its edits are stored (bench/unseen_edits.py the other way round: 22 edits of each original) found the one
   in a cell of a 2 x 2 grid verified for 13 of 60 originals, split among the other copies' matches; weighed
   without the verified ones, for 36. The sum is then weighted
   by the match's **hull density** (``FULL_DENSITY``): the inliers over the keypoints inside their convex hull, how
   much of the region the match spans it explains. A shared frame spans a whole page whose picture does not match.
   It is the query's density, or the candidate's where that is higher and the match covers a part of the candidate
   (its hull there at most ``PART_AREA`` of the picture): a database image that holds the query as a part of itself
   (the original of a small crop, a collage searched with one of its photos) keeps few keypoints of that part, and
   the detailed query has many there with nothing to match. A shared frame covers the whole candidate, so only the
   query's density counts for it. On the copy-detection set this lifted seed 1's small crops from AP 0.949 to 0.963,
   its µAP from 0.945 to 0.967 and seed 0's from 0.964 to 0.977; all-vs-all went from 0.893 / 0.940 to 0.896 / 0.944.
   The query's density is also divided by the candidate's **visible share** (``visible_share``, at least
   ``VISIBLE_FLOOR``): of the candidate's keypoints inside the match's hull, those large enough to be seen at all
   where the query shows the candidate smaller (their size over the match's scale at least SIFT's finest). A
   database image keeps its 256 strongest keypoints, mostly fine ones, and a query that holds it at half its size
   (a picture inset on another) cannot show those: a forest photo inset at 0.53x matched 36 of the 57 keypoints it
   could show, but the query has 192 keypoints there, so its density was 0.19 and its strength 0.3. Nor can the
   query show what an opaque overlay hides: a candidate keypoint counts as visible only where, mapped into the query
   by the match, it lands near a query keypoint (``shown_in_query``). A photo under opaque stripes over 40 % of it
   keeps its 512 keypoints in the rest, where the original has only 150 of its 256: 89 inliers, density 0.22,
   strength 4.4, not verified; with what the stripes hide left out, strength 12.
   Last, the sum is weighted by the match's **coverage** (``FULL_COVERAGE``): the area of the inliers' hull over the
   area of the hull of all the keypoints, on the side where that is larger. A copy covers most of one side at least
   (the query is a part of the candidate, or the candidate a part of the query); a match confined to a small part of
   both is an element they share (an avatar and a name above a post's picture, a logo, an emoji), not a copy. Taken
   against the keypoints' hull, not the picture, so a smooth picture with keypoints in one textured spot is not
   penalised. On the copy-detection set a captioned copy matched 10 inliers on a few glyphs of another picture's
   caption in the same font (coverage 0.01), and that picture had ranked above the original (seed 0 text + JPEG AP
   0.971 -> 0.986).
4. **clean, specific matches count in full**: noise, JPEG blocks and pixels give a query keypoints of their own that
   match nothing, so a copy's inliers are 10-20 % of the query's keypoints around them and the hull density made
   its strength 0.2-3: a copy of the coins photo under colour, contrast and JPEG 10 had 79 inliers of 85 tentative
   matches, density 0.19, strength 2.6, and no other candidate had any. A match is *clean* when it has at least
   ``CLEAN_INLIERS`` inliers and they are at least ``CLEAN_RATIO`` of its tentative matches (random agreement on a
   texture gives 10 inliers of 20-40); a clean match whose inliers are specific to its candidate (at most
   ``SPECIFIC_SHARE`` of them are other candidates' inliers too: a template frame shared by several screenshots is
   not) and that does not surround another candidate's verified match (``surrounds``: a frame or a background around
   the picture another candidate matches) counts with the coverage's weight alone, where that gives more. The clean
   transform need not be the one whose inliers count most by density: a stretched, pixelized copy matched 27 of its
   39 tentative matches on the stretch (density weight 0.002) and 10 on a similarity around a detail (0.06). On
   chained edits (DISC21-style, ``bench/chained_edits.py``) this verified copies under noise, JPEG 10, pixels and
   fading that had ranked 2nd-40th; the copy-detection protocol and all-vs-all did not move.

A candidate is ``verified`` when it has at least ``MIN_INLIERS`` inliers and a strength of at least ``MIN_STRENGTH``.
Its score (``Verification.scores``) grows with the strength up to ``STRENGTH_CERTAIN``, where a copy is certain
(on the copy-detection set's all-vs-all, 41 % of the verified copies had more and no verified non-copy more than
15), and certain copies are ordered by their cosine, how alike they are as a whole: the strength cannot order them,
since a crop's 256 keypoints are denser on the part it keeps and the query's keypoints there all have a partner,
so the original itself, whose 256 keypoints can answer only half of the query's 512, came after three crops of it
(strength 47 against 65-88 for the cat photo's 90, 80 and 70 % crops).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple, Sequence

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
PARTIAL_GAIN = 0.15  # the most an unverified candidate's score gains from the evidence it has (``partial_gain``)
SCALE_RANGE = (1 / 8, 8.0)  # candidate / query scale of the fitted similarity
REPROJECTION = 0.015  # RANSAC threshold, a fraction of the candidate image's longest side
RANSAC_ITERATIONS = 1000
STRETCH_LIMIT = 3.0  # a stretch's larger axis scale over its smaller one, at most
STRETCH_SAMPLES = 500  # RANSAC samples (pairs of matches) of the stretch model
STRETCH_SPAN = 0.02  # a sample's two query points lie at least this share of the query's longest side apart on each axis
FULL_DENSITY = 0.6  # hull density at which inliers count fully; below it they count (density / 0.6) ** 3
DENSITY_POWER = 3
FULL_COVERAGE = 0.1  # match coverage at which inliers count fully; below it they count coverage / 0.1
WHOLE_QUERY = 0.5  # a match covering this share of the query's keypoint hull, with no hole, copies the whole query
HOLE_GRID, HOLE_KEYPOINTS = 4, 8  # a hole: a cell of a 4 x 4 grid over the query's keypoints with 8 of them, no inlier
CLEAN_INLIERS = 10  # a clean match has at least this many inliers ...
CLEAN_RATIO = 0.5  # ... and they are at least this share of its tentative matches
SPECIFIC_SHARE = 0.2  # a clean match counts in full when at most this share of its inliers are other candidates' too
SURROUNDED_SHARE = 0.5  # ... and it does not surround another verified match: this share of its inliers inside its hull
PART_AREA = 0.5  # a match whose hull on the candidate covers at most this share of it is a part of the candidate
STRENGTH_HALF = 15.0  # the strength at which a verified score is half-way between 1 and 2
STRENGTH_CERTAIN = 40.0  # the strength from which a copy is certain: more orders nothing, the cosine does
COSINE_WEIGHT = 0.01  # the share of a verified score that is the candidate's cosine (the order of certain copies)
FINEST_SIZE = 1.8  # px: the smallest keypoint size SIFT gives (OpenCV's first octave, upsampled 2x)
VISIBLE_FLOOR = 0.2  # the query's density is divided by the candidate's visible share, at least this
SHOWN_RADIUS = 0.02  # a candidate keypoint is shown by the query with a query keypoint this near (of its extent)
BLOCK_KEYPOINTS = 4_096  # candidate keypoints matched per matrix product: 8 MB of similarities with 512 query keypoints


@dataclass(frozen=True)
class QueryLocalFeatures:
    """A query's local features and its mirror image's (``retrieval.descriptors.local_features.query_local_features``),
    and those of ``restored`` views of it (its picture filtered of impulse noise, or with stripes taken off), verified
    like ``direct``."""

    direct: LocalFeatures
    mirrored: LocalFeatures
    restored: tuple[LocalFeatures, ...] = ()

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

    def scores(self, cosines: np.ndarray | None = None) -> np.ndarray:
        """The fused score of verified candidates, in (1, 2): above every cosine, ``1 + s / (s + STRENGTH_HALF)`` with
        the strength ``s`` capped at ``STRENGTH_CERTAIN``, plus ``COSINE_WEIGHT`` x the candidate's cosine (K,)
        (clipped to 0..1; none given: 0), which orders the certain copies (see the module docstring)."""
        capped = np.minimum(self.strength, STRENGTH_CERTAIN)
        alike = 0.0 if cosines is None else np.clip(np.asarray(cosines, np.float64), 0.0, 1.0)
        return 1.0 + capped / (capped + STRENGTH_HALF) + COSINE_WEIGHT * alike


def _tentative_all(query: np.ndarray, candidates: Sequence[LocalFeatures]) -> list[tuple[np.ndarray, np.ndarray]]:
    """RootSIFT query (nq, 128) against every candidate -> per candidate (query indices, candidate indices) that pass
    the ratio test, one-to-one. The candidates, widest first, are padded into blocks of alike widths (a third of the
    database's pictures have fewer than half of the 256 keypoints) and matched with one matrix product per block."""
    from .matching import two_nearest  # numba: imported by the searches that verify, not by every pipeline

    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    out: list[tuple[np.ndarray, np.ndarray]] = [empty] * len(candidates)
    if max((len(c) for c in candidates), default=0) < 2 or len(query) == 0:
        return out
    order = sorted(range(len(candidates)), key=lambda i: -len(candidates[i]))
    start = 0
    while start < len(order):
        width = max(2, len(candidates[order[start]]))  # the widest candidate left
        block = order[start : start + max(1, BLOCK_KEYPOINTS // width)]
        start += len(block)
        # padding rows are zero: similarity 0, below every real RootSIFT pair (non-negative unit vectors), so it is never
        # a nearest neighbour and, as a second one, only for a candidate with one keypoint (which never has enough)
        padded = np.zeros((len(block), width, query.shape[1]), np.float32)
        for i, index in enumerate(block):
            padded[i, : len(candidates[index])] = as_root_sift(candidates[index].descriptors)
        # (k * width, nq): each candidate's rows together, so the two nearest are one pass over them (two_nearest)
        nearest, s1, s2 = two_nearest(padded.reshape(-1, query.shape[1]) @ query.T, width)  # each (k, nq)
        d1 = np.sqrt(np.maximum(2.0 - 2.0 * s1, 0.0))
        d2 = np.sqrt(np.maximum(2.0 - 2.0 * s2, 0.0))
        passed = d1 < RATIO * d2
        for i, index in enumerate(block):
            rows = np.flatnonzero(passed[i])
            if rows.size < MIN_TENTATIVE:
                continue
            # one-to-one: of the query keypoints claiming one candidate keypoint, the closest keeps it
            claims = rows[np.argsort(-s1[i, rows], kind="stable")]
            _, first_claim = np.unique(nearest[i, claims], return_index=True)
            kept = np.sort(claims[first_claim])
            out[index] = (kept, nearest[i, kept])
    return out


def similarity_inliers(query_points: np.ndarray, candidate_points: np.ndarray, threshold: float) -> np.ndarray | None:
    """Inlier mask (n,) of a plausible similarity transform from query to candidate points (n, 2), or None.
    ``threshold``: the reprojection error an inlier may have, candidate pixels."""
    import cv2

    matrix, mask = cv2.estimateAffinePartial2D(
        query_points.astype(np.float32), candidate_points.astype(np.float32), method=cv2.RANSAC,
        ransacReprojThreshold=threshold, maxIters=RANSAC_ITERATIONS, confidence=0.995,
    )
    if matrix is None or mask is None:
        return None
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    if not SCALE_RANGE[0] <= scale <= SCALE_RANGE[1]:
        return None
    return mask.ravel().astype(bool)


def _plausible_stretch(scale_x: np.ndarray, scale_y: np.ndarray) -> np.ndarray:
    """Which (scale_x, scale_y) pairs are a plausible stretch: positive (no flip), within ``STRETCH_LIMIT`` of each
    other, their geometric mean within ``SCALE_RANGE``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = scale_x / scale_y
        mean = np.sqrt(scale_x * scale_y)
        return ((scale_x > 0) & (scale_y > 0) & (ratio <= STRETCH_LIMIT) & (ratio >= 1 / STRETCH_LIMIT)
                & (mean >= SCALE_RANGE[0]) & (mean <= SCALE_RANGE[1]))


def line_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line through (x, y), n >= 2 points with x not all equal (what
    ``np.polyfit(x, y, 1)`` gives, without its SVD: a tenth of the time)."""
    dx = x - x.mean()
    slope = float(dx @ (y - y.mean()) / (dx @ dx))
    return slope, float(y.mean() - slope * x.mean())


@functools.lru_cache(maxsize=1024)
def sample_pairs(count: int, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """RANSAC's pairs of ``count`` matches (two int64 index arrays, read-only): every pair where there are at most
    ``samples`` of them, else ``samples`` pairs drawn with a fixed seed (the same points give the same answer)."""
    if count * (count - 1) // 2 <= samples:
        pairs = np.triu_indices(count, 1)
    else:
        rng = np.random.default_rng(0)
        pairs = rng.integers(0, count, samples), rng.integers(0, count, samples)
    for index in pairs:
        index.flags.writeable = False
    return pairs


def stretch_inliers(query_points: np.ndarray, candidate_points: np.ndarray, threshold: float,
                    samples: int = STRETCH_SAMPLES) -> np.ndarray | None:
    """Inlier mask (n,) of the best plausible stretch ``candidate = (sx * x + tx, sy * y + ty)`` from query to
    candidate points (n, 2), or None: RANSAC over every pair of matches, or ``samples`` pairs of them where there are
    more (a fixed seed: the same points give the same answer), then a least-squares refit of each axis on the
    inliers. ``threshold`` as ``similarity_inliers``."""
    from .matching import most_inliers

    query = np.ascontiguousarray(query_points, np.float64)  # one compiled signature of most_inliers
    candidate = np.ascontiguousarray(candidate_points, np.float64)
    count = len(query)
    if count < 2:
        return None
    first, second = sample_pairs(count, samples)
    span = query[first] - query[second]  # (samples, 2)
    usable = (np.abs(span) >= STRETCH_SPAN * max(np.ptp(query, axis=0).max(), 1.0)).all(axis=1)
    first, second, span = first[usable], second[usable], span[usable]
    scales = (candidate[first] - candidate[second]) / span  # (samples, 2): sx, sy
    plausible = _plausible_stretch(scales[:, 0], scales[:, 1])
    if not plausible.any():
        return None
    scales, first = scales[plausible], first[plausible]
    shifts = candidate[first] - scales * query[first]  # (samples, 2): tx, ty
    best = most_inliers(query, candidate, scales, shifts, threshold)
    across = scales[best, 0] * query[:, 0] + shifts[best, 0] - candidate[:, 0]
    down = scales[best, 1] * query[:, 1] + shifts[best, 1] - candidate[:, 1]
    mask = across * across + down * down < threshold * threshold
    if mask.sum() >= 3 and np.ptp(query[mask], axis=0).min() > 0:
        fit = [line_fit(query[mask, axis], candidate[mask, axis]) for axis in (0, 1)]
        if _plausible_stretch(np.array(fit[0][0]), np.array(fit[1][0])):
            predicted = np.stack([fit[axis][0] * query[:, axis] + fit[axis][1] for axis in (0, 1)], axis=1)
            refined = np.hypot(*(predicted - candidate).T) < threshold
            if refined.sum() >= mask.sum():
                mask = refined
    return mask


def _transforms(query_points: np.ndarray, candidate_points: np.ndarray, candidate_side: float) -> list[np.ndarray]:
    """The inlier masks of the plausible transforms (a similarity, a stretch) from query to candidate points; no
    stretch is fitted where the similarity leaves at most 2 matches out, or where there are too few matches to verify
    a candidate (``MIN_INLIERS``)."""
    threshold = max(2.0, REPROJECTION * candidate_side)
    similar = similarity_inliers(query_points, candidate_points, threshold)
    if len(query_points) < MIN_INLIERS or (similar is not None and similar.sum() >= len(similar) - 2):
        return [similar] if similar is not None else []
    masks = (similar, stretch_inliers(query_points, candidate_points, threshold))
    return [mask for mask in masks if mask is not None]


def inside_hull(points: np.ndarray, hull: np.ndarray) -> np.ndarray:
    """Which of ``points`` (n, 2) lie inside (or on) the convex polygon ``hull`` (m, 2), vertices in order."""
    from .matching import inside_convex

    if len(hull) < 3:
        return np.zeros(len(points), bool)
    return inside_convex(np.ascontiguousarray(points, np.float64), np.ascontiguousarray(hull, np.float64))


def inside_inliers_hull(points: np.ndarray, inliers: np.ndarray) -> tuple[np.ndarray, float]:
    """(Which of ``points`` (n, 2) lie inside the convex hull of ``points[inliers]``, bool (n,); the hull's area in
    square pixels): the region a match spans on one side (nothing for fewer than 3 inliers)."""
    import cv2

    inlier_points = points[inliers]
    if len(inlier_points) < 3:
        return np.zeros(len(points), bool), 0.0
    hull = cv2.convexHull(inlier_points.astype(np.float32)).reshape(-1, 2).astype(np.float64)
    return inside_hull(points.astype(np.float64), hull), float(cv2.contourArea(hull.astype(np.float32)))


def hull_density(inliers: int, inside: np.ndarray) -> float:
    """Inliers over the keypoints inside their convex hull (``inside``, from ``inside_inliers_hull``), at most 1: how
    much of the region the match spans it explains. A copy pasted into a frame explains its own region; a shared
    frame spans the whole picture, whose other content does not match. 0 for fewer than 3 inliers."""
    return min(1.0, inliers / max(int(inside.sum()), 1)) if inliers >= 3 else 0.0


def visible_share(sizes: np.ndarray, inside: np.ndarray, scale: float, shown: np.ndarray) -> float:
    """The share of a candidate's keypoints inside the match's hull (``inside``) that the query could have matched:
    large enough to be seen at all at the match's ``scale`` (candidate / query: ``sizes`` (px) over it at least SIFT's
    finest, ``FINEST_SIZE``), and ``shown`` by the query (``shown_in_query``); 1 where none is inside."""
    count = int(inside.sum())
    return float((inside & shown & (sizes / scale >= FINEST_SIZE)).sum()) / count if count else 1.0


def shown_in_query(query_points: np.ndarray, query_inliers: np.ndarray, candidate_points: np.ndarray,
                   candidate_inliers: np.ndarray, tested: np.ndarray | None = None) -> np.ndarray:
    """Which candidate keypoints (n,) the query shows: mapped into the query by the affine map fitted (least
    squares) to the match's inliers, they land within ``SHOWN_RADIUS`` of the query's longest keypoint extent of a
    query keypoint. Those that land on flat query pixels are hidden (under an opaque overlay: stripes, a box).
    ``tested`` (bool (n,), default all): the keypoints to test; the others are False."""
    shown = np.zeros(len(candidate_points), bool)
    chosen = np.arange(len(candidate_points)) if tested is None else np.flatnonzero(tested)
    if not len(chosen):
        return shown
    from .matching import near_any

    source = np.c_[candidate_points[candidate_inliers].astype(np.float64), np.ones(len(candidate_inliers))]
    affine, *_ = np.linalg.lstsq(source, query_points[query_inliers].astype(np.float64), rcond=None)
    mapped = np.c_[candidate_points[chosen].astype(np.float64), np.ones(len(chosen))] @ affine
    points = np.ascontiguousarray(query_points, np.float64)
    radius = SHOWN_RADIUS * float(np.ptp(points, axis=0).max())
    shown[chosen] = near_any(mapped, points, radius)
    return shown


def density_and_coverage(query: LocalFeatures, query_inliers: np.ndarray, query_extent: float,
                         candidate: LocalFeatures, candidate_inliers: np.ndarray) -> tuple[float, float, float]:
    """(The hull density of a match, its coverage, its coverage of the query where it leaves no hole there (else
    0)). The density is the query's, divided by the candidate's ``visible_share`` (at least ``VISIBLE_FLOOR``), or
    the candidate's where that is higher and its hull covers at most ``PART_AREA`` of the candidate picture; the
    match's scale is the median ratio of its inliers' keypoint sizes. A side's coverage is the inliers' hull area
    over the hull area of all that side's keypoints (``query_extent``: the query's, square pixels), the match's the
    larger of the two; a hole is ``has_hole``'s. See the module docstring."""
    query_points = np.asarray(query.keypoints[:, :2], np.float32)
    candidate_points = np.asarray(candidate.keypoints[:, :2], np.float32)
    candidate_sizes = np.asarray(candidate.keypoints[:, 2], np.float32)
    query_sizes = np.asarray(query.keypoints[query_inliers, 2], np.float32)
    scale = float(np.median(candidate_sizes[candidate_inliers] / np.maximum(query_sizes, 1e-3)))
    query_inside, query_area = inside_inliers_hull(query_points, query_inliers)
    candidate_inside, candidate_area = inside_inliers_hull(candidate_points, candidate_inliers)
    shown = shown_in_query(query_points, query_inliers, candidate_points, candidate_inliers, tested=candidate_inside)
    visible = max(visible_share(candidate_sizes, candidate_inside, scale, shown), VISIBLE_FLOOR)
    query_density = min(1.0, hull_density(len(query_inliers), query_inside) / visible)
    width, height = candidate.size
    if candidate_area <= PART_AREA * width * height:
        density = max(query_density, hull_density(len(candidate_inliers), candidate_inside))
    else:
        density = query_density
    query_coverage = min(1.0, query_area / max(query_extent, 1.0))
    coverage = max(query_coverage, min(1.0, candidate_area / max(hull_area(candidate_points), 1.0)))
    return density, coverage, 0.0 if has_hole(query_points, query_inliers) else query_coverage


def has_hole(points: np.ndarray, inliers: np.ndarray, grid: int = HOLE_GRID, min_keypoints: int = HOLE_KEYPOINTS) -> bool:
    """Whether a cell of a ``grid`` x ``grid`` division of the keypoints' bounding box (``points`` (n, 2)) holds at
    least ``min_keypoints`` keypoints and none of the ``inliers`` (indices): a region of the picture the match leaves
    out (the picture inside a shared screenshot frame)."""
    low, high = points.min(axis=0), points.max(axis=0)
    cells = np.minimum(((points - low) / np.maximum(high - low, 1e-6) * grid).astype(int), grid - 1)
    index = cells[:, 1] * grid + cells[:, 0]
    keypoints = np.bincount(index, minlength=grid * grid)
    matched = np.bincount(index[inliers], minlength=grid * grid)
    return bool(((keypoints >= min_keypoints) & (matched == 0)).any())


def hull_area(points: np.ndarray) -> float:
    """The area of the convex hull of ``points`` (n, 2), square pixels (0 for fewer than 3)."""
    import cv2

    if len(points) < 3:
        return 0.0
    return float(cv2.contourArea(cv2.convexHull(np.asarray(points, np.float32))))


def match_weight(density: float, coverage: float) -> float:
    """How fully a match's inliers count: ``min(1, density / FULL_DENSITY) ** DENSITY_POWER``, times
    ``min(1, coverage / FULL_COVERAGE)``."""
    return min(1.0, density / FULL_DENSITY) ** DENSITY_POWER * min(1.0, coverage / FULL_COVERAGE)


class Match(NamedTuple):
    """A plausible transform between the query and one candidate: the query keypoint indices that are its inliers,
    how fully they count (``match_weight``), the share of the query's keypoint hull they cover where they leave no
    hole in it (0 where they do), how fully they count where they are specific to this candidate (``_strength``:
    for a ``clean`` match the coverage's weight alone, else ``weight``), and whether it is clean."""

    query_inliers: np.ndarray  # int64 (n,)
    weight: float
    whole_coverage: float
    specific_weight: float
    clean: bool = False  # at least CLEAN_INLIERS inliers, and at least CLEAN_RATIO of the tentative matches

    @property
    def copies_query(self) -> bool:
        """The candidate is, or holds, a copy of the whole query (``WHOLE_QUERY`` of it, no hole)."""
        return self.whole_coverage >= WHOLE_QUERY

    @property
    def inliers(self) -> int:
        return len(self.query_inliers)


NO_MATCH = Match(np.zeros(0, np.int64), 0.0, 0.0, 0.0)


class Candidate(NamedTuple):
    """One candidate's matches (``_matches``): the ``best`` (its inliers' number times their weight is the largest)
    and the ``clean`` one with the most inliers (``NO_MATCH`` where no transform is clean; the same where the best
    is clean)."""

    best: Match
    clean: Match


def _matches(query: LocalFeatures, candidates: Sequence[LocalFeatures]) -> list[Candidate]:
    """Per candidate, the ``Candidate`` of its plausible transforms."""
    out = [Candidate(NO_MATCH, NO_MATCH)] * len(candidates)
    if len(query) < MIN_TENTATIVE:
        return out
    points = np.asarray(query.keypoints[:, :2], np.float32)
    extent = hull_area(points)
    for i, (q_idx, c_idx) in enumerate(_tentative_all(as_root_sift(query.descriptors), candidates)):
        if len(q_idx) < MIN_TENTATIVE:
            continue
        candidate = candidates[i]
        best = clean = NO_MATCH
        for mask in _transforms(points[q_idx], np.asarray(candidate.keypoints[c_idx, :2], np.float32), max(candidate.size)):
            if mask.sum() < MIN_TENTATIVE:
                continue
            density, coverage, whole_coverage = density_and_coverage(query, q_idx[mask], extent, candidate, c_idx[mask])
            weight = match_weight(density, coverage)
            is_clean = bool(mask.sum() >= max(CLEAN_INLIERS, CLEAN_RATIO * len(q_idx)))
            match = Match(q_idx[mask], weight, whole_coverage, match_weight(1.0, coverage) if is_clean else weight, is_clean)
            if match.inliers * match.weight > best.inliers * best.weight:
                best = match
            if is_clean and match.inliers > clean.inliers:
                clean = match
        out[i] = Candidate(best, clean)
    return out


def _strength(candidates: list[Candidate], query_points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per candidate (strength, inliers of the match it comes from). Each inlier of its best match is weighted
    1 / (how many candidates' best matches hold that query keypoint), times the match's weight; a candidate that
    copies the whole query (``Match.copies_query``) is not counted against the others. Its clean match, where its
    inliers are specific to it (at most ``SPECIFIC_SHARE`` of them are in other candidates' best matches) and it does
    not surround another candidate's verified match (``surrounds``), counts with its ``specific_weight`` instead
    where that gives more (see the module docstring). Then the candidates this leaves unverified are weighed again
    with the verified ones not counted against them: a keypoint that verified copies reproduce is the query's own
    content, not an element that unrelated pictures share. ``query_points`` (n, 2)."""
    best = [c.best for c in candidates]
    splitting = np.array([not m.copies_query for m in best], bool)
    strength, inliers, verified = _weighed(candidates, splitting, query_points)
    unverified = ~verified
    if verified.any() and unverified.any():
        again, again_inliers, _ = _weighed(candidates, splitting & unverified, query_points, np.flatnonzero(verified))
        better = unverified & (again > strength)
        strength[better], inliers[better] = again[better], again_inliers[better]
    return strength, inliers


def is_verified(inliers: np.ndarray, strength: np.ndarray) -> np.ndarray:
    """bool (K,): at least ``MIN_INLIERS`` inliers and a strength of at least ``MIN_STRENGTH``."""
    return (inliers >= MIN_INLIERS) & (strength >= MIN_STRENGTH)


def partial_gain(strength: np.ndarray, verified: np.ndarray) -> np.ndarray:
    """(K,) score increments of the candidates not ``verified``: ``PARTIAL_GAIN`` x sqrt(strength / MIN_STRENGTH), at
    most ``PARTIAL_GAIN``; 0 for verified ones and for those with no specific evidence.

    A copy that falls short of verification (a smooth wallpaper's few keypoints under emoji, stripes or a new aspect
    ratio: 6-9 inliers, strength 0.1-7) still has evidence that unrelated pictures almost never have: on AugLy's
    edits (``bench/augly_edits.py``, both seeds) 39 of the 122 unverified originals among the verified candidates
    had a strength above 0, and 13 of ~57,000 unverified other candidates; five originals ranked 2nd-4th behind
    look-alikes 0.017-0.113 ahead of them in cosine, with strengths 0.22-4.98. The square root gives a little
    evidence most of its weight (strength 0.2: 0.03)."""
    strength = np.clip(np.nan_to_num(np.asarray(strength, np.float64)), 0.0, MIN_STRENGTH)
    return np.where(np.asarray(verified, bool), 0.0, PARTIAL_GAIN * np.sqrt(strength / MIN_STRENGTH))


def _holders(best: Sequence[Match], counted: np.ndarray, keypoints: int) -> np.ndarray:
    """float64 (keypoints,): per query keypoint, how many of the ``counted`` candidates' best matches hold it."""
    shared = np.zeros(max(keypoints, 1), np.float64)
    for match, count in zip(best, counted):
        if count:
            shared[match.query_inliers] += 1.0
    return shared


def _weighed(candidates: list[Candidate], counted: np.ndarray, query_points: np.ndarray,
             verified: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``_strength``'s weighing, each inlier shared with the ``counted`` candidates (bool (K,)) that hold it: (strength,
    inliers, verified) per candidate; ``verified`` (indices): the verified matches a clean match must not surround
    (default: those its best matches verify)."""
    best = [c.best for c in candidates]
    shared = _holders(best, counted, len(query_points))
    strength = np.array([
        float(np.sum(1.0 / np.maximum(shared[m.query_inliers] + m.copies_query, 1.0))) * m.weight for m in best
    ])
    inliers = np.array([m.inliers for m in best], np.int64)
    if verified is None:
        verified = np.flatnonzero(is_verified(inliers, strength))
    for i, (own, clean) in enumerate(candidates):
        if not clean.clean:
            continue
        others = shared[clean.query_inliers] - np.isin(clean.query_inliers, own.query_inliers) * counted[i]
        if float(np.mean(others > 0)) > SPECIFIC_SHARE:
            continue
        if surrounds(query_points, clean.query_inliers, [best[j].query_inliers for j in verified if j != i]):
            continue
        specific = float(np.sum(1.0 / (others + 1.0))) * clean.specific_weight
        if specific > strength[i]:
            strength[i], inliers[i] = specific, clean.inliers
    return strength, inliers, is_verified(inliers, strength)


def surrounds(points: np.ndarray, inliers: np.ndarray, others: Sequence[np.ndarray]) -> bool:
    """Whether the hull of a match's ``inliers`` (indices into ``points`` (n, 2)) holds at least ``SURROUNDED_SHARE``
    of the inliers of one of the ``others`` (index arrays) that are not its own: the match is the context around
    another copy (a shared frame around the picture another candidate matches, a background the copy was pasted on)."""
    if not others:
        return False
    inside, _ = inside_inliers_hull(points, inliers)
    inside[inliers] = False
    return any(len(other) and float(np.mean(inside[other])) >= SURROUNDED_SHARE for other in others)


def verify(
    query: QueryLocalFeatures, candidates: Sequence[LocalFeatures], mirror: Sequence[bool] | None = None
) -> Verification:
    """Verify every candidate against the query (and its ``restored`` views), and those ``mirror`` marks (default:
    the first ``MIRROR_TOP``) against its mirror image too (see the module docstring); each candidate keeps the
    strongest."""
    count = len(candidates)
    inliers = np.zeros(count, np.int64)
    strength = np.zeros(count, np.float64)
    mirrored = np.zeros(count, bool)
    checked_mirror = np.arange(count) < MIRROR_TOP if mirror is None else np.asarray(mirror, bool).reshape(count)
    for is_mirror, side in ((False, query.direct), (True, query.mirrored), *((False, view) for view in query.restored)):
        rows = np.flatnonzero(checked_mirror) if is_mirror else np.arange(count)
        found = [Candidate(NO_MATCH, NO_MATCH)] * count
        for row, candidate in zip(rows, _matches(side, [candidates[i] for i in rows])):
            found[row] = candidate
        weighted, raw = _strength(found, np.asarray(side.keypoints[:, :2], np.float32))
        better = weighted > strength
        strength = np.where(better, weighted, strength)
        inliers = np.where(better, raw, inliers)
        mirrored = np.where(better, is_mirror, mirrored)
    verified = is_verified(inliers, strength)
    return Verification(inliers, strength, mirrored, verified)
