"""The one interface every search backend implements, and what index.py hands a backend to bring it up to date.

A backend is one class (one module) with two sides:

* index time (class methods): ``check_options`` / ``record`` turn the user's options into the ``search_backend``
  record stored in the database file; ``prepare`` brings the backend's structure to a new database version *before*
  index.py commits the file that names it, ``finish`` runs after the commit, ``remove_files`` deletes what a version
  no longer uses;
* query time (an instance from ``open``): ``search(queries, k)`` for a batch of searched vectors (M, d) returns rows
  and scores (M, k), best first, padded with row -1 / score -inf where fewer than k were found; ``close()`` lets go
  of files, connections and servers. ``open_regions`` gives the search of the database's region vectors
  (``regions.RegionSearch``: several vectors per image, results still images); by default they are searched exactly
  in memory, faiss and Milvus keep them in a structure of their own beside the global vectors.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from ...vectors import as_query_matrix
from .regions import ExactRegions, Regions, RegionSearch


@dataclass
class SyncJob:
    """A database version about to be committed, for ``Backend.prepare`` / ``finish``."""

    index_path: Path
    database: Any  # retrieval.storage.database.FeatureDatabase being written
    database_id: str  # the version id it will carry
    matrix: np.ndarray  # its searched vectors (whitened when the database is), (N, d)
    options: dict = field(default_factory=dict)  # the backend options given for this run (e.g. {"ann": "hnsw"})
    previous: Any = None  # the version being replaced, or None
    unchanged: frozenset = frozenset()  # paths whose searched vector is bit-identical in both versions
    rebuild: bool = False
    notice: Callable[[str], None] = print
    regions: Regions | None = None  # its region vectors (copy detection), or None when it stores none


@dataclass
class BackendUpdate:
    """What ``prepare`` did, for the indexing report."""

    search: str = "exact"  # exact | hnsw | faiss-hnsw | faiss-ivf | milvus-HNSW | milvus-IVF_FLAT
    detail: str = ""


def empty_result(count: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((count, k), -1, np.int64), np.full((count, k), -np.inf, np.float32)


class Backend(ABC):
    """A search backend. Subclasses set ``name`` and ``options`` (option key -> command-line flag)."""

    name: ClassVar[str]
    options: ClassVar[dict[str, str]] = {}
    kind: str = "exact"  # what answers the searches of an open backend

    # ------------------------------------------------------------------ index time

    @classmethod
    def check_options(cls, options: dict) -> None:
        """RetrievalError for an option value that cannot work (no connection is made)."""

    @classmethod
    def record(cls, index_path: Path, options: dict, stored: dict | None) -> dict:
        """The ``search_backend`` record for the database: ``options`` given now, else ``stored`` (the record of an
        existing database on this backend, or None), else the defaults."""
        return {"backend": cls.name}

    @classmethod
    def check_reachable(cls, index_path: Path, record: dict) -> None:
        """Fail now, before any extraction, when the backend cannot be used (a wrong server address)."""

    @classmethod
    def prepare(cls, job: SyncJob, record: dict) -> BackendUpdate:
        """Bring the backend's structure to ``job.database`` before the file is committed."""
        return BackendUpdate()

    @classmethod
    def finish(cls, job: SyncJob, record: dict) -> None:
        """After the commit: structures built once the file is in place; stale files of this backend removed."""
        cls.remove_files(job.index_path, keep_id=job.database_id)

    @classmethod
    def remove_files(cls, index_path: Path, keep_id: str | None = None) -> None:
        """Delete this backend's files beside the database except those of version ``keep_id``."""

    @classmethod
    def retire(cls, index_path: Path, old: dict, new: dict, notice: Callable[[str], None]) -> None:
        """The database moved from record ``old`` (this backend's) to ``new``: say what is left behind."""

    # ------------------------------------------------------------------ query time

    @classmethod
    @abstractmethod
    def open(cls, index_path: Path, database, matrix: np.ndarray, record: dict, *, uri: str | None = None) -> "Backend":
        """The backend's search structure for this database version; BackendError / IndexFileError when unusable."""

    @classmethod
    def open_regions(cls, index_path: Path, database, regions: Regions, record: dict, *, uri: str | None = None) -> RegionSearch:
        """The search of this database version's ``regions``: exact in memory unless the backend keeps its own."""
        return ExactRegions.of(regions)

    @abstractmethod
    def __len__(self) -> int:
        """How many database images can be found."""

    @abstractmethod
    def search_batch(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``queries`` float32 (M, d), 1 <= k <= len(self) -> rows int64 (M, k), scores float32 (M, k), padded."""

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Searched vectors (M, d) or (d,) -> (rows, scores), (M, k) or (k,), best first, -1 / -inf padded."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        single = np.ndim(queries) == 1
        queries = as_query_matrix(queries, self.dim)
        k = min(k, len(self))
        if k == 0 or queries.shape[0] == 0:
            rows, scores = empty_result(queries.shape[0], k)
        else:
            rows, scores = self.search_batch(queries, k)
        return (rows[0], scores[0]) if single else (rows, scores)

    @property
    @abstractmethod
    def dim(self) -> int:
        """Dimension of the searched vectors."""

    def close(self) -> None:
        """Let go of what ``open`` acquired (files, connections). Searching after ``close`` is an error."""


def sidecar(index_path: str | os.PathLike, database_id: str, suffix: str) -> Path:
    """A backend file that belongs to one database version: ``<index>.<database_id><suffix>``."""
    return Path(f"{index_path}.{database_id}{suffix}")


def remove_sidecars(index_path: str | os.PathLike, suffixes: tuple[str, ...], keep_id: str | None) -> None:
    index_path = Path(index_path)
    keep = {sidecar(index_path, keep_id, suffix) for suffix in suffixes} if keep_id else set()
    for suffix in suffixes:
        for stale in index_path.parent.glob(f"{index_path.name}.*{suffix}"):
            if stale not in keep:
                stale.unlink(missing_ok=True)
