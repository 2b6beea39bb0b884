"""The HDF5 feature database: descriptors, UTF-8 relative paths, file stats, and how the descriptors were made.

Layout of a database file (format ``cbir-feature-database``, version ``FORMAT_VERSION``)::

    /vectors          float32 | float16 (N, D)   L2-normalised descriptors, row i describes paths[i]
    /paths            UTF-8 str (N,)   paths relative to the image folder, POSIX separators, sorted
    /file_sizes       int64 (N,)       bytes, when the file was indexed
    /file_mtimes_ns   int64 (N,)       modification time in ns, when the file was indexed
    /image_sizes      optional int64 (N, 2)   full-resolution (width, height) as displayed (after the EXIF
                      rotation); -1 where unknown (files written before it was recorded, reference-demo files)
    /whitening        optional group: PCA-whitening learned at indexing (mean, projection, eigenvalues + attributes),
                      applied by readers to database and query vectors alike
    /regions, /local  optional groups: region vectors and local features for copy detection (see
                      ``retrieval.storage.copy_features``); attribute copy_detection = 1 makes queries verify by default
    /codebook         MOP poolings only: per finer level ``level<l>/`` the local PCA, k-means centroids and VLAD PCA
                      (float32, fletcher32) + attributes (method, power, images, level_dims, k, source); its SHA-256
                      is the encoder's ``codebook`` field, checked at every read (``retrieval.descriptors.mop``)
    attributes        format, format_version, encoder (JSON of ``EncoderConfig``), image_root, created_at,
                      updated_at, database_id (new random id at every write), vector_dtype (float32 | float16),
                      software (JSON of library versions), search_backend (optional JSON: how the database is
                      searched, e.g. {"backend": "milvus", "uri": ..., "collection": ...}; absent = in memory),
                      paths_sha256 (digest of the paths, checked at every read)

Integrity (format version 2): every numeric dataset carries HDF5's fletcher32 chunk checksums, which h5py verifies on
every read, and the paths a SHA-256 digest; a mismatch, or vectors that are not finite unit rows, is refused with
``IndexFileError`` (kind ``corrupt``) instead of serving NaN scores. Version 1 files (no checksums) are still read,
with the finite/unit check.

Files written by the reference demo (``dataset_1`` features, ``dataset_2`` names) are read too, as VGG16 ImageNet
max pooling with the nearest-neighbour squash resize that demo used. Writes go through ``retrieval.files``'
``atomic_replace``: a reader never sees a half-written database.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import io
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import h5py
import numpy as np

from ..descriptors.encoder import EncoderConfig
from ..descriptors.mop import MopCodebook, codebook_from_arrays, codebook_to_arrays
from ..descriptors.pooling import CODEBOOK_POOLINGS
from ..descriptors.whitening import Whitening, whitening_from_arrays, whitening_to_arrays
from .copy_features import CopyFeatures, read_copy_features, write_copy_features
from ..errors import IndexFileError, RetrievalError
from ..files import atomic_replace, check_readable_file, describe_os_error, remove_leftovers
from ..models.backbones import VGG16_IMAGENET_MD5

FORMAT_NAME = "cbir-feature-database"
FORMAT_VERSION = 2
VECTOR_DTYPES = ("float32", "float16")
UNIT_TOLERANCE = {np.dtype(np.float32): 1e-3, np.dtype(np.float16): 1e-2}  # |norm - 1| allowed per stored row


@dataclass
class FeatureDatabase:
    """A feature database in memory. ``vectors`` row i belongs to ``paths[i]``."""

    encoder: EncoderConfig
    vectors: np.ndarray  # float32 or float16 (N, D)
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
    search_backend: dict = field(default_factory=dict)  # how it is searched (see retrieval.search.backends); {} = memory
    codebook: MopCodebook | None = None  # MOP poolings: the codebook the vectors were encoded with (encoder.codebook)
    codebook_source: str = ""  # "database" (learned on a sample of its images) or the index file it was taken from
    image_sizes: np.ndarray | None = None  # int64 (N, 2) width, height in pixels; -1 where unknown; None: not recorded
    copies: CopyFeatures | None = None  # regions / local features for copy detection (storage.copy_features)

    def __len__(self) -> int:
        return len(self.paths)

    def image_size(self, row: int) -> tuple[int, int]:
        """(width, height) of image ``row`` as displayed, or (-1, -1) when the file does not record it."""
        if self.image_sizes is None:
            return (-1, -1)
        width, height = self.image_sizes[row]
        return (int(width), int(height))


def new_database_id() -> str:
    return uuid.uuid4().hex


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def software_versions() -> dict:
    """Versions of the libraries that write the file (recorded for provenance)."""
    import importlib.metadata as md

    versions = {"numpy": np.__version__, "h5py": h5py.__version__}
    for package in ("keras", "tensorflow-cpu", "tensorflow", "pillow", "openvino", "nncf"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return versions


def paths_digest(paths: list[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()


def read_database(path: str | os.PathLike) -> FeatureDatabase:
    """Read a database file (ours or the reference demo's) into memory; raises IndexFileError with a reason."""
    try:
        path = check_readable_file(path, "index file")
    except RetrievalError as exc:
        if exc.kind == "not_found":
            raise IndexFileError(f"{path}: no such index file (build one with index.py)", kind="not_found") from None
        raise IndexFileError(str(exc)) from None
    try:
        with h5py.File(path, "r") as h5:
            if "dataset_1" in h5 and "dataset_2" in h5 and "format" not in h5.attrs:
                return _read_legacy(h5, path)
            return _read_current(h5, path)
    except IndexFileError:
        raise
    except OSError as exc:
        text = str(exc)
        if "filter returned failure" in text or "checksum" in text.lower():
            raise IndexFileError(
                f"{path}: the index file is corrupt (a checksum does not match); rebuild it with index.py --rebuild",
                kind="corrupt",
            ) from None
        reason = text.splitlines()[0] if text else describe_os_error(exc)
        raise IndexFileError(f"{path}: not a readable HDF5 feature database ({reason})") from None
    except (KeyError, ValueError, TypeError, AttributeError, RuntimeError, UnicodeDecodeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise IndexFileError(f"{path}: not a readable HDF5 feature database ({reason})") from None


def _corrupt(path: Path, what: str) -> IndexFileError:
    return IndexFileError(f"{path}: the index file is corrupt ({what}); rebuild it with index.py --rebuild", kind="corrupt")


def _read_paths(h5: h5py.File, name: str, path: Path) -> list[str]:
    dataset = h5[name]
    if not isinstance(dataset, h5py.Dataset) or h5py.check_string_dtype(dataset.dtype) is None or dataset.ndim != 1:
        raise IndexFileError(f"{path}: dataset {name} does not hold strings")
    values = [p.decode("utf-8") if isinstance(p, bytes) else str(p) for p in dataset[...]]
    for value in values:
        relative = PurePosixPath(value)
        if not value or relative.is_absolute() or ".." in relative.parts or "\\" in value or "\0" in value:
            raise IndexFileError(f"{path}: stored image path {value[:60]!r} is not a relative path inside the image folder")
    return values


def check_vectors(vectors: np.ndarray, path: Path) -> None:
    """Refuse vectors that are not finite rows of unit (or zero) length: a sign of corruption."""
    if vectors.size == 0:
        return
    if not np.isfinite(vectors).all():
        raise _corrupt(path, "vectors hold NaN or infinite values")
    norms = np.linalg.norm(np.asarray(vectors, dtype=np.float32), axis=1)
    tolerance = UNIT_TOLERANCE[vectors.dtype]
    bad = ~((np.abs(norms - 1.0) <= tolerance) | (norms <= tolerance))
    if bad.any():
        raise _corrupt(path, f"{int(bad.sum())} vectors are not unit length")


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
    vectors = stored[...]  # read once into the one matrix held in memory (float16 stays float16); checksums verified
    paths = _read_paths(h5, "paths", path)
    if version >= 2 and h5.attrs.get("paths_sha256") != paths_digest(paths):
        raise _corrupt(path, "the stored paths do not match their digest")
    sizes = np.asarray(h5["file_sizes"][...], dtype=np.int64)
    mtimes = np.asarray(h5["file_mtimes_ns"][...], dtype=np.int64)
    if vectors.ndim != 2 or vectors.shape[1] != encoder.dim:
        raise IndexFileError(f"{path}: vectors have shape {vectors.shape}, expected (N, {encoder.dim})")
    if not (len(paths) == len(sizes) == len(mtimes) == vectors.shape[0]):
        raise IndexFileError(f"{path}: datasets disagree on the number of images")
    image_sizes = None
    if "image_sizes" in h5:
        image_sizes = np.asarray(h5["image_sizes"][...], dtype=np.int64)
        if image_sizes.shape != (len(paths), 2):
            raise IndexFileError(f"{path}: image_sizes has shape {image_sizes.shape}, expected ({len(paths)}, 2)")
    check_vectors(vectors, path)
    codebook = _read_codebook(h5, encoder, path)
    whitening = None
    if "whitening" in h5:
        group = h5["whitening"]
        try:
            whitening = whitening_from_arrays({name: group[name][...] for name in group}, dict(group.attrs))
        except ValueError as exc:
            raise IndexFileError(f"{path}: unusable whitening ({exc})") from None
        if whitening.input_dim != encoder.dim:
            raise IndexFileError(f"{path}: whitening expects {whitening.input_dim}-d vectors, database has {encoder.dim}")
        if not all(np.isfinite(a).all() for a in (whitening.mean, whitening.projection, whitening.eigenvalues)):
            raise _corrupt(path, "the whitening holds NaN or infinite values")
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
        codebook=codebook,
        codebook_source=str(h5["codebook"].attrs.get("source", "")) if codebook is not None else "",
        image_sizes=image_sizes,
        copies=read_copy_features(h5, path, len(paths), encoder.dim),
    )


def _read_codebook(h5: h5py.File, encoder: EncoderConfig, path: Path) -> MopCodebook | None:
    """The MOP codebook, checked against the digest and dimension the encoder settings record; None when the
    encoder names none. A missing, damaged or foreign codebook is refused (kind ``corrupt``)."""
    if not encoder.codebook:
        if encoder.pooling in CODEBOOK_POOLINGS:
            raise _corrupt(path, f"pooling {encoder.pooling} needs a codebook, and the settings name none")
        return None
    if "codebook" not in h5 or not isinstance(h5["codebook"], h5py.Group):
        raise _corrupt(path, f"pooling {encoder.pooling} needs its codebook, and the file has none")
    group = h5["codebook"]
    arrays = {}
    group.visititems(lambda name, item: arrays.__setitem__(name, item[...]) if isinstance(item, h5py.Dataset) else None)
    try:
        codebook = codebook_from_arrays(arrays, {key: _attribute_value(value) for key, value in group.attrs.items()})
    except ValueError as exc:
        raise _corrupt(path, f"unusable codebook: {exc}") from None
    if codebook.digest() != encoder.codebook or codebook.dim != encoder.dim:
        raise _corrupt(path, "the codebook is not the one the vectors were encoded with")
    return codebook


def _attribute_value(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


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


def legacy_encoder(weights_name: str = "imagenet", weights_hash: str = f"md5:{VGG16_IMAGENET_MD5}") -> EncoderConfig:
    """How the reference demo made its vectors: VGG16 max pooling, 224 squash with nearest neighbour, float32."""
    return EncoderConfig(
        backbone="vgg16",
        weights_name=weights_name,
        weights_hash=weights_hash,
        layer="block5_conv3",
        pooling="max",
        input_size=224,
        resize_rule="squash-nearest",
        precision="float32",
        dim=512,
    )


def with_legacy_weights(database: FeatureDatabase, weights_file: str | os.PathLike | None) -> FeatureDatabase:
    """A reference-demo file records no weights: with ``weights_file`` given, the database is taken to be made with
    that file (VGG16 architecture, any weights), so queries encode with it. Other databases are returned as they are."""
    if not database.legacy or weights_file is None:
        return database
    from ..models.backbones import file_md5

    try:
        digest = file_md5(weights_file)
    except OSError as exc:
        raise IndexFileError(f"{weights_file}: cannot read the weights file ({describe_os_error(exc)})", kind="not_found") from None
    encoder = legacy_encoder(weights_name=Path(weights_file).name, weights_hash=digest)
    return dataclasses.replace(database, encoder=encoder)


def _read_legacy(h5: h5py.File, path: Path) -> FeatureDatabase:
    vectors = np.asarray(h5["dataset_1"][...], dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != 512:
        raise IndexFileError(f"{path}: reference-demo features have shape {vectors.shape}, expected (N, 512)")
    names = _read_paths(h5, "dataset_2", path)
    if len(names) != vectors.shape[0]:
        raise IndexFileError(f"{path}: reference-demo file has {len(names)} names for {vectors.shape[0]} vectors")
    if not np.isfinite(vectors).all():
        raise _corrupt(path, "vectors hold NaN or infinite values")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    count = len(names)
    return FeatureDatabase(
        encoder=legacy_encoder(),
        vectors=vectors / np.maximum(norms, 1e-12),
        paths=names,
        file_sizes=np.full(count, -1, dtype=np.int64),
        file_mtimes_ns=np.full(count, -1, dtype=np.int64),
        legacy=True,
    )


IN_MEMORY_WRITE_BYTES = 1 << 30  # files up to 1 GiB are built in memory before they are written


def estimated_file_bytes(count: int, dim: int, itemsize: int, paths) -> int:
    """A generous estimate of a database file's size: vectors, paths, stats, checksums, metadata."""
    path_bytes = sum(len(p.encode("utf-8", "surrogatepass")) + 32 for p in paths)
    return int(count * dim * itemsize * 1.02 + path_bytes + count * 40 + 64 * 1024)


def check_free_space(path: Path, needed: int) -> None:
    """IndexFileError when the folder of ``path`` has less free space than ``needed`` bytes (the old file stays
    until the new one replaces it, so both must fit)."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return
    if free < needed:
        raise IndexFileError(
            f"{path}: not enough free space to write the index ({needed / 1e6:.1f} MB needed, {free / 1e6:.1f} MB free); "
            "the previous one is unchanged",
            kind="unavailable",
        )


def write_database(path: str | os.PathLike, database: FeatureDatabase, *, database_id: str | None = None) -> str:
    """Write atomically: the file at ``path`` is either the old one or the complete new one, at every instant.

    Every write gets a new random ``database_id`` (returned, and set on ``database``); ``database_id`` gives one chosen
    beforehand (index.py builds derived search structures for a version before committing the file that names it).
    A failure (a full disk) raises IndexFileError and leaves the previous file and no temporary file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.float16 if np.asarray(database.vectors).dtype == np.float16 else np.float32
    vectors = np.ascontiguousarray(database.vectors, dtype=dtype)
    count = len(database.paths)
    if vectors.shape != (count, database.encoder.dim):
        raise ValueError(f"vectors {vectors.shape} do not match {count} paths of dimension {database.encoder.dim}")
    database_id = database_id or new_database_id()
    checksummed = {"fletcher32": True} if count else {}
    remove_leftovers(path)
    needed = estimated_file_bytes(count, database.encoder.dim, np.dtype(dtype).itemsize, database.paths)
    check_free_space(path, needed)
    in_memory = needed <= IN_MEMORY_WRITE_BYTES
    try:
        with atomic_replace(path) as temporary:
            # HDF5 cannot recover from a failed write (a full disk ends in a crash inside h5py): build the file in
            # memory and let Python write it, so a failure is an ordinary OSError; very large files go straight to
            # disk after the free-space check above
            image = io.BytesIO() if in_memory else temporary
            with h5py.File(image, "w") as h5:
                h5.attrs["format"] = FORMAT_NAME
                h5.attrs["format_version"] = FORMAT_VERSION
                h5.attrs["encoder"] = database.encoder.to_json()
                h5.attrs["image_root"] = database.image_root
                h5.attrs["created_at"] = database.created_at or now_iso()
                h5.attrs["updated_at"] = database.updated_at or now_iso()
                h5.attrs["software"] = json.dumps(software_versions(), sort_keys=True)
                h5.attrs["database_id"] = database_id
                h5.attrs["vector_dtype"] = np.dtype(dtype).name
                h5.attrs["paths_sha256"] = paths_digest(list(database.paths))
                if database.search_backend:
                    h5.attrs["search_backend"] = json.dumps(database.search_backend, sort_keys=True)
                # readable summary attributes for h5dump / other tools; the JSON above is what readers use
                for name, value in dataclasses.asdict(database.encoder).items():
                    if name not in ("pooling_params", "scales") and not isinstance(value, (dict, list)):
                        h5.attrs[f"encoder_{name}"] = value
                h5.create_dataset("vectors", data=vectors, chunks=True if count else None, **checksummed)
                h5.create_dataset("paths", data=list(database.paths), dtype=h5py.string_dtype("utf-8"), shape=(count,))
                for name, values in (("file_sizes", database.file_sizes), ("file_mtimes_ns", database.file_mtimes_ns)):
                    h5.create_dataset(name, data=np.asarray(values, dtype=np.int64), shape=(count,), **checksummed)
                if database.image_sizes is not None:
                    h5.create_dataset(
                        "image_sizes", data=np.asarray(database.image_sizes, dtype=np.int64).reshape(count, 2),
                        shape=(count, 2), **checksummed,
                    )
                write_copy_features(h5, database.copies, count)
                if database.whitening is not None:
                    arrays, attributes = whitening_to_arrays(database.whitening)
                    group = h5.create_group("whitening")
                    for name, array in arrays.items():
                        group.create_dataset(name, data=array, fletcher32=True)
                    group.attrs.update(attributes)
                    group.attrs["source"] = database.whitening_source
                    group.attrs["requested_dim"] = database.whitening_requested_dim
                if database.codebook is not None:
                    arrays, attributes = codebook_to_arrays(database.codebook)
                    group = h5.create_group("codebook")
                    for name, array in arrays.items():
                        group.create_dataset(name, data=array, chunks=True, fletcher32=True)
                    group.attrs.update(attributes)
                    group.attrs["source"] = database.codebook_source
            if in_memory:
                with open(temporary, "wb") as out:
                    out.write(image.getbuffer())
    except OSError as exc:
        raise IndexFileError(f"{path}: cannot write the index ({describe_os_error(exc)}); the previous one is unchanged") from None
    database.database_id = database_id
    return database_id
