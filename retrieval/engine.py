"""The retrieval engine: one feature database plus the extractor that encodes queries exactly like it.

Shared by ``query_online.py``, ``evaluate.py`` and the web app. Build it once; ``search_*`` calls are cheap and
thread-safe. The database's whitening (if any) is applied to the database once and to every query; query expansion
is chosen per query.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .extractor import Extractor
from .rerank import QUERY_EXPANSIONS, expand_query
from .store import FeatureDatabase, read_database
from .vector_index import ExactIndex, open_vector_index
from .whitening import apply_whitening


@dataclass(frozen=True)
class Hit:
    """One search result: 1-based rank, cosine score, row in the database, path relative to the image folder."""

    rank: int
    score: float
    id: int
    path: str

    def as_dict(self) -> dict:
        return {"rank": self.rank, "score": round(self.score, 6), "id": self.id, "path": self.path}


@dataclass(frozen=True)
class QueryExpansion:
    """Query-time re-ranking: ``method`` none | avg (AQE) | alpha (alpha-QE) over the ``top_n`` first results."""

    method: str = "none"
    top_n: int = 3
    alpha: float = 3.0

    def __post_init__(self):
        if self.method not in QUERY_EXPANSIONS:
            raise ValueError(f"unknown query expansion {self.method!r}; choose from {', '.join(QUERY_EXPANSIONS)}")
        if self.top_n < 1:
            raise ValueError(f"query expansion needs top_n >= 1, got {self.top_n}")
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")


NO_EXPANSION = QueryExpansion()


def search_matrix(database: FeatureDatabase) -> np.ndarray:
    """The matrix searched: the stored vectors, or their whitened form when the database carries a whitening."""
    if database.whitening is None:
        return database.vectors
    return apply_whitening(database.vectors, database.whitening)


def _open_search(index_path, database: FeatureDatabase, backend: str | None, milvus_uri: str | None):
    """(search structure, searched matrix) of a database read from ``index_path``."""
    matrix = search_matrix(database)
    vector_index = open_vector_index(
        index_path, database.database_id, matrix, database.search_backend, database.paths,
        backend=backend, milvus_uri=milvus_uri,
    )
    return vector_index, matrix


class RetrievalEngine:
    """A database in memory and a matching extractor. ``image_root`` overrides the folder recorded in the file."""

    def __init__(
        self,
        database: FeatureDatabase,
        extractor: Extractor | None,
        image_root: str | os.PathLike | None = None,
        vector_index=None,
        matrix: np.ndarray | None = None,
    ):
        self.database = database
        self.extractor = extractor
        self.matrix = search_matrix(database) if matrix is None else matrix
        self.vector_index = vector_index if vector_index is not None else ExactIndex(self.matrix)
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
    ) -> "RetrievalEngine":
        """Read the database and build its extractor (skip that with ``with_extractor=False`` for vector-only use).

        Searches go through the backend recorded in the database (memory, faiss or milvus, see ``vector_index``);
        ``backend`` serves it with another one (``memory`` always works: the vectors are in the file), ``milvus_uri``
        reaches the recorded collection at another address. Raises RetrievalError when the backend is unavailable.
        """
        database = read_database(index_path)
        vector_index, matrix = _open_search(index_path, database, backend, milvus_uri)
        extractor = Extractor.for_database(database.encoder, weights_file) if with_extractor else None
        return cls(database, extractor, image_root, vector_index, matrix)

    @classmethod
    def reopen(
        cls,
        index_path: str | os.PathLike,
        previous: "RetrievalEngine | None",
        *,
        weights_file: str | os.PathLike | None = None,
        image_root: str | os.PathLike | None = None,
        backend: str | None = None,
        milvus_uri: str | None = None,
    ) -> "RetrievalEngine":
        """A new version of the index at ``index_path``, for a server that reloads it without restarting.

        The file is read whole (a later replacement cannot affect the result). ``previous``'s extractor is kept when
        the encoder settings are unchanged, so no second model is built; otherwise a matching one is built. Raises
        like ``open``; ``previous`` is never modified.
        """
        database = read_database(index_path)
        if (
            previous is not None
            and previous.extractor is not None
            and database.encoder.identity() == previous.database.encoder.identity()
        ):
            extractor = previous.extractor
        else:
            extractor = None
        vector_index, matrix = _open_search(index_path, database, backend, milvus_uri)
        if extractor is None:
            extractor = Extractor.for_database(database.encoder, weights_file)
        return cls(database, extractor, image_root, vector_index, matrix)

    def __len__(self) -> int:
        return len(self.database)

    def image_path(self, hit_or_id: Hit | int) -> Path | None:
        """Absolute path of a database image, or None when the image folder is unknown."""
        row = hit_or_id.id if isinstance(hit_or_id, Hit) else int(hit_or_id)
        if self.image_root is None:
            return None
        return self.image_root / self.database.paths[row]

    def prepare_query(self, vector: np.ndarray) -> np.ndarray:
        """A descriptor from the extractor (D,) -> the vector compared with ``matrix`` (whitened if the database is)."""
        vector = np.asarray(vector, dtype=np.float32)
        if self.database.whitening is None:
            return vector
        return apply_whitening(vector, self.database.whitening)

    def search_vector(self, query: np.ndarray, k: int = 10, expansion: QueryExpansion = NO_EXPANSION) -> list[Hit]:
        """The ``k`` nearest database images to an extractor descriptor (D,), optionally with query expansion."""
        prepared = self.prepare_query(query)
        if expansion.method != "none":
            prepared = expand_query(expansion.method, prepared, self.matrix, expansion.top_n, alpha=expansion.alpha)
        rows, scores = self.vector_index.search(prepared, k)
        paths = self.database.paths
        return [Hit(rank, float(score), int(row), paths[row]) for rank, (row, score) in enumerate(zip(rows, scores), 1)]

    def search_id(self, row: int, k: int = 10, expansion: QueryExpansion = NO_EXPANSION) -> list[Hit]:
        """Search with a database image's stored descriptor (no model call). Raises IndexError for a bad row."""
        if not 0 <= row < len(self.database):
            raise IndexError(f"no image with id {row}")
        return self.search_vector(self.database.vectors[row], k, expansion)

    def search_source(
        self, source: str | os.PathLike | bytes, k: int = 10, expansion: QueryExpansion = NO_EXPANSION
    ) -> list[Hit]:
        """Encode an image file or bytes and return its ``k`` nearest database images. Raises ImageError."""
        return self.search_vector(self.extractor.encode_source(source), k, expansion)
