"""Exact cosine search over L2-normalised descriptors: numpy in, numpy out."""

from __future__ import annotations

import numpy as np

FLOAT16_BLOCK_ROWS = 65_536  # float16 matrices are scored block by block in float32 (numpy has no fast fp16 matmul)


def cosine_scores(database: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Dot products of every row of ``database`` (N, D) float32 or float16 with ``query`` (D,) -> float32 (N,).

    For unit vectors this is the cosine similarity. A float16 matrix is converted a block at a time, so no full
    float32 copy is ever made.
    """
    query = np.asarray(query, dtype=np.float32).reshape(-1)
    if database.ndim != 2 or query.shape[0] != database.shape[1]:
        raise ValueError(f"query has dimension {query.shape[0]}, database vectors have shape {database.shape}")
    if database.dtype == np.float32:
        return database @ query
    scores = np.empty(database.shape[0], dtype=np.float32)
    for start in range(0, database.shape[0], FLOAT16_BLOCK_ROWS):
        block = database[start : start + FLOAT16_BLOCK_ROWS]
        scores[start : start + len(block)] = block.astype(np.float32) @ query
    return scores


def top_k_of_scores(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the ``k`` largest ``scores`` (N,), best first, ties broken by the lower index.

    ``argpartition`` (O(N)) then a sort of the k winners only. Returns (int64 (k',), float32 (k',)), k' = min(k, N).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    count = scores.shape[0]
    if count == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    k = min(k, count)
    if k < count:
        candidates = np.argpartition(-scores, k - 1)[:k]
        # bring in every row tied with the k-th score, so tie-breaking by index is exact
        candidates = np.flatnonzero(scores >= scores[candidates].min())
    else:
        candidates = np.arange(count)
    order = np.lexsort((candidates, -scores[candidates]))[:k]
    best = candidates[order].astype(np.int64)
    return best, scores[best].astype(np.float32)


def top_k(database: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar rows of ``database`` (N, D) to one ``query`` (D,), best first: (rows, scores)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    return top_k_of_scores(cosine_scores(database, query), k)
