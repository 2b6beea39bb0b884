"""Build or update a feature database from an image folder: scan, reuse, extract, checkpoint, write atomically.

Incremental by default: a file whose relative path, size and modification time match the existing database keeps
its descriptor; new or changed files are extracted; files gone from the folder are dropped. ``rebuild`` starts over.

One code path for every run: only the "extract what is to do" step differs between one process (``Extractor``) and
a Ray cluster (``retrieval.distributed``); scanning, reuse, checkpoints and writing are the same. The search backend
(memory, faiss, milvus: ``retrieval.vector_index``) is brought up to date for the new version before the database
file that names it is committed.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import backbones, pooling
from .engine import search_matrix
from .errors import IndexFileError, RetrievalError
from .extractor import DEFAULT_BATCH_SIZE, DEFAULT_SCALES, Extractor, check_encoder_options, new_encoder_config
from .images import IMAGE_EXTENSIONS, list_image_files
from .store import (
    VECTOR_DTYPES,
    Checkpoint,
    EncoderConfig,
    FeatureDatabase,
    new_database_id,
    now_iso,
    read_database,
    write_database,
)
from .vector_index import BackendRequest, finish_backend, normalized_record, prepare_backend
from .whitening import learn_pca_whitening

CHECKPOINT_EVERY = 256  # images between checkpoint chunks


@dataclass
class IndexReport:
    """What an indexing run did. ``skipped`` lists (relative path, reason)."""

    total: int = 0  # images in the database written
    extracted: int = 0
    reused: int = 0
    resumed: int = 0  # taken from the checkpoint of an interrupted run
    removed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0  # the whole run
    extract_seconds: float = 0.0  # decoding + forward passes + pooling of the extracted images (model build excluded)
    encoder: EncoderConfig | None = None
    written: bool = False
    ann: str = "exact"  # the search the database gets: exact, hnsw (memory + graph), faiss-hnsw, faiss-ivf, milvus-HNSW, ...
    backend: str = "memory"  # memory | faiss | milvus
    backend_detail: str = ""  # what was done to the backend's structure (built, updated, upserted, ...)
    extraction: str = "local"  # local | ray (with ray, extract_seconds includes starting Ray and building the models)

    def summary(self) -> str:
        rate = f", {self.extracted / self.extract_seconds:.1f} img/s" if self.extracted and self.extract_seconds > 0 else ""
        parts = [f"indexed {self.total} images ({self.extracted} extracted, {self.reused} unchanged"]
        if self.resumed:
            parts.append(f", {self.resumed} resumed")
        parts.append(f", {self.removed} removed), skipped {len(self.skipped)}, in {self.seconds:.1f} s{rate}")
        return "".join(parts)


@dataclass(frozen=True)
class FileStat:
    size: int
    mtime_ns: int


def scan_folder(root: Path) -> tuple[dict[str, FileStat], list[tuple[str, str]]]:
    """Relative path -> size and mtime for every image file under ``root``; files that cannot be stat'ed are skipped."""
    stats, skipped = {}, []
    for rel in list_image_files(root):
        try:
            info = (root / rel).stat()
        except OSError as exc:
            skipped.append((rel, f"cannot read ({exc.strerror or exc})"))
            continue
        stats[rel] = FileStat(info.st_size, info.st_mtime_ns)
    return stats, skipped


@dataclass(frozen=True)
class EncoderRequest:
    """What the user asked for on the command line; None means "the existing database's, or the default"."""

    backbone: str = "auto"
    weights_file: str | os.PathLike | None = None
    pooling: str | None = None
    pooling_params: dict | None = None
    scales: tuple[float, ...] | None = None
    resize_rule: str | None = None
    input_size: int | None = None
    precision: str | None = None

    def conflicts_with(self, existing: EncoderConfig) -> str | None:
        """A phrase naming what the existing database was built with, when this request asks for something else."""
        if self.backbone != "auto" and self.backbone != existing.backbone:
            return f"backbone {existing.backbone}"
        if self.pooling is not None and self.pooling != existing.pooling:
            return f"pooling {existing.pooling}"
        if self.pooling_params:
            try:
                wanted = pooling.resolve_pooling_params(self.pooling or existing.pooling, self.pooling_params)
            except ValueError as exc:
                raise RetrievalError(str(exc)) from None
            if wanted != existing.pooling_params:
                return f"pooling parameters {existing.pooling_params}"
        if self.scales is not None and [float(s) for s in self.scales] != list(existing.scales):
            return f"scales {existing.scales}"
        if self.resize_rule is not None and self.resize_rule != existing.resize_rule:
            return f"resize rule {existing.resize_rule}"
        if self.input_size is not None and self.input_size != existing.input_size:
            return f"input size {existing.input_size}"
        if self.precision not in (None, "auto") and self.precision != existing.precision:
            return f"precision {existing.precision}"
        if self.weights_file is not None and backbones.file_md5(self.weights_file) != existing.weights_hash:
            return f"other weights ({existing.weights_name})"
        return None

    def new_config(self, notice: Callable[[str], None]) -> tuple[EncoderConfig, backbones.Weights]:
        try:  # options first, so a typo is reported before any weights are looked for
            check_encoder_options(
                self.pooling or "max", self.pooling_params, self.scales or DEFAULT_SCALES,
                self.resize_rule or "squash-bicubic", self.input_size,
            )
        except ValueError as exc:
            raise RetrievalError(str(exc)) from None
        weights = backbones.choose_weights(self.backbone, self.weights_file, notice)
        try:
            encoder = new_encoder_config(
                weights,
                self.pooling or "max",
                self.precision or "auto",
                pooling_params=self.pooling_params,
                scales=self.scales or DEFAULT_SCALES,
                resize_rule=self.resize_rule or "squash-bicubic",
                input_size=self.input_size,
            )
        except ValueError as exc:
            raise RetrievalError(str(exc)) from None
        return encoder, weights


IMAGES_PER_WHITENED_DIM = 4
"""PCA-whitening keeps at most N / 4 dimensions for N training images. With as many dimensions as images it makes all
training vectors equidistant (every pair at cosine -1/(N-1)): search results would be meaningless."""


@dataclass(frozen=True)
class WhiteningRequest:
    """``learn``: PCA-whitening learned on the database itself (re-learned at every update); ``source``: learned once
    on the vectors of another index file built with the same encoder; ``dim``: keep that many dimensions (default:
    as many as the training set supports, at most N / 4); ``power``: 0.5 full whitening, 0 centring + PCA rotation."""

    learn: bool = False
    source: str | os.PathLike | None = None
    dim: int | None = None
    power: float | None = None


def _whitening_for(request: WhiteningRequest, existing: FeatureDatabase | None, encoder: EncoderConfig, vectors: np.ndarray):
    """(whitening, source, requested dim) for the database being written, or (None, "", 0)."""
    previous = existing.whitening if existing is not None else None
    previous_source = existing.whitening_source if existing is not None else ""
    if request.source is not None:
        other = read_database(request.source)
        if other.encoder.identity() != encoder.identity():
            raise RetrievalError(
                f"{request.source}: built with other encoder settings; whitening must be learned on the same kind of descriptors"
            )
        training, source = np.asarray(other.vectors, np.float32), str(Path(request.source).resolve())
    elif request.learn or previous_source == "database":
        training, source = vectors, "database"
    elif previous is not None:
        return previous, previous_source, existing.whitening_requested_dim  # learned once elsewhere: kept as it is
    else:
        return None, "", 0
    requested = request.dim or (existing.whitening_requested_dim if previous is not None else 0)
    power = request.power if request.power is not None else (previous.power if previous is not None else 0.5)
    supported = min(encoder.dim, len(training) // IMAGES_PER_WHITENED_DIM)
    if supported < 1:
        raise RetrievalError(f"cannot learn whitening from {len(training)} images: it needs at least {IMAGES_PER_WHITENED_DIM}")
    if requested > supported:
        raise RetrievalError(
            f"cannot learn {requested}-d whitening from {len(training)} images: it needs {IMAGES_PER_WHITENED_DIM} images per "
            f"dimension; use --whiten-dim {supported} or less, or --whiten-from a larger index"
        )
    try:
        return learn_pca_whitening(training, requested or supported, power=power), source, requested
    except ValueError as exc:
        raise RetrievalError(f"cannot learn whitening: {exc}") from None


def build_index(
    image_root: str | os.PathLike,
    index_path: str | os.PathLike,
    *,
    whitening: WhiteningRequest = WhiteningRequest(),
    storage: str | None = None,
    ann: str = "auto",
    backend: str | None = None,
    faiss_index: str | None = None,
    milvus_uri: str | None = None,
    milvus_collection: str | None = None,
    milvus_index: str | None = None,
    ray: str | None = None,
    ray_actors: int | None = None,
    rebuild: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    checkpoint_every: int = CHECKPOINT_EVERY,
    progress: bool = True,
    notice: Callable[[str], None] = print,
    **encoder_options,
) -> IndexReport:
    """Index every image under ``image_root`` into ``index_path``; see the module docstring. Returns a report.

    ``encoder_options`` are ``EncoderRequest`` fields (backbone, weights_file, pooling, pooling_params, scales,
    resize_rule, input_size, precision); those left None take the existing database's settings (or the defaults for a new one); fields that
    contradict an existing database raise IndexFileError unless ``rebuild``. ``storage`` float32 | float16 (None: keep
    the existing, else float32). ``ann``: auto | off | hnsw, see ``vector_index``. Raises RetrievalError for a missing
    or empty folder or an unusable existing index.

    ``backend`` memory | faiss | milvus (None: the existing database's, else memory), with ``faiss_index`` auto |
    hnsw | ivf, ``milvus_uri`` (default ``<index>.milvus.db``, Milvus Lite), ``milvus_collection``, ``milvus_index``
    HNSW | IVF_FLAT; see ``vector_index`` and ``milvus_backend``. ``ray``: extract on Ray (``"local"`` starts a local
    instance, else a cluster address, see ``distributed``) with ``ray_actors`` model actors (default: one per GPU, or
    one per 4 CPUs).
    """
    started = time.perf_counter()
    request = EncoderRequest(**encoder_options)
    root = Path(image_root)
    if not root.exists():
        raise RetrievalError(f"{root}: no such folder")
    if not root.is_dir():
        raise RetrievalError(f"{root}: not a folder")
    index_path = Path(index_path)
    if index_path.is_dir():
        raise IndexFileError(f"{index_path}: is a folder; give the path of the index file to write")
    if storage not in (None, *VECTOR_DTYPES):
        raise RetrievalError(f"unknown storage {storage!r}; choose from {', '.join(VECTOR_DTYPES)}")
    backend_request = BackendRequest(backend, ann, faiss_index, milvus_uri, milvus_collection, milvus_index)
    backend_request.check()  # validates the choices before any work
    if ray is not None:
        from .distributed import check_address

        check_address(ray)  # an unreachable cluster fails now, in seconds
    stats, skipped = scan_folder(root)
    if not stats:
        raise RetrievalError(f"{root}: no image files found (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")

    existing = None
    if index_path.exists() and not rebuild:
        existing = read_database(index_path)
        if existing.legacy:
            raise IndexFileError(
                f"{index_path}: written by the reference demo (no file stats to update incrementally); "
                "rerun with --rebuild to replace it"
            )
        differs = request.conflicts_with(existing.encoder)
        if differs:
            raise IndexFileError(f"{index_path}: was built with {differs}; rerun with --rebuild to change it")

    if existing is not None:
        encoder = existing.encoder
        weights = backbones.weights_for_database(
            encoder.backbone, encoder.weights_name, encoder.weights_hash, encoder.weights_path, request.weights_file
        )
    else:
        encoder, weights = request.new_config(notice)
    vector_dtype = storage or (str(existing.vectors.dtype) if existing is not None else "float32")
    record = backend_request.resolve(index_path, existing.search_backend if existing is not None else None)
    previous_record = normalized_record(existing.search_backend) if existing is not None else None
    if record["backend"] == "milvus":
        from .milvus_backend import check_reachable

        check_reachable(index_path, record)  # a wrong URI fails now, not after the extraction

    report = IndexReport(encoder=encoder)
    kept: dict[str, tuple[FileStat, np.ndarray]] = {}
    if existing is not None:
        for i, rel in enumerate(existing.paths):
            stat = stats.get(rel)
            if stat is not None and stat == FileStat(int(existing.file_sizes[i]), int(existing.file_mtimes_ns[i])):
                kept[rel] = (stat, existing.vectors[i])
        report.reused = len(kept)
        report.removed = sum(1 for rel in existing.paths if rel not in stats)
    unchanged = set(kept)  # descriptors taken over bit for bit from the existing database

    checkpoint = Checkpoint(index_path, encoder, str(root.resolve()))
    for rel, (size, mtime, vector) in checkpoint.load().items():
        stat = stats.get(rel)
        if rel not in kept and stat is not None and stat == FileStat(size, mtime):
            kept[rel] = (stat, vector)
            report.resumed += 1

    todo = [rel for rel in stats if rel not in kept]
    if todo:
        if ray is None:
            files = [root / rel for rel in todo]
            extractor = Extractor(encoder, weights)
            batches = extractor.encode_files(files, batch_size=batch_size)
        else:
            from .distributed import encode_files_ray

            files = [root.resolve() / rel for rel in todo]  # workers on other nodes read these names
            batches = encode_files_ray(
                files, encoder, address=ray, weights_file=request.weights_file, batch_size=batch_size, actors=ray_actors
            )
            report.extraction = "ray"
        extract_started = time.perf_counter()
        _extract(batches, files, todo, stats, kept, checkpoint, report, checkpoint_every, progress)
        report.extract_seconds = time.perf_counter() - extract_started

    if not kept:
        checkpoint.discard()
        raise RetrievalError(f"{root}: none of the {len(stats)} image files could be read; nothing written")
    report.skipped.extend(skipped)
    report.skipped.sort()
    changed = (
        existing is None
        or bool(todo)
        or report.removed > 0
        or str(root.resolve()) != existing.image_root
        or vector_dtype != str(existing.vectors.dtype)
        or whitening.learn
        or whitening.source is not None
        or record != previous_record
        or not existing.database_id
    )
    if changed:
        order = sorted(kept)
        vectors = np.stack([kept[rel][1] for rel in order]).astype(np.float32)
        learned, source, requested_dim = _whitening_for(whitening, existing, encoder, vectors)
        database = FeatureDatabase(
            encoder=encoder,
            vectors=vectors.astype(vector_dtype),
            paths=order,
            file_sizes=np.array([kept[rel][0].size for rel in order], dtype=np.int64),
            file_mtimes_ns=np.array([kept[rel][0].mtime_ns for rel in order], dtype=np.int64),
            image_root=str(root.resolve()),
            created_at=existing.created_at if existing is not None else now_iso(),
            updated_at=now_iso(),
            whitening=learned,
            whitening_source=source,
            whitening_requested_dim=requested_dim,
            search_backend=record,
        )
        database_id = new_database_id()
    else:
        database = existing
        database_id = existing.database_id
    matrix = search_matrix(database)
    # the backend's structure for the new version first, then the commit of the file that names that version
    update = prepare_backend(
        record, index_path, database, database_id, matrix,
        previous=existing, unchanged=unchanged, ann=ann, rebuild=rebuild, notice=notice,
    )
    if changed:
        write_database(index_path, database, database_id=database_id)
        report.written = True
    finish_backend(record, index_path, database_id, matrix, ann)
    if previous_record is not None and previous_record["backend"] == "milvus" and (
        (record.get("uri"), record.get("collection")) != (previous_record.get("uri"), previous_record.get("collection"))
    ):
        notice(f"Milvus collection {previous_record.get('collection')} at {previous_record.get('uri')} is no longer "
               "used by this database; drop it if nothing else needs it")
    report.ann, report.backend, report.backend_detail = update.search, record["backend"], update.detail
    checkpoint.discard()
    report.total = len(kept)
    report.seconds = time.perf_counter() - started
    return report


def _extract(batches, files, todo, stats, kept, checkpoint, report, checkpoint_every, progress):
    """Consume ``batches`` of ``EncodedItem`` (positions index ``todo``, whose files are ``files``; any order), filling
    ``kept`` and the checkpoint, recording skips in ``report``. The same for one process and for a Ray job."""
    from tqdm import tqdm

    pending: list[str] = []
    bar = tqdm(total=len(todo), unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True, leave=False)
    try:
        with closing(batches):
            for items in batches:
                for item in items:
                    rel = todo[item.position]
                    if item.error is not None:
                        report.skipped.append((rel, str(item.error).removeprefix(f"{files[item.position]}: ")))
                        continue
                    kept[rel] = (stats[rel], item.vector)
                    pending.append(rel)
                    report.extracted += 1
                bar.update(len(items))
                if len(pending) >= checkpoint_every:
                    _flush(checkpoint, pending, kept)
    finally:
        bar.close()
        _flush(checkpoint, pending, kept)  # also on Ctrl-C: what was finished is kept for the next run


def _flush(checkpoint: Checkpoint, pending: list[str], kept) -> None:
    if pending:
        checkpoint.add(
            list(pending),
            [kept[rel][0].size for rel in pending],
            [kept[rel][0].mtime_ns for rel in pending],
            np.stack([kept[rel][1] for rel in pending]),
        )
        pending.clear()
