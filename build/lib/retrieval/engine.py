"""The retrieval engine: one feature database, the extractor that encodes queries exactly like it, and its pipeline.

Shared by ``query_online.py``, ``evaluate.py``, the web app and the Python API. Build it once; ``encode`` and
``search*`` calls are cheap and thread-safe. Every search goes through ``retrieval.search.pipeline.QueryPipeline``
(stored whitening -> the recorded backend -> query expansion through that backend), so every face ranks alike.
``close()`` lets go of the backend (a Milvus connection, faiss files).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .descriptors.extractor import Extractor
from .errors import RetrievalError
from .search.backends import open_backend
from .search.backends.memory import MemoryBackend
from .search.expansion import NO_EXPANSION, QueryExpansion
from .search.pipeline import QueryPipeline, searched_matrix
from .storage.database import FeatureDatabase, read_database


@dataclass(frozen=True)
class Hit:
    """One search result: 1-based rank, cosine score, row in the database, path relative to the image folder."""

    rank: int
    score: float
    id: int
    path: str

    def as_dict(self) -> dict:
        return {"rank": self.rank, "score": round(self.score, 6), "id": self.id, "path": self.path}


def open_pipeline(index_path, database: FeatureDatabase, *, backend: str | None = None, uri: str | None = None) -> QueryPipeline:
    """The query pipeline of a database read from ``index_path``: its searched matrix and recorded backend."""
    matrix = searched_matrix(database.vectors, database.whitening)
    return QueryPipeline(open_backend(Path(index_path), database, matrix, override=backend, uri=uri), matrix, database.whitening)


class RetrievalEngine:
    """A database in memory, a matching extractor (or None for vector-only use) and the query pipeline (by default
    exact search in memory). ``image_root`` overrides the folder recorded in the file.
    """

    def __init__(
        self,
        database: FeatureDatabase,
        extractor: Extractor | None,
        pipeline: QueryPipeline | None = None,
        image_root: str | os.PathLike | None = None,
    ):
        if pipeline is None:  # a database in memory only: exact search over its searched matrix
            matrix = searched_matrix(database.vectors, database.whitening)
            pipeline = QueryPipeline(MemoryBackend(matrix), matrix, database.whitening)
        self.database = database
        self.extractor = extractor
        self.pipeline = pipeline
        root = image_root or database.image_root
        self.image_root = Path(root) if root else None

    @classmethod
    def open(
        cls,
        index_path: str | os.PathLike,
        *,
        weights_file: str | os.PathLike | None = None,
        image_root: str | os.PathLike | None = None,
        with_extractor: bool = True,
        backend: str | None = None,
        milvus_uri: str | None = None,
        previous: "RetrievalEngine | None" = None,
    ) -> "RetrievalEngine":
        """Read the database and build its extractor (skip that with ``with_extractor=False`` for vector-only use).

        Searches go through the backend recorded in the database; ``backend`` serves it with another one (``memory``
        always works), ``milvus_uri`` reaches the recorded collection at another address. ``previous`` (a server
        reloading a new version of the file): its extractor is reused when the encoder settings are unchanged, so no
        second model is built; ``previous`` itself is never modified. Raises RetrievalError.
        """
        database = read_database(index_path)
        pipeline = open_pipeline(index_path, database, backend=backend, uri=milvus_uri)
        try:
            extractor = None
            if with_extractor:
                same = previous is not None and previous.extractor is not None and (
                    database.encoder.identity() == previous.database.encoder.identity()
                )
                extractor = previous.extractor if same else Extractor.for_database(database.encoder, weights_file)
        except BaseException:
            pipeline.close()
            raise
        return cls(database, extractor, pipeline, image_root)

    def close(self) -> None:
        self.pipeline.close()

    def __len__(self) -> int:
        return len(self.database)

    @property
    def matrix(self) -> np.ndarray:
        """The searched matrix (N, d): the stored vectors, whitened when the database carries a whitening."""
        return self.pipeline.matrix

    def image_path(self, hit_or_id: Hit | int) -> Path | None:
        """Absolute path of a database image, or None when the image folder is unknown."""
        row = hit_or_id.id if isinstance(hit_or_id, Hit) else int(hit_or_id)
        if self.image_root is None:
            return None
        return self.image_root / self.database.paths[row]

    # ------------------------------------------------------------------ encoding

    def load_extractor(self, weights_file: str | os.PathLike | None = None) -> None:
        """Build the extractor of an engine opened without one (the evaluator needs it only for some queries)."""
        if self.extractor is None:
            self.extractor = Extractor.for_database(self.database.encoder, weights_file)

    def _extractor(self) -> Extractor:
        if self.extractor is None:
            raise RetrievalError("this engine was opened without an extractor (vector-only)")
        return self.extractor

    def encode(self, source: str | os.PathLike | bytes) -> np.ndarray:
        """An image file or its bytes -> descriptor (D,), encoded like the database. Raises ImageError."""
        return self._extractor().encode_source(source)

    def encode_images(self, images: Sequence) -> np.ndarray:
        """RGB PIL images -> descriptors (M, D), encoded like the database."""
        return self._extractor().encode_pil(images)

    # ------------------------------------------------------------------ searching

    def _hits(self, rows: np.ndarray, scores: np.ndarray) -> list[Hit]:
        paths = self.database.paths
        found = rows >= 0
        return [Hit(rank, float(score), int(row), paths[row]) for rank, (row, score) in enumerate(zip(rows[found], scores[found]), 1)]

    def search_many(
        self,
        descriptors: np.ndarray,
        k: int = 10,
        expansion: QueryExpansion = NO_EXPANSION,
        query_rows: Sequence[int | None] | None = None,
    ) -> list[list[Hit]]:
        """The ``k`` nearest database images to each descriptor (M, D), in one batched pipeline call."""
        rows, scores = self.pipeline.search(np.atleast_2d(descriptors), k, expansion, query_rows)
        return [self._hits(r, s) for r, s in zip(rows, scores)]

    def search(self, descriptor: np.ndarray, k: int = 10, expansion: QueryExpansion = NO_EXPANSION) -> list[Hit]:
        """The ``k`` nearest database images to one extractor descriptor (D,)."""
        return self.search_many(np.asarray(descriptor)[None, :], k, expansion)[0]

    def search_id(self, row: int, k: int = 10, expansion: QueryExpansion = NO_EXPANSION) -> list[Hit]:
        """Search with a database image's stored descriptor (no model call); it is never its own expansion
        neighbour. Raises IndexError for a bad row."""
        if not 0 <= row < len(self.database):
            raise IndexError(f"no image with id {row}")
        return self.search_many(self.database.vectors[row : row + 1], k, expansion, query_rows=[row])[0]

    def search_image(
        self, source: str | os.PathLike | bytes, k: int = 10, expansion: QueryExpansion = NO_EXPANSION
    ) -> list[Hit]:
        """Encode an image file or bytes and return its ``k`` nearest database images. Raises ImageError."""
        return self.search(self.encode(source), k, expansion)
