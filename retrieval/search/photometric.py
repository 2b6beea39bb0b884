"""The photometric check of copy search: does a candidate's colour thumbnail contain the query's (or the query's
contain the candidate's), shifted and scaled? For the copies SIFT cannot verify (smooth and blurred pictures,
``retrieval.descriptors.thumbnails``). Numpy in, numpy out; OpenCV's normalised cross-correlation.

``similarity(query, candidate)`` slides the query's thumbnail, at ``SCALES`` of its size, over the candidate's (a
crop of the candidate, the same picture, a smaller copy), or the candidate's over the query's when no scale of the
query fits (the query is the wider or the taller), and returns the best zero-mean normalised cross-correlation over
the three colour channels, in [-1, 1]: 1 for the same picture, lower for a crop that is not among the scales tried.

Each of the first ``CHECK_TOP`` candidates (in ranking order) that the verification did not confirm gains
``boost(likeness)`` (``likeness``: the query's thumbnail, or its mirror image at ``MIRRORED_SIMILARITY``): nothing below
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
MIN_SIDE = 4  # pixels: a thumbnail scaled below this is not compared
MIN_SIMILARITY = 0.9
MIRRORED_SIMILARITY = 0.95  # the query's mirror image counts from here (see ``likeness``) ...
MIRRORED_MARGIN = 0.05  # ... and where it is this much more like the candidate than the query itself
CHECK_TOP = 30  # the first CHECK_TOP unverified candidates of the ranking are checked
MAX_BOOST = 0.2


def similarity(query: np.ndarray, candidate: np.ndarray) -> float:
    """Two uint8 RGB thumbnails (h, w, 3) -> the best normalised cross-correlation of the query, at ``SCALES``, inside
    the candidate (a crop of it, the same picture, a smaller copy); when no scale fits (the query is the wider or the
    taller), of the candidate inside the query. -1 when neither fits; a flat thumbnail correlates 0 with anything."""
    query = np.asarray(query, np.float32)
    candidate = np.asarray(candidate, np.float32)
    best = _best_inside(query, candidate)
    return best if best > -1.0 else _best_inside(candidate, query)


def likeness(query: np.ndarray, candidates: Sequence[np.ndarray]) -> float:
    """The best ``similarity`` of the query thumbnail to any of a candidate's ``candidates`` thumbnails, or of its
    mirror image (a mirrored copy, as verification tries the mirrored query) where that reaches
    ``MIRRORED_SIMILARITY`` and beats the query itself by ``MIRRORED_MARGIN``; -1 for none. Two views are two
    chances for a look-alike: mirrored, smooth pictures of one kind reached 0.90-0.93 (on the copy-detection set, and
    tests/test_photometric.py's misty pictures), and a picture that is its own mirror image (a striped wallpaper)
    gains nothing from it but that chance; the mirrored copies the bench sets make score 0.96-1.00."""
    query = np.asarray(query)
    direct = max((similarity(query, thumbnail) for thumbnail in candidates), default=-1.0)
    mirrored = max((similarity(np.ascontiguousarray(query[:, ::-1]), t) for t in candidates), default=-1.0)
    return mirrored if mirrored >= max(MIRRORED_SIMILARITY, direct + MIRRORED_MARGIN) else direct


def _best_inside(small: np.ndarray, large: np.ndarray) -> float:
    import cv2

    if float(small.std()) < 1e-3 or float(large.std()) < 1e-3:
        return 0.0
    best = -1.0
    for scale in SCALES:
        height, width = round(small.shape[0] * scale), round(small.shape[1] * scale)
        if min(height, width) < MIN_SIDE or height > large.shape[0] or width > large.shape[1]:
            continue
        template = small if scale == 1.0 else cv2.resize(small, (width, height), interpolation=cv2.INTER_AREA)
        best = max(best, float(np.nan_to_num(cv2.matchTemplate(large, template, cv2.TM_CCOEFF_NORMED), nan=0.0).max()))
    return best


def boost(similarities: np.ndarray) -> np.ndarray:
    """(K,) similarities -> (K,) score increments: 0 below ``MIN_SIMILARITY``, rising linearly to ``MAX_BOOST`` at 1."""
    values = np.asarray(similarities, np.float64)
    return np.where(values >= MIN_SIMILARITY, MAX_BOOST * (values - MIN_SIMILARITY) / (1 - MIN_SIMILARITY), 0.0)
