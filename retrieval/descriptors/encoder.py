"""The encoder vocabulary: everything that determines a descriptor, and the one place its options are validated.

``EncoderConfig`` is written into every database and read back by every reader, so a query is always encoded like the
database it searches. ``EncoderRequest`` is what a user asked for (None: the existing database's, or the default);
``EncoderRequest.new_config`` turns it into a config for a new database, ``conflicts_with`` says what an existing
database was built with when the request contradicts it. Store, extractor, indexing and the Ray job import this
module; it imports only the backbones' fixed facts and the pooling name table.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..errors import IndexFileError, RetrievalError
from ..models import backbones, runtime
from . import pooling

PRECISIONS = ("auto", "float32", "bfloat16", "int8")
CALIBRATION_IMAGES = 128  # int8: at most this many of the database's images calibrate the quantization
CALIBRATION_SEED = 0
DEFAULT_SCALES = (1.0,)
DEFAULT_POOLING = "max"
DEFAULT_RESIZE_RULE = "squash-bicubic"
INPUT_SIZE_RANGE = (32, 2048)


@dataclass(frozen=True)
class EncoderConfig:
    """Everything that determines a descriptor; a query must be encoded with the same config as the database."""

    backbone: str  # "vgg16" | "efficientnet-lite0"
    weights_name: str  # "imagenet" or the file name of custom weights
    weights_hash: str  # "md5:<hex>" of the weights file
    layer: str  # the conv layer whose activations are pooled
    pooling: str  # a name from retrieval.descriptors.pooling.POOLINGS
    input_size: int  # square input side in pixels
    resize_rule: str  # a name from retrieval.images.RESIZE_RULES
    precision: str  # "float32" | "bfloat16" | "int8"
    dim: int  # descriptor dimension
    pooling_params: dict = field(default_factory=dict)  # e.g. {"p": 3.0} for GeM
    scales: list = field(default_factory=lambda: [1.0])  # multi-scale extraction: factors of input_size
    weights_path: str = ""  # where the weights were read from when indexing (a hint for readers, not identity)
    codebook: str = ""  # MOP poolings: "sha256:<hex>" of the codebook stored in the database (retrieval.descriptors.mop)
    # int8: the calibration sample {"method", "images", "seed", "paths" (relative), "digest" (md5 of names + bytes)}
    calibration: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EncoderConfig":
        try:
            data = json.loads(text)
        except (TypeError, ValueError):
            raise IndexFileError("encoder settings are not valid JSON") from None
        if not isinstance(data, dict):
            raise IndexFileError("encoder settings are not a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise IndexFileError(f"encoder settings name unknown fields {sorted(unknown)}: written by a newer version?")
        try:
            return cls(**data)
        except TypeError as exc:
            raise IndexFileError(f"encoder settings are incomplete ({exc})") from None

    def identity(self) -> dict:
        """The fields that change descriptors (everything but where the weights were found)."""
        data = dataclasses.asdict(self)
        data.pop("weights_path")
        return data


def cpu_has_bf16() -> bool:
    """True when the CPU advertises AMX or AVX-512 bf16 instructions (Linux /proc/cpuinfo)."""
    return bool({"amx_bf16", "avx512_bf16"} & set(runtime.cpu_fields().get("flags", "").split()))


def resolve_precision(precision: str, backbone: str = "vgg16", weights: backbones.Weights | None = None) -> str:
    """``auto`` -> the fastest precision whose quality gate passed for the backbone (``BackboneSpec.gated``) that
    this machine runs faster than float32.

    With OpenVINO (the CPU runtime): int8 when the CPU plugin has INT8 and NNCF is installed, bfloat16 when it has
    BF16 and, given the ``weights``, runs them faster in it (``runtime.bfloat16_pays``: timed once per CPU), else
    float32. With Keras (a GPU, or no OpenVINO): bfloat16 for backbones it speeds up there (``bf16_pays``) on CPUs
    with bf16 units or a GPU, else float32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    spec = backbones.BACKBONES[backbone]
    if runtime.runtime_name(precision) == "keras":
        if spec.bf16_pays and (cpu_has_bf16() or runtime.gpu_for_tensorflow()):
            return "bfloat16"
        return "float32"
    capabilities = runtime.openvino_capabilities()
    for candidate in spec.gated:
        if candidate == "int8" and "INT8" in capabilities and runtime.nncf_available():
            return "int8"
        if candidate == "bfloat16" and "BF16" in capabilities and (weights is None or runtime.bfloat16_pays(weights)):
            return "bfloat16"
    return "float32"


def calibration_sample(paths: Sequence[str], count: int = CALIBRATION_IMAGES, seed: int = CALIBRATION_SEED) -> list[str]:
    """A bounded, seeded sample of the database's relative paths (sorted first, so the order they came in does not
    matter), in sorted order."""
    ordered = sorted(paths)
    if len(ordered) <= count:
        return ordered
    import numpy as np

    picked = np.random.default_rng(seed).choice(len(ordered), size=count, replace=False)
    return [ordered[i] for i in sorted(picked)]


def calibration_files_digest(names: Sequence[str], files: Sequence[str | os.PathLike]) -> str:
    """md5 over each calibration file's relative name and bytes, in order. Raises OSError for an unreadable file."""
    import hashlib

    digest = hashlib.md5(usedforsecurity=False)
    for name, path in zip(names, files):
        digest.update(name.encode("utf-8", "surrogateescape") + b"\0")
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return "md5:" + digest.hexdigest()


def with_calibration(encoder: EncoderConfig, image_root: str | os.PathLike, paths: Sequence[str]) -> EncoderConfig:
    """int8 settings with their calibration sample recorded (other precisions unchanged). Raises RetrievalError."""
    if encoder.precision != "int8" or encoder.calibration:
        return encoder
    sample = calibration_sample(paths)
    if not sample:
        raise RetrievalError("precision int8 calibrates on the database's images, and there are none")
    try:
        digest = calibration_files_digest(sample, [os.path.join(image_root, rel) for rel in sample])
    except OSError as exc:
        raise RetrievalError(f"{exc.filename}: cannot read this calibration image ({exc.strerror})") from None
    record = {"method": "nncf post-training quantization", "images": len(sample), "seed": CALIBRATION_SEED,
              "paths": sample, "digest": digest}
    return dataclasses.replace(encoder, calibration=record)


def check_encoder_options(
    pooling_name: str, pooling_params: dict | None, scales: Sequence[float], resize_rule: str, input_size: int | None
) -> tuple[dict, list[float]]:
    """Validate the backbone-independent encoder options -> (resolved pooling params, scales). Raises ValueError."""
    from ..images import RESIZE_RULES

    params = pooling.resolve_pooling_params(pooling_name, pooling_params)
    scales = [float(scale) for scale in scales]
    if not scales or any(not 0.1 <= scale <= 1.0 for scale in scales) or len(set(scales)) != len(scales):
        raise ValueError(f"scales must be distinct factors in [0.1, 1], got {scales}")
    if pooling_name in pooling.CODEBOOK_POOLINGS and scales != [1.0]:
        raise ValueError(f"pooling {pooling_name} makes its own scales (patches or input scales): leave --scales at 1")
    if resize_rule not in RESIZE_RULES:
        raise ValueError(f"unknown resize rule {resize_rule!r}; choose from {', '.join(RESIZE_RULES)}")
    low, high = INPUT_SIZE_RANGE
    if input_size is not None and not low <= input_size <= high:
        raise ValueError(f"input size must be between {low} and {high} pixels, got {input_size}")
    return params, scales


def new_encoder_config(
    weights: backbones.Weights,
    pooling_name: str = DEFAULT_POOLING,
    precision: str = "float32",
    *,
    pooling_params: dict | None = None,
    scales: Sequence[float] = DEFAULT_SCALES,
    resize_rule: str = DEFAULT_RESIZE_RULE,
    input_size: int | None = None,
) -> EncoderConfig:
    """The encoder settings for a fresh database. Raises ValueError for unknown or out-of-range choices.

    ``scales``: multi-scale extraction, factors of the input size in (0, 1] (e.g. 1, 0.707, 0.5); each scale is
    pooled and L2-normalised, then they are summed (MOP-style) and normalised again.
    """
    spec = backbones.BACKBONES[weights.backbone]
    params, scales = check_encoder_options(pooling_name, pooling_params, scales, resize_rule, input_size)
    return EncoderConfig(
        backbone=weights.backbone,
        weights_name=weights.name,
        weights_hash=weights.hash,
        weights_path=str(weights.path),
        layer=spec.layer,
        pooling=pooling_name,
        pooling_params=params,
        scales=scales,
        input_size=int(input_size or spec.input_size),
        resize_rule=resize_rule,
        precision=resolve_precision(precision, weights.backbone, weights),
        dim=spec.channels,
    )


def weights_for(encoder: EncoderConfig, weights_file: str | os.PathLike | None = None) -> backbones.Weights:
    """The exact weights a database with these settings was built with (md5-checked); WeightsError otherwise."""
    return backbones.weights_for_database(
        encoder.backbone, encoder.weights_name, encoder.weights_hash, encoder.weights_path, weights_file
    )


@dataclass(frozen=True)
class EncoderRequest:
    """What the user asked for on the command line; None means "the existing database's, or the default"."""

    backbone: str = "auto"
    weights_file: str | os.PathLike | None = None
    pooling: str | None = None
    pooling_params: dict | None = None
    scales: tuple[float, ...] | None = None
    resize_rule: str | None = None
    input_size: int | None = None
    precision: str | None = None

    def check(self) -> None:
        """RetrievalError for an option that cannot work, before any weights are looked for or files read."""
        if self.backbone not in backbones.BACKBONE_CHOICES:
            raise RetrievalError(f"unknown backbone {self.backbone!r}; choose from {', '.join(backbones.BACKBONE_CHOICES)}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise RetrievalError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        try:
            # parameters without a pooling name are checked against the existing database's pooling (conflicts_with)
            params = self.pooling_params if self.pooling is not None else None
            check_encoder_options(
                self.pooling or DEFAULT_POOLING, params, self.scales or DEFAULT_SCALES,
                self.resize_rule or DEFAULT_RESIZE_RULE, self.input_size,
            )
        except ValueError as exc:
            raise RetrievalError(str(exc)) from None

    def conflicts_with(self, existing: EncoderConfig) -> str | None:
        """A phrase naming what the existing database was built with, when this request asks for something else."""
        if self.backbone != "auto" and self.backbone != existing.backbone:
            return f"backbone {existing.backbone}"
        if self.pooling is not None and self.pooling != existing.pooling:
            return f"pooling {existing.pooling}"
        if self.pooling_params:
            try:
                wanted = pooling.resolve_pooling_params(self.pooling or existing.pooling, self.pooling_params)
            except ValueError as exc:
                raise RetrievalError(str(exc)) from None
            if wanted != existing.pooling_params:
                return f"pooling parameters {existing.pooling_params}"
        if self.scales is not None and [float(s) for s in self.scales] != list(existing.scales):
            return f"scales {existing.scales}"
        if self.resize_rule is not None and self.resize_rule != existing.resize_rule:
            return f"resize rule {existing.resize_rule}"
        if self.input_size is not None and self.input_size != existing.input_size:
            return f"input size {existing.input_size}"
        if self.precision not in (None, "auto") and self.precision != existing.precision:
            return f"precision {existing.precision}"
        if self.weights_file is not None and backbones.file_md5(self.weights_file) != existing.weights_hash:
            return f"other weights ({existing.weights_name})"
        return None

    def new_config(self, notice: Callable[[str], None]) -> tuple[EncoderConfig, backbones.Weights]:
        """Settings and weights for a new database (options checked before any weights are looked for)."""
        self.check()
        try:
            pooling.resolve_pooling_params(self.pooling or DEFAULT_POOLING, self.pooling_params)
        except ValueError as exc:
            raise RetrievalError(str(exc)) from None
        weights = backbones.choose_weights(self.backbone, self.weights_file, notice)
        try:
            encoder = new_encoder_config(
                weights,
                self.pooling or DEFAULT_POOLING,
                self.precision or "auto",
                pooling_params=self.pooling_params,
                scales=self.scales or DEFAULT_SCALES,
                resize_rule=self.resize_rule or DEFAULT_RESIZE_RULE,
                input_size=self.input_size,
            )
        except ValueError as exc:
            raise RetrievalError(str(exc)) from None
        return encoder, weights
