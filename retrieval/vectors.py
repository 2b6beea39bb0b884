"""Vector maths at the ground floor: L2 normalisation and exact cosine top-k, numpy in, numpy out.

Everything here works on batches: queries (M, D) against a matrix (N, D) of unit rows gives (M, k) rows and scores,
best first, ties broken by the lower row, so every caller (the backends, query expansion, the evaluator) ranks alike.
"""

from __future__ import annotations

import numpy as np

NORM_EPSILON = 1e-12
FLOAT16_BLOCK_ROWS = 65_536  # float16 matrices are scored block by block in float32 (numpy has no fast fp16 matmul)
FLOOR_CHUNK = 64  # columns per chunk whose maximum bounds the top k (``_top_k_by_floor``)
FLOOR_MIN_CHUNKS = 16  # narrower rows go straight to argpartition
FLOOR_MAX_CANDIDATES = 4_096  # candidates per row above the floor beyond which a row goes to argpartition
SCORE_BLOCK = 1 << 24  # scores held at once by a batched search: queries per block x N <= this (64 MB of float32)
QUERY_BLOCK = 1_024  # fewer queries per block than this (a tall matrix) and the matrix's rows are tiled instead


def l2_normalize(vectors: np.ndarray, epsilon: float = NORM_EPSILON) -> np.ndarray:
    """Rows scaled to unit L2 norm; an all-zero row stays zero instead of becoming NaN. (..., D) -> float32 (..., D)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, epsilon)


def as_query_matrix(queries: np.ndarray, dim: int) -> np.ndarray:
    """(D,) or (M, D) -> float32 (M, D); ValueError when the dimension does not fit."""
    queries = np.asarray(queries, dtype=np.float32)
    if queries.ndim == 1:
        queries = queries[None, :]
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"queries of shape {queries.shape} do not fit vectors of dimension {dim}")
    return queries


def cosine_scores(matrix: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Dot products of every query (M, D) with every row of ``matrix`` (N, D), float32 or float16 -> float32 (M, N).

    For unit vectors this is the cosine similarity. A float16 matrix is converted a block of rows at a time, so no
    full float32 copy is ever made. A single query (D,) gives (N,).
    """
    single = np.ndim(queries) == 1
    if matrix.ndim != 2:
        raise ValueError(f"matrix must have shape (N, D), got {matrix.shape}")
    queries = as_query_matrix(queries, matrix.shape[1])
    if matrix.dtype == np.float32:
        scores = queries @ matrix.T
    else:
        scores = np.empty((queries.shape[0], matrix.shape[0]), dtype=np.float32)
        for start in range(0, matrix.shape[0], FLOAT16_BLOCK_ROWS):
            block = matrix[start : start + FLOAT16_BLOCK_ROWS]
            scores[:, start : start + len(block)] = queries @ block.astype(np.float32).T
    return scores[0] if single else scores


def top_k_of_scores(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the ``k`` largest of each row of ``scores`` (M, N), best first, ties by lower index.

    Returns (int64 (M, k'), float32 (M, k')) with k' = min(k, N); a 1-d ``scores`` (N,) gives 1-d results. Wide rows
    go through ``_top_k_by_floor`` (a few passes over the scores), the rest, and rows it cannot settle, through
    ``argpartition`` and a sort of the k winners.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    single = scores.ndim == 1
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float32))
    count = scores.shape[1]
    k = min(k, count)
    rows = np.empty((scores.shape[0], k), np.int64)
    values = np.empty((scores.shape[0], k), np.float32)
    pending = np.arange(scores.shape[0])
    if 0 < k and count >= FLOOR_MIN_CHUNKS * FLOOR_CHUNK and k * FLOOR_CHUNK <= count:
        settled = _top_k_by_floor(scores, k, rows, values)
        pending = np.flatnonzero(~settled)
    if count and len(pending):
        rows[pending], values[pending] = _top_k_by_partition(scores[pending], k)
    return (rows[0], values[0]) if single else (rows, values)


def _top_k_by_floor(scores: np.ndarray, k: int, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Fill ``rows`` / ``values`` (M, k) for the rows of ``scores`` (M, N) this settles; a bool (M,) of those.

    The maxima of ``FLOOR_CHUNK``-wide column chunks bound the answer: at least k scores reach the k-th largest chunk
    maximum (the floor), so the top k are among the scores at or above it, usually a few times k. Those candidates
    are sorted (row, score descending, column); a row with more than ``FLOOR_MAX_CANDIDATES`` of them (masses of
    ties) or fewer than k (NaN) is left to the caller.
    """
    count, width = scores.shape
    whole = width // FLOOR_CHUNK * FLOOR_CHUNK
    chunk_max = scores[:, :whole].reshape(count, -1, FLOOR_CHUNK).max(axis=2)
    if whole < width:
        chunk_max = np.concatenate([chunk_max, scores[:, whole:].max(axis=1, keepdims=True)], axis=1)
    chunks = chunk_max.shape[1]
    floor = np.partition(chunk_max, chunks - k, axis=1)[:, chunks - k]
    hit_rows, hit_columns = np.nonzero(scores >= floor[:, None])
    per_row = np.bincount(hit_rows, minlength=count)
    settled = (per_row >= k) & (per_row <= FLOOR_MAX_CANDIDATES)
    keep = settled[hit_rows]
    hit_rows, hit_columns = hit_rows[keep], hit_columns[keep]
    hit_values = scores[hit_rows, hit_columns]
    order = np.lexsort((hit_columns, -hit_values, hit_rows))
    firsts = (np.cumsum(per_row * settled) - per_row * settled)[settled]
    picks = order[firsts[:, None] + np.arange(k)]
    rows[settled], values[settled] = hit_columns[picks], hit_values[picks]
    return settled


def _top_k_by_partition(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``top_k_of_scores`` for every row of ``scores`` (M, N), 1 <= k <= N: argpartition, then the k sorted."""
    count = scores.shape[1]
    if k < count:
        candidates = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        candidates = np.broadcast_to(np.arange(count), scores.shape).copy()
    picked = np.take_along_axis(scores, candidates, axis=1)
    order = np.lexsort((candidates, -picked), axis=1)
    rows = np.take_along_axis(candidates, order, axis=1).astype(np.int64)
    values = np.take_along_axis(picked, order, axis=1)
    if k < count:  # rows tied with the k-th score outside the partition: redo those exactly, by index
        kth = values[:, -1:]
        ties = np.flatnonzero((scores >= kth).sum(axis=1) > k)
        for query in ties:
            tied = np.flatnonzero(scores[query] >= kth[query, 0])
            best = tied[np.lexsort((tied, -scores[query, tied]))][:k]
            rows[query], values[query] = best, scores[query, best]
    return rows, values


def top_k(matrix: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar rows of ``matrix`` (N, D) to each query (M, D), best first: (rows, scores) (M, k').

    Queries are scored in blocks so at most ``SCORE_BLOCK`` scores exist at once; against a tall matrix, where that
    would leave fewer than ``QUERY_BLOCK`` queries per matrix product (slow: the matrix is streamed once per block),
    ``QUERY_BLOCK`` queries meet tiles of rows and the tiles' top k are merged. A single query (D,) gives 1-d results.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    single = np.ndim(queries) == 1
    queries = as_query_matrix(queries, matrix.shape[1])
    width = min(k, matrix.shape[0])
    rows = np.empty((queries.shape[0], width), np.int64)
    scores = np.empty((queries.shape[0], width), np.float32)
    step = max(1, SCORE_BLOCK // max(1, matrix.shape[0]))
    if step >= QUERY_BLOCK or queries.shape[0] <= step:
        for start in range(0, queries.shape[0], step):
            block = slice(start, start + step)
            rows[block], scores[block] = top_k_of_scores(cosine_scores(matrix, queries[block]), k)
    else:  # a tall matrix: QUERY_BLOCK queries at a time against tiles of its rows, then the tiles' winners merged
        columns = max(width, SCORE_BLOCK // QUERY_BLOCK)
        for start in range(0, queries.shape[0], QUERY_BLOCK):
            block = slice(start, start + QUERY_BLOCK)
            tile_rows, tile_scores = [], []
            for first in range(0, matrix.shape[0], columns):
                found, values = top_k_of_scores(cosine_scores(matrix[first : first + columns], queries[block]), k)
                tile_rows.append(found + first)
                tile_scores.append(values)
            picks, scores[block] = top_k_of_scores(np.concatenate(tile_scores, axis=1), k)
            rows[block] = np.take_along_axis(np.concatenate(tile_rows, axis=1), picks, axis=1)
    return (rows[0], scores[0]) if single else (rows, scores)
