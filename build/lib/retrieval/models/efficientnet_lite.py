"""EfficientNet-Lite0 as a Keras 3 functional model, with weights copied from the PyTorch ``state_dict``.

Lite0 is EfficientNet-B0 without squeeze-excitation, with ReLU6 instead of swish, and with the stem (32 channels)
and head (1280 channels) left unscaled. Every layer is named after its PyTorch module (``_conv_stem``,
``_blocks.3._depthwise_conv``, ``_conv_head``, ``_fc``, ...) so the weight mapping is plain to see.

Layout conversions: conv ``(out, in, kh, kw)`` -> Keras ``(kh, kw, in, out)``; depthwise ``(C, 1, kh, kw)`` ->
Keras ``(kh, kw, C, 1)``; dense ``(out, in)`` -> ``(in, out)``; batch norm ``weight, bias, running_mean,
running_var`` -> ``gamma, beta, moving_mean, moving_variance`` with epsilon 1e-3. Convs use ``padding="same"``,
which pads like the TensorFlow-style static padding of the PyTorch model.

Importing this module builds nothing; Keras is imported only when a model is built.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import WeightsError

BN_EPSILON = 1e-3
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000


class BlockSpec(NamedTuple):
    """One MBConv block: depthwise kernel size, depthwise stride, expansion ratio, input and output channels."""

    kernel: int
    stride: int
    expand: int
    in_channels: int
    out_channels: int


BLOCKS: tuple[BlockSpec, ...] = tuple(
    BlockSpec(*spec)
    for spec in [
        (3, 1, 1, 32, 16),
        (3, 2, 6, 16, 24),
        (3, 1, 6, 24, 24),
        (5, 2, 6, 24, 40),
        (5, 1, 6, 40, 40),
        (3, 2, 6, 40, 80),
        (3, 1, 6, 80, 80),
        (3, 1, 6, 80, 80),
        (5, 1, 6, 80, 112),
        (5, 1, 6, 112, 112),
        (5, 1, 6, 112, 112),
        (5, 2, 6, 112, 192),
        (5, 1, 6, 192, 192),
        (5, 1, 6, 192, 192),
        (5, 1, 6, 192, 192),
        (3, 1, 6, 192, 320),
    ]
)


def preprocess_efficientnet_lite(batch) -> np.ndarray:
    """Map RGB pixel values in [0, 255] (uint8 or float, any shape, e.g. ``(N, H, W, 3)``) to ``(rgb - 127) / 128``.

    Returns a float32 array of the same shape, roughly in [-1, 1].
    """
    return ((np.asarray(batch, dtype=np.float32) - 127.0) / 128.0).astype(np.float32, copy=False)


def expected_weight_shapes() -> dict[str, tuple[int, ...]]:
    """Every PyTorch state-dict entry the port uses (``num_batches_tracked`` aside), with its PyTorch shape."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, out_channels: int, in_channels: int, kernel: int) -> None:
        shapes[f"{name}.weight"] = (out_channels, in_channels, kernel, kernel)

    def batch_norm(name: str, channels: int) -> None:
        for part in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{part}"] = (channels,)

    conv("_conv_stem", STEM_CHANNELS, 3, 3)
    batch_norm("_bn0", STEM_CHANNELS)
    for index, spec in enumerate(BLOCKS):
        prefix = f"_blocks.{index}"
        hidden = spec.in_channels * spec.expand
        if spec.expand != 1:
            conv(f"{prefix}._expand_conv", hidden, spec.in_channels, 1)
            batch_norm(f"{prefix}._bn0", hidden)
        conv(f"{prefix}._depthwise_conv", hidden, 1, spec.kernel)
        batch_norm(f"{prefix}._bn1", hidden)
        conv(f"{prefix}._project_conv", spec.out_channels, hidden, 1)
        batch_norm(f"{prefix}._bn2", spec.out_channels)
    conv("_conv_head", HEAD_CHANNELS, BLOCKS[-1].out_channels, 1)
    batch_norm("_bn1", HEAD_CHANNELS)
    shapes["_fc.weight"] = (NUM_CLASSES, HEAD_CHANNELS)
    shapes["_fc.bias"] = (NUM_CLASSES,)
    return shapes


def check_state_dict(state_dict: dict[str, np.ndarray]) -> None:
    """Raise :class:`WeightsError` unless ``state_dict`` holds exactly the expected entries with the expected shapes.

    ``*.num_batches_tracked`` entries are ignored. Cheap: imports and builds nothing.
    """
    expected = expected_weight_shapes()
    present = {k for k in state_dict if not k.endswith(".num_batches_tracked")}
    missing = [k for k in expected if k not in present]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise WeightsError(f"EfficientNet-Lite0 weights lack {missing[0]}{more}")
    unexpected = sorted(present - expected.keys())
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise WeightsError(f"EfficientNet-Lite0 weights hold an unexpected entry {unexpected[0]}{more}")
    for name, shape in expected.items():
        actual = tuple(np.shape(state_dict[name]))
        if actual != shape:
            raise WeightsError(f"EfficientNet-Lite0 weight {name} has shape {actual}, expected {shape}")


class _WeightBank:
    """The state dict, handed out entry by entry; each entry must be taken exactly once with the expected shape."""

    def __init__(self, state_dict: dict[str, np.ndarray]):
        self._state = state_dict
        self._used: set[str] = set()

    def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The float32 array for ``name``, checked to have ``shape``."""
        if name not in self._state:
            raise WeightsError(f"EfficientNet-Lite0 weights lack {name}")
        if name in self._used:
            raise WeightsError(f"EfficientNet-Lite0 weight {name} used twice")
        value = np.asarray(self._state[name])
        if value.shape != tuple(shape):
            raise WeightsError(f"EfficientNet-Lite0 weight {name} has shape {value.shape}, expected {tuple(shape)}")
        self._used.add(name)
        return value.astype(np.float32, copy=False)

    def finish(self) -> None:
        """Raise if any entry other than ``num_batches_tracked`` was left unused."""
        unused = sorted(k for k in self._state if k not in self._used and not k.endswith("num_batches_tracked"))
        if unused:
            more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
            raise WeightsError(f"EfficientNet-Lite0 weights hold unused entries: {', '.join(unused[:3])}{more}")


def _conv(x, bank: _WeightBank, name: str, filters: int, kernel: int, stride: int = 1):
    """Bias-free ``padding="same"`` conv named ``name``: ``(N, H, W, C)`` -> ``(N, ceil(H/stride), ceil(W/stride), filters)``."""
    from keras import layers

    layer = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=name)
    y = layer(x)
    in_channels = x.shape[-1]
    weight = bank.take(f"{name}.weight", (filters, in_channels, kernel, kernel))
    layer.set_weights([weight.transpose(2, 3, 1, 0)])
    return y


def _depthwise_conv(x, bank: _WeightBank, name: str, kernel: int, stride: int):
    """Bias-free ``padding="same"`` depthwise conv: ``(N, H, W, C)`` -> ``(N, ceil(H/stride), ceil(W/stride), C)``."""
    from keras import layers

    layer = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=name)
    y = layer(x)
    channels = x.shape[-1]
    weight = bank.take(f"{name}.weight", (channels, 1, kernel, kernel))
    layer.set_weights([weight.transpose(2, 3, 0, 1)])
    return y


def _batch_norm(x, bank: _WeightBank, name: str):
    """Inference batch norm over the last axis, shape-preserving, epsilon 1e-3."""
    from keras import layers

    layer = layers.BatchNormalization(epsilon=BN_EPSILON, name=name)
    y = layer(x)
    channels = (x.shape[-1],)
    layer.set_weights([bank.take(f"{name}.{part}", channels) for part in ("weight", "bias", "running_mean", "running_var")])
    return y


def _relu6(x, name: str):
    """``min(max(x, 0), 6)``, shape-preserving."""
    from keras import layers

    return layers.ReLU(max_value=6.0, name=name)(x)


def _mbconv_block(x, bank: _WeightBank, index: int, spec: BlockSpec):
    """MBConv block ``_blocks.<index>``: ``(N, H, W, in)`` -> ``(N, ceil(H/stride), ceil(W/stride), out)``.

    [expand 1x1 + BN + ReLU6] -> depthwise kxk + BN + ReLU6 -> project 1x1 + BN, plus the input when the block keeps
    the shape (stride 1 and in == out).
    """
    from keras import layers

    prefix = f"_blocks.{index}"
    y = x
    if spec.expand != 1:
        y = _conv(y, bank, f"{prefix}._expand_conv", spec.in_channels * spec.expand, 1)
        y = _batch_norm(y, bank, f"{prefix}._bn0")
        y = _relu6(y, f"{prefix}._relu0")
    y = _depthwise_conv(y, bank, f"{prefix}._depthwise_conv", spec.kernel, spec.stride)
    y = _batch_norm(y, bank, f"{prefix}._bn1")
    y = _relu6(y, f"{prefix}._relu1")
    y = _conv(y, bank, f"{prefix}._project_conv", spec.out_channels, 1)
    y = _batch_norm(y, bank, f"{prefix}._bn2")
    if spec.stride == 1 and spec.in_channels == spec.out_channels:
        y = layers.Add(name=f"{prefix}._add")([x, y])
    return y


def build_efficientnet_lite0(state_dict: dict[str, np.ndarray], *, with_logits: bool = False):
    """Build EfficientNet-Lite0 in Keras 3 and load ``state_dict`` (the PyTorch names and layouts) into it.

    Input: float32 ``(N, H, W, 3)``, any ``H, W``, already preprocessed by :func:`preprocess_efficientnet_lite`.
    Output: head features after ``_conv_head`` (1x1, 1280) + ``_bn1`` + ReLU6, ``(N, ceil(H/32), ceil(W/32), 1280)``
    (7x7 at 224). With ``with_logits=True`` the outputs are ``(features, logits)`` with logits ``(N, 1000)`` from
    global average pooling and ``_fc``. Raises :class:`WeightsError` (before building anything, see
    :func:`check_state_dict`) when an entry is missing, has the wrong shape, or (``num_batches_tracked`` aside) is
    not used; ``_fc.*`` must be present even without logits. While building, every entry is taken exactly once.
    """
    check_state_dict(state_dict)
    import keras
    from keras import layers

    bank = _WeightBank(state_dict)
    inputs = keras.Input(shape=(None, None, 3), dtype="float32", name="image")
    x = _conv(inputs, bank, "_conv_stem", STEM_CHANNELS, 3, stride=2)
    x = _batch_norm(x, bank, "_bn0")
    x = _relu6(x, "_relu_stem")
    for index, spec in enumerate(BLOCKS):
        x = _mbconv_block(x, bank, index, spec)
    x = _conv(x, bank, "_conv_head", HEAD_CHANNELS, 1)
    x = _batch_norm(x, bank, "_bn1")
    features = _relu6(x, "_relu_head")

    fc_weight = bank.take("_fc.weight", (NUM_CLASSES, HEAD_CHANNELS))
    fc_bias = bank.take("_fc.bias", (NUM_CLASSES,))
    bank.finish()
    if not with_logits:
        return keras.Model(inputs, features, name="efficientnet_lite0")

    pooled = layers.GlobalAveragePooling2D(name="_avg_pooling")(features)
    fc = layers.Dense(NUM_CLASSES, name="_fc")
    logits = fc(pooled)
    fc.set_weights([fc_weight.T, fc_bias])
    return keras.Model(inputs, [features, logits], name="efficientnet_lite0")
