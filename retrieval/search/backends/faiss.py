"""The ``faiss`` backend: a faiss HNSW or IVF-Flat index file beside the database, updated in place of rebuilding.

Files of one database version: ``<index>.<database_id>.faiss`` plus ``<index>.<database_id>.faiss.npz`` mapping each
faiss id to a row of that version (-1: deleted). index.py adds the vectors of new or changed images under new ids and
marks the ids of removed or changed ones -1; they are filtered out during the search (an ``IDSelectorBitmap``: faiss
HNSW cannot remove ids). The index is rebuilt from scratch when more than ``REBUILD_DELETED`` of its ids are dead,
when the kind changes, or when every vector changed (a whitening learned again).

A database with region vectors (copy detection) has a second pair, ``<index>.<database_id>.regions.faiss`` and its
``.regions.faiss.npz``, built and updated the same way: one id per region, each mapped to the row of its image, so
the search of a query's regions returns image rows (``regions.RankedRegions`` makes them distinct).

This module also holds the faiss pieces the memory backend's HNSW graph uses (``build_hnsw``, ``write_index``).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

from ...errors import BackendError, IndexFileError, RetrievalError
from ...files import atomic_replace
from .base import Backend, BackendUpdate, SyncJob, remove_sidecars, sidecar
from .regions import ExactRegions, RankedRegions, Regions, RegionSearch

HNSW_M = 16  # graph degree: 16 builds ~1.5x faster than 32
HNSW_EF_CONSTRUCTION = 40
# recall@10 at 1M CNN-like 512-d vectors: 0.935 at efSearch 128, 0.989 at 256 (1.7 ms), 0.998 at 512 (3.1 ms)
HNSW_EF_SEARCH = 256
KINDS = ("auto", "hnsw", "ivf")
IVF_THRESHOLD = 2_000_000  # "auto": HNSW below, IVF-Flat from here (see ivf_settings and bench/scale.py)
REBUILD_DELETED = 0.25  # rebuild when more than this fraction of the ids are dead
ADD_BLOCK = 65_536
SUFFIXES = (".faiss", ".faiss.npz", ".regions.faiss", ".regions.faiss.npz")
GLOBAL, REGIONS = "", ".regions"  # the two parts of a database version: its global vectors, its region vectors


def add_blocks(index, matrix: np.ndarray) -> None:
    """Add ``matrix`` (N, d) to a faiss index a block at a time (float16 matrices converted block by block)."""
    for start in range(0, matrix.shape[0], ADD_BLOCK):
        index.add(np.ascontiguousarray(matrix[start : start + ADD_BLOCK], dtype=np.float32))


def build_hnsw(matrix: np.ndarray, m: int = HNSW_M, ef_construction: int = HNSW_EF_CONSTRUCTION):
    """faiss ``IndexHNSWFlat``, inner product (cosine on unit vectors), ids = rows of ``matrix``."""
    import faiss

    index = faiss.IndexHNSWFlat(matrix.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    add_blocks(index, matrix)
    return index


def write_index(index, path: Path) -> None:
    import faiss

    with atomic_replace(path) as temporary:
        faiss.write_index(index, str(temporary))


def read_index(path: Path):
    """A faiss index file, or None when it is missing or unreadable."""
    import faiss

    if not path.is_file():
        return None
    try:
        return faiss.read_index(str(path))
    except RuntimeError:
        return None


def search_params(settings: dict, k: int, selector=None):
    import faiss

    if settings["kind"] == "hnsw":
        params = faiss.SearchParametersHNSW(efSearch=max(int(settings.get("ef_search", HNSW_EF_SEARCH)), k))
    else:
        params = faiss.SearchParametersIVF(nprobe=int(settings["nprobe"]))
    if selector is not None:
        params.sel = selector
    return params


def resolve_kind(kind: str, count: int) -> str:
    if kind not in KINDS:
        raise RetrievalError(f"unknown faiss index {kind!r}; choose from {', '.join(KINDS)}")
    if kind == "auto":
        return "ivf" if count >= IVF_THRESHOLD else "hnsw"
    return kind


def ivf_settings(count: int) -> tuple[int, int]:
    """(nlist, nprobe) for an IVF-Flat index of ``count`` vectors: ~4 sqrt(N) lists (a power of two, at least 39
    training points each), 4 sqrt(nlist) of them visited per query. On CNN-like vectors (bench/scale.py) that is
    recall@10 0.971 at 100k (1024 lists, nprobe 128, 2 ms) and 0.974 at 1M (4096 lists, nprobe 256, 7.6 ms)."""
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(max(count, 1)))))
    nlist = max(1, min(nlist, count // 39, 65_536))
    return nlist, max(1, min(nlist, 4 * round(math.sqrt(nlist))))


def vectors_fingerprint(database) -> str:
    """Identifies how the searched vectors are made: encoder, storage type and whitening. Two versions of a database
    with the same fingerprint give bit-identical searched vectors for an unchanged image."""
    from ...descriptors.whitening import whitening_to_arrays

    digest = hashlib.sha256(json.dumps(database.encoder.identity(), sort_keys=True).encode("utf-8"))
    digest.update(str(np.asarray(database.vectors).dtype).encode("ascii"))
    if database.whitening is not None:
        arrays, attributes = whitening_to_arrays(database.whitening)
        digest.update(json.dumps(attributes, sort_keys=True).encode("utf-8"))
        for name in sorted(arrays):
            digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest()[:32]


def carried_rows(previous_rows: np.ndarray, previous_paths: list[str], paths: list[str], unchanged) -> np.ndarray:
    """Map ids pointing at rows of the previous version to rows of the new one; -1 where the image is gone or its
    vector changed (``unchanged``: paths whose vector is bit-identical in both versions)."""
    row_of = {path: row for row, path in enumerate(paths)}
    new_of_old = np.array([row_of.get(path, -1) if path in unchanged else -1 for path in previous_paths], dtype=np.int64)
    rows = np.full(len(previous_rows), -1, dtype=np.int64)
    live = previous_rows >= 0
    rows[live] = new_of_old[previous_rows[live]]
    return rows


def uncovered(rows: np.ndarray, owners: np.ndarray) -> np.ndarray:
    """Indices of the vectors (``owners`` (M,): the row each belongs to) whose row no id maps to (``rows``, -1 = none)."""
    covered = np.zeros(int(owners.max()) + 1 if len(owners) else 0, dtype=bool)
    covered[rows[(rows >= 0) & (rows < len(covered))]] = True
    return np.flatnonzero(~covered[owners])


def faiss_paths(index_path, database_id: str, part: str = GLOBAL) -> tuple[Path, Path]:
    """(the faiss index file, the npz of its id -> row map and settings) of one part (``GLOBAL`` or ``REGIONS``) of one
    database version."""
    return sidecar(index_path, database_id, f"{part}.faiss"), sidecar(index_path, database_id, f"{part}.faiss.npz")


class FaissBackend(Backend):
    """A faiss HNSW or IVF-Flat index (inner product) whose ids map to rows of one database version.

    ``rows[faiss_id]`` is the database row of that vector, or -1 for a deleted one; deleted ids are excluded during
    the search by an ``IDSelectorBitmap``, so they never take a place in the top k. Searches are thread-safe.
    """

    name = "faiss"
    options = {"faiss_index": "--faiss-index"}

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
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def dead(self) -> int:
        return len(self.rows) - self._count

    # ------------------------------------------------------------------ building

    @classmethod
    def build(cls, matrix: np.ndarray, kind: str, owners: np.ndarray | None = None) -> "FaissBackend":
        """A fresh index of ``kind`` hnsw | ivf over every row of ``matrix``; id ``i`` maps to row ``owners[i]`` (None:
        to row ``i``; regions: the row of the image each belongs to)."""
        import faiss

        count, dim = matrix.shape
        if kind == "hnsw":
            index = build_hnsw(matrix)
            settings = {"kind": "hnsw", "m": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": HNSW_EF_SEARCH}
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
            add_blocks(index, matrix)
            settings = {"kind": "ivf", "nlist": nlist, "nprobe": nprobe}
        else:
            raise ValueError(f"unknown faiss index kind {kind!r}")
        return cls(index, np.arange(count, dtype=np.int64) if owners is None else np.asarray(owners, np.int64), settings)

    def updated(self, matrix: np.ndarray, rows: np.ndarray, owners: np.ndarray | None = None) -> "FaissBackend":
        """This index carried to a new database version: ``rows`` maps its ids to the new rows (-1 = gone); every vector
        of ``matrix`` (the new version's; vector ``i`` belongs to row ``owners[i]``, None: to row ``i``) whose row no id
        maps to is added under a new id. The faiss index object is reused."""
        rows = np.asarray(rows, dtype=np.int64)
        owners = np.arange(matrix.shape[0], dtype=np.int64) if owners is None else np.asarray(owners, np.int64)
        missing = uncovered(rows, owners)
        add_blocks(self.index, matrix[missing] if len(missing) else matrix[:0])
        return FaissBackend(self.index, np.concatenate([rows, owners[missing]]), self.settings)

    def save(self, index_path, database_id: str, part: str = GLOBAL) -> None:
        """Write the two files of one part of a database version, each atomically (the map last: readers need both)."""
        index_file, map_file = faiss_paths(index_path, database_id, part)
        write_index(self.index, index_file)
        with atomic_replace(map_file) as temporary, open(temporary, "wb") as out:
            np.savez(out, rows=self.rows, settings=np.array(json.dumps(self.settings, sort_keys=True)))

    @classmethod
    def load(cls, index_path, database_id: str, part: str = GLOBAL) -> "FaissBackend | None":
        """The index saved for one part of this database version, or None when it is missing or unreadable."""
        index_file, map_file = faiss_paths(index_path, database_id, part)
        if not map_file.is_file():
            return None
        index = read_index(index_file)
        if index is None:
            return None
        try:
            with np.load(map_file, allow_pickle=False) as data:
                rows = np.array(data["rows"], dtype=np.int64)
                settings = json.loads(str(data["settings"]))
        except (OSError, ValueError, KeyError):
            return None
        if index.ntotal != len(rows) or not isinstance(settings, dict) or settings.get("kind") not in ("hnsw", "ivf"):
            return None
        return cls(index, rows, settings)

    # ------------------------------------------------------------------ index time

    @classmethod
    def check_options(cls, options: dict) -> None:
        if options.get("faiss_index") is not None:
            resolve_kind(options["faiss_index"], 0)

    @classmethod
    def record(cls, index_path: Path, options: dict, stored: dict | None) -> dict:
        kind = options.get("faiss_index") or (stored or {}).get("index") or "auto"
        return {"backend": cls.name, "index": kind}

    @classmethod
    def prepare(cls, job: SyncJob, record: dict) -> BackendUpdate:
        kind = record.get("index", "auto")
        update = cls._prepare_part(job, kind, job.matrix, None, GLOBAL)
        if job.regions is None:
            return update
        regions = cls._prepare_part(job, kind, job.regions.matrix, job.regions.image, REGIONS)
        return BackendUpdate(update.search, f"{update.detail}; regions {regions.detail}")

    @classmethod
    def _prepare_part(cls, job: SyncJob, kind: str, matrix: np.ndarray, owners: np.ndarray | None, part: str) -> BackendUpdate:
        """Carry the previous version's index of ``part`` to ``job.database`` (``matrix`` (M, d): the part's vectors,
        vector ``i`` of row ``owners[i]``, None: of row ``i``), or build it afresh, and save it."""
        database = job.database
        kind = resolve_kind(kind, matrix.shape[0])
        current = cls.load(job.index_path, job.database_id, part)
        if current is not None and current.settings["kind"] == kind and len(current) == matrix.shape[0]:
            return BackendUpdate(current.kind, "up to date")
        previous, unchanged = job.previous, job.unchanged
        if previous is not None and vectors_fingerprint(previous) != vectors_fingerprint(database):
            unchanged = frozenset()  # e.g. a whitening learned again: every searched vector differs
        carried = None
        if previous is not None and not job.rebuild and previous.database_id and unchanged:
            old = cls.load(job.index_path, previous.database_id, part)
            if old is not None and old.settings["kind"] == kind and old.dim == matrix.shape[1]:
                rows = carried_rows(old.rows, previous.paths, database.paths, unchanged)
                dead = int(np.sum(rows < 0))
                added = len(uncovered(rows, np.arange(matrix.shape[0]) if owners is None else owners))
                if dead <= REBUILD_DELETED * (len(rows) + added):
                    carried = old.updated(matrix, rows, owners)
                    detail = f"updated: {added} added, {carried.dead} dead ids filtered"
        if carried is None:
            carried = cls.build(matrix, kind, owners)
            detail = f"built {kind}" + (
                f" (nlist {carried.settings['nlist']}, nprobe {carried.settings['nprobe']})" if kind == "ivf" else ""
            )
        carried.save(job.index_path, job.database_id, part)
        return BackendUpdate(carried.kind, detail)

    @classmethod
    def remove_files(cls, index_path: Path, keep_id: str | None = None) -> None:
        remove_sidecars(index_path, SUFFIXES, keep_id)

    # ------------------------------------------------------------------ query time

    @classmethod
    def open(cls, index_path: Path, database, matrix: np.ndarray, record: dict, *, uri: str | None = None) -> "FaissBackend":
        database_id = database.database_id
        loaded = cls.load(index_path, database_id) if database_id else None
        if loaded is None:
            raise IndexFileError(
                f"{index_path}: no faiss index for this version of the database "
                f"({faiss_paths(index_path, database_id)[0].name}); run index.py --backend faiss to build it",
                kind="unavailable",
            )
        if len(loaded) != matrix.shape[0] or loaded.dim != matrix.shape[1]:
            raise IndexFileError(f"{index_path}: the faiss index does not match the database; run index.py to rebuild it")
        return loaded

    @classmethod
    def open_regions(cls, index_path: Path, database, regions: Regions, record: dict, *, uri: str | None = None) -> RegionSearch:
        """The regions' faiss index of this version; exact search in memory for a database indexed before it existed."""
        loaded = cls.load(index_path, database.database_id, REGIONS) if database.database_id else None
        if loaded is None:
            return ExactRegions.of(regions)
        if len(loaded) != len(regions) or np.any(loaded.rows[loaded.rows >= 0] >= regions.count):
            raise IndexFileError(f"{index_path}: the faiss index of its regions does not match the database; run index.py to rebuild it")
        return RankedRegions(loaded, regions.per_image)

    def search_batch(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.index is None:
            raise BackendError("the faiss index was closed")
        scores, ids = self.index.search(queries, k, params=search_params(self.settings, k, self._selector))
        found = ids >= 0
        rows = np.where(found, self.rows[np.where(found, ids, 0)], -1)
        return rows.astype(np.int64), np.where(found, scores, -np.inf).astype(np.float32)

    def close(self) -> None:
        self.index = None
