"""Exact cosine search over L2-normalised descriptors: numpy in, numpy out."""

from __future__ import annotations

import numpy as np


def top_k(database: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar rows of ``database`` (N, D) to one ``query`` (D,), best first.

    Both are expected to be L2-normalised, so the dot product is the cosine similarity. Returns (indices int64 (k',),
    scores float32 (k',)) with k' = min(k, N). Uses ``argpartition`` (O(N)) and sorts only the k winners; ties are
    broken by the lower index so results are deterministic.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    query = np.asarray(query, dtype=np.float32).reshape(-1)
    if database.ndim != 2 or query.shape[0] != database.shape[1]:
        raise ValueError(f"query has dimension {query.shape[0]}, database vectors have shape {database.shape}")
    count = database.shape[0]
    if count == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    scores = np.asarray(database @ query.astype(database.dtype, copy=False), dtype=np.float32)
    k = min(k, count)
    if k < count:
        candidates = np.argpartition(-scores, k - 1)[:k]
        # bring in every row tied with the k-th score, so tie-breaking by index is exact
        threshold = scores[candidates].min()
        candidates = np.flatnonzero(scores >= threshold)
    else:
        candidates = np.arange(count)
    order = np.lexsort((candidates, -scores[candidates]))[:k]
    best = candidates[order].astype(np.int64)
    return best, scores[best]
