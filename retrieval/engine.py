"""The retrieval engine: one feature database plus the extractor that encodes queries exactly like it.

Shared by ``query_online.py`` and the web app. Build it once; ``search_*`` calls are cheap and thread-safe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .extractor import Extractor
from .search import top_k
from .store import FeatureDatabase, read_database


@dataclass(frozen=True)
class Hit:
    """One search result: 1-based rank, cosine score, row in the database, path relative to the image folder."""

    rank: int
    score: float
    id: int
    path: str

    def as_dict(self) -> dict:
        return {"rank": self.rank, "score": round(self.score, 6), "id": self.id, "path": self.path}


class RetrievalEngine:
    """A database in memory and a matching extractor. ``image_root`` overrides the folder recorded in the file."""

    def __init__(self, database: FeatureDatabase, extractor: Extractor, image_root: str | os.PathLike | None = None):
        self.database = database
        self.extractor = extractor
        self.image_root = Path(image_root) if image_root else (Path(database.image_root) if database.image_root else None)

    @classmethod
    def open(
        cls,
        index_path: str | os.PathLike,
        *,
        weights_file: str | os.PathLike | None = None,
        image_root: str | os.PathLike | None = None,
    ) -> "RetrievalEngine":
        database = read_database(index_path)
        return cls(database, Extractor.for_database(database.encoder, weights_file), image_root)

    def __len__(self) -> int:
        return len(self.database)

    def image_path(self, hit_or_id: Hit | int) -> Path | None:
        """Absolute path of a database image, or None when the image folder is unknown."""
        row = hit_or_id.id if isinstance(hit_or_id, Hit) else int(hit_or_id)
        if self.image_root is None:
            return None
        return self.image_root / self.database.paths[row]

    def search_vector(self, query: np.ndarray, k: int = 10) -> list[Hit]:
        rows, scores = top_k(self.database.vectors, query, k)
        return [Hit(rank + 1, float(score), int(row), self.database.paths[row]) for rank, (row, score) in enumerate(zip(rows, scores))]

    def search_source(self, source: str | os.PathLike | bytes, k: int = 10) -> list[Hit]:
        """Encode an image file or bytes and return its ``k`` nearest database images. Raises ImageError."""
        return self.search_vector(self.extractor.encode_source(source), k)
