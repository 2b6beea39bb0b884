"""Build or update a feature database from an image folder: scan, reuse, extract, checkpoint, write atomically.

Incremental by default: a file whose relative path, size and modification time match the existing database keeps
its descriptor; new or changed files are extracted; files gone from the folder are dropped. ``rebuild`` starts over.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import backbones
from .errors import IndexFileError, RetrievalError
from .extractor import DEFAULT_BATCH_SIZE, Extractor, new_encoder_config
from .images import IMAGE_EXTENSIONS, list_image_files
from .store import Checkpoint, EncoderConfig, FeatureDatabase, now_iso, read_database, write_database

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
    seconds: float = 0.0
    encoder: EncoderConfig | None = None
    written: bool = False

    def summary(self) -> str:
        rate = f", {self.extracted / self.seconds:.1f} img/s" if self.extracted and self.seconds > 0 else ""
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


def _requested_differs(existing: EncoderConfig, backbone: str, weights_file, pooling_name: str | None) -> str | None:
    """A sentence when explicit options ask for something other than what the existing database holds."""
    if backbone != "auto" and backbone != existing.backbone:
        return f"backbone {existing.backbone}"
    if pooling_name is not None and pooling_name != existing.pooling:
        return f"pooling {existing.pooling}"
    if weights_file is not None and backbones.file_md5(weights_file) != existing.weights_hash:
        return f"other weights ({existing.weights_name})"
    return None


def build_index(
    image_root: str | os.PathLike,
    index_path: str | os.PathLike,
    *,
    backbone: str = "auto",
    weights_file: str | os.PathLike | None = None,
    pooling_name: str | None = None,
    precision: str = "float32",
    rebuild: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    checkpoint_every: int = CHECKPOINT_EVERY,
    progress: bool = True,
    notice: Callable[[str], None] = print,
) -> IndexReport:
    """Index every image under ``image_root`` into ``index_path``; see the module docstring. Returns a report.

    ``pooling_name`` None means the existing database's pooling, or ``max`` for a new one. Raises RetrievalError for a
    missing or empty folder, an unusable existing index, or options that contradict the existing index.
    """
    started = time.perf_counter()
    root = Path(image_root)
    if not root.exists():
        raise RetrievalError(f"{root}: no such folder")
    if not root.is_dir():
        raise RetrievalError(f"{root}: not a folder")
    index_path = Path(index_path)
    if index_path.is_dir():
        raise IndexFileError(f"{index_path}: is a folder; give the path of the index file to write")
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
        differs = _requested_differs(existing.encoder, backbone, weights_file, pooling_name)
        if differs:
            raise IndexFileError(f"{index_path}: was built with {differs}; rerun with --rebuild to change it")

    if existing is not None:
        encoder = existing.encoder
        weights = backbones.weights_for_database(
            encoder.backbone, encoder.weights_name, encoder.weights_hash, encoder.weights_path, weights_file
        )
    else:
        weights = backbones.choose_weights(backbone, weights_file, notice)
        encoder = new_encoder_config(weights, pooling_name or "max", precision)

    report = IndexReport(encoder=encoder)
    kept: dict[str, tuple[FileStat, np.ndarray]] = {}
    if existing is not None:
        for i, rel in enumerate(existing.paths):
            stat = stats.get(rel)
            if stat is not None and stat == FileStat(int(existing.file_sizes[i]), int(existing.file_mtimes_ns[i])):
                kept[rel] = (stat, existing.vectors[i])
        report.reused = len(kept)
        report.removed = sum(1 for rel in existing.paths if rel not in stats)

    checkpoint = Checkpoint(index_path, encoder, str(root.resolve()))
    for rel, (size, mtime, vector) in checkpoint.load().items():
        stat = stats.get(rel)
        if rel not in kept and stat is not None and stat == FileStat(size, mtime):
            kept[rel] = (stat, vector)
            report.resumed += 1

    todo = [rel for rel in stats if rel not in kept]
    if todo:
        extractor = Extractor(encoder, weights)
        _extract(extractor, root, todo, stats, kept, checkpoint, report, batch_size, checkpoint_every, progress)

    if not kept:
        checkpoint.discard()
        raise RetrievalError(f"{root}: none of the {len(stats)} image files could be read; nothing written")
    report.skipped.extend(skipped)
    report.skipped.sort()
    changed = existing is None or bool(todo) or report.removed > 0 or str(root.resolve()) != existing.image_root
    if changed:
        order = sorted(kept)
        database = FeatureDatabase(
            encoder=encoder,
            vectors=np.stack([kept[rel][1] for rel in order]).astype(np.float32),
            paths=order,
            file_sizes=np.array([kept[rel][0].size for rel in order], dtype=np.int64),
            file_mtimes_ns=np.array([kept[rel][0].mtime_ns for rel in order], dtype=np.int64),
            image_root=str(root.resolve()),
            created_at=existing.created_at if existing is not None else now_iso(),
            updated_at=now_iso(),
        )
        write_database(index_path, database)
        report.written = True
    checkpoint.discard()
    report.total = len(kept)
    report.seconds = time.perf_counter() - started
    return report


def _extract(extractor, root, todo, stats, kept, checkpoint, report, batch_size, checkpoint_every, progress):
    """Run the extractor over ``todo``, filling ``kept`` and the checkpoint, recording skips in ``report``."""
    from tqdm import tqdm

    pending: list[str] = []
    bar = tqdm(total=len(todo), unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True, leave=False)
    try:
        for items in extractor.encode_files([root / rel for rel in todo], batch_size=batch_size):
            for item in items:
                rel = todo[item.position]
                if item.error is not None:
                    report.skipped.append((rel, str(item.error).removeprefix(f"{root / rel}: ")))
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
