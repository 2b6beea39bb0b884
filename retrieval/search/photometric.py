"""The photometric check of copy search: does a candidate's colour thumbnail contain the query's (or the query's
contain the candidate's), shifted and scaled? For the copies SIFT cannot verify (smooth and blurred pictures,
``retrieval.descriptors.thumbnails``). Numpy in, numpy out; OpenCV's normalised cross-correlation
(``matching.best_correlation``, the same without OpenCV's set-up per call).

``similarity(query, candidate)`` slides the query's thumbnail, at ``SCALES`` of its size, over the candidate's (a
crop of the candidate, the same picture, a smaller copy), or the candidate's over the query's when no scale of the
query fits (the query is the wider or the taller), and returns the best zero-mean normalised cross-correlation over
the three colour channels, in [-1, 1]: 1 for the same picture, lower for a crop that is not among the scales tried.

Each of the first ``CHECK_TOP`` candidates (in ranking order) that the verification did not confirm, and each
that ``ThumbnailSearch`` finds in the whole database, gains ``boost(likeness)`` (``likeness``: the query's thumbnail,
or its mirror image, upside down or turned half at ``MIRRORED_SIMILARITY``): nothing below
``MIN_SIMILARITY``, up to ``MAX_BOOST`` at 1. A cosine plus that stays below every verified score (at least 1.25),
and passes look-alikes whose cosine is at most ``MAX_BOOST`` higher. The first unverified ones, not the unverified
among the first ten: a photo searched among many verified copies of it (where was it used?) had its noisy copies,
which SIFT cannot verify, below the first ten, and never checked; with the first 30 checked instead of 10, such
a search finds its noisy copies among the first 22 for 95 % of the photos instead of 82-87 % (``bench/unseen_edits.py``,
reverse), and no copy-detection score moved down. Measured on the copy-detection set (seed 0, the top 10
unverified candidates of every query): the originals of the copies SIFT missed scored 0.94-1.00; of the 3,300
unverified non-originals of queries that are not screenshots, 7 scored above 0.9. Whole screenshots correlate
with one another through their shared frame, so a screenshot is compared as the picture inside it (its query
thumbnail is that picture's, and a database page stores its picture's thumbnail beside its own).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

SCALES = (1.0, 0.9, 0.8, 0.7, 0.6)  # sizes of the smaller thumbnail tried inside the larger one
FLIPPED_SCALES = (1.0,)  # ... for the query upside down or turned half: whole pictures only (see ``likeness``)
MIN_SIDE = 4  # pixels: a thumbnail scaled below this is not compared
MIN_SIMILARITY = 0.9
MIRRORED_SIMILARITY = 0.95  # the query's mirror image counts from here (see ``likeness``) ...
MIRRORED_MARGIN = 0.05  # ... and where it is this much more like the candidate than the query itself
CHECK_TOP = 30  # the first CHECK_TOP unverified candidates of the ranking are checked
MAX_BOOST = 0.2
SEARCH_SIDE = 16  # ``ThumbnailSearch``: every thumbnail squashed to a square of this side ...
SEARCH_TOP = 5  # ... and the images of the best SEARCH_TOP correlations of MIN_SIMILARITY or more checked too


def similarity(query: np.ndarray, candidate: np.ndarray, scales: Sequence[float] = SCALES) -> float:
    """Two uint8 RGB thumbnails (h, w, 3) -> the best normalised cross-correlation of the query, at ``scales`` of its
    size, inside the candidate (a crop of it, the same picture, a smaller copy); when no scale fits (the query is the
    wider or the taller), of the candidate inside the query. -1 when neither fits; a flat thumbnail correlates 0 with
    anything."""
    query = np.asarray(query, np.float32)
    candidate = np.asarray(candidate, np.float32)
    best = _best_inside(query, candidate, scales)
    return best if best > -1.0 else _best_inside(candidate, query, scales)


def likeness(query: np.ndarray, candidates: Sequence[np.ndarray]) -> float:
    """The best ``similarity`` of the query thumbnail to any of a candidate's ``candidates`` thumbnails, or of its
    mirror image, of it upside down or turned half (a mirrored or flipped copy: verification tries the mirrored
    query, SIFT turns with the picture) where that reaches ``MIRRORED_SIMILARITY`` and beats the query itself by
    ``MIRRORED_MARGIN``; -1 for none. More views are more chances for a look-alike: mirrored, smooth pictures of one
    kind reached 0.90-0.93 (on the copy-detection set, and tests/test_photometric.py's misty pictures), and a picture
    that is its own mirror image (a striped wallpaper) gains nothing from it but that chance; the mirrored copies the
    bench sets make score 0.96-1.00, an AugLy ``vflip`` of a wallpaper shrunk to 82 px 0.99. The flipped views are
    tried as whole pictures (``FLIPPED_SCALES``): at every scale, flipped parts of a clock photo's tiles matched its
    other tiles (bench.quality's hard near-duplicates, all-vs-all: 0.9307 -> 0.9295 mAP; whole: 0.9305)."""
    query = np.asarray(query)
    direct = max((similarity(query, thumbnail) for thumbnail in candidates), default=-1.0)
    views = [(query[:, ::-1], SCALES), (query[::-1], FLIPPED_SCALES), (query[::-1, ::-1], FLIPPED_SCALES)]
    mirrored = max((similarity(np.ascontiguousarray(view), t, scales) for view, scales in views for t in candidates),
                   default=-1.0)
    return mirrored if mirrored >= max(MIRRORED_SIMILARITY, direct + MIRRORED_MARGIN) else direct


def _best_inside(small: np.ndarray, large: np.ndarray, scales: Sequence[float]) -> float:
    import cv2

    from .matching import best_correlation  # numba: OpenCV's matchTemplate, without its set-up per call

    if float(small.std()) < 1e-3 or float(large.std()) < 1e-3:
        return 0.0
    best = -1.0
    for scale in scales:
        height, width = round(small.shape[0] * scale), round(small.shape[1] * scale)
        if min(height, width) < MIN_SIDE or height > large.shape[0] or width > large.shape[1]:
            continue
        template = small if scale == 1.0 else cv2.resize(small, (width, height), interpolation=cv2.INTER_AREA)
        best = max(best, best_correlation(np.ascontiguousarray(template), large))
    return best


def boost(similarities: np.ndarray) -> np.ndarray:
    """(K,) similarities -> (K,) score increments: 0 below ``MIN_SIMILARITY``, rising linearly to ``MAX_BOOST`` at 1."""
    values = np.asarray(similarities, np.float64)
    return np.where(values >= MIN_SIMILARITY, MAX_BOOST * (values - MIN_SIMILARITY) / (1 - MIN_SIMILARITY), 0.0)


def squashed(thumbnail: np.ndarray) -> np.ndarray:
    """uint8 RGB (h, w, 3) -> float32 (``SEARCH_SIDE`` ** 2 * 3,): squashed to a ``SEARCH_SIDE`` square (area filter),
    zero-mean per channel, unit norm (zeros for a flat one). The dot product of two is their normalised
    cross-correlation with the whole pictures laid over each other, whatever their aspects."""
    import cv2

    values = cv2.resize(np.asarray(thumbnail, np.float32), (SEARCH_SIDE, SEARCH_SIDE), interpolation=cv2.INTER_AREA)
    values -= values.mean(axis=(0, 1))
    norm = float(np.linalg.norm(values))
    return (values / norm).ravel() if norm > 1e-3 else np.zeros(values.size, np.float32)


class ThumbnailSearch:
    """Where the photometric check looks beyond the ranking's head: the images with a thumbnail (any of theirs: the
    picture, a page's picture) whose ``squashed`` form correlates with the query's, or with its mirror image, upside
    down or turned half (as ``likeness`` tries them), at ``MIN_SIMILARITY`` or more. A whole smooth picture under
    noise, blurred or shrunk to a few dozen pixels has no keypoints to verify, and its CNN descriptor, after such
    edits, ranks it among unrelated pictures (a pastel wallpaper under Gaussian noise: 338th); the layout of its
    colours survives them. The squashed thumbnails stay in memory, (M, 768) float32 (3 KB each); a query's four
    views against them are one matrix product."""

    def __init__(self, vectors: np.ndarray, image: np.ndarray):
        self.vectors = np.asarray(vectors, np.float32)  # (M, SEARCH_SIDE ** 2 * 3), ``squashed`` thumbnails
        self.image = np.asarray(image, np.int64)  # (M,) the database row of each

    @classmethod
    def of(cls, thumbnails: np.ndarray, sizes: np.ndarray, image: np.ndarray) -> "ThumbnailSearch":
        """From the stored thumbnails (``storage.copy_features.CopyFeatures``): uint8 (M, T, T, 3) zero-padded,
        (M, 2) width and height, (M,) database rows."""
        vectors = [squashed(thumbnail[:height, :width]) for thumbnail, (width, height) in zip(thumbnails, sizes)]
        return cls(np.stack(vectors) if vectors else np.zeros((0, SEARCH_SIDE**2 * 3), np.float32), image)

    def top(self, thumbnail: np.ndarray, count: int = SEARCH_TOP, exclude: int | None = None) -> np.ndarray:
        """A query's uint8 RGB thumbnail -> int64 database rows (at most ``count``, best first) of the images it (or
        one of its flips) correlates with at ``MIN_SIMILARITY`` or more; ``exclude``: a row never returned."""
        thumbnail = np.asarray(thumbnail)
        flips = (thumbnail, thumbnail[:, ::-1], thumbnail[::-1], thumbnail[::-1, ::-1])
        correlations = (np.stack([squashed(np.ascontiguousarray(flip)) for flip in flips]) @ self.vectors.T).max(axis=0)
        best = np.full(int(self.image.max(initial=-1)) + 1, -1.0, np.float32)
        np.maximum.at(best, self.image, correlations)
        if exclude is not None and 0 <= exclude < len(best):
            best[exclude] = -1.0
        rows = np.argsort(-best, kind="stable")[:count]
        return rows[best[rows] >= MIN_SIMILARITY].astype(np.int64)
