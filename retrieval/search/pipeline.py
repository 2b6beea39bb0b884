"""The one query pipeline that every face uses (terminal, server, evaluator, Python API):

    query descriptors (M, D)  ->  the database's stored transform (PCA-whitening, if any)  ->  backend search
    ->  query expansion, whose neighbours come from the same backend  ->  a second backend search  ->  rows, scores

N queries are one batched call at every step. Rankings come back best first, padded with row -1 where a backend
found fewer than k; ``query_rows`` names database rows that *are* the queries (search by id, the evaluator's
database queries): such a row is never used as its own expansion neighbour, and stays in the results (the caller
decides whether to show it).
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from ..descriptors.whitening import Whitening, apply_whitening
from ..vectors import as_query_matrix, l2_normalize
from .backends.base import Backend
from .backends.regions import ExactRegions, RegionSearch
from .copies import (
    BACKGROUND_RANK, NO_LOCAL_FEATURES, NoLocalFeatures, QueryFeatures, calibrated, fuse, stored_query,
    verified_ranking, weighted_lists,
)
from .expansion import NO_EXPANSION, QueryExpansion, expand
from .photometric import ThumbnailSearch
from .verification import VERIFY_TOP, QueryLocalFeatures
from .visual_words import VisualWords, Vocabulary


def searched_matrix(vectors: np.ndarray, whitening: Whitening | None) -> np.ndarray:
    """The matrix searched for stored ``vectors`` (N, D): themselves, or their whitened form (N, d) float32."""
    if whitening is None:
        return vectors
    return apply_whitening(vectors, whitening)


class QueryPipeline:
    """Transform -> backend -> expansion -> backend, over one database version's searched ``matrix`` (N, d)."""

    def __init__(
        self, backend: Backend, matrix: np.ndarray, whitening: Whitening | None = None, copies=None,
        regions: RegionSearch | None = None,
    ):
        self.backend = backend
        self.matrix = matrix
        self.whitening = whitening
        # copy detection (retrieval.search.copies): the database's storage.copy_features.CopyFeatures, or None, and
        # the search of its regions (the backend's, ``backends.open_regions``; by default exact in memory)
        self.copies = copies
        self.regions = regions
        if regions is None and copies is not None and copies.has_regions:
            self.regions = ExactRegions(self.transform(copies.region_vectors), copies.region_image, matrix.shape[0])

    @functools.cached_property
    def words(self) -> VisualWords | None:
        """The visual-word search over the database's local features (``visual_words``), built on first use from the
        words stored with it, or learned now where it has none."""
        copies = self.copies
        stored = None if copies.words is None else Vocabulary(copies.word_top, copies.word_children)
        return VisualWords.of(copies.descriptors, copies.keypoint_image, copies.count, stored, copies.words)

    @functools.cached_property
    def thumbnail_search(self) -> ThumbnailSearch | None:
        """The photometric check's search over every database thumbnail (``photometric.ThumbnailSearch``), built on
        first use; None for a database without thumbnails (written before them)."""
        copies = self.copies
        if copies.thumbnails is None:
            return None
        return ThumbnailSearch.of(copies.thumbnails, copies.thumbnail_sizes, copies.thumbnail_image)

    @property
    def can_verify(self) -> bool:
        return self.copies is not None and self.copies.has_local

    @property
    def verifies_by_default(self) -> bool:
        return self.can_verify and self.copies.verify_default

    def __len__(self) -> int:
        return len(self.backend)

    @property
    def kind(self) -> str:
        return self.backend.kind

    def transform(self, descriptors: np.ndarray) -> np.ndarray:
        """Extractor descriptors (M, D) -> the vectors compared with ``matrix`` (M, d), unit rows."""
        descriptors = np.asarray(descriptors, dtype=np.float32)
        if self.whitening is None:
            return l2_normalize(descriptors)
        return apply_whitening(descriptors, self.whitening)

    def search(
        self,
        descriptors: np.ndarray,
        k: int,
        expansion: QueryExpansion = NO_EXPANSION,
        query_rows: Sequence[int | None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Descriptors (M, D) or (D,) -> (rows int64, scores float32), (M, k) or (k,), best first, -1 padded."""
        single = np.ndim(descriptors) == 1
        descriptors = np.atleast_2d(np.asarray(descriptors, dtype=np.float32))
        if query_rows is not None and len(query_rows) != descriptors.shape[0]:
            raise ValueError(f"query_rows has {len(query_rows)} entries for {descriptors.shape[0]} queries")
        queries = as_query_matrix(self.transform(descriptors), self.matrix.shape[1])
        if expansion.active and len(self.backend):
            queries = self._expanded(queries, expansion, query_rows)
        rows, scores = self.backend.search(queries, k)
        return (rows[0], scores[0]) if single else (rows, scores)

    def _expanded(self, queries: np.ndarray, expansion: QueryExpansion, query_rows) -> np.ndarray:
        extra = 1 if query_rows is not None and any(row is not None for row in query_rows) else 0
        rows, scores = self.backend.search(queries, expansion.top_n + extra)
        valid = rows >= 0
        if extra:
            own = np.array([-2 if row is None else int(row) for row in query_rows], dtype=np.int64)
            valid &= rows != own[:, None]
            # keep the first top_n valid neighbours of each query
            valid &= np.cumsum(valid, axis=1) <= expansion.top_n
        neighbours = np.asarray(self.matrix[np.where(valid, rows, 0)], dtype=np.float32)
        return expand(expansion, queries, neighbours, scores, valid)

    def search_copies(
        self,
        queries: Sequence[QueryFeatures],
        k: int,
        expansion: QueryExpansion = NO_EXPANSION,
        query_rows: Sequence[int | None] | None = None,
        *,
        verify: bool = False,
        verify_top: int = VERIFY_TOP,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Copy search (``retrieval.search.copies``) for ``queries`` -> (rows, scores, inliers), each (M, k), best first,
        -1 / -inf / -1 padded; ``inliers`` is the inlier count of verified results, 0 where verification found none,
        -1 where it did not run. Raises ``NoLocalFeatures`` when ``verify`` is asked of a database without them."""
        if verify and not self.can_verify:
            raise NoLocalFeatures(NO_LOCAL_FEATURES)
        if query_rows is not None and len(query_rows) != len(queries):
            raise ValueError(f"query_rows has {len(query_rows)} entries for {len(queries)} queries")
        count = len(self.backend)
        out_rows = np.full((len(queries), k), -1, np.int64)
        out_scores = np.full((len(queries), k), -np.inf, np.float32)
        out_inliers = np.full((len(queries), k), -1, np.int64)
        if not queries or count == 0:
            return out_rows, out_scores, out_inliers
        rows_of = query_rows or [None] * len(queries)
        prepared = list(queries)
        vectors = as_query_matrix(self.transform(np.stack([q.vector for q in prepared])), self.matrix.shape[1])
        if expansion.active:
            vectors = self._expanded(vectors, expansion, query_rows)
        # deep enough for each list's background (``copies.calibrated``) whatever k is, and for verification
        depth = min(count, max(k, BACKGROUND_RANK + 1, verify_top if verify else k))
        windows = [np.zeros((0, vectors.shape[1]), np.float32) if q.windows is None or not len(q.windows) else self.transform(q.windows) for q in prepared]
        sizes = [len(w) for w in windows]
        # the global vectors and the windows in one search: one pass over the database's vectors
        found_rows, found_scores = self.backend.search(as_query_matrix(np.concatenate([vectors, *windows]), vectors.shape[1]), depth)
        global_rows, global_scores = found_rows[: len(prepared)], found_scores[: len(prepared)]
        window_rows, window_scores = found_rows[len(prepared) :], found_scores[len(prepared) :]
        region_rows = region_scores = None
        if self.regions is not None:
            region_rows, region_scores = self.regions.search(vectors, depth)
        start = 0
        for i, query in enumerate(prepared):
            lists = [(global_rows[i], global_scores[i])]
            if region_rows is not None:
                lists.append((region_rows[i], region_scores[i]))
            if sizes[i]:
                part = slice(start, start + sizes[i])
                windows_found = weighted_lists(window_rows[part], window_scores[part], query.window_weights)
                lists += calibrated(windows_found, global_scores[i], query.window_parts)
            start += sizes[i]
            fused = fuse(self.matrix.shape[0], lists)
            if verify and query.local is not None:
                words = self.words
                sides = (query.local.direct, *query.local.restored)
                also = () if words is None else np.concatenate([words.top(side.descriptors) for side in sides])
                also_mirrored = () if words is None else words.top(query.local.mirrored.descriptors)
                alike = self._alike_thumbnails(query.local, vectors[i], fused, rows_of[i])
                order, scores, inliers = verified_ranking(
                    fused, query.local, self.copies, verify_top, rows_of[i], also, also_mirrored,
                    also_photometric=alike,
                )
            else:
                order = np.argsort(-fused, kind="stable")
                order = order[np.isfinite(fused[order])]
                scores, inliers = fused[order], np.full(len(order), -1, np.int64)
            n = min(k, len(order))
            out_rows[i, :n], out_scores[i, :n], out_inliers[i, :n] = order[:n], scores[:n], inliers[:n]
        return out_rows, out_scores, out_inliers

    def _alike_thumbnails(
        self, local: QueryLocalFeatures, vector: np.ndarray, fused: np.ndarray, own_row: int | None
    ) -> np.ndarray:
        """The rows ``ThumbnailSearch`` finds for a query's local features (its picture's thumbnail), each given its
        global cosine in ``fused`` (N,) where the fused lists left it unscored."""
        search = self.thumbnail_search
        if search is None or not local.direct.thumbnails:
            return np.zeros(0, np.int64)
        rows = search.top(local.direct.thumbnails[-1], exclude=own_row)
        unscored = rows[~np.isfinite(fused[rows])]
        if len(unscored):
            fused[unscored] = np.asarray(self.matrix[unscored], np.float32) @ vector
        return rows

    def stored_query(self, vector: np.ndarray, row: int) -> QueryFeatures:
        """Database image ``row`` (stored descriptor ``vector``) as a copy-search query (``copies.stored_query``)."""
        return stored_query(vector, self.copies, row)

    def close(self) -> None:
        self.backend.close()
        if self.regions is not None:
            self.regions.close()
