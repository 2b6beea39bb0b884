"""The extractor: the one place that runs a model. Images in, L2-normalised descriptors out.

An ``Extractor`` is built once (model, weights, a traced forward function) and then encodes batches: uint8 RGB arrays,
PIL images, files or upload bytes. ``encode_files`` decodes the next batch on worker threads while the model runs.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from . import backbones, pooling
from .errors import ImageError
from .images import load_for_backbone, resize_square
from .store import EncoderConfig

PRECISIONS = ("auto", "float32", "bfloat16")
DEFAULT_BATCH_SIZE = 16


def cpu_has_bf16() -> bool:
    """True when the CPU advertises AMX or AVX-512 bf16 instructions (Linux /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"amx_bf16", "avx512_bf16"} & flags)
    except OSError:
        pass
    return False


def resolve_precision(precision: str) -> str:
    """``auto`` -> ``bfloat16`` on CPUs with bf16 units or when a GPU is visible, else ``float32``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if cpu_has_bf16():
        return "bfloat16"
    backbones.quiet_tensorflow()
    import tensorflow as tf

    return "bfloat16" if tf.config.list_physical_devices("GPU") else "float32"


def new_encoder_config(weights: backbones.Weights, pooling_name: str, precision: str = "float32") -> EncoderConfig:
    """The encoder settings for fresh databases: the backbone's layer and input size, the chosen pooling."""
    spec = backbones.BACKBONES[weights.backbone]
    if pooling_name not in pooling.POOLINGS:
        raise ValueError(f"unknown pooling {pooling_name!r}; choose from {', '.join(pooling.POOLINGS)}")
    return EncoderConfig(
        backbone=weights.backbone,
        weights_name=weights.name,
        weights_hash=weights.hash,
        weights_path=str(weights.path),
        layer=spec.layer,
        pooling=pooling_name,
        input_size=spec.input_size,
        resize_rule="squash-bicubic",
        precision=resolve_precision(precision),
        dim=spec.channels,
    )


@dataclass
class EncodedItem:
    """One input of ``encode_files``: its position, and either a descriptor (D,) or the reason it was skipped."""

    position: int
    vector: np.ndarray | None
    error: ImageError | None


class Extractor:
    """Backbone + pooling + L2 normalisation for one ``EncoderConfig``; build once, call many times (thread-safe)."""

    def __init__(self, encoder: EncoderConfig, weights: backbones.Weights):
        if weights.hash != encoder.weights_hash:
            raise ValueError("weights do not match the encoder settings")
        backbones.quiet_tensorflow()
        import tensorflow as tf

        self.encoder = encoder
        self.spec = backbones.BACKBONES[encoder.backbone]
        self.model = backbones.build_feature_model(weights, encoder.precision)
        size = encoder.input_size
        model = self.model

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)], reduce_retracing=True)
        def forward(batch):
            return tf.cast(model(batch, training=False), tf.float32)

        self._forward = forward
        forward(np.zeros((1, size, size, 3), np.float32))  # trace and warm up once, here, not on the first request

    @classmethod
    def for_database(cls, encoder: EncoderConfig, weights_file: str | os.PathLike | None = None) -> "Extractor":
        """An extractor that encodes exactly like the database whose settings are ``encoder``."""
        weights = backbones.weights_for_database(
            encoder.backbone, encoder.weights_name, encoder.weights_hash, encoder.weights_path, weights_file
        )
        return cls(encoder, weights)

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def feature_maps(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB (N, S, S, 3) -> float32 conv maps (N, h, w, C)."""
        batch = self.spec.preprocess(images)
        return self._forward(batch).numpy()

    def encode_arrays(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB (N, S, S, 3), S = input size -> L2-normalised float32 (N, D)."""
        images = np.asarray(images)
        size = self.encoder.input_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(f"expected images of shape (N, {size}, {size}, 3), got {images.shape}")
        if len(images) == 0:
            return np.empty((0, self.dim), np.float32)
        return pooling.l2_normalize(pooling.pool(self.encoder.pooling, self.feature_maps(images)))

    def encode_pil(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB PIL images of any size -> L2-normalised float32 (N, D), resized by the database's rule."""
        size, rule = self.encoder.input_size, self.encoder.resize_rule
        return self.encode_arrays(np.stack([resize_square(image.convert("RGB"), size, rule) for image in images]))

    def encode_source(self, source: str | os.PathLike | bytes) -> np.ndarray:
        """One image file or its bytes -> float32 (D,). Raises ImageError for anything that is not a usable image."""
        array = load_for_backbone(source, self.encoder.input_size, self.encoder.resize_rule)
        return self.encode_arrays(array[None])[0]

    def encode_files(
        self, paths: Iterable[str | os.PathLike], batch_size: int = DEFAULT_BATCH_SIZE, workers: int = 2
    ) -> Iterator[list[EncodedItem]]:
        """Encode files in batches, yielding one list of ``EncodedItem`` per batch, in input order.

        Decoding and resizing of the next batches run on ``workers`` threads while the model computes; an unusable
        file becomes an item with ``error`` set and never stops the run.
        """
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        size, rule = self.encoder.input_size, self.encoder.resize_rule

        def load(path):
            try:
                return load_for_backbone(path, size, rule), None
            except ImageError as exc:
                return None, exc

        paths = list(paths)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
            # map() submits everything at once; keep only a bounded window of decoded images in flight
            window = batch_size * 3
            pending = [pool.submit(load, p) for p in paths[:window]]
            submitted = len(pending)
            for start in range(0, len(paths), batch_size):
                results = [future.result() for future in pending[:batch_size]]
                pending = pending[batch_size:]
                while submitted < len(paths) and len(pending) < window:
                    pending.append(pool.submit(load, paths[submitted]))
                    submitted += 1
                good = [i for i, (array, _) in enumerate(results) if array is not None]
                vectors = self.encode_arrays(np.stack([results[i][0] for i in good])) if good else None
                items = [EncodedItem(start + i, None, error) for i, (_, error) in enumerate(results)]
                for row, i in enumerate(good):
                    items[i].vector = vectors[row]
                yield items
