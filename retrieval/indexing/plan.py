"""Stage 2: the plan of a run against the existing database: the encoder, what is reused, resumed, extracted,
removed, and in one place whether the file will be rewritten and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..descriptors.encoder import EncoderConfig, weights_for
from ..errors import IndexFileError
from ..models.backbones import Weights
from ..search.backends import backend_class, normalized_record
from ..storage.checkpoint import Checkpoint
from ..storage.database import FeatureDatabase, read_database
from .requests import IndexRequest
from .scan import FileStat, Scan


@dataclass
class Plan:
    """What a run will do. ``kept`` maps the paths whose descriptor is already known (unchanged in the database, or
    finished by an interrupted run) to (stat, vector, (width, height)); ``todo`` lists the paths to extract."""

    request: IndexRequest
    scan: Scan
    existing: FeatureDatabase | None
    encoder: EncoderConfig
    weights: Weights
    record: dict  # the search_backend record the database will carry
    vector_dtype: str
    checkpoint: Checkpoint
    kept: dict[str, tuple[FileStat, np.ndarray, tuple[int, int]]] = field(default_factory=dict)
    unchanged: frozenset = frozenset()  # taken over bit for bit from the existing database
    resumed: int = 0
    removed: int = 0
    todo: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)  # why the database file is rewritten; empty: it is not

    @property
    def previous_record(self) -> dict | None:
        return normalized_record(self.existing.search_backend) if self.existing is not None else None


def _existing(request: IndexRequest) -> FeatureDatabase | None:
    path = request.index_path
    if request.rebuild or not (path.exists() or path.is_symlink()):
        return None
    existing = read_database(path)
    if existing.legacy:
        raise IndexFileError(
            f"{path}: written by the reference demo (no file stats to update incrementally); rerun with --rebuild to replace it"
        )
    differs = request.encoder.conflicts_with(existing.encoder)
    if differs:
        raise IndexFileError(f"{path}: was built with {differs}; rerun with --rebuild to change it", kind="conflict")
    return existing


def make_plan(request: IndexRequest, scan: Scan, notice: Callable[[str], None]) -> Plan:
    """Read the existing database, choose the encoder and backend, and decide what to extract and rewrite.

    Everything that can fail without extracting fails here: the existing index, the weights, the backend.
    """
    existing = _existing(request)
    if existing is not None:
        encoder = existing.encoder
        weights = weights_for(encoder, request.encoder.weights_file)
    else:
        encoder, weights = request.encoder.new_config(notice)
    record = request.backend.resolve(request.index_path, existing.search_backend if existing is not None else None)
    backend_class(record["backend"]).check_reachable(request.index_path, record)
    if request.extraction.ray is not None:
        from ..descriptors.distributed import check_address

        check_address(request.extraction.ray)  # an unreachable cluster fails now, in seconds
    vector_dtype = request.storage or (str(existing.vectors.dtype) if existing is not None else "float32")
    root = str(scan.root.resolve())
    plan = Plan(request, scan, existing, encoder, weights, record, vector_dtype, Checkpoint(request.index_path, encoder, root))

    stats = scan.stats
    if existing is not None:
        for i, rel in enumerate(existing.paths):
            stat = stats.get(rel)
            if stat is not None and stat == FileStat(int(existing.file_sizes[i]), int(existing.file_mtimes_ns[i])):
                plan.kept[rel] = (stat, existing.vectors[i], existing.image_size(i))
        plan.removed = sum(1 for rel in existing.paths if rel not in stats)
    plan.unchanged = frozenset(plan.kept)
    for rel, (size, mtime, vector, dimensions) in plan.checkpoint.load().items():
        stat = stats.get(rel)
        if rel not in plan.kept and stat is not None and stat == FileStat(size, mtime):
            plan.kept[rel] = (stat, vector, dimensions)
            plan.resumed += 1
    plan.todo = [rel for rel in stats if rel not in plan.kept]

    reasons = plan.reasons
    if existing is None:
        reasons.append("new database" if not request.rebuild else "rebuild")
    else:
        if plan.todo:
            reasons.append(f"{len(plan.todo)} new or changed images")
        if plan.resumed:
            reasons.append(f"{plan.resumed} images finished by an interrupted run")
        if plan.removed:
            reasons.append(f"{plan.removed} images removed")
        if root != existing.image_root:
            reasons.append("the image folder moved")
        if vector_dtype != str(existing.vectors.dtype):
            reasons.append(f"storage {existing.vectors.dtype} -> {vector_dtype}")
        if request.whitening.asked:
            reasons.append("whitening asked for")
        if record != plan.previous_record:
            reasons.append("search backend changed")
        if not existing.database_id:
            reasons.append("the file carries no version id")
    return plan


def describe(plan: Plan) -> str:
    """One line: what will be rewritten and why (``index.py`` prints it as a note)."""
    if not plan.reasons:
        return f"{plan.request.index_path} is up to date"
    return f"{plan.request.index_path} will be rewritten: " + "; ".join(plan.reasons)
