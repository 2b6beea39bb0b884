"""The Milvus search backend: the searched vectors, their paths and file stats in a Milvus collection (``pymilvus``).

A URI that is a local path ending in ``.db`` runs the embedded Milvus Lite inside the process (the default is
``<index>.milvus.db`` beside the database file); ``http://host:19530`` talks to a Milvus standalone or distributed
deployment. The HDF5 database stays the source of truth: it keeps the encoder settings and the vectors too (so the
evaluator, ``--backend memory`` and a rebuild of the collection all work from it) and records the backend, the URI,
the collection and the index settings in its ``search_backend`` attribute.

The collection (one per database)::

    path            VARCHAR primary key   the image path relative to the image folder (the database's ``paths``)
    vector          FLOAT_VECTOR (D)      the searched vector (whitened when the database is), unit length
    file_size       INT64                 what incremental updates compare
    file_mtime_ns   INT64

    properties      cbir.format, cbir.database_id (the database version it mirrors), cbir.vectors (fingerprint of
                    how the vectors were made: encoder, storage type, whitening)

A database with region vectors (copy detection) has a second collection, ``<collection>__regions``, one row per
region, searched for a query's regions (``regions.RankedRegions`` turns its hits into distinct images)::

    key             VARCHAR primary key   "<j>:<path>", region j of that image
    path            VARCHAR               the image it belongs to
    vector, file_size, file_mtime_ns      as above (the image's file stats); the same properties

Index: ``HNSW`` (M 16, efConstruction 40; searched with ef = max(256, k)) or ``IVF_FLAT`` (nlist 1024, nprobe 128),
inner product (= cosine on unit vectors). Only these two are accepted: Milvus Lite accepts other index types
(IVF_PQ, DISKANN, SCANN, anything) and then fails to build them in the background, while ``describe_index`` keeps
reporting ``Finished`` and every search silently stays brute force. So after every change index.py checks the index:
on Milvus Lite by releasing and loading the collection, which builds the index of every segment synchronously and
fails loudly; on a Milvus server by waiting (up to ``INDEX_WAIT_S``) until ``describe_index`` reports every row
indexed.

Updates map to Milvus operations: images gone from the folder are deleted, new and changed ones upserted (a changed
file keeps its path, so the upsert replaces its row). When the collection mirrors the previous database version
(``cbir.database_id``) only that difference is sent; otherwise (a failed earlier run, another database) the whole
collection is reconciled with the database (its paths and file stats are read back and compared).

Milvus Lite serves one process at a time (it locks its folder): index a Lite collection while no server has it
open, or use a Milvus server for a collection that is searched while it is being updated.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import BackendError, IndexFileError, RetrievalError
from .base import Backend, BackendUpdate, SyncJob, empty_result
from .faiss import vectors_fingerprint
from .regions import ExactRegions, RankedRegions, Regions, RegionSearch

INDEX_TYPES = ("HNSW", "IVF_FLAT")
INDEX_PARAMS = {"HNSW": {"M": 16, "efConstruction": 40}, "IVF_FLAT": {"nlist": 1024}}  # as the faiss backend
SEARCH_PARAMS = {"HNSW": {"ef": 256}, "IVF_FLAT": {"nprobe": 128}}  # as the faiss backend
METRIC = "IP"
CONNECT_TIMEOUT_S = 10.0  # connecting, and each call of a short operation
CALL_TIMEOUT_S = 120.0  # one batch of inserts or deletes, a flush
BUILD_TIMEOUT_S = 3_600.0  # creating the index or loading the collection: Milvus Lite builds the index in that call
SEARCH_TIMEOUT_S = 30.0
INDEX_WAIT_S = 600.0  # a Milvus server builds its index in the background: how long index.py waits for it
BATCH_ROWS = 2_000  # rows per upsert (512-d: ~4 MB, far below gRPC's 64 MB)
DELETE_BATCH = 1_000
MAX_PATH_BYTES = 8_192
MAX_TOP_K = 16_384  # Milvus' limit on k
SEARCH_SLACK = 16  # extra results asked for, in case some paths are not in this version of the database
SEARCH_BATCH = 64  # queries per search call
FORMAT = "cbir-feature-database"
NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
REMOTE_SCHEMES = ("http://", "https://", "tcp://", "unix:")
REGION_SUFFIX = "__regions"


# ------------------------------------------------------------------------------------------------ settings and URIs


def is_lite(uri: str) -> bool:
    return not uri.lower().startswith(REMOTE_SCHEMES)


def check_settings(uri: str | None, collection: str | None, index_type: str | None) -> None:
    """RetrievalError for a malformed URI, collection name or index type (no connection is made)."""
    if uri is not None:
        if not uri.strip():
            raise RetrievalError("empty Milvus URI")
        if is_lite(uri) and not uri.endswith(".db"):
            raise RetrievalError(
                f"Milvus URI {uri!r}: give http://host:19530 for a Milvus server or a local path ending in .db for Milvus Lite"
            )
    if collection is not None and not NAME_PATTERN.fullmatch(collection):
        raise RetrievalError(
            f"Milvus collection name {collection!r}: use letters, digits and underscores, not starting with a digit"
        )
    if index_type is not None and index_type not in INDEX_TYPES:
        raise RetrievalError(
            f"Milvus index type {index_type!r} is not supported here; choose from {', '.join(INDEX_TYPES)} "
            "(Milvus Lite accepts other types and then silently searches by brute force)"
        )


def default_collection(index_path: str | os.PathLike) -> str:
    stem = re.sub(r"[^A-Za-z0-9_]", "_", Path(index_path).stem)
    return f"cbir_{stem}"[:255]


def region_collection(collection: str) -> str:
    """The collection of the region vectors of the database whose global vectors are in ``collection``."""
    return collection[: 255 - len(REGION_SUFFIX)] + REGION_SUFFIX


def region_keys(paths: list[str], image: np.ndarray) -> list[str]:
    """Primary keys "<j>:<path>" of regions (``image`` (M,): the non-decreasing row of each) of images ``paths``."""
    image = np.asarray(image, np.int64)
    if not len(image):
        return []
    within = np.arange(len(image)) - np.searchsorted(image, image, side="left")
    return [f"{j}:{paths[row]}" for j, row in zip(within.tolist(), image.tolist())]


def resolve_record(
    index_path, *, uri: str | None, collection: str | None, index_type: str | None, stored_uri: str | None = None
) -> dict:
    """The ``search_backend`` record of a Milvus database. ``uri`` as the user gave it (a Lite path relative to the
    working directory), else ``stored_uri`` as recorded, else the default beside the database. A Lite path is stored
    relative to the database's folder when it lies inside it (the two move together), else absolute."""
    check_settings(uri, collection, index_type)
    index_path = Path(index_path)
    if uri is None:
        uri = stored_uri or f"{index_path.name}.milvus.db"
    elif is_lite(uri):
        folder = index_path.resolve().parent
        absolute = (Path.cwd() / uri).resolve() if not Path(uri).is_absolute() else Path(uri).resolve()
        try:
            uri = absolute.relative_to(folder).as_posix()
        except ValueError:
            uri = str(absolute)
    index_type = index_type or "HNSW"
    return {
        "backend": "milvus",
        "uri": uri,
        "collection": collection or default_collection(index_path),
        "index_type": index_type,
        "metric_type": METRIC,
        "index_params": dict(INDEX_PARAMS[index_type]),
        "search_params": dict(SEARCH_PARAMS[index_type]),
    }


def runtime_uri(index_path: str | os.PathLike, uri: str) -> str:
    """The URI to connect to: a relative Lite path is relative to the database's folder."""
    if is_lite(uri) and not Path(uri).is_absolute():
        return str(Path(index_path).resolve().parent / uri)
    return uri


def _quiet_logs() -> None:
    # pymilvus logs every failed call with a traceback, Milvus Lite its background failures: we report them ourselves
    for name in ("pymilvus", "milvus_lite"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _reason(exc: Exception) -> str:
    if callable(getattr(exc, "code", None)) and callable(getattr(exc, "details", None)):
        # a raw gRPC error (pymilvus lets DEADLINE_EXCEEDED through): its str() starts "<_InactiveRpcError of RPC..."
        try:
            return f"{exc.code().name}: {exc.details()}"
        except Exception:
            pass
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return str(message).strip().splitlines()[0]


_lite_lock = threading.Lock()
_lite_users: dict[str, int] = {}  # Milvus Lite folder -> our open clients on it


def connect(uri: str):
    """A ``MilvusClient`` for ``uri``; RetrievalError (one line) when it cannot be reached within the timeout.
    Give it back with ``disconnect``."""
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise RetrievalError("the milvus backend needs pymilvus (pip install pymilvus milvus-lite)") from None
    _quiet_logs()
    if is_lite(uri):
        folder = Path(uri).parent
        if not folder.is_dir():
            raise RetrievalError(f"{uri}: cannot create a Milvus Lite database there, folder {folder} does not exist")
    options = {}
    if is_lite(uri):
        # pymilvus pings every 10 s; Milvus Lite's gRPC server allows one ping per 5 minutes without data and
        # answers more with GOAWAY, which kills a long call (building the index of a million vectors) and makes
        # pymilvus retry it. In-process, keepalive is pointless: ping rarely.
        options["grpc_options"] = {"grpc.keepalive_time_ms": 3_600_000, "grpc.keepalive_permit_without_calls": False}
    try:
        client = MilvusClient(uri=uri, timeout=CONNECT_TIMEOUT_S, **options)
    except Exception as exc:  # pymilvus raises its own and gRPC errors
        if is_lite(uri):
            raise BackendError(
                f"{uri}: cannot open the Milvus Lite database ({_reason(exc)}); Milvus Lite serves one process at a time, "
                "is a server or another index.py using it?"
            ) from None
        raise BackendError(f"cannot reach Milvus at {uri}: {_reason(exc)}") from None
    if is_lite(uri):
        with _lite_lock:
            _lite_users[os.path.abspath(uri)] = _lite_users.get(os.path.abspath(uri), 0) + 1
    return client


def disconnect(client, uri: str) -> None:
    """Close a client of ``connect``. When the last one of a Milvus Lite folder goes, its in-process server stops
    and unlocks the folder (pymilvus itself keeps it until the process exits), so another process can open it."""
    try:
        client.close()
    except Exception:
        pass
    if not is_lite(uri):
        return
    path = os.path.abspath(uri)
    with _lite_lock:
        left = _lite_users.get(path, 1) - 1
        if left > 0:
            _lite_users[path] = left
            return
        _lite_users.pop(path, None)
        try:
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(path)
        except Exception:
            pass


def check_reachable(index_path, record: dict) -> None:
    """Connect once and close: index.py calls this before extracting, so a wrong URI fails in seconds."""
    uri = runtime_uri(index_path, record["uri"])
    client = connect(uri)
    try:
        _call("listing collections", uri, client.list_collections, timeout=CONNECT_TIMEOUT_S)
    finally:
        disconnect(client, uri)


def _call(what: str, uri: str, function, *args, **kwargs):
    try:
        return function(*args, **kwargs)
    except RetrievalError:
        raise
    except Exception as exc:
        raise BackendError(f"Milvus at {uri}: {what} failed: {_reason(exc)}") from None


# ---------------------------------------------------------------------------------------------------- searching


class MilvusBackend(Backend):
    """Search a Milvus collection; hits are mapped back to rows of the database version in memory by path (a path
    that this version does not have, as while index.py is updating the collection, is left out)."""

    name = "milvus"
    options = {"milvus_uri": "--milvus-uri", "milvus_collection": "--milvus-collection", "milvus_index": "--milvus-index"}

    def __init__(self, client, uri: str, record: dict, paths: list[str], dim: int, *, collection: str | None = None, count: int | None = None):
        self.client = client
        self.uri = uri
        self.collection = collection or record["collection"]
        self.index_type = record.get("index_type", "HNSW")
        self.kind = f"milvus-{self.index_type}"
        self.search_params = dict(record.get("search_params") or SEARCH_PARAMS.get(self.index_type, {}))
        self.row_of = {path: row for row, path in enumerate(paths)}
        self._dim = dim
        self._count = len(self.row_of) if count is None else int(count)  # the region collection: its regions

    def __len__(self) -> int:
        return self._count

    @property
    def dim(self) -> int:
        return self._dim

    # ------------------------------------------------------------------ index time

    @classmethod
    def check_options(cls, options: dict) -> None:
        check_settings(options.get("milvus_uri"), options.get("milvus_collection"), options.get("milvus_index"))

    @classmethod
    def record(cls, index_path: Path, options: dict, stored: dict | None) -> dict:
        stored = stored or {}
        return resolve_record(
            index_path,
            uri=options.get("milvus_uri"),
            stored_uri=stored.get("uri"),
            collection=options.get("milvus_collection") or stored.get("collection"),
            index_type=options.get("milvus_index") or stored.get("index_type"),
        )

    @classmethod
    def check_reachable(cls, index_path: Path, record: dict) -> None:
        check_reachable(index_path, record)

    @classmethod
    def prepare(cls, job: SyncJob, record: dict) -> BackendUpdate:
        detail = sync_collection(record, job)
        return BackendUpdate(f"milvus-{record['index_type']}", detail)

    @classmethod
    def finish(cls, job: SyncJob, record: dict) -> None:
        """Nothing beside the database to clean: the collection lives in Milvus."""

    @classmethod
    def retire(cls, index_path: Path, old: dict, new: dict, notice) -> None:
        if (old.get("uri"), old.get("collection")) != (new.get("uri"), new.get("collection")):
            notice(f"Milvus collection {old.get('collection')} at {old.get('uri')} is no longer used by this database; "
                   "drop it if nothing else needs it")

    # ------------------------------------------------------------------ query time

    @classmethod
    def open(cls, index_path: Path, database, matrix: np.ndarray, record: dict, *, uri: str | None = None) -> "MilvusBackend":
        if record.get("backend") != "milvus":
            raise IndexFileError(f"{index_path}: built for the {record.get('backend')} backend, not milvus (no collection recorded)")
        uri = uri or runtime_uri(index_path, record["uri"])
        dim = int(matrix.shape[1])
        client = connect(uri)
        try:
            _check_collection(client, uri, record["collection"], dim)
        except BaseException:
            disconnect(client, uri)
            raise
        return cls(client, uri, record, database.paths, dim)

    @classmethod
    def open_regions(cls, index_path: Path, database, regions: Regions, record: dict, *, uri: str | None = None) -> RegionSearch:
        """The region collection's search; exact search in memory for a database indexed before it existed."""
        if record.get("backend") != "milvus":
            return ExactRegions.of(regions)
        uri = uri or runtime_uri(index_path, record["uri"])
        name = region_collection(record["collection"])
        dim = regions.dim
        client = connect(uri)
        try:
            if not _call("listing collections", uri, client.has_collection, name, timeout=CONNECT_TIMEOUT_S):
                disconnect(client, uri)
                return ExactRegions.of(regions)
            _check_collection(client, uri, name, dim)
        except BaseException:
            disconnect(client, uri)
            raise
        searcher = cls(client, uri, record, database.paths, dim, collection=name, count=len(regions))
        return RankedRegions(searcher, regions.per_image)

    def search_batch(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.client is None:
            raise BackendError(f"Milvus at {self.uri}: the connection was closed")
        limit = min(k + SEARCH_SLACK, MAX_TOP_K)
        params = dict(self.search_params)
        if "ef" in params:
            params["ef"] = max(int(params["ef"]), limit)
        rows, scores = empty_result(queries.shape[0], k)
        for start in range(0, queries.shape[0], SEARCH_BATCH):
            block = queries[start : start + SEARCH_BATCH]
            result = _call(
                "search", self.uri, self.client.search, self.collection,
                data=[vector.tolist() for vector in block], limit=limit,
                output_fields=["path"],  # only the key: Milvus Lite returns every field, vectors too, when none are named
                search_params={"metric_type": METRIC, "params": params}, timeout=SEARCH_TIMEOUT_S,
            )
            for offset, hits in enumerate(result):
                found = 0
                for hit in hits:
                    row = self.row_of.get(hit["path"])
                    if row is not None:
                        rows[start + offset, found], scores[start + offset, found] = row, hit.distance
                        found += 1
                        if found == k:
                            break
        return rows, scores

    def close(self) -> None:
        """Let go of the collection (for Milvus Lite: of its folder, once no other search here uses it)."""
        if self.client is not None:
            client, self.client = self.client, None
            disconnect(client, self.uri)


def _check_collection(client, uri: str, name: str, dim: int) -> None:
    """The collection exists, holds ``dim``-d vectors and is loaded (IndexFileError / BackendError otherwise)."""
    if not _call("listing collections", uri, client.has_collection, name, timeout=CONNECT_TIMEOUT_S):
        raise IndexFileError(f"{uri}: no collection {name!r}; run index.py --backend milvus to create it", kind="not_found")
    described = _call("describe", uri, client.describe_collection, name, timeout=CONNECT_TIMEOUT_S)
    stored_dim = _vector_dim(described)
    if stored_dim != dim:
        raise IndexFileError(f"{uri}: collection {name!r} holds {stored_dim}-d vectors, the database {dim}-d; run index.py")
    _ensure_loaded(client, uri, name)


def _vector_dim(described: dict) -> int | None:
    for field in described.get("fields", []):
        if field.get("name") == "vector":
            return int(field.get("params", {}).get("dim", -1))
    return None


def _ensure_loaded(client, uri: str, name: str) -> None:
    state = _call("load state", uri, client.get_load_state, name, timeout=CONNECT_TIMEOUT_S)
    if "Loaded" not in str(state.get("state")):
        _call("loading the collection", uri, client.load_collection, name, timeout=BUILD_TIMEOUT_S)


# ----------------------------------------------------------------------------------------------------- updating


@dataclass
class Mirror:
    """What one collection mirrors: ``keys`` (its primary keys, field ``key_field``), ``owners`` (M,) the database row
    of each, ``matrix`` (M, d) their vectors, ``previous_keys`` the keys of the version being replaced (or None)."""

    name: str
    key_field: str  # "path": the global vectors, one per image; "key": regions, "<j>:<path>"
    keys: list[str]
    owners: np.ndarray
    matrix: np.ndarray
    previous_keys: list[str] | None


def mirrors(record: dict, job: SyncJob) -> tuple[Mirror, Mirror | None]:
    """The global collection's mirror and the region collection's (None when the database stores no regions)."""
    database, previous = job.database, job.previous
    paths = database.paths
    main = Mirror(
        record["collection"], "path", paths, np.arange(len(paths)), job.matrix,
        previous.paths if previous is not None else None,
    )
    if job.regions is None:
        return main, None
    old = None
    if previous is not None and previous.copies is not None and previous.copies.has_regions:
        old = region_keys(previous.paths, previous.copies.region_image)
    regions = Mirror(
        region_collection(record["collection"]), "key", region_keys(paths, job.regions.image),
        np.asarray(job.regions.image, np.int64), job.regions.matrix, old,
    )
    return main, regions


def sync_collection(record: dict, job: SyncJob) -> str:
    """Make the collection (and the region collection, for a database with regions) mirror ``job.database`` (version
    ``job.database_id``; ``job.matrix`` its searched vectors), create it if needed, check its index, and record the
    version in it. Returns a short description of what was done."""
    index_path, database = job.index_path, job.database
    uri = runtime_uri(index_path, record["uri"])
    check_settings(record["uri"], record["collection"], record["index_type"])
    too_long = next((p for p in database.paths if len(p.encode("utf-8")) > MAX_PATH_BYTES), None)
    if too_long is not None:
        raise RetrievalError(f"path longer than {MAX_PATH_BYTES} bytes cannot be stored in Milvus: {too_long[:80]}...")
    main, regions = mirrors(record, job)
    client = connect(uri)
    try:
        detail = _sync_mirror(client, uri, record, job, main)
        if regions is not None:
            detail += "; regions " + _sync_mirror(client, uri, record, job, regions)
        else:
            _drop_stale(client, uri, region_collection(record["collection"]), job.notice)
    finally:
        disconnect(client, uri)
    return detail


def _sync_mirror(client, uri: str, record: dict, job: SyncJob, mirror: Mirror) -> str:
    database, database_id, name, index_type = job.database, job.database_id, mirror.name, record["index_type"]
    fingerprint = vectors_fingerprint(database)
    marker, fresh = _open_or_create(client, uri, name, record, int(mirror.matrix.shape[1]), job.rebuild, job.notice, mirror.key_field)
    keys, owners, paths = mirror.keys, mirror.owners, database.paths

    def stats_of(item: int) -> tuple[int, int]:
        return int(database.file_sizes[owners[item]]), int(database.file_mtimes_ns[owners[item]])

    if marker.get("cbir.database_id") == database_id and marker.get("cbir.vectors") == fingerprint:
        upserts, deletes, how = [], [], "unchanged"
    elif (
        job.previous is not None
        and job.previous.database_id
        and mirror.previous_keys is not None
        and marker.get("cbir.database_id") == job.previous.database_id
        and marker.get("cbir.vectors") == fingerprint
    ):
        keep = set(keys)
        deletes = [key for key in mirror.previous_keys if key not in keep]
        upserts = [item for item in range(len(keys)) if paths[owners[item]] not in job.unchanged]
        how = "updated"
    else:
        stored = {} if fresh else _stored_stats(client, uri, name, mirror.key_field)
        same_vectors = marker.get("cbir.vectors") == fingerprint
        keep = set(keys)
        deletes = [key for key in stored if key not in keep]
        upserts = [item for item in range(len(keys)) if not same_vectors or stored.get(keys[item]) != stats_of(item)]
        how = "reconciled" if stored else "filled"
    for start in range(0, len(deletes), DELETE_BATCH):
        _call("delete", uri, client.delete, name, ids=deletes[start : start + DELETE_BATCH], timeout=CALL_TIMEOUT_S)
    for start in range(0, len(upserts), BATCH_ROWS):
        items = upserts[start : start + BATCH_ROWS]
        vectors = np.asarray(mirror.matrix[items], dtype=np.float32)
        data = []
        for i, item in enumerate(items):
            size, mtime = stats_of(item)
            entry = {mirror.key_field: keys[item], "vector": vectors[i], "file_size": size, "file_mtime_ns": mtime}
            if mirror.key_field != "path":
                entry["path"] = paths[owners[item]]
            data.append(entry)
        if fresh:  # a new collection: plain inserts (an upsert first looks for the key)
            _call("insert", uri, client.insert, name, data=data, timeout=CALL_TIMEOUT_S)
        else:
            _call("upsert", uri, client.upsert, name, data=data, timeout=CALL_TIMEOUT_S)
    if upserts or deletes or how != "unchanged":
        _call("flush", uri, client.flush, name, timeout=CALL_TIMEOUT_S)
    created = _describe_vector_index(client, uri, name) is None
    if created:
        _create_index(client, uri, name, record)
    _check_index(client, uri, name, index_type, changed=bool(upserts or deletes) and not created, notice=job.notice)
    count = _count(client, uri, name)
    if count != len(keys):
        raise RetrievalError(f"Milvus at {uri}: collection {name!r} holds {count} rows after the update, the database {len(keys)}")
    _set_marker(client, uri, name, {"cbir.database_id": database_id, "cbir.vectors": fingerprint}, job.notice)
    return f"{how}: {len(upserts)} upserted, {len(deletes)} deleted, {index_type} index checked"


def _drop_stale(client, uri: str, name: str, notice) -> None:
    """Drop a region collection left by an earlier version of a database that no longer stores regions."""
    if not _call("listing collections", uri, client.has_collection, name, timeout=CONNECT_TIMEOUT_S):
        return
    described = _call("describe", uri, client.describe_collection, name, timeout=CONNECT_TIMEOUT_S)
    if dict(described.get("properties") or {}).get("cbir.format") == FORMAT:
        notice(f"dropping Milvus collection {name}: the database no longer stores regions")
        _call("drop", uri, client.drop_collection, name, timeout=CALL_TIMEOUT_S)


def _open_or_create(
    client, uri: str, name: str, record: dict, dim: int, rebuild: bool, notice, key_field: str = "path"
) -> tuple[dict, bool]:
    """(the collection's properties (its marker), whether it was created empty now), after creating it or
    re-creating one that cannot be updated."""
    if _call("listing collections", uri, client.has_collection, name, timeout=CONNECT_TIMEOUT_S):
        described = _call("describe", uri, client.describe_collection, name, timeout=CONNECT_TIMEOUT_S)
        properties = dict(described.get("properties") or {})
        if properties.get("cbir.format") != FORMAT:
            raise RetrievalError(
                f"Milvus at {uri}: collection {name!r} exists and was not made by index.py; choose another --milvus-collection"
            )
        reason = None
        if rebuild:
            reason = "--rebuild"
        elif _vector_dim(described) != dim:
            reason = f"its vectors are {_vector_dim(described)}-d, the database's {dim}-d"
        else:
            index = _describe_vector_index(client, uri, name)
            if index is not None and (index.get("index_type") != record["index_type"] or index.get("metric_type") != METRIC):
                reason = f"its index is {index.get('index_type')}, {record['index_type']} was asked for"
        if reason is None:
            if _describe_vector_index(client, uri, name) is None:
                _create_index(client, uri, name, record)  # a run that failed before its index: a load needs one
            _ensure_loaded(client, uri, name)
            return properties, False
        notice(f"re-creating Milvus collection {name} ({reason})")
        _call("drop", uri, client.drop_collection, name, timeout=CALL_TIMEOUT_S)
    _create(client, uri, name, record, dim, key_field)
    return {"cbir.format": FORMAT}, True


def _create(client, uri: str, name: str, record: dict, dim: int, key_field: str = "path") -> None:
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    if key_field != "path":  # regions: "<j>:<path>"
        schema.add_field(key_field, DataType.VARCHAR, is_primary=True, max_length=MAX_PATH_BYTES + 16)
    schema.add_field("path", DataType.VARCHAR, is_primary=key_field == "path", max_length=MAX_PATH_BYTES)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("file_size", DataType.INT64)
    schema.add_field("file_mtime_ns", DataType.INT64)
    # A server cannot load (so cannot query, count or search) a collection without an index: give it the index at
    # creation (pymilvus then loads it); rows flushed later are indexed in the background (see _check_index).
    # Milvus Lite keeps creating the index after the rows are in (it builds it synchronously then).
    index_params = None if is_lite(uri) else _index_params(client, record)
    _call(
        "creating the collection", uri, client.create_collection, name,
        schema=schema, index_params=index_params, properties={"cbir.format": FORMAT}, timeout=CALL_TIMEOUT_S,
    )


def _create_index(client, uri: str, name: str, record: dict) -> None:
    """The vector index, created once the rows are in (Milvus Lite then builds it at once for every segment, and
    fails here for a type it cannot build; a server builds it in the background, see ``_check_index``)."""
    try:
        client.create_index(name, _index_params(client, record), timeout=BUILD_TIMEOUT_S)
    except Exception as exc:
        if "already exists" not in _reason(exc):  # a retried call whose first attempt went through: fine
            raise BackendError(f"Milvus at {uri}: creating the {record['index_type']} index failed: {_reason(exc)}") from None


def _index_params(client, record: dict):
    index_params = client.prepare_index_params()
    index_params.add_index(
        field_name="vector", index_name="vector", index_type=record["index_type"], metric_type=METRIC,
        params=dict(record["index_params"]),
    )
    return index_params


def _describe_vector_index(client, uri: str, name: str) -> dict | None:
    try:
        return client.describe_index(name, index_name="vector", timeout=CONNECT_TIMEOUT_S)
    except Exception:
        return None


def _stored_stats(client, uri: str, name: str, key_field: str = "path") -> dict[str, tuple[int, int]]:
    """Every key in the collection -> (file size, mtime), read back in batches."""
    stored: dict[str, tuple[int, int]] = {}
    if not is_lite(uri):
        # on a server query_iterator ignores consistency_level (pymilvus 3.0.2 + Milvus 2.3.5) and can miss writes of
        # the last ~0.5 s; a Strong query first waits until everything written so far is visible
        _count(client, uri, name)
    iterator = _call(
        "reading paths", uri, client.query_iterator, name,
        batch_size=5_000, output_fields=[key_field, "file_size", "file_mtime_ns"], timeout=CALL_TIMEOUT_S,
    )
    try:
        while True:
            batch = _call("reading paths", uri, iterator.next)
            if not batch:
                break
            for row in batch:
                stored[row[key_field]] = (int(row["file_size"]), int(row["file_mtime_ns"]))
    finally:
        iterator.close()
    return stored


def _count(client, uri: str, name: str) -> int:
    result = _call(
        "count", uri, client.query, name,
        filter="", output_fields=["count(*)"], consistency_level="Strong", timeout=CALL_TIMEOUT_S,
    )
    return int(result[0]["count(*)"])


def _check_index(client, uri: str, name: str, index_type: str, *, changed: bool, notice) -> None:
    """Make sure searches use the index, not brute force (see the module docstring)."""
    described = _describe_vector_index(client, uri, name)
    if described is None or described.get("index_type") != index_type or described.get("metric_type") != METRIC:
        raise RetrievalError(f"Milvus at {uri}: collection {name!r} has no {index_type} index on its vectors")
    if is_lite(uri):
        if not changed:
            _ensure_loaded(client, uri, name)
        else:
            # Lite builds segment indexes in a background thread and only logs a failure; a load builds every
            # missing one synchronously and raises if it cannot (release first: load of a loaded collection is a no-op)
            _call("releasing the collection", uri, client.release_collection, name, timeout=CALL_TIMEOUT_S)
            _call(f"building its {index_type} index", uri, client.load_collection, name, timeout=BUILD_TIMEOUT_S)
        return
    _ensure_loaded(client, uri, name)
    deadline = time.monotonic() + INDEX_WAIT_S
    while True:
        described = _describe_vector_index(client, uri, name) or {}
        state = str(described.get("state", ""))
        if "Failed" in state:
            raise RetrievalError(
                f"Milvus at {uri}: building the {index_type} index failed: {described.get('index_state_fail_reason', '')}"
            )
        if "Finished" in state and int(described.get("pending_index_rows", 0) or 0) == 0:
            return
        if time.monotonic() >= deadline:
            notice(
                f"Milvus is still building the {index_type} index of {name} after {INDEX_WAIT_S:.0f} s "
                "(rows not yet indexed are searched by brute force until it finishes)"
            )
            return
        time.sleep(2.0)


def _set_marker(client, uri: str, name: str, marker: dict, notice) -> None:
    try:
        client.alter_collection_properties(name, properties=marker, timeout=CONNECT_TIMEOUT_S)
        if not is_lite(uri):
            # Milvus server 2.3.5 persists each alter only with the next one: the last is lost at a restart
            # (milvus-io/milvus#30144, fixed in 2.3.6). The same alter again makes the first one durable.
            client.alter_collection_properties(name, properties=marker, timeout=CONNECT_TIMEOUT_S)
    except Exception as exc:  # a server that refuses custom properties: every update then reconciles the collection
        notice(f"could not record the database version in Milvus collection {name} ({_reason(exc)}); "
               "each update will compare the whole collection")
