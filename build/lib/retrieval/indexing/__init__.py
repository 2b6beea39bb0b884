"""Build or update a feature database from an image folder, in four stages over one ``IndexRequest``::

    scan (scan.py)      the image files under the folder, with size and modification time
    plan (plan.py)      against the existing database: the encoder, what is reused, resumed from an interrupted run,
                        extracted, removed; whether the file is rewritten and why (``Plan.reasons``)
    extract (extract.py) descriptors of what is to do, in this process or on Ray, checkpointed as they come
    commit (commit.py)  the new version: whitening, the backend brought up to date, the file replaced atomically

Incremental by default: a file whose relative path, size and modification time match the existing database keeps
its descriptor; new or changed files are extracted; files gone from the folder are dropped. ``rebuild`` starts over.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from ..descriptors.encoder import EncoderConfig
from ..files import check_writable_target
from .commit import IMAGES_PER_WHITENED_DIM, commit
from .extract import extract
from .plan import describe, make_plan
from .requests import CHECKPOINT_EVERY, ExtractionRequest, IndexRequest, WhiteningRequest
from .scan import scan_folder


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
    reasons: list[str] = field(default_factory=list)  # why the file was rewritten
    ann: str = "exact"  # the search the database gets: exact, hnsw, faiss-hnsw, faiss-ivf, milvus-HNSW, ...
    backend: str = "memory"  # memory | faiss | milvus
    backend_detail: str = ""  # what was done to the backend's structure (built, updated, upserted, ...)
    extraction: str = "local"  # local | ray

    def summary(self) -> str:
        rate = f", {self.extracted / self.extract_seconds:.1f} img/s" if self.extracted and self.extract_seconds > 0 else ""
        parts = [f"indexed {self.total} images ({self.extracted} extracted, {self.reused} unchanged"]
        if self.resumed:
            parts.append(f", {self.resumed} resumed")
        parts.append(f", {self.removed} removed), skipped {len(self.skipped)}, in {self.seconds:.1f} s{rate}")
        return "".join(parts)


def run_index(request: IndexRequest, notice: Callable[[str], None] = print) -> IndexReport:
    """Index ``request.image_root`` into ``request.index_path``: scan, plan, extract, commit. Returns a report.

    Raises RetrievalError for a missing or empty folder, an unusable existing index, options that contradict it
    (unless ``rebuild``), an unwritable location or an unreachable backend, before anything is extracted.
    """
    started = time.perf_counter()
    request.check()
    check_writable_target(request.index_path, "index file")  # where we will write, before any work
    scan = scan_folder(request.image_root)
    plan = make_plan(request, scan, notice)
    extraction = extract(plan)
    done = commit(plan, extraction, notice)
    return IndexReport(
        total=done.total,
        extracted=len(extraction.vectors),
        reused=len(plan.unchanged),
        resumed=plan.resumed,
        removed=plan.removed,
        skipped=sorted(scan.skipped + extraction.skipped),
        seconds=time.perf_counter() - started,
        extract_seconds=extraction.seconds,
        encoder=plan.encoder,
        written=done.written,
        reasons=list(plan.reasons),
        ann=done.update.search,
        backend=plan.record["backend"],
        backend_detail=done.update.detail,
        extraction=extraction.mode,
    )


def build_index(image_root, index_path, *, notice: Callable[[str], None] = print, **options) -> IndexReport:
    """The Python API: ``run_index(IndexRequest.create(image_root, index_path, **options))``; see ``IndexRequest``."""
    return run_index(IndexRequest.create(image_root, index_path, **options), notice)


__all__ = [
    "CHECKPOINT_EVERY", "IMAGES_PER_WHITENED_DIM", "ExtractionRequest", "IndexReport", "IndexRequest",
    "WhiteningRequest", "build_index", "describe", "run_index",
]
