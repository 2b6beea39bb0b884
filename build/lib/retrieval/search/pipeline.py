"""The one query pipeline that every face uses (terminal, server, evaluator, Python API):

    query descriptors (M, D)  ->  the database's stored transform (PCA-whitening, if any)  ->  backend search
    ->  query expansion, whose neighbours come from the same backend  ->  a second backend search  ->  rows, scores

N queries are one batched call at every step. Rankings come back best first, padded with row -1 where a backend
found fewer than k; ``query_rows`` names database rows that *are* the queries (search by id, the evaluator's
database queries): such a row is never used as its own expansion neighbour, and stays in the results (the caller
decides whether to show it).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..descriptors.whitening import Whitening, apply_whitening
from ..vectors import as_query_matrix, l2_normalize
from .backends.base import Backend
from .expansion import NO_EXPANSION, QueryExpansion, expand


def searched_matrix(vectors: np.ndarray, whitening: Whitening | None) -> np.ndarray:
    """The matrix searched for stored ``vectors`` (N, D): themselves, or their whitened form (N, d) float32."""
    if whitening is None:
        return vectors
    return apply_whitening(vectors, whitening)


class QueryPipeline:
    """Transform -> backend -> expansion -> backend, over one database version's searched ``matrix`` (N, d)."""

    def __init__(self, backend: Backend, matrix: np.ndarray, whitening: Whitening | None = None):
        self.backend = backend
        self.matrix = matrix
        self.whitening = whitening

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

    def close(self) -> None:
        self.backend.close()
