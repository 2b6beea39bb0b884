"""Search backends over the search matrix, one interface: ``search(query, k) -> (rows, scores)``, best first.

Three backends, chosen when the index is built (``index.py --backend``) and recorded in the database file (attribute
``search_backend``); readers open what the file names (``open_vector_index``), a server may override it:

``memory`` (default)
    The HDF5 matrix searched exactly in RAM (``ExactIndex``). Above ``ANN_THRESHOLD`` vectors (or with ``--ann hnsw``)
    index.py adds an HNSW graph beside the database, ``<index>.<database_id>.hnsw``, rebuilt for every database version.
``faiss``
    A faiss index beside the database, HNSW (``FaissIndex`` kind ``hnsw``) or, for very large sets, IVF-Flat (kind
    ``ivf``): ``<index>.<database_id>.faiss`` plus ``<index>.<database_id>.faiss.npz`` mapping each faiss id to a row
    of that database version (-1: deleted). index.py updates it in place of rebuilding: vectors of new or changed
    images are added under new faiss ids, the ids of removed or changed images are marked -1 and filtered out during
    the search (an ``IDSelectorBitmap``: faiss HNSW cannot remove ids); it is rebuilt from scratch when more than
    ``FAISS_REBUILD_DELETED`` of its ids are dead, when the kind changes, or when every vector changed (new whitening).
``milvus``
    A Milvus collection (``retrieval.milvus_backend``): a local ``*.db`` path runs the embedded Milvus Lite, an
    ``http://host:19530`` URI a Milvus standalone or distributed deployment.

Every derived structure names the database version it was built for (its ``database_id``). index.py builds it for
the new version *before* it commits the HDF5 file that names that version, so a reader never finds a database whose
search structure is still missing; stale ones are removed after the commit. The HDF5 file always keeps the vectors:
it stays the source of truth, the evaluator and the exact search read it, and any backend can be rebuilt from it.

Why 250,000 for the memory backend: exact search costs ~0.11 ms per 1,000 512-d vectors here (11 ms at 100k, ~90 ms
at 1M), which stays below ~30 ms (small beside a 30-300 ms CNN forward pass) up to about 250k vectors; exact results
are worth keeping until then. Above it, HNSW answers in under 2 ms at recall@10 ~0.99 (efSearch 256; bench/scale.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import IndexFileError, RetrievalError
from .search import top_k

ANN_THRESHOLD = 250_000
HNSW_M = 16  # graph degree: 16 builds ~1.5x faster than 32
HNSW_EF_CONSTRUCTION = 40
HNSW_EF_SEARCH = 256  # recall@10 at 1M CNN-like vectors: 0.935 at 128, >= 0.95 at 256, still under 2 ms (bench/run.py)
ANN_CHOICES = ("auto", "off", "hnsw")

BACKENDS = ("memory", "faiss", "milvus")
FAISS_KINDS = ("auto", "hnsw", "ivf")
FAISS_IVF_THRESHOLD = 2_000_000  # faiss "auto": HNSW below, IVF-Flat from here (see ivf_settings and bench/scale.py)
FAISS_REBUILD_DELETED = 0.25  # rebuild the faiss index when more than this fraction of its ids are dead
# the faiss backend's HNSW: as the memory backend's graph. bench/scale.py, 1M CNN-like 512-d vectors: recall@10 0.935
# at efSearch 128, 0.989 at 256 (1.7 ms), 0.998 at 512 (3.1 ms); at 100k 0.986 already at 128
FAISS_HNSW_EF_SEARCH = HNSW_EF_SEARCH


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
    """faiss ``IndexHNSWFlat`` with inner-product metric (cosine on unit vectors); faiss ids are the rows."""

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
        _add_blocks(index, matrix)
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
        _write_faiss(self.index, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HnswIndex":
        import faiss

        return cls(faiss.read_index(str(path)))


def _add_blocks(index, matrix: np.ndarray, block: int = 65_536) -> None:
    for start in range(0, matrix.shape[0], block):  # float16 matrices converted a block at a time
        index.add(np.ascontiguousarray(matrix[start : start + block], dtype=np.float32))


def _write_faiss(index, path: str | os.PathLike) -> None:
    import faiss

    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        faiss.write_index(index, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


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


# ------------------------------------------------------------------------------------------------------ faiss backend


def faiss_paths(index_path: str | os.PathLike, database_id: str) -> tuple[Path, Path]:
    """(the faiss index file, the npz of its id -> row map and settings) for one database version."""
    return Path(f"{index_path}.{database_id}.faiss"), Path(f"{index_path}.{database_id}.faiss.npz")


def remove_stale_faiss(index_path: str | os.PathLike, keep_id: str | None = None) -> None:
    index_path = Path(index_path)
    keep = set(faiss_paths(index_path, keep_id)) if keep_id else set()
    for pattern in (f"{index_path.name}.*.faiss", f"{index_path.name}.*.faiss.npz"):
        for stale in index_path.parent.glob(pattern):
            if stale not in keep:
                stale.unlink(missing_ok=True)


def resolve_faiss_kind(kind: str, count: int) -> str:
    if kind not in FAISS_KINDS:
        raise RetrievalError(f"unknown faiss index {kind!r}; choose from {', '.join(FAISS_KINDS)}")
    if kind == "auto":
        return "ivf" if count >= FAISS_IVF_THRESHOLD else "hnsw"
    return kind


def ivf_settings(count: int) -> tuple[int, int]:
    """(nlist, nprobe) for an IVF-Flat index of ``count`` vectors: ~4 sqrt(N) lists (a power of two, at least 39
    training points each), 4 sqrt(nlist) of them visited per query. On CNN-like vectors (bench/scale.py) that is
    recall@10 0.971 at 100k (1024 lists, nprobe 128, 2 ms) and 0.974 at 1M (4096 lists, nprobe 256, 7.6 ms)."""
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(max(count, 1)))))
    nlist = max(1, min(nlist, count // 39, 65_536))
    return nlist, max(1, min(nlist, 4 * round(math.sqrt(nlist))))


class FaissIndex:
    """A faiss HNSW or IVF-Flat index (inner product) whose ids map to rows of one database version.

    ``rows[faiss_id]`` is the database row of that vector, or -1 for a deleted one; deleted ids are excluded during
    the search by an ``IDSelectorBitmap``, so they never take a place in the top k. Searches are thread-safe.
    """

    def __init__(self, index, rows: np.ndarray, settings: dict):
        import faiss

        self.index = index
        self.rows = np.asarray(rows, dtype=np.int64)
        self.settings = dict(settings)
        self.kind = f"faiss-{settings['kind']}"
        live = self.rows >= 0
        self._count = int(live.sum())
        self._bitmap = None if live.all() else np.packbits(live, bitorder="little")
        self._selector = None
        if self._bitmap is not None:
            self._selector = faiss.IDSelectorBitmap(len(self.rows), faiss.swig_ptr(self._bitmap))

    def __len__(self) -> int:
        return self._count

    @property
    def dead(self) -> int:
        return len(self.rows) - self._count

    @classmethod
    def build(cls, matrix: np.ndarray, kind: str) -> "FaissIndex":
        """A fresh index of ``kind`` hnsw | ivf over every row of ``matrix``."""
        import faiss

        count, dim = matrix.shape
        if kind == "hnsw":
            index = HnswIndex.build(matrix).index
            settings = {"kind": "hnsw", "m": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": FAISS_HNSW_EF_SEARCH}
        elif kind == "ivf":
            nlist, nprobe = ivf_settings(count)
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.spherical = True  # centroids on the unit sphere, like the descriptors
            if nlist == 1:
                centroid = np.asarray(matrix, np.float32).mean(axis=0, keepdims=True)
                quantizer.add(centroid / max(float(np.linalg.norm(centroid)), 1e-12))
                index.is_trained = True
            else:
                sample_size = min(count, 64 * nlist)
                sample = np.random.default_rng(0).choice(count, sample_size, replace=False)
                index.train(np.ascontiguousarray(matrix[np.sort(sample)], dtype=np.float32))
            _add_blocks(index, matrix)
            settings = {"kind": "ivf", "nlist": nlist, "nprobe": nprobe}
        else:
            raise ValueError(f"unknown faiss index kind {kind!r}")
        return cls(index, np.arange(count, dtype=np.int64), settings)

    def updated(self, matrix: np.ndarray, rows: np.ndarray) -> "FaissIndex":
        """This index carried to a new database version: ``rows`` maps its ids to the new rows (-1 = gone); every row of
        ``matrix`` (the new version) that no id maps to is added under a new id. The faiss index object is reused."""
        rows = np.asarray(rows, dtype=np.int64)
        covered = np.zeros(matrix.shape[0], dtype=bool)
        covered[rows[rows >= 0]] = True
        missing = np.flatnonzero(~covered)
        for start in range(0, len(missing), 65_536):
            block = missing[start : start + 65_536]
            self.index.add(np.ascontiguousarray(matrix[block], dtype=np.float32))
        return FaissIndex(self.index, np.concatenate([rows, missing.astype(np.int64)]), self.settings)

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        k = min(k, self._count)
        if k == 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        import faiss

        if self.settings["kind"] == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(int(self.settings["ef_search"]), k))
        else:
            params = faiss.SearchParametersIVF(nprobe=int(self.settings["nprobe"]))
        if self._selector is not None:
            params.sel = self._selector
        scores, ids = self.index.search(np.asarray(query, np.float32).reshape(1, -1), k, params=params)
        keep = ids[0] >= 0
        rows = self.rows[ids[0][keep]]
        return rows.astype(np.int64), scores[0][keep].astype(np.float32)

    def save(self, index_path: str | os.PathLike, database_id: str) -> None:
        """Write the two files of one database version, each atomically (the map last: readers need both)."""
        index_file, map_file = faiss_paths(index_path, database_id)
        _write_faiss(self.index, index_file)
        handle, temporary = tempfile.mkstemp(prefix=f".{map_file.name}.", suffix=".npz", dir=map_file.parent)
        try:
            with os.fdopen(handle, "wb") as out:
                np.savez(out, rows=self.rows, settings=np.array(json.dumps(self.settings, sort_keys=True)))
            os.replace(temporary, map_file)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, index_path: str | os.PathLike, database_id: str) -> "FaissIndex | None":
        """The index saved for this database version, or None when it is missing or unreadable."""
        import faiss

        index_file, map_file = faiss_paths(index_path, database_id)
        if not (index_file.is_file() and map_file.is_file()):
            return None
        try:
            with np.load(map_file, allow_pickle=False) as data:
                rows = np.array(data["rows"], dtype=np.int64)
                settings = json.loads(str(data["settings"]))
            index = faiss.read_index(str(index_file))
        except (OSError, ValueError, KeyError, RuntimeError):
            return None
        if index.ntotal != len(rows):
            return None
        return cls(index, rows, settings)


def carried_rows(previous_rows: np.ndarray, previous_paths: list[str], paths: list[str], unchanged: set[str]) -> np.ndarray:
    """Map ids pointing at rows of the previous version to rows of the new one; -1 where the image is gone or its
    vector changed (``unchanged``: paths whose vector is bit-identical in both versions)."""
    row_of = {path: row for row, path in enumerate(paths)}
    new_of_old = np.array([row_of.get(path, -1) if path in unchanged else -1 for path in previous_paths], dtype=np.int64)
    rows = np.full(len(previous_rows), -1, dtype=np.int64)
    live = previous_rows >= 0
    rows[live] = new_of_old[previous_rows[live]]
    return rows


# --------------------------------------------------------------------------------------------- choosing a backend


def vectors_fingerprint(database) -> str:
    """Identifies how the searched vectors are made: encoder, storage type and whitening. Two versions of a database
    with the same fingerprint give bit-identical searched vectors for an unchanged image."""
    from .whitening import whitening_to_arrays

    digest = hashlib.sha256(json.dumps(database.encoder.identity(), sort_keys=True).encode("utf-8"))
    digest.update(str(np.asarray(database.vectors).dtype).encode("ascii"))
    if database.whitening is not None:
        arrays, attributes = whitening_to_arrays(database.whitening)
        digest.update(json.dumps(attributes, sort_keys=True).encode("utf-8"))
        for name in sorted(arrays):
            digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class BackendRequest:
    """What index.py was asked for; None fields take the existing database's choice (or the default).

    ``name`` memory | faiss | milvus; ``ann`` (memory only) auto | off | hnsw; ``faiss_index`` auto | hnsw | ivf;
    ``milvus_uri`` a ``*.db`` path (Milvus Lite) or ``http://host:19530``; ``milvus_collection``; ``milvus_index``
    HNSW | IVF_FLAT.
    """

    name: str | None = None
    ann: str = "auto"
    faiss_index: str | None = None
    milvus_uri: str | None = None
    milvus_collection: str | None = None
    milvus_index: str | None = None

    def check(self) -> None:
        """Raise RetrievalError for a choice that cannot work, before any work is done."""
        if self.name is not None and self.name not in BACKENDS:
            raise RetrievalError(f"unknown backend {self.name!r}; choose from {', '.join(BACKENDS)}")
        if self.ann not in ANN_CHOICES:
            raise RetrievalError(f"unknown ANN choice {self.ann!r}; choose from {', '.join(ANN_CHOICES)}")
        if self.name not in (None, "memory") and self.ann != "auto":
            raise RetrievalError("--ann applies to the memory backend (faiss and milvus build their own index)")
        if self.faiss_index is not None:
            if self.name not in (None, "faiss"):
                raise RetrievalError("--faiss-index applies to --backend faiss")
            resolve_faiss_kind(self.faiss_index, 0)
        milvus_given = [self.milvus_uri, self.milvus_collection, self.milvus_index]
        if any(value is not None for value in milvus_given):
            if self.name not in (None, "milvus"):
                raise RetrievalError("--milvus-uri, --milvus-collection and --milvus-index apply to --backend milvus")
            from . import milvus_backend

            milvus_backend.check_settings(self.milvus_uri, self.milvus_collection, self.milvus_index)

    def resolve(self, index_path: str | os.PathLike, existing: dict | None) -> dict:
        """The record to store in the database: the requested backend with every field filled in."""
        existing = normalized_record(existing)
        name = self.name or existing["backend"]
        if self.name is None and name != "milvus" and any(
            value is not None for value in (self.milvus_uri, self.milvus_collection, self.milvus_index)
        ):
            name = "milvus"  # milvus options alone mean the milvus backend
        if self.name is None and name != "faiss" and self.faiss_index is not None:
            name = "faiss"
        same = existing["backend"] == name
        if name != "memory" and self.ann != "auto":
            raise RetrievalError(f"--ann applies to the memory backend; this database uses {name}")
        if name == "memory":
            return {"backend": "memory"}
        if name == "faiss":
            return {"backend": "faiss", "index": self.faiss_index or (existing.get("index") if same else None) or "auto"}
        from . import milvus_backend

        return milvus_backend.resolve_record(
            index_path,
            uri=self.milvus_uri,
            stored_uri=existing.get("uri") if same else None,
            collection=self.milvus_collection or (existing.get("collection") if same else None),
            index_type=self.milvus_index or (existing.get("index_type") if same else None),
        )


def normalized_record(record: dict | None) -> dict:
    """A database's ``search_backend`` with the default filled in (files written before backends existed: memory)."""
    record = dict(record or {})
    record.setdefault("backend", "memory")
    if record["backend"] not in BACKENDS:
        raise IndexFileError(f"the database names search backend {record['backend']!r}, which this version does not know")
    return record


@dataclass
class BackendUpdate:
    """What ``prepare_backend`` did, for the indexing report."""

    search: str = "exact"  # exact | hnsw | faiss-hnsw | faiss-ivf | milvus-HNSW | milvus-IVF_FLAT
    detail: str = ""


def prepare_backend(
    record: dict,
    index_path: str | os.PathLike,
    database,
    database_id: str,
    matrix: np.ndarray,
    *,
    previous=None,
    unchanged: set[str] = frozenset(),
    ann: str = "auto",
    rebuild: bool = False,
    notice: Callable[[str], None] = print,
) -> BackendUpdate:
    """Bring the search structure of ``record``'s backend to ``database`` (version ``database_id``), before index.py
    commits the file. ``previous``: the database version being replaced (None for a new one); ``unchanged``: the
    paths whose vector is bit-identical in both. Raises RetrievalError when the backend cannot be brought up to date.

    The memory backend's HNSW graph is built after the commit, as it always was (``finish_backend``).
    """
    name = record["backend"]
    if name == "memory":
        return BackendUpdate("hnsw" if wants_ann(ann, len(database)) else "exact")
    if name == "faiss":
        kind = resolve_faiss_kind(record.get("index", "auto"), len(database))
        current = FaissIndex.load(index_path, database_id)
        if current is not None and current.settings["kind"] == kind and len(current) == len(database):
            return BackendUpdate(current.kind, "up to date")
        carried = None
        if previous is not None and vectors_fingerprint(previous) != vectors_fingerprint(database):
            unchanged = frozenset()  # e.g. a whitening learned again: every searched vector differs
        if previous is not None and not rebuild and previous.database_id and unchanged:
            old = FaissIndex.load(index_path, previous.database_id)
            if old is not None and old.settings["kind"] == kind and old.index.d == matrix.shape[1]:
                rows = carried_rows(old.rows, previous.paths, database.paths, set(unchanged))
                dead = int(np.sum(rows < 0))
                added = len(database) - int(np.sum(rows >= 0))
                if dead <= FAISS_REBUILD_DELETED * (len(rows) + added):
                    carried = old.updated(matrix, rows)
                    detail = f"updated: {added} added, {carried.dead} dead ids filtered"
        if carried is None:
            carried = FaissIndex.build(matrix, kind)
            detail = f"built {kind}" + (
                f" (nlist {carried.settings['nlist']}, nprobe {carried.settings['nprobe']})" if kind == "ivf" else ""
            )
        carried.save(index_path, database_id)
        return BackendUpdate(carried.kind, detail)
    from . import milvus_backend

    detail = milvus_backend.sync_collection(
        record, index_path, database, database_id, matrix,
        previous=previous, unchanged=unchanged, rebuild=rebuild, notice=notice,
    )
    return BackendUpdate(f"milvus-{record['index_type']}", detail)


def finish_backend(record: dict, index_path: str | os.PathLike, database_id: str, matrix: np.ndarray, ann: str = "auto") -> None:
    """After the commit: the memory backend's HNSW graph, and removal of structures no version uses any more."""
    name = record["backend"]
    keep_graph = None
    if name == "memory" and wants_ann(ann, matrix.shape[0]):
        keep_graph = hnsw_path(index_path, database_id)
        if not keep_graph.exists():
            HnswIndex.build(matrix).save(keep_graph)
    remove_stale_hnsw(index_path, keep=keep_graph)
    remove_stale_faiss(index_path, keep_id=database_id if name == "faiss" else None)


def open_vector_index(
    index_path: str | os.PathLike,
    database_id: str,
    matrix: np.ndarray,
    record: dict | None = None,
    paths: list[str] | None = None,
    *,
    backend: str | None = None,
    milvus_uri: str | None = None,
):
    """The search structure of this database version: the recorded backend's, or ``backend`` when a reader asks for
    another (``memory`` always works: the vectors are in the file). Raises RetrievalError when it is unavailable.

    memory: the HNSW graph built for exactly this version if there is one, else exact search over ``matrix``.
    """
    record = normalized_record(record)
    if backend is not None and backend not in BACKENDS:
        raise RetrievalError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    name = backend or record["backend"]
    if name == "memory":
        graph = hnsw_path(index_path, database_id) if database_id else None
        if graph is not None and graph.is_file():
            loaded = HnswIndex.load(graph)
            if len(loaded) == matrix.shape[0]:
                return loaded
        return ExactIndex(matrix)
    if name == "faiss":
        loaded = FaissIndex.load(index_path, database_id) if database_id else None
        if loaded is None:
            raise IndexFileError(
                f"{index_path}: no faiss index for this version of the database "
                f"({faiss_paths(index_path, database_id)[0].name}); run index.py --backend faiss to build it"
            )
        if len(loaded) != matrix.shape[0] or loaded.index.d != matrix.shape[1]:
            raise IndexFileError(f"{index_path}: the faiss index does not match the database; run index.py to rebuild it")
        return loaded
    if record["backend"] != "milvus" and milvus_uri is None:
        raise IndexFileError(f"{index_path}: built for the {record['backend']} backend, not milvus (no collection recorded)")
    from . import milvus_backend

    return milvus_backend.MilvusIndex.open(index_path, record, paths or [], matrix.shape[1], uri=milvus_uri)
