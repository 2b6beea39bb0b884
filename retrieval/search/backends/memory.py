"""The ``memory`` backend (default): the HDF5 matrix searched exactly in RAM, with an optional HNSW graph beside it.

Above ``ANN_THRESHOLD`` vectors (or with ``--ann hnsw``) index.py adds an HNSW graph, ``<index>.<database_id>.hnsw``,
built after the commit for every database version; until it exists, and whenever it does not match, searches are
exact.

Why 250,000: exact search costs ~0.11 ms per 1,000 512-d vectors here (11 ms at 100k, ~90 ms at 1M), which stays
below ~30 ms (small beside a 30-300 ms CNN forward pass) up to about 250k vectors; exact results are worth keeping
until then. Above it, HNSW answers in under 2 ms at recall@10 ~0.99 (efSearch 256; bench/scale.py).

A float16 matrix (``index.py --storage float16``) is searched exactly by faiss' fp16 scalar quantizer
(``QT_fp16``, inner product), whose codes are the same IEEE halves: numpy has no fast float16 product (it converts
block by block, 30-60x slower than float32), faiss decodes halves in registers at memory speed. bench/run.py
measures both and the recall (1.0 but for ties). A float32 matrix keeps numpy's matmul + exact top-k (retrieval.vectors).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...vectors import top_k
from .base import Backend, BackendUpdate, SyncJob, remove_sidecars, sidecar
from .faiss import HNSW_EF_SEARCH, build_hnsw, read_index, search_params, write_index

ANN_THRESHOLD = 250_000
ANN_CHOICES = ("auto", "off", "hnsw")
GRAPH_SUFFIX = ".hnsw"


def wants_ann(ann: str | None, count: int) -> bool:
    ann = ann or "auto"
    if ann not in ANN_CHOICES:
        raise ValueError(f"unknown ANN choice {ann!r}; choose from {', '.join(ANN_CHOICES)}")
    return ann == "hnsw" or (ann == "auto" and count >= ANN_THRESHOLD)


def float16_scanner(matrix: np.ndarray):
    """A faiss ``IndexScalarQuantizer`` (QT_fp16, inner product) holding the bytes of a float16 matrix (N, d)."""
    import faiss

    index = faiss.IndexScalarQuantizer(matrix.shape[1], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    if matrix.shape[0]:
        codes = np.ascontiguousarray(matrix, dtype="<f2").view(np.uint8).reshape(-1)
        faiss.copy_array_to_vector(codes, index.codes)
        index.ntotal = matrix.shape[0]
    return index


def hnsw_path(index_path, database_id: str) -> Path:
    return sidecar(index_path, database_id, GRAPH_SUFFIX)


class MemoryBackend(Backend):
    """Exact cosine top-k over the matrix in memory (float32: numpy; float16: faiss QT_fp16 over the same halves),
    or its HNSW graph when one was built."""

    name = "memory"
    options = {"ann": "--ann"}

    def __init__(self, matrix: np.ndarray, graph=None):
        self.matrix = matrix
        self.graph = graph
        self.kind = "hnsw" if graph is not None else "exact"
        self._scanner = None

    def __len__(self) -> int:
        return self.matrix.shape[0]

    @property
    def dim(self) -> int:
        return self.matrix.shape[1]

    @classmethod
    def check_options(cls, options: dict) -> None:
        from ...errors import RetrievalError

        ann = options.get("ann")
        if ann is not None and ann not in ANN_CHOICES:
            raise RetrievalError(f"unknown ANN choice {ann!r}; choose from {', '.join(ANN_CHOICES)}")

    @classmethod
    def prepare(cls, job: SyncJob, record: dict) -> BackendUpdate:
        return BackendUpdate("hnsw" if wants_ann(job.options.get("ann"), len(job.database)) else "exact")

    @classmethod
    def finish(cls, job: SyncJob, record: dict) -> None:
        keep = None
        if wants_ann(job.options.get("ann"), job.matrix.shape[0]):
            keep = job.database_id
            graph = hnsw_path(job.index_path, job.database_id)
            if not graph.exists():
                write_index(build_hnsw(job.matrix), graph)
        cls.remove_files(job.index_path, keep_id=keep)

    @classmethod
    def remove_files(cls, index_path: Path, keep_id: str | None = None) -> None:
        remove_sidecars(index_path, (GRAPH_SUFFIX,), keep_id)

    @classmethod
    def open(cls, index_path: Path, database, matrix: np.ndarray, record: dict, *, uri: str | None = None) -> "MemoryBackend":
        graph = read_index(hnsw_path(index_path, database.database_id)) if database.database_id else None
        if graph is not None and (graph.ntotal != matrix.shape[0] or graph.d != matrix.shape[1]):
            graph = None
        return cls(matrix, graph)

    def search_batch(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.graph is None:
            if self.matrix.dtype != np.float16 or self.matrix.shape[0] == 0:
                return top_k(self.matrix, queries, k)
            if self._scanner is None:
                self._scanner = float16_scanner(self.matrix)  # built on the first search (a benign race: same result)
            width = min(k, self.matrix.shape[0])
            scores, rows = self._scanner.search(np.ascontiguousarray(queries, dtype=np.float32), width)
            return rows.astype(np.int64), scores.astype(np.float32)
        scores, rows = self.graph.search(queries, k, params=search_params({"kind": "hnsw", "ef_search": HNSW_EF_SEARCH}, k))
        found = rows >= 0
        return rows.astype(np.int64), np.where(found, scores, -np.inf).astype(np.float32)
