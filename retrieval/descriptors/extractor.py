"""The extractor: the one place that runs a model. Images in, L2-normalised descriptors out.

An ``Extractor`` is built once (model, weights, a traced forward function) and then encodes batches: uint8 RGB arrays,
PIL images, files or upload bytes. ``encode_files`` decodes the next batch on worker threads while the model runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from ..errors import ImageError, RetrievalError
from ..images import MIN_SIDE, load_for_backbone, load_sized_for_backbone, prefetched_batches, resize_for_backbone
from ..models import backbones, runtime
from ..vectors import l2_normalize
from . import mop, mop_extract, pooling
from .encoder import EncoderConfig, calibration_files_digest, weights_for

DEFAULT_BATCH_SIZE = 16


@dataclass
class EncodedItem:
    """One input of ``encode_files``: its position, and either a descriptor (D,) with the image's full-resolution
    (width, height) as displayed, or the reason it was skipped."""

    position: int
    vector: np.ndarray | None
    error: ImageError | None
    size: tuple[int, int] | None = None


def rescale_image(image: np.ndarray, scale: float) -> np.ndarray:
    """uint8 (H, W, 3) resized by ``scale`` (bicubic), each side at least MIN_SIDE pixels."""
    if scale == 1.0:
        return image
    height, width = image.shape[:2]
    target = (max(MIN_SIDE, round(width * scale)), max(MIN_SIDE, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(target, Image.Resampling.BICUBIC), dtype=np.uint8)


def calibration_for(encoder: EncoderConfig, image_root: str | os.PathLike | None) -> runtime.Calibration | None:
    """The int8 calibration sample the encoder settings record, read from ``image_root`` when it is needed; None for
    other precisions. The recorded digest of the files is checked before they are used."""
    if encoder.precision != "int8":
        return None
    sample = list(encoder.calibration.get("paths", []))
    digest = encoder.calibration.get("digest", "")

    def images() -> list[np.ndarray]:
        if image_root is None or not sample:
            raise RetrievalError(
                "the int8 model has to be calibrated again (no cached conversion here) and needs the database's "
                "images: give the image folder (--database DIR) or rebuild the index", kind="unavailable",
            )
        files = [os.path.join(image_root, rel) for rel in sample]
        try:
            actual = calibration_files_digest(sample, files)
        except OSError as exc:
            raise RetrievalError(f"int8 calibration image missing or unreadable ({exc.filename}): rebuild the index", kind="not_found") from None
        if actual != digest:
            raise RetrievalError("the int8 calibration images have changed since the database was built: rebuild the index", kind="conflict")
        return [load_for_backbone(path, encoder.input_size, encoder.resize_rule) for path in files]

    return runtime.Calibration(digest, images)


class Extractor:
    """Backbone + pooling + L2 normalisation for one ``EncoderConfig``; build once, call many times (thread-safe).

    The forward pass runs through ``retrieval.models.runtime`` (OpenVINO from a cached conversion on CPUs, else the
    Keras ``tf.function``), with a dynamic batch and spatial shape, so batches of any size (and aspect-preserving
    inputs) reuse it; it is warmed up before the first real call. ``image_root``: the folder the database's images
    are in, for an int8 model whose cached conversion has to be rebuilt from the recorded calibration sample.
    """

    def __init__(
        self,
        encoder: EncoderConfig,
        weights: backbones.Weights,
        *,
        image_root: str | os.PathLike | None = None,
        notice: Callable[[str], None] | None = None,
    ):
        if weights.hash != encoder.weights_hash:
            raise ValueError("weights do not match the encoder settings")
        self.encoder = encoder
        self.spec = backbones.BACKBONES[encoder.backbone]
        calibration = calibration_for(encoder, image_root)
        self.runtime = runtime.load_runtime(weights, encoder.precision, calibration, notice or runtime.stderr_notice)
        size = encoder.input_size
        self.runtime(self.spec.preprocess(np.zeros((1, size, size, 3), np.uint8)))  # warm up here, not on a request

    codebook = None  # MOP poolings: the database's ``mop.MopCodebook`` (``use_codebook``)

    @classmethod
    def for_database(
        cls, encoder: EncoderConfig, weights_file: str | os.PathLike | None = None, codebook=None,
        image_root: str | os.PathLike | None = None,
    ) -> "Extractor":
        """An extractor that encodes exactly like the database whose settings are ``encoder`` (and, for MOP, whose
        codebook is ``codebook``)."""
        extractor = cls(encoder, weights_for(encoder, weights_file), image_root=image_root)
        return extractor.use_codebook(codebook) if codebook is not None else extractor

    def use_codebook(self, codebook) -> "Extractor":
        """Encode MOP against ``codebook``; ValueError unless it is the one the encoder settings name."""
        if codebook.digest() != self.encoder.codebook or codebook.dim != self.encoder.dim:
            raise ValueError("the MOP codebook is not the one these encoder settings were made with")
        self.codebook = codebook
        return self

    def mop_material(self, images: Sequence[np.ndarray]):
        """MOP's material (``mop.Material``) of uint8 RGB arrays resized by the database's rule."""
        return mop_extract.material(self.encoder.pooling, self.feature_maps, list(images), rescale_image,
                                    self.encoder.pooling_params)

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def feature_maps(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB (N, H, W, 3) -> float32 conv maps (N, h, w, C)."""
        return self.runtime(self.spec.preprocess(images))

    def _pooled(self, images: list[np.ndarray]) -> np.ndarray:
        """Pool a list of uint8 (H, W, 3) arrays, batching those of equal shape. -> float32 (N, C), not normalised."""
        out = np.empty((len(images), self.dim), np.float32)
        groups: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(image.shape, []).append(i)
        for rows in groups.values():
            maps = self.feature_maps(np.stack([images[i] for i in rows]))
            out[rows] = pooling.pool(self.encoder.pooling, maps, **self.encoder.pooling_params)
        return out

    def encode_arrays(self, images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """uint8 RGB arrays, already resized by the database's rule -> L2-normalised float32 (N, D).

        Accepts a stacked (N, H, W, 3) array or a list of (H, W, 3) arrays of possibly different shapes.
        """
        images = list(images)
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
                raise ValueError(f"expected RGB images of shape (H, W, 3), got {image.shape}")
        if not images:
            return np.empty((0, self.dim), np.float32)
        if self.encoder.pooling in pooling.CODEBOOK_POOLINGS:
            if self.codebook is None:
                raise ValueError(f"pooling {self.encoder.pooling} needs the database's codebook (Extractor.use_codebook)")
            return mop.encode(self.mop_material(images), self.codebook)
        per_scale = [self._pooled([rescale_image(image, scale) for image in images]) for scale in self.encoder.scales]
        combined = per_scale[0] if len(per_scale) == 1 else pooling.combine_scales(per_scale)
        return l2_normalize(combined)

    def encode_pil(self, images: Sequence[Image.Image], input_sizes: Sequence[int] | None = None) -> np.ndarray:
        """RGB PIL images of any size -> L2-normalised float32 (N, D), resized by the database's rule to the encoder's
        input size or, one per image, to ``input_sizes`` (query windows: ``regions.window_input_side``)."""
        rule = self.encoder.resize_rule
        sizes = [self.encoder.input_size] * len(images) if input_sizes is None else list(input_sizes)
        if len(sizes) != len(images):
            raise ValueError(f"{len(sizes)} input sizes for {len(images)} images")
        arrays = [resize_for_backbone(image.convert("RGB"), size, rule) for image, size in zip(images, sizes)]
        return self.encode_arrays(arrays)

    def encode_source(self, source: str | os.PathLike | bytes) -> np.ndarray:
        """One image file or its bytes -> float32 (D,). Raises ImageError for anything that is not a usable image."""
        array = load_for_backbone(source, self.encoder.input_size, self.encoder.resize_rule)
        return self.encode_arrays([array])[0]

    def encode_files(
        self, paths: Iterable[str | os.PathLike], batch_size: int = DEFAULT_BATCH_SIZE, workers: int = 2
    ) -> Iterator[list[EncodedItem]]:
        """Encode files in batches, yielding one list of ``EncodedItem`` per batch, in input order.

        Decoding and resizing of the next batches run on ``workers`` threads while the model computes; an unusable
        file becomes an item with ``error`` set and never stops the run.
        """
        size, rule = self.encoder.input_size, self.encoder.resize_rule

        def load(path):
            return load_sized_for_backbone(path, size, rule)

        for start, results in prefetched_batches(list(paths), load, batch_size, workers):
            good = [i for i, (loaded, _) in enumerate(results) if loaded is not None]
            vectors = self.encode_arrays([results[i][0][0] for i in good]) if good else None
            items = [EncodedItem(start + i, None, error) for i, (_, error) in enumerate(results)]
            for row, i in enumerate(good):
                items[i].vector = vectors[row]
                items[i].size = tuple(int(side) for side in results[i][0][1])
            yield items
