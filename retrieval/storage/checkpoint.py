"""Checkpoints of a long indexing run, in ``<index>.partial/``: a ``meta.json`` plus ``chunk-NNNNNN.npz`` files.

Each file is written through ``retrieval.files.atomic_replace``, so a killed run resumes without redoing finished
images; a checkpoint made with other settings is discarded rather than mixed in.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..descriptors.encoder import EncoderConfig
from ..files import atomic_replace, atomic_write_bytes, remove_leftovers
from .database import FORMAT_VERSION


class Checkpoint:
    """Append-only store of finished descriptors for one indexing run."""

    def __init__(self, index_path: str | os.PathLike, encoder: EncoderConfig, image_root: str):
        self.folder = Path(f"{index_path}.partial")
        self.meta = {"encoder": encoder.identity(), "image_root": image_root, "format_version": FORMAT_VERSION}
        self._next_chunk = 0

    def load(self) -> dict[str, tuple[int, int, np.ndarray, tuple[int, int]]]:
        """Entries of a matching earlier run: path -> (size, mtime_ns, vector, (width, height) or (-1, -1) where
        unknown). Discards a foreign checkpoint."""
        meta_file = self.folder / "meta.json"
        try:
            meta = json.loads(meta_file.read_text("utf-8"))
        except (OSError, ValueError):
            meta = None
        if meta != self.meta:
            self.discard()
            return {}
        for leftover in self.folder.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)
        entries: dict[str, tuple[int, int, np.ndarray, tuple[int, int]]] = {}
        for chunk in sorted(self.folder.glob("chunk-*.npz")):
            try:
                with np.load(chunk, allow_pickle=False) as data:
                    count = len(data["paths"])
                    dimensions = data["image_sizes"] if "image_sizes" in data else np.full((count, 2), -1, np.int64)
                    for p, s, m, v, d in zip(data["paths"], data["sizes"], data["mtimes"], data["vectors"], dimensions):
                        vector = np.array(v, dtype=np.float32)
                        if np.isfinite(vector).all():
                            entries[str(p)] = (int(s), int(m), vector, (int(d[0]), int(d[1])))
            except (OSError, ValueError, KeyError):
                continue  # a damaged chunk only costs its images being extracted again
            self._next_chunk = max(self._next_chunk, int(chunk.stem.split("-")[1]) + 1)
        return entries

    def add(
        self, paths: list[str], sizes: list[int], mtimes: list[int], vectors: np.ndarray,
        image_sizes: list[tuple[int, int]] | None = None,
    ) -> None:
        """Append finished descriptors: file sizes (bytes), mtimes (ns), vectors (N, D), image (width, height)."""
        if not paths:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        meta_file = self.folder / "meta.json"
        if not meta_file.exists():
            atomic_write_bytes(meta_file, json.dumps(self.meta, sort_keys=True).encode("utf-8"))
        target = self.folder / f"chunk-{self._next_chunk:06d}.npz"
        self._next_chunk += 1
        with atomic_replace(target) as temporary, open(temporary, "wb") as out:
            np.savez(
                out,
                paths=np.asarray(paths, dtype=str),
                sizes=np.asarray(sizes, dtype=np.int64),
                mtimes=np.asarray(mtimes, dtype=np.int64),
                vectors=np.asarray(vectors, dtype=np.float32),
                image_sizes=np.asarray(image_sizes if image_sizes is not None else [(-1, -1)] * len(paths), np.int64),
            )

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        remove_leftovers(self.folder)
