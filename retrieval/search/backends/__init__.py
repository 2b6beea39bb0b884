"""Search backends behind one interface (``base.Backend``), and ``BACKENDS``: the one place a name maps to a class.

``memory`` (default, ``memory.py``): the HDF5 matrix searched exactly in RAM, with an HNSW graph beside it for large
sets; ``faiss`` (``faiss.py``): an HNSW / IVF-Flat index file beside the database; ``milvus`` (``milvus.py``): a
collection in Milvus Lite or a Milvus server. The backend is chosen when the index is built (``index.py --backend``)
and recorded in the database file (attribute ``search_backend``); readers open what the file names, a reader may ask
for another (``memory`` always works: the vectors are in the file).

Every derived structure names the database version it was built for (its ``database_id``). index.py builds it for
the new version *before* it commits the HDF5 file that names that version, so a reader never finds a database whose
search structure is still missing; stale ones are removed after the commit. Adding a backend: one module with a
``Backend`` subclass, one line in ``BACKENDS``.

A database with region vectors (copy detection) has them searched by the same backend (``open_regions``, see
``regions.py``): exact in memory, a second faiss index, a second Milvus collection; results are always images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import IndexFileError, RetrievalError
from .base import Backend, BackendUpdate, SyncJob
from .faiss import FaissBackend
from .memory import MemoryBackend
from .milvus import MilvusBackend
from .regions import RegionSearch, database_regions

BACKENDS: dict[str, type[Backend]] = {
    "memory": MemoryBackend,
    "faiss": FaissBackend,
    "milvus": MilvusBackend,
}
DEFAULT_BACKEND = "memory"


def backend_class(name: str) -> type[Backend]:
    try:
        return BACKENDS[name]
    except KeyError:
        raise RetrievalError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}") from None


def normalized_record(record: dict | None) -> dict:
    """A database's ``search_backend`` with the default filled in (files written before backends existed: memory)."""
    record = dict(record or {})
    record.setdefault("backend", DEFAULT_BACKEND)
    if record["backend"] not in BACKENDS:
        raise IndexFileError(f"the database names search backend {record['backend']!r}, which this version does not know")
    return record


def option_owner(option: str) -> type[Backend]:
    for cls in BACKENDS.values():
        if option in cls.options:
            return cls
    raise RetrievalError(f"unknown backend option {option!r}")


@dataclass(frozen=True)
class BackendRequest:
    """What index.py was asked for: ``name`` (None: the existing database's, or the one its options imply, or
    memory) and ``options``, the backend options actually given (e.g. ``{"faiss_index": "ivf"}``)."""

    name: str | None = None
    options: dict = field(default_factory=dict)

    def given(self) -> dict:
        return {key: value for key, value in self.options.items() if value is not None}

    def check(self) -> None:
        """Raise RetrievalError for a choice that cannot work, before any work is done."""
        if self.name is not None:
            backend_class(self.name)
        owners = {option: option_owner(option) for option in self.given()}
        for option, owner in owners.items():
            if self.name is not None and owner.name != self.name:
                raise RetrievalError(f"{owner.options[option]} applies to --backend {owner.name}, not {self.name}")
        if len({owner.name for owner in owners.values()}) > 1:
            flags = ", ".join(owner.options[option] for option, owner in owners.items())
            raise RetrievalError(f"{flags}: options of different backends; give one --backend")
        for owner in set(owners.values()):
            owner.check_options(self.given())

    def chosen(self, existing: dict | None) -> type[Backend]:
        """The backend to use: the named one, else the one whose options were given, else the existing database's."""
        if self.name is not None:
            return backend_class(self.name)
        owners = {option_owner(option) for option in self.given()}
        if owners:
            return owners.pop()
        return backend_class(normalized_record(existing)["backend"])

    def resolve(self, index_path: Path, existing: dict | None) -> dict:
        """The record to store in the database: the chosen backend with every field filled in."""
        self.check()
        existing = normalized_record(existing)
        cls = self.chosen(existing)
        stored = existing if existing["backend"] == cls.name else None
        return cls.record(Path(index_path), self.given(), stored)


def prepare_backend(record: dict, job: SyncJob) -> BackendUpdate:
    """Bring the recorded backend's structure to ``job.database`` before index.py commits the file."""
    return backend_class(record["backend"]).prepare(job, record)


def finish_backend(record: dict, job: SyncJob, previous_record: dict | None) -> None:
    """After the commit: the chosen backend's finishing work; every other backend's files removed; a backend or
    collection the database left behind named."""
    chosen = backend_class(record["backend"])
    chosen.finish(job, record)
    for cls in BACKENDS.values():
        if cls is not chosen:
            cls.remove_files(job.index_path, keep_id=None)
    if previous_record is not None and previous_record != record:
        backend_class(previous_record["backend"]).retire(job.index_path, previous_record, record, job.notice)


def open_backend(
    index_path: Path, database, matrix: np.ndarray, *, override: str | None = None, uri: str | None = None
) -> Backend:
    """The search structure of this database version: the recorded backend's, or ``override`` when a reader asks for
    another. ``uri`` reaches a recorded Milvus collection at another address. Raises RetrievalError when unusable."""
    record = normalized_record(database.search_backend)
    cls = backend_class(override or record["backend"])
    return cls.open(Path(index_path), database, matrix, record, uri=uri)


def open_regions(index_path: Path, database, *, override: str | None = None, uri: str | None = None) -> RegionSearch | None:
    """The search of this database version's region vectors through the backend ``open_backend`` chose (None when
    the database stores no regions)."""
    regions = database_regions(database)
    if regions is None:
        return None
    record = normalized_record(database.search_backend)
    cls = backend_class(override or record["backend"])
    return cls.open_regions(Path(index_path), database, regions, record, uri=uri)


__all__ = [
    "BACKENDS", "Backend", "BackendRequest", "BackendUpdate", "RegionSearch", "SyncJob",
    "backend_class", "database_regions", "finish_backend", "normalized_record", "open_backend", "open_regions", "prepare_backend",
]
