"""Copy search: several vectors per image and per query, aggregated to images, then geometric verification.

A query is a ``QueryFeatures``: its global descriptor, optionally its windows (``retrieval.descriptors.regions``:
parts of the query encoded like whole images) and its local features. Against a database with copy features
(``retrieval.storage.copy_features``) the score of image ``i`` is the best of

* global query . global image          (the backend: exact, faiss or Milvus)
* each query window . global image     (the same backend; a window's cosines times its weight: the whole page of a
                                        screenshot counts less than the photo inside it)
* global query . each region of image  (the backend's region search, ``backends.regions``: exact in memory, a faiss
                                        index or a Milvus collection of their own; a crop meets the part it was cut from)

so several vectors stand for one image and the results are always images (each at most once). Taking the maximum
keeps the ranking of the global descriptor wherever the regions do not match better. Before the maximum, each
window's cosines are lowered by what its ``background`` (its 6th best cosine) exceeds the global search's
(``calibrated``): a window that many unrelated images resemble (a flat sky, a texture, noise) gives each of them a
high cosine, which says less than the same cosine through the whole query. A whole view beside the query's vector
(the query with its stripes filled in: ``QueryFeatures.window_parts``) keeps its cosines. Then, when verification is on,
the best ``verify_top`` images, and the best of a search over the local features themselves that are not among
them (``visual_words``), are verified with local features (``verification.verify``) and a verified image
scores ``1 + strength / (strength + 15)`` (the strength capped at 40, where a copy is certain) plus a hundredth of
its cosine, which orders the certain copies, above every unverified cosine; unverified ones keep their score, plus
what the inliers they have add (``verification.partial_gain``: a copy whose few inliers fall short of verification), and,
for the first ``photometric.CHECK_TOP`` of them and for the images whose thumbnails a search over all of them finds
(``photometric.ThumbnailSearch``, verified too), what their colour thumbnail's likeness to the query's adds
(``photometric``: the copies of smooth, blurred and noisy pictures, which have no keypoints to verify); the two
together at most ``photometric.MAX_BOOST``.

Each of these is a ranked list of images, as deep as the verification needs (``verify_top``), so the fused top of
the ranking is the same as if every image were scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..descriptors.local_features import LocalFeatures, mirrored
from ..descriptors.regions import PAGE_WEIGHT
from ..errors import RetrievalError
from . import photometric
from .verification import MIRROR_TOP, VERIFY_TOP, QueryLocalFeatures, partial_gain, verify

BACKGROUND_RANK = 5  # ``background``: a list's 6th best score


@dataclass(frozen=True)
class QueryFeatures:
    """What a copy search compares: ``vector`` (D,) the extractor descriptor, ``windows`` (W, D) descriptors of parts of
    the query (or None), ``local`` its local features and its mirror image's (or None). ``window_weights`` (W,) scale
    each window's cosines before they are fused (None: all 1): a view dominated by page furniture counts for less.
    ``window_parts`` (W,) bool: whether a window's cosines are ``calibrated`` (None: all are); False for another view
    of the whole query (the query with its stripes filled in), which stands beside ``vector``."""

    vector: np.ndarray
    windows: np.ndarray | None = None
    local: QueryLocalFeatures | None = None
    window_weights: np.ndarray | None = None
    window_parts: np.ndarray | None = None


class NoLocalFeatures(RetrievalError):
    """Verification asked of a database stored without local features."""

    kind = "invalid"


NO_LOCAL_FEATURES = (
    "this index has no local features, so results cannot be verified: rebuild it with index.py --preset "
    "copy-detection (or --local-features --rebuild), or search without verification"
)


def stored_query(vector: np.ndarray, copies, row: int) -> QueryFeatures:
    """A database image as a query (search by id, the evaluator's database queries): its stored global vector, its
    regions in place of windows, its stored local features and their mirror image (``local_features.mirrored``: the
    descriptors' bins permuted, no pixels needed). A page around a
    picture is searched as that picture (its last region), the page's own vectors weighted ``PAGE_WEIGHT``, as an
    uploaded screenshot is (``RetrievalEngine.query_features``)."""
    vector = np.asarray(vector, np.float32)
    windows = np.asarray(copies.regions_of(row), np.float32) if copies is not None and copies.has_regions else None
    local = None
    if copies is not None and copies.has_local:
        stored = copies.local_of(row)
        local = QueryLocalFeatures(stored, mirrored(stored))
    if windows is not None and copies.is_page(row):
        page_views = np.concatenate([vector[None], windows[:-1]])
        weights = np.full(len(page_views), PAGE_WEIGHT, np.float32)
        return QueryFeatures(windows[-1], page_views, local, weights)
    return QueryFeatures(vector, windows, local)


def fuse(count: int, lists: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """(count,) image scores: the maximum over ranked lists (rows, scores; -1 padded), -inf for images in none."""
    scores = np.full(count, -np.inf, np.float32)
    for rows, values in lists:
        found = rows >= 0
        np.maximum.at(scores, rows[found], values[found].astype(np.float32))
    return scores


def background(scores: np.ndarray, rank: int = BACKGROUND_RANK) -> float:
    """A ranked list's background: its score at 0-based ``rank`` (the last finite one in a shorter list; 0 in an empty
    one), what an unrelated image can reach through that list."""
    finite = np.asarray(scores, np.float64)
    finite = finite[np.isfinite(finite)]
    return float(finite[min(rank, len(finite) - 1)]) if len(finite) else 0.0


def calibrated(
    lists: Sequence[tuple[np.ndarray, np.ndarray]], reference: np.ndarray, parts: np.ndarray | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """A query's window lists (rows, scores) -> the same lists, each one's scores lowered by what its ``background``
    exceeds that of ``reference`` (the global search's scores), never raised: a window that many unrelated images
    resemble (a flat sky, a texture, noise) gives them all high cosines, which say less than the same cosine through
    the whole query. ``parts`` (W,) bool: the lists to calibrate (``QueryFeatures.window_parts``; None: all)."""
    floor = background(reference)
    lowered = []
    for j, (rows, scores) in enumerate(lists):
        excess = max(0.0, background(scores) - floor) if parts is None or parts[j] else 0.0
        lowered.append((rows, scores - np.float32(excess) if excess else scores))
    return lowered


def weighted_lists(rows: np.ndarray, scores: np.ndarray, weights: np.ndarray | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """One query's window searches (W, k) rows and scores -> W ranked lists for ``fuse``, each window's cosines times
    its weight (``QueryFeatures.window_weights``; None: unweighted)."""
    if weights is None:
        return list(zip(rows, scores))
    return [(r, s * np.float32(w)) for r, s, w in zip(rows, scores, weights)]


def photometric_boost(
    query: LocalFeatures, candidates: Sequence[LocalFeatures], verified: np.ndarray, always: np.ndarray | None = None
) -> np.ndarray:
    """(K,) score increments: ``photometric.boost`` of the ``photometric.likeness`` of the query's picture (its last
    thumbnail: a page is searched as its picture) to a candidate's thumbnails (its whole picture, a page's picture),
    for the first ``photometric.CHECK_TOP`` of the ``candidates`` (in ranking order) that were not ``verified``, and
    for those of ``always`` (K,) bool (``photometric.ThumbnailSearch``'s) not verified; 0 for the others and where
    either side has no thumbnail (an older file)."""
    likeness = np.full(len(candidates), -1.0)
    if query.thumbnails:
        picture = query.thumbnails[-1]
        unverified = ~np.asarray(verified, bool)
        checked = np.zeros(len(candidates), bool)
        checked[np.flatnonzero(unverified)[: photometric.CHECK_TOP]] = True
        if always is not None:
            checked |= unverified & np.asarray(always, bool)
        for j in np.flatnonzero(checked):
            likeness[j] = photometric.likeness(picture, candidates[j].thumbnails)
    return photometric.boost(likeness)


def verified_ranking(
    scores: np.ndarray, query: QueryLocalFeatures, copies, top: int = VERIFY_TOP, exclude: int | None = None,
    also: Sequence[int] = (), also_mirrored: Sequence[int] = (), mirror_top: int = MIRROR_TOP,
    also_photometric: Sequence[int] = (),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Verify the best ``top`` images of ``scores`` (count,), and the rows ``also`` and ``also_mirrored`` (the
    visual-word search's for the query and for its mirror image, ``visual_words``) -> (order of all found rows, their
    scores, inliers: the inlier count of verified rows, 0 for rows verified without success, -1 for rows not
    verified). The mirror image is verified against the first ``mirror_top`` candidates and the rows of
    ``also_mirrored``. A row of either that does not verify keeps the place its score gives it, or stays out of the
    ranking where it has none. The rows of ``also_photometric`` (``photometric.ThumbnailSearch``'s, each with a finite
    score) are verified too and, unverified, get the photometric check wherever they rank."""
    order = np.argsort(-scores, kind="stable")
    order = order[np.isfinite(scores[order])]
    fused = scores[order].astype(np.float32)
    head = set(order[:top].tolist())
    extra = list(dict.fromkeys(
        int(row) for row in (*also, *also_mirrored, *also_photometric) if int(row) not in head and row != exclude
    ))
    unranked = [row for row in extra if not np.isfinite(scores[row])]  # verified at the end of the ranking
    order = np.concatenate([order, np.array(unranked, np.int64)])
    fused = np.concatenate([fused, np.full(len(unranked), -np.inf, np.float32)])
    inliers = np.full(len(order), -1, np.int64)
    position = {int(row): i for i, row in enumerate(order)}
    candidates = [i for i in range(min(top, len(order))) if order[i] != exclude] + [position[row] for row in extra]
    if candidates:
        features = [copies.local_of(int(order[i])) for i in candidates]
        mirrored_rows = {int(row) for row in also_mirrored}
        mirror = [n < mirror_top or int(order[i]) in mirrored_rows for n, i in enumerate(candidates)]
        result = verify(query, features, mirror)
        index = np.array(candidates)
        inliers[index] = np.where(result.verified, result.inliers, 0)
        fused[index] = np.where(result.verified, result.scores(fused[index]), fused[index]).astype(np.float32)
        photometric_rows = {int(row) for row in also_photometric}
        always = np.array([int(order[i]) in photometric_rows for i in candidates])
        # what an unverified candidate's thumbnail and its inliers add, together at most photometric.MAX_BOOST: below
        # every verified score
        gained = (photometric_boost(query.direct, features, result.verified, always)
                  + partial_gain(result.strength, result.verified))
        fused[index] += np.minimum(gained, photometric.MAX_BOOST).astype(np.float32)
        again = np.argsort(-fused, kind="stable")
        again = again[np.isfinite(fused[again])]
        order, fused, inliers = order[again], fused[again], inliers[again]
    return order, fused, inliers
