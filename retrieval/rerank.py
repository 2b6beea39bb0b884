"""Query expansion over L2-normalised descriptors: numpy in, numpy out.

Search once, build a new query from the query and its best neighbours, search again with it:

* ``average_query_expansion`` (AQE, Chum et al., ICCV 2007; as used for CNN descriptors): the mean of the query and
  its ``top_n`` nearest database vectors, L2-normalised.
* ``alpha_query_expansion`` (alpha-QE, Radenović, Tolias, Chum, TPAMI 2018): a weighted sum with weight 1 for the
  query and ``max(similarity, 0) ** alpha`` for each neighbour, L2-normalised. ``alpha = 0`` is AQE.

``exclude`` lists database rows that must not serve as neighbours, typically the query's own row when the query is a
database image (otherwise it is its own first neighbour and counts twice).

Engine use::

    expanded = expand_query("alpha", query_vector, database.vectors, top_n=3)
    hits = engine.search_vector(expanded, k)
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from .pooling import l2_normalize
from .search import top_k

QUERY_EXPANSIONS = ("none", "avg", "alpha")
"""Names accepted by ``expand_query`` / ``expand_queries`` (and by ``evaluate.py --qe``)."""


def _neighbours(query: np.ndarray, database: np.ndarray, top_n: int, exclude: Iterable[int] | None):
    """Rows and cosine scores of the ``top_n`` nearest database vectors, skipping ``exclude``."""
    if top_n < 0:
        raise ValueError(f"top_n must be at least 0, got {top_n}")
    skip = {int(row) for row in (exclude if exclude is not None else ())}
    if top_n == 0 or database.shape[0] == 0:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    rows, scores = top_k(database, query, top_n + len(skip))
    keep = np.array([row not in skip for row in rows], dtype=bool)
    return rows[keep][:top_n], scores[keep][:top_n]


def _check(query: np.ndarray, database: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    query = np.asarray(query, dtype=np.float32)
    database = np.asarray(database, dtype=np.float32)
    if query.ndim != 1 or database.ndim != 2 or database.shape[1] != query.shape[0]:
        raise ValueError(f"query of shape {query.shape} does not fit database vectors of shape {database.shape}")
    return query, database


def average_query_expansion(
    query: np.ndarray, database: np.ndarray, top_n: int = 3, *, exclude: Iterable[int] | None = None
) -> np.ndarray:
    """AQE: ``l2n(query + sum of the top_n nearest database rows)``. query (D,), database (N, D) -> float32 (D,).

    Dividing by ``top_n + 1`` would not change the normalised result, so the sum is used. Fewer than ``top_n``
    neighbours (small database) uses what there is; ``top_n = 0`` returns the normalised query.
    """
    query, database = _check(query, database)
    rows, _ = _neighbours(query, database, top_n, exclude)
    return l2_normalize(query.astype(np.float64) + database[rows].sum(axis=0, dtype=np.float64))


def alpha_query_expansion(
    query: np.ndarray,
    database: np.ndarray,
    top_n: int = 3,
    alpha: float = 3.0,
    *,
    exclude: Iterable[int] | None = None,
) -> np.ndarray:
    """alpha-QE: ``l2n(query + sum_i max(s_i, 0) ** alpha * d_i)`` over the ``top_n`` nearest rows ``d_i`` with cosine
    similarity ``s_i`` to the query. query (D,), database (N, D) -> float32 (D,).

    The query's own weight is 1 (its similarity to itself). Negative similarities get weight 0.
    """
    if alpha < 0:
        raise ValueError(f"alpha must be at least 0, got {alpha}")
    query, database = _check(query, database)
    rows, scores = _neighbours(query, database, top_n, exclude)
    weights = np.maximum(scores.astype(np.float64), 0.0) ** alpha
    return l2_normalize(query.astype(np.float64) + weights @ database[rows].astype(np.float64))


def expand_query(
    method: str,
    query: np.ndarray,
    database: np.ndarray,
    top_n: int = 3,
    *,
    alpha: float = 3.0,
    exclude: Iterable[int] | None = None,
) -> np.ndarray:
    """Dispatch by name (one of ``QUERY_EXPANSIONS``): query (D,) -> float32 (D,). ``none`` returns ``l2n(query)``."""
    if method == "none":
        return l2_normalize(_check(query, database)[0])
    if method == "avg":
        return average_query_expansion(query, database, top_n, exclude=exclude)
    if method == "alpha":
        return alpha_query_expansion(query, database, top_n, alpha, exclude=exclude)
    raise ValueError(f"unknown query expansion {method!r}; choose from {', '.join(QUERY_EXPANSIONS)}")


def expand_queries(
    method: str,
    queries: np.ndarray,
    database: np.ndarray,
    top_n: int = 3,
    *,
    alpha: float = 3.0,
    exclude: Sequence[Iterable[int] | int | None] | None = None,
) -> np.ndarray:
    """Batch form: queries (M, D) -> float32 (M, D). ``exclude[i]`` (a row, rows, or None) applies to query ``i``."""
    queries = np.asarray(queries, dtype=np.float32)
    if queries.ndim != 2:
        raise ValueError(f"queries must have shape (M, D), got {queries.shape}")
    if exclude is not None and len(exclude) != len(queries):
        raise ValueError(f"exclude has {len(exclude)} entries for {len(queries)} queries")
    out = np.empty_like(queries)
    for i, query in enumerate(queries):
        skip = None if exclude is None else exclude[i]
        if skip is not None and np.ndim(skip) == 0:
            skip = [int(skip)]
        out[i] = expand_query(method, query, database, top_n, alpha=alpha, exclude=skip)
    return out
