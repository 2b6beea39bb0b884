"""What an indexing run was asked for, built once by index.py (or ``IndexRequest.create`` in the Python API) and
passed to every stage unchanged."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..descriptors.encoder import EncoderRequest
from ..descriptors.extractor import DEFAULT_BATCH_SIZE
from ..errors import RetrievalError
from ..files import check_readable_file
from ..search.backends import BackendRequest
from ..storage.database import VECTOR_DTYPES

CHECKPOINT_EVERY = 256  # images between checkpoint chunks
BACKEND_OPTIONS = ("ann", "faiss_index", "milvus_uri", "milvus_collection", "milvus_index")


@dataclass(frozen=True)
class WhiteningRequest:
    """``learn``: PCA-whitening learned on the database itself (re-learned at every update); ``source``: learned once
    on the vectors of another index file built with the same encoder; ``dim``: keep that many dimensions (default:
    as many as the training set supports, at most N / 4); ``power``: 0.5 full whitening, 0 centring + PCA rotation."""

    learn: bool = False
    source: str | os.PathLike | None = None
    dim: int | None = None
    power: float | None = None

    @property
    def asked(self) -> bool:
        return self.learn or self.source is not None


@dataclass(frozen=True)
class ExtractionRequest:
    """How descriptors are computed: in this process, or as a Ray job (``ray``: "local" or a cluster address)."""

    batch_size: int = DEFAULT_BATCH_SIZE
    checkpoint_every: int = CHECKPOINT_EVERY
    ray: str | None = None
    ray_actors: int | None = None
    progress: bool = True


@dataclass(frozen=True)
class CopyRequest:
    """Copy-detection features stored per image (``retrieval.storage.copy_features``): ``regions`` (region vectors
    searched beside the global one), ``local_features`` (SIFT for geometric verification), ``verify`` (queries verify
    by default). None: the existing database's, else off."""

    regions: bool | None = None
    local_features: bool | None = None
    verify: bool | None = None

    @property
    def asked(self) -> bool:
        return any(value is not None for value in (self.regions, self.local_features, self.verify))

    def settings(self, existing: dict | None = None) -> dict:
        """The settings of the database being written: asked for, else ``existing``'s, else off."""
        existing = existing or {}
        chosen = {name: getattr(self, name) for name in ("regions", "local_features", "verify")}
        return {name: bool(existing.get(name, False)) if value is None else bool(value) for name, value in chosen.items()}


@dataclass(frozen=True)
class IndexRequest:
    """One indexing run: the image folder, the database file, and what to build there."""

    image_root: Path
    index_path: Path
    encoder: EncoderRequest = field(default_factory=EncoderRequest)
    whitening: WhiteningRequest = field(default_factory=WhiteningRequest)
    backend: BackendRequest = field(default_factory=BackendRequest)
    extraction: ExtractionRequest = field(default_factory=ExtractionRequest)
    storage: str | None = None  # float32 | float16; None: the existing database's, else float32
    rebuild: bool = False
    codebook_from: str | os.PathLike | None = None  # MOP: take the codebook of this index file (indexing/codebook.py)
    copies: CopyRequest = field(default_factory=CopyRequest)

    @classmethod
    def create(
        cls,
        image_root: str | os.PathLike,
        index_path: str | os.PathLike,
        *,
        whitening: WhiteningRequest | None = None,
        storage: str | None = None,
        backend: str | None = None,
        rebuild: bool = False,
        codebook_from: str | os.PathLike | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        checkpoint_every: int = CHECKPOINT_EVERY,
        ray: str | None = None,
        ray_actors: int | None = None,
        progress: bool = True,
        **options,
    ) -> "IndexRequest":
        """The request from flat keyword options: ``EncoderRequest`` fields (backbone, weights_file, pooling,
        pooling_params, scales, resize_rule, input_size, precision) and backend options (ann, faiss_index, milvus_uri,
        milvus_collection, milvus_index) and copy-detection options (regions, local_features, verify: see
        ``CopyRequest``). TypeError for an unknown keyword."""
        backend_options = {name: options.pop(name) for name in BACKEND_OPTIONS if name in options}
        copies = CopyRequest(options.pop("regions", None), options.pop("local_features", None), options.pop("verify", None))
        options.setdefault("backbone", "auto")
        return cls(
            image_root=Path(image_root),
            index_path=Path(index_path),
            encoder=EncoderRequest(**options),
            whitening=whitening or WhiteningRequest(),
            backend=BackendRequest(backend, backend_options),
            extraction=ExtractionRequest(batch_size, checkpoint_every, ray, ray_actors, progress),
            storage=storage,
            rebuild=rebuild,
            codebook_from=codebook_from,
            copies=copies,
        )

    def check(self) -> None:
        """RetrievalError for options that cannot work, before any file is read."""
        if not str(self.image_root) or str(self.image_root).strip() == "":
            raise RetrievalError("empty image folder path: give the folder of images to index")
        if self.storage not in (None, *VECTOR_DTYPES):
            raise RetrievalError(f"unknown storage {self.storage!r}; choose from {', '.join(VECTOR_DTYPES)}")
        if self.extraction.batch_size < 1 or self.extraction.checkpoint_every < 1:
            raise RetrievalError("batch size and checkpoint interval must be at least 1")
        self.encoder.check()
        if self.copies.asked and self.extraction.ray is not None:
            raise RetrievalError("region vectors and local features are computed in this process only: leave out --ray")
        if self.copies.verify and self.copies.local_features is False:
            raise RetrievalError("verification by default needs local features")
        self.backend.check()
        if self.whitening.source is not None:
            check_readable_file(self.whitening.source, "index file")
        if self.codebook_from is not None:
            check_readable_file(self.codebook_from, "index file")
