"""Stage 2: the plan of a run against the existing database: the encoder, what is reused, resumed, extracted,
removed, and in one place whether the file will be rewritten and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..descriptors.encoder import EncoderConfig, weights_for, with_calibration
from ..descriptors.mop import MopCodebook
from ..descriptors.pooling import CODEBOOK_POOLINGS
from ..errors import IndexFileError, RetrievalError
from ..models.backbones import Weights
from ..search.backends import backend_class, normalized_record
from ..storage.checkpoint import Checkpoint
from ..storage.database import FeatureDatabase, read_database
from .codebook import codebook_for
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
    codebook: MopCodebook | None = None  # MOP poolings: what the vectors are encoded with (indexing/codebook.py)
    codebook_source: str = ""
    copies: dict = field(default_factory=dict)  # copy-detection settings of the new version (requests.CopyRequest)

    @property
    def wants_copies(self) -> bool:
        return bool(self.copies.get("regions") or self.copies.get("local_features"))

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


def copy_settings(request: IndexRequest, existing: FeatureDatabase | None) -> dict:
    """The copy-detection settings of the version to write; IndexFileError when an update asks for features the
    existing database was built without (every image would need them: --rebuild)."""
    stored = existing.copies.settings() if existing is not None and existing.copies is not None else {}
    settings = request.copies.settings(stored)
    if existing is not None:
        for name, flag in (("regions", "--regions"), ("local_features", "--local-features")):
            if settings[name] and not stored.get(name, False):
                raise IndexFileError(
                    f"{request.index_path}: was built without {name.replace('_', ' ')}; rerun with --rebuild to add them "
                    f"({flag} or --preset copy-detection)", kind="conflict",
                )
        dropped = [name for name in ("regions", "local_features") if stored.get(name) and not settings[name]]
        if dropped:
            raise IndexFileError(
                f"{request.index_path}: was built with {' and '.join(n.replace('_', ' ') for n in dropped)}; "
                "rerun with --rebuild to leave them out", kind="conflict",
            )
    return settings


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
        encoder = with_calibration(encoder, scan.root, list(scan.stats))  # int8: the seeded sample, recorded
    record = request.backend.resolve(request.index_path, existing.search_backend if existing is not None else None)
    backend_class(record["backend"]).check_reachable(request.index_path, record)
    if request.extraction.ray is not None and encoder.pooling in CODEBOOK_POOLINGS:
        raise RetrievalError(f"--ray does not run pooling {encoder.pooling} (its codebook is not shipped to the workers); "
                             "index without --ray")
    if request.extraction.ray is not None:
        from ..descriptors.distributed import check_address

        check_address(request.extraction.ray)  # an unreachable cluster fails now, in seconds
    # MOP: learned on a sample (first build), taken from --codebook-from, or the existing one; sets encoder.dim
    encoder, codebook, codebook_source = codebook_for(
        request.codebook_from, request.encoder, existing, encoder, weights, scan, notice)
    vector_dtype = request.storage or (str(existing.vectors.dtype) if existing is not None else "float32")
    root = str(scan.root.resolve())
    plan = Plan(request, scan, existing, encoder, weights, record, vector_dtype, Checkpoint(request.index_path, encoder, root))
    plan.codebook, plan.codebook_source = codebook, codebook_source
    plan.copies = copy_settings(request, existing)

    stats = scan.stats
    if existing is not None:
        for i, rel in enumerate(existing.paths):
            stat = stats.get(rel)
            if stat is not None and stat == FileStat(int(existing.file_sizes[i]), int(existing.file_mtimes_ns[i])):
                plan.kept[rel] = (stat, existing.vectors[i], existing.image_size(i))
        plan.removed = sum(1 for rel in existing.paths if rel not in stats)
    plan.unchanged = frozenset(plan.kept)
    # an interrupted run's checkpoint holds global vectors only: with copy features those images are extracted again
    for rel, (size, mtime, vector, dimensions) in (plan.checkpoint.load().items() if not plan.wants_copies else ()):
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
        if plan.copies.get("verify") != (existing.copies.verify_default if existing.copies is not None else False):
            reasons.append("the query default for verification changed")
    return plan


def describe(plan: Plan) -> str:
    """One line: what will be rewritten and why (``index.py`` prints it as a note)."""
    if not plan.reasons:
        return f"{plan.request.index_path} is up to date"
    return f"{plan.request.index_path} will be rewritten: " + "; ".join(plan.reasons)
