"""The HDF5 feature database: descriptors, UTF-8 relative paths, file stats, and how the descriptors were made.

Layout of a database file (format ``cbir-feature-database``, version ``FORMAT_VERSION``)::

    /vectors          float32 (N, D)   L2-normalised descriptors, row i describes paths[i]
    /paths            UTF-8 str (N,)   paths relative to the image folder, POSIX separators, sorted
    /file_sizes       int64 (N,)       bytes, when the file was indexed
    /file_mtimes_ns   int64 (N,)       modification time in ns, when the file was indexed
    /whitening        optional group: PCA-whitening learned at indexing (mean, projection, eigenvalues + attributes),
                      applied by readers to database and query vectors alike
    attributes        format, format_version, encoder (JSON of ``EncoderConfig``), image_root, created_at,
                      updated_at, database_id (new random id at every write), vector_dtype (float32 | float16),
                      software (JSON of library versions), search_backend (optional JSON: how the database is
                      searched, e.g. {"backend": "milvus", "uri": ..., "collection": ...}; absent = in memory)

Files written by the reference demo (``dataset_1`` features, ``dataset_2`` names) are read too, as VGG16 ImageNet
max pooling with the nearest-neighbour squash resize that demo used. Writes are atomic: a temporary file in the same
folder, fsync, then ``os.replace``; a reader never sees a half-written database.

A long indexing run checkpoints into ``<index>.partial/``: a ``meta.json`` plus ``chunk-NNNNNN.npz`` files, each
written atomically, so a killed run resumes without redoing finished images.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .errors import IndexFileError
from .whitening import Whitening, whitening_from_arrays, whitening_to_arrays

FORMAT_NAME = "cbir-feature-database"
FORMAT_VERSION = 1
VECTOR_DTYPES = ("float32", "float16")
VGG16_IMAGENET_MD5 = "6d6bbae143d832006294945121d1f1fc"


@dataclass(frozen=True)
class EncoderConfig:
    """Everything that determines a descriptor; a query must be encoded with the same config as the database."""

    backbone: str  # "vgg16" | "efficientnet-lite0"
    weights_name: str  # "imagenet" or the file name of custom weights
    weights_hash: str  # "md5:<hex>" of the weights file
    layer: str  # the conv layer whose activations are pooled
    pooling: str  # a name from retrieval.pooling.POOLINGS
    input_size: int  # square input side in pixels
    resize_rule: str  # a name from retrieval.images.RESIZE_RULES
    precision: str  # "float32" | "bfloat16"
    dim: int  # descriptor dimension
    pooling_params: dict = field(default_factory=dict)  # e.g. {"p": 3.0} for GeM
    scales: list = field(default_factory=lambda: [1.0])  # multi-scale extraction: factors of input_size
    weights_path: str = ""  # where the weights were read from when indexing (a hint for readers, not identity)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EncoderConfig":
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise IndexFileError(f"encoder settings name unknown fields {sorted(unknown)}: written by a newer version?")
        return cls(**data)

    def identity(self) -> dict:
        """The fields that change descriptors (everything but where the weights were found)."""
        data = dataclasses.asdict(self)
        data.pop("weights_path")
        return data


@dataclass
class FeatureDatabase:
    """A feature database in memory. ``vectors`` row i belongs to ``paths[i]``."""

    encoder: EncoderConfig
    vectors: np.ndarray  # float32 (N, D)
    paths: list[str]
    file_sizes: np.ndarray  # int64 (N,)
    file_mtimes_ns: np.ndarray  # int64 (N,)
    image_root: str = ""
    created_at: str = ""
    updated_at: str = ""
    legacy: bool = False  # read from a reference-demo file: no file stats, cannot be updated incrementally
    whitening: Whitening | None = None
    whitening_source: str = ""  # "database" (re-learned at every update) or the index file it was learned from
    whitening_requested_dim: int = 0  # --whiten-dim asked for when it was learned (0: automatic), kept across updates
    database_id: str = ""  # changes at every write: derived files (an ANN index) record which version they match
    search_backend: dict = field(default_factory=dict)  # how it is searched (see retrieval.vector_index); {} = memory

    def __len__(self) -> int:
        return len(self.paths)


def new_database_id() -> str:
    return uuid.uuid4().hex


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def software_versions() -> dict:
    """Versions of the libraries that write the file (recorded for provenance)."""
    import importlib.metadata as md

    versions = {"numpy": np.__version__, "h5py": h5py.__version__}
    for package in ("keras", "tensorflow-cpu", "tensorflow", "pillow"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return versions


def read_database(path: str | os.PathLike) -> FeatureDatabase:
    """Read a database file (ours or the reference demo's) into memory; raises IndexFileError with a reason."""
    path = Path(path)
    if not path.exists():
        raise IndexFileError(f"{path}: no such index file (build one with index.py)")
    if path.is_dir():
        raise IndexFileError(f"{path}: is a folder, not an index file")
    try:
        with h5py.File(path, "r") as h5:
            if "dataset_1" in h5 and "dataset_2" in h5 and "format" not in h5.attrs:
                return _read_legacy(h5, path)
            return _read_current(h5, path)
    except IndexFileError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise IndexFileError(f"{path}: not a readable HDF5 feature database ({reason})") from None


def _read_current(h5: h5py.File, path: Path) -> FeatureDatabase:
    if h5.attrs.get("format") != FORMAT_NAME:
        raise IndexFileError(f"{path}: HDF5 file is not a feature database written by index.py")
    version = int(h5.attrs.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise IndexFileError(
            f"{path}: database format version {version} is newer than this program understands ({FORMAT_VERSION})"
        )
    encoder = EncoderConfig.from_json(h5.attrs["encoder"])
    stored = h5["vectors"]
    if stored.dtype not in (np.float32, np.float16):
        raise IndexFileError(f"{path}: vectors are {stored.dtype}, expected float32 or float16")
    vectors = stored[...]  # read once into the one matrix held in memory (float16 stays float16)
    paths = [p.decode("utf-8") if isinstance(p, bytes) else str(p) for p in h5["paths"][...]]
    sizes = np.asarray(h5["file_sizes"][...], dtype=np.int64)
    mtimes = np.asarray(h5["file_mtimes_ns"][...], dtype=np.int64)
    if vectors.ndim != 2 or vectors.shape[1] != encoder.dim:
        raise IndexFileError(f"{path}: vectors have shape {vectors.shape}, expected (N, {encoder.dim})")
    if not (len(paths) == len(sizes) == len(mtimes) == vectors.shape[0]):
        raise IndexFileError(f"{path}: datasets disagree on the number of images")
    whitening = None
    if "whitening" in h5:
        group = h5["whitening"]
        whitening = whitening_from_arrays({name: group[name][...] for name in group}, dict(group.attrs))
        if whitening.input_dim != encoder.dim:
            raise IndexFileError(f"{path}: whitening expects {whitening.input_dim}-d vectors, database has {encoder.dim}")
    return FeatureDatabase(
        encoder=encoder,
        vectors=vectors,
        paths=paths,
        file_sizes=sizes,
        file_mtimes_ns=mtimes,
        image_root=str(h5.attrs.get("image_root", "")),
        created_at=str(h5.attrs.get("created_at", "")),
        updated_at=str(h5.attrs.get("updated_at", "")),
        whitening=whitening,
        whitening_source=str(h5["whitening"].attrs.get("source", "")) if whitening is not None else "",
        whitening_requested_dim=int(h5["whitening"].attrs.get("requested_dim", 0)) if whitening is not None else 0,
        database_id=str(h5.attrs.get("database_id", "")),
        search_backend=_read_json_attribute(h5, "search_backend", path),
    )


def _read_json_attribute(h5: h5py.File, name: str, path: Path) -> dict:
    if name not in h5.attrs:
        return {}
    try:
        value = json.loads(h5.attrs[name])
    except (TypeError, ValueError):
        value = None
    if not isinstance(value, dict):
        raise IndexFileError(f"{path}: attribute {name} is not a JSON object")
    return value


def _read_legacy(h5: h5py.File, path: Path) -> FeatureDatabase:
    vectors = np.asarray(h5["dataset_1"][...], dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != 512:
        raise IndexFileError(f"{path}: reference-demo features have shape {vectors.shape}, expected (N, 512)")
    names = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in h5["dataset_2"][...]]
    if len(names) != vectors.shape[0]:
        raise IndexFileError(f"{path}: reference-demo file has {len(names)} names for {vectors.shape[0]} vectors")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    encoder = EncoderConfig(
        backbone="vgg16",
        weights_name="imagenet",
        weights_hash=f"md5:{VGG16_IMAGENET_MD5}",
        layer="block5_conv3",
        pooling="max",
        input_size=224,
        resize_rule="squash-nearest",
        precision="float32",
        dim=512,
    )
    count = len(names)
    return FeatureDatabase(
        encoder=encoder,
        vectors=vectors / np.maximum(norms, 1e-12),
        paths=names,
        file_sizes=np.full(count, -1, dtype=np.int64),
        file_mtimes_ns=np.full(count, -1, dtype=np.int64),
        legacy=True,
    )


def write_database(path: str | os.PathLike, database: FeatureDatabase, *, database_id: str | None = None) -> str:
    """Write atomically: the file at ``path`` is either the old one or the complete new one, at every instant.

    Every write gets a new random ``database_id`` (returned, and set on ``database``); ``database_id`` gives one chosen
    beforehand (index.py builds derived search structures for a version before committing the file that names it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.float16 if np.asarray(database.vectors).dtype == np.float16 else np.float32
    vectors = np.ascontiguousarray(database.vectors, dtype=dtype)
    count = len(database.paths)
    if vectors.shape != (count, database.encoder.dim):
        raise ValueError(f"vectors {vectors.shape} do not match {count} paths of dimension {database.encoder.dim}")
    database_id = database_id or new_database_id()
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        with h5py.File(temporary, "w") as h5:
            h5.attrs["format"] = FORMAT_NAME
            h5.attrs["format_version"] = FORMAT_VERSION
            h5.attrs["encoder"] = database.encoder.to_json()
            h5.attrs["image_root"] = database.image_root
            h5.attrs["created_at"] = database.created_at or now_iso()
            h5.attrs["updated_at"] = database.updated_at or now_iso()
            h5.attrs["software"] = json.dumps(software_versions(), sort_keys=True)
            h5.attrs["database_id"] = database_id
            h5.attrs["vector_dtype"] = np.dtype(dtype).name
            if database.search_backend:
                h5.attrs["search_backend"] = json.dumps(database.search_backend, sort_keys=True)
            # readable summary attributes for h5dump / other tools; the JSON above is what readers use
            for name, value in dataclasses.asdict(database.encoder).items():
                if name not in ("pooling_params", "scales"):
                    h5.attrs[f"encoder_{name}"] = value
            h5.create_dataset("vectors", data=vectors, chunks=True if count else None)
            h5.create_dataset("paths", data=list(database.paths), dtype=h5py.string_dtype("utf-8"), shape=(count,))
            h5.create_dataset("file_sizes", data=np.asarray(database.file_sizes, dtype=np.int64), shape=(count,))
            h5.create_dataset("file_mtimes_ns", data=np.asarray(database.file_mtimes_ns, dtype=np.int64), shape=(count,))
            if database.whitening is not None:
                arrays, attributes = whitening_to_arrays(database.whitening)
                group = h5.create_group("whitening")
                for name, array in arrays.items():
                    group.create_dataset(name, data=array)
                group.attrs.update(attributes)
                group.attrs["source"] = database.whitening_source
                group.attrs["requested_dim"] = database.whitening_requested_dim
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    database.database_id = database_id
    return database_id


class Checkpoint:
    """Append-only store of finished descriptors for one indexing run, in ``<index>.partial/``.

    Each ``add`` writes one ``chunk-NNNNNN.npz`` atomically; ``meta.json`` names the encoder and image folder, and a
    checkpoint made with other settings is discarded rather than mixed in.
    """

    def __init__(self, index_path: str | os.PathLike, encoder: EncoderConfig, image_root: str):
        self.folder = Path(f"{index_path}.partial")
        self.meta = {"encoder": encoder.identity(), "image_root": image_root, "format_version": FORMAT_VERSION}
        self._next_chunk = 0

    def load(self) -> dict[str, tuple[int, int, np.ndarray]]:
        """Entries of a matching earlier run: path -> (size, mtime_ns, vector). Discards a foreign checkpoint."""
        meta_file = self.folder / "meta.json"
        try:
            meta = json.loads(meta_file.read_text("utf-8"))
        except (OSError, ValueError):
            meta = None
        if meta != self.meta:
            self.discard()
            return {}
        entries: dict[str, tuple[int, int, np.ndarray]] = {}
        for chunk in sorted(self.folder.glob("chunk-*.npz")):
            try:
                with np.load(chunk, allow_pickle=False) as data:
                    for p, s, m, v in zip(data["paths"], data["sizes"], data["mtimes"], data["vectors"]):
                        entries[str(p)] = (int(s), int(m), np.array(v, dtype=np.float32))
            except (OSError, ValueError, KeyError):
                continue  # a damaged chunk only costs its images being extracted again
            self._next_chunk = max(self._next_chunk, int(chunk.stem.split("-")[1]) + 1)
        return entries

    def add(self, paths: list[str], sizes: list[int], mtimes: list[int], vectors: np.ndarray) -> None:
        if not paths:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        meta_file = self.folder / "meta.json"
        if not meta_file.exists():
            _atomic_write_bytes(meta_file, json.dumps(self.meta, sort_keys=True).encode("utf-8"))
        target = self.folder / f"chunk-{self._next_chunk:06d}.npz"
        self._next_chunk += 1
        handle, temporary = tempfile.mkstemp(prefix=".chunk.", suffix=".npz", dir=self.folder)
        try:
            with os.fdopen(handle, "wb") as out:
                np.savez(
                    out,
                    paths=np.asarray(paths, dtype=str),
                    sizes=np.asarray(sizes, dtype=np.int64),
                    mtimes=np.asarray(mtimes, dtype=np.int64),
                    vectors=np.asarray(vectors, dtype=np.float32),
                )
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _atomic_write_bytes(target: Path, data: bytes) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    with os.fdopen(handle, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, target)
