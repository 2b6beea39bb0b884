"""Vector indexes over the search matrix: exact (numpy) or approximate (faiss HNSW), one ``search`` interface.

The HNSW graph is a derived file beside the database, ``<index>.<database_id>.hnsw``: its name carries the id of the
database version it was built from, so a reader can never pair a graph with another version of the vectors. index.py
builds it when the database reaches ``ANN_THRESHOLD`` vectors (or when asked) and removes stale ones.

Why 250,000: exact search costs ~0.11 ms per 1,000 512-d vectors here (11 ms at 100k, ~90 ms at 1M), which stays
below ~30 ms (small beside a 30-300 ms CNN forward pass) up to about 250k vectors; exact results are worth keeping
until then. Above it, HNSW answers in about a millisecond at recall@10 >= 0.95 (see bench/run.py).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from .search import top_k

ANN_THRESHOLD = 250_000
HNSW_M = 16  # graph degree: 16 builds ~1.5x faster than 32 with recall@10 >= 0.95 at ef_search 128
HNSW_EF_CONSTRUCTION = 40
HNSW_EF_SEARCH = 128
ANN_CHOICES = ("auto", "off", "hnsw")


class ExactIndex:
    """Exact cosine top-k over the matrix in memory (float32 or float16)."""

    kind = "exact"

    def __init__(self, matrix: np.ndarray):
        self.matrix = matrix

    def __len__(self) -> int:
        return self.matrix.shape[0]

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return top_k(self.matrix, query, k)


class HnswIndex:
    """faiss ``IndexHNSWFlat`` with inner-product metric (cosine on unit vectors)."""

    kind = "hnsw"

    def __init__(self, index, ef_search: int = HNSW_EF_SEARCH):
        self.index = index
        self.ef_search = ef_search

    def __len__(self) -> int:
        return self.index.ntotal

    @classmethod
    def build(cls, matrix: np.ndarray, m: int = HNSW_M, ef_construction: int = HNSW_EF_CONSTRUCTION) -> "HnswIndex":
        import faiss

        index = faiss.IndexHNSWFlat(matrix.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        for start in range(0, matrix.shape[0], 65_536):  # float16 matrices converted a block at a time
            index.add(np.ascontiguousarray(matrix[start : start + 65_536], dtype=np.float32))
        return cls(index)

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        k = min(k, len(self))
        if k == 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        import faiss

        params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, k))  # per call: thread-safe
        scores, rows = self.index.search(np.asarray(query, np.float32).reshape(1, -1), k, params=params)
        keep = rows[0] >= 0
        return rows[0][keep].astype(np.int64), scores[0][keep].astype(np.float32)

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temporary file, then rename)."""
        import faiss

        path = Path(path)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(handle)
        try:
            faiss.write_index(self.index, temporary)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HnswIndex":
        import faiss

        return cls(faiss.read_index(str(path)))


def hnsw_path(index_path: str | os.PathLike, database_id: str) -> Path:
    return Path(f"{index_path}.{database_id}.hnsw")


def remove_stale_hnsw(index_path: str | os.PathLike, keep: Path | None = None) -> None:
    index_path = Path(index_path)
    for stale in index_path.parent.glob(f"{index_path.name}.*.hnsw"):
        if stale != keep:
            stale.unlink(missing_ok=True)


def wants_ann(ann: str, count: int) -> bool:
    if ann not in ANN_CHOICES:
        raise ValueError(f"unknown ANN choice {ann!r}; choose from {', '.join(ANN_CHOICES)}")
    return ann == "hnsw" or (ann == "auto" and count >= ANN_THRESHOLD)


def open_vector_index(index_path: str | os.PathLike, database_id: str, matrix: np.ndarray):
    """The HNSW graph built for exactly this database version if there is one, else exact search over ``matrix``."""
    graph = hnsw_path(index_path, database_id) if database_id else None
    if graph is not None and graph.is_file():
        loaded = HnswIndex.load(graph)
        if len(loaded) == matrix.shape[0]:
            return loaded
    return ExactIndex(matrix)
