"""Several vectors per image in every backend: a database's region vectors, searched so that the results are images.

A copy-detection database stores a few region descriptors per image (``retrieval.storage.copy_features``). A
``RegionSearch`` answers "which images have a region most like this query vector" with each image once, at the
score of its best region, best first, exactly like a backend answers for global vectors:

* ``ExactRegions`` (the memory backend, and any backend whose region structure is missing): every region scored in
  memory, the best per image taken with ``np.maximum.reduceat``;
* ``RankedRegions`` (faiss, Milvus): the backend's own search over the region vectors, whose rows are image rows
  (an image appears once per region), asked for ``per_image`` times as many hits and reduced to distinct images. An
  image has at most ``per_image`` regions, so ``k * per_image`` region hits always hold ``k`` distinct images when
  the search is exact; an approximate one keeps its own recall.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...descriptors.whitening import Whitening, apply_whitening
from ...vectors import l2_normalize, top_k_of_scores


@dataclass
class Regions:
    """A database version's regions: ``stored`` (M, D) as in the file, ``image`` (M,) the database row of each
    (non-decreasing), ``count`` images, ``whitening`` the database's (or None). ``matrix`` is their searched form
    (M, d) float32, computed on first use (index time, exact search); faiss and Milvus searches never need it."""

    stored: np.ndarray
    image: np.ndarray
    count: int
    whitening: Whitening | None = None
    _matrix: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.image)

    @property
    def per_image(self) -> int:
        """The most regions any one image has (0 when there are none)."""
        return int(np.bincount(self.image).max()) if len(self.image) else 0

    @property
    def dim(self) -> int:
        """Dimension of the searched vectors."""
        return int(self.stored.shape[1]) if self.whitening is None else self.whitening.dim

    @property
    def matrix(self) -> np.ndarray:
        if self._matrix is None:
            vectors = np.asarray(self.stored, np.float32)
            self._matrix = l2_normalize(vectors) if self.whitening is None else apply_whitening(vectors, self.whitening)
        return self._matrix


def database_regions(database) -> Regions | None:
    """The regions of a ``FeatureDatabase`` (None when it stores none)."""
    copies = database.copies
    if copies is None or not copies.has_regions:
        return None
    return Regions(copies.region_vectors, np.asarray(copies.region_image, np.int64), len(database), database.whitening)


def distinct_images(rows: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ranked hits whose rows are image rows, repeated (M, H), best first, -1 padded -> each image once, at its first
    (best) hit: (rows int64 (M, k), scores float32 (M, k)), -1 / -inf padded."""
    out_rows = np.full((rows.shape[0], k), -1, np.int64)
    out_scores = np.full((rows.shape[0], k), -np.inf, np.float32)
    for i in range(rows.shape[0]):
        found = np.flatnonzero(rows[i] >= 0)
        _, first = np.unique(rows[i, found], return_index=True)
        keep = found[np.sort(first)][:k]
        out_rows[i, : len(keep)], out_scores[i, : len(keep)] = rows[i, keep], scores[i, keep]
    return out_rows, out_scores


class RegionSearch:
    """Images by their best region. ``search(queries (M, d), k)`` -> (rows (M, k), scores (M, k)), best first, each
    image at most once, -1 / -inf padded; ``kind`` names what answers; ``close()`` lets go of it."""

    kind = "exact"

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Let go of files and connections."""


class ExactRegions(RegionSearch):
    """Every region scored in memory: ``matrix`` (M, d) searched vectors, ``image`` (M,) non-decreasing rows of
    ``count`` images."""

    def __init__(self, matrix: np.ndarray, image: np.ndarray, count: int):
        self.matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        self.image = np.asarray(image, dtype=np.int64)
        self.count = int(count)
        self.present = np.flatnonzero(np.bincount(self.image, minlength=self.count) > 0) if len(self.image) else np.zeros(0, np.int64)
        self.starts = np.searchsorted(self.image, self.present, side="left")

    @classmethod
    def of(cls, regions: Regions) -> "ExactRegions":
        return cls(regions.matrix, regions.image, regions.count)

    def __len__(self) -> int:
        return self.matrix.shape[0]

    def image_scores(self, queries: np.ndarray) -> np.ndarray:
        """(q, d) -> (q, count) float32: the best region of each image, -inf for images without regions."""
        out = np.full((queries.shape[0], self.count), -np.inf, np.float32)
        if len(self.matrix) == 0 or queries.shape[0] == 0:
            return out
        similarity = np.asarray(queries, np.float32) @ self.matrix.T
        out[:, self.present] = np.maximum.reduceat(similarity, self.starts, axis=1)
        return out

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        out_rows = np.full((queries.shape[0], k), -1, np.int64)
        out_scores = np.full((queries.shape[0], k), -np.inf, np.float32)
        if self.count == 0 or queries.shape[0] == 0:
            return out_rows, out_scores
        rows, scores = top_k_of_scores(self.image_scores(queries), k)
        found = np.isfinite(scores)
        width = rows.shape[1]
        out_rows[:, :width] = np.where(found, rows, -1)
        out_scores[:, :width] = np.where(found, scores, -np.inf)
        return out_rows, out_scores


class RankedRegions(RegionSearch):
    """A backend's search over region vectors whose rows are image rows (``searcher``: a ``base.Backend`` whose
    ``len`` is the number of regions), asked ``per_image`` times deeper and reduced to distinct images."""

    def __init__(self, searcher, per_image: int):
        self.searcher = searcher
        self.per_image = max(1, int(per_image))
        self.kind = searcher.kind

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.searcher) == 0 or queries.shape[0] == 0:
            return distinct_images(np.full((queries.shape[0], 0), -1, np.int64), np.zeros((queries.shape[0], 0), np.float32), k)
        rows, scores = self.searcher.search(queries, k * self.per_image)
        return distinct_images(rows, scores, k)

    def close(self) -> None:
        self.searcher.close()
