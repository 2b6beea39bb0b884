"""Stage 4: the new database version: merge, learn the whitening, bring the backend up to date, write atomically,
finish the backend, drop the checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..descriptors.encoder import EncoderConfig
from ..descriptors.whitening import learn_pca_whitening
from ..errors import RetrievalError
from ..search.backends import BackendUpdate, SyncJob, database_regions, finish_backend, prepare_backend
from ..search.pipeline import searched_matrix
from ..search.visual_words import STORED_FROM_IMAGES, learned
from ..storage.copy_features import CopyFeatures
from ..storage.database import FeatureDatabase, new_database_id, now_iso, read_database, write_database
from .extract import Extraction
from .plan import Plan
from .requests import WhiteningRequest

IMAGES_PER_WHITENED_DIM = 4
"""PCA-whitening keeps at most N / 4 dimensions for N training images. With as many dimensions as images it makes all
training vectors equidistant (every pair at cosine -1/(N-1)): search results would be meaningless."""


@dataclass
class Commit:
    """What the commit did."""

    total: int
    written: bool
    update: BackendUpdate


def whitening_for(request: WhiteningRequest, existing: FeatureDatabase | None, encoder: EncoderConfig, vectors: np.ndarray):
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


def copy_features_for(plan: Plan, extraction: Extraction, order: list[str]) -> CopyFeatures | None:
    """The regions and local features of the new version, in path order: extracted now, or carried over from the
    existing database with their unchanged image (removed images take theirs with them)."""
    settings = plan.copies
    if not plan.wants_copies:
        return None
    existing = plan.existing.copies if plan.existing is not None else None
    row_of = {rel: row for row, rel in enumerate(plan.existing.paths)} if existing is not None else {}
    regions, local, pages = [], [], []
    for rel in order:
        if rel in extraction.copies:
            region, features, page = extraction.copies[rel]
        else:  # unchanged: carried over (the plan extracts every image it cannot carry)
            row = row_of[rel]
            region = existing.regions_of(row) if existing.has_regions else None
            features = existing.local_of(row) if existing.has_local else None
            page = existing.is_page(row)
        regions.append(region)
        local.append(features)
        pages.append(page)
    features = CopyFeatures.assemble(
        regions if settings["regions"] else None, local if settings["local_features"] else None,
        plan.encoder.dim, verify_default=settings["verify"], pages=pages if settings["regions"] else None,
    )
    return with_visual_words(features)


def with_visual_words(features: CopyFeatures) -> CopyFeatures:
    """``features`` with the vocabulary and every keypoint's visual word (``visual_words.learned``) when the database
    has at least ``STORED_FROM_IMAGES`` images with keypoints; a smaller one learns them when it is loaded."""
    if features.has_local and features.count >= STORED_FROM_IMAGES and len(features.descriptors):
        vocabulary, words = learned(features.descriptors)
        features.words, features.word_top, features.word_children = words.astype(np.uint16), vocabulary.top, vocabulary.children
    return features


def new_version(plan: Plan, extraction: Extraction) -> FeatureDatabase:
    """The database to write: kept and extracted descriptors in path order, with its whitening and backend record."""
    request, existing = plan.request, plan.existing
    entries = {rel: vector for rel, (_, vector, _) in plan.kept.items()}
    entries.update(extraction.vectors)
    dimensions = {rel: size for rel, (_, _, size) in plan.kept.items()}
    dimensions.update(extraction.image_sizes)
    order = sorted(entries)
    vectors = np.stack([entries[rel] for rel in order]).astype(np.float32)
    stats = plan.scan.stats
    learned, source, requested_dim = whitening_for(request.whitening, existing, plan.encoder, vectors)
    return FeatureDatabase(
        encoder=plan.encoder,
        vectors=vectors.astype(plan.vector_dtype),
        paths=order,
        file_sizes=np.array([stats[rel].size for rel in order], dtype=np.int64),
        file_mtimes_ns=np.array([stats[rel].mtime_ns for rel in order], dtype=np.int64),
        image_sizes=np.array([dimensions.get(rel, (-1, -1)) for rel in order], dtype=np.int64).reshape(-1, 2),
        image_root=str(plan.scan.root.resolve()),
        created_at=existing.created_at if existing is not None else now_iso(),
        updated_at=now_iso(),
        whitening=learned,
        whitening_source=source,
        whitening_requested_dim=requested_dim,
        search_backend=plan.record,
        codebook=plan.codebook,
        codebook_source=plan.codebook_source,
        copies=copy_features_for(plan, extraction, order),
    )


def commit(plan: Plan, extraction: Extraction, notice: Callable[[str], None]) -> Commit:
    """Write the new version when the plan says so (else keep the file), after the backend has been brought to it."""
    request = plan.request
    if not plan.kept and not extraction.vectors:
        plan.checkpoint.discard()
        raise RetrievalError(f"{plan.scan.root}: none of the {len(plan.scan.stats)} image files could be read; nothing written")
    if plan.reasons:
        database = new_version(plan, extraction)
        database_id = new_database_id()
    else:
        database, database_id = plan.existing, plan.existing.database_id
    job = SyncJob(
        index_path=request.index_path,
        database=database,
        database_id=database_id,
        matrix=searched_matrix(database.vectors, database.whitening),
        options=request.backend.given(),
        previous=plan.existing,
        unchanged=plan.unchanged,
        rebuild=request.rebuild,
        notice=notice,
        regions=database_regions(database),
    )
    # the backend's structure for the new version first, then the commit of the file that names that version
    update = prepare_backend(plan.record, job)
    if plan.reasons:
        write_database(request.index_path, database, database_id=database_id)
    finish_backend(plan.record, job, plan.previous_record)
    plan.checkpoint.discard()
    return Commit(total=len(database), written=bool(plan.reasons), update=update)
