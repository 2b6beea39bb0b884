"""Query expansion over L2-normalised descriptors: numpy in, numpy out.

Search once, build a new query from the query and its best neighbours, search again with it. The neighbours are
found by the caller (``retrieval.search.pipeline`` asks the database's own backend); these functions only combine:

* ``average_query_expansion`` (AQE, Chum et al., ICCV 2007; as used for CNN descriptors): the sum of the query and
  its neighbours, L2-normalised (dividing by the count would not change the normalised result).
* ``alpha_query_expansion`` (alpha-QE, Radenović, Tolias, Chum, TPAMI 2018): a weighted sum with weight 1 for the
  query and ``max(similarity, 0) ** alpha`` for each neighbour, L2-normalised. ``alpha = 0`` is AQE.

Shapes: queries (M, D); neighbours (M, n, D) with ``valid`` (M, n) saying which neighbour slots are real (a backend
may find fewer than n) and ``scores`` (M, n) their cosine similarity to the query.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..vectors import l2_normalize

QUERY_EXPANSIONS = ("none", "avg", "alpha")
"""Names accepted by ``QueryExpansion`` (and by ``--qe`` / ``qe=``)."""


@dataclass(frozen=True)
class QueryExpansion:
    """Query-time re-ranking: ``method`` none | avg (AQE) | alpha (alpha-QE) over the ``top_n`` first results."""

    method: str = "none"
    top_n: int = 3
    alpha: float = 3.0

    def __post_init__(self):
        if self.method not in QUERY_EXPANSIONS:
            raise ValueError(f"unknown query expansion {self.method!r}; choose from {', '.join(QUERY_EXPANSIONS)}")
        if isinstance(self.top_n, bool) or not isinstance(self.top_n, (int, np.integer)) or self.top_n < 1:
            raise ValueError(f"query expansion needs top_n >= 1, got {self.top_n}")
        if not (np.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0, got {self.alpha}")

    @property
    def active(self) -> bool:
        return self.method != "none"


NO_EXPANSION = QueryExpansion()


def _check(queries: np.ndarray, neighbours: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    queries = np.asarray(queries, dtype=np.float64)
    neighbours = np.asarray(neighbours, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool)
    if queries.ndim != 2 or neighbours.ndim != 3 or neighbours.shape[0] != queries.shape[0] or (
        neighbours.shape[2] != queries.shape[1] or valid.shape != neighbours.shape[:2]
    ):
        raise ValueError(
            f"queries {queries.shape}, neighbours {neighbours.shape} and valid {valid.shape} do not fit together"
        )
    return queries, neighbours, valid


def average_query_expansion(queries: np.ndarray, neighbours: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """AQE: ``l2n(query + sum of its valid neighbours)``. (M, D), (M, n, D), (M, n) -> float32 (M, D)."""
    queries, neighbours, valid = _check(queries, neighbours, valid)
    return l2_normalize(queries + (neighbours * valid[..., None]).sum(axis=1))


def alpha_query_expansion(
    queries: np.ndarray, neighbours: np.ndarray, scores: np.ndarray, valid: np.ndarray, alpha: float = 3.0
) -> np.ndarray:
    """alpha-QE: ``l2n(query + sum_i max(s_i, 0) ** alpha * d_i)`` over the valid neighbours ``d_i`` with similarity
    ``s_i``. (M, D), (M, n, D), (M, n), (M, n) -> float32 (M, D). Negative similarities get weight 0."""
    if not alpha >= 0:
        raise ValueError(f"alpha must be at least 0, got {alpha}")
    queries, neighbours, valid = _check(queries, neighbours, valid)
    weights = np.where(valid, np.maximum(np.nan_to_num(np.asarray(scores, np.float64), neginf=0.0), 0.0) ** alpha, 0.0)
    return l2_normalize(queries + np.einsum("mn,mnd->md", weights, neighbours))


def expand(
    expansion: QueryExpansion, queries: np.ndarray, neighbours: np.ndarray, scores: np.ndarray, valid: np.ndarray
) -> np.ndarray:
    """Dispatch by ``expansion.method``: (M, D) -> float32 (M, D); ``none`` returns the normalised queries."""
    if expansion.method == "none":
        return l2_normalize(queries)
    if expansion.method == "avg":
        return average_query_expansion(queries, neighbours, valid)
    return alpha_query_expansion(queries, neighbours, scores, valid, expansion.alpha)
