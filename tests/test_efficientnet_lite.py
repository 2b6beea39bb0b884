"""The Keras port of EfficientNet-Lite0 reproduces the PyTorch classifier on known images."""

import numpy as np
import pytest
import skimage.data
from PIL import Image

from retrieval.models.efficientnet_lite import (
    build_efficientnet_lite0,
    check_state_dict,
    expected_weight_shapes,
    preprocess_efficientnet_lite,
)
from retrieval.errors import WeightsError
from retrieval.models.torch_pickle import efficientnet_lite0_weights_path, load_legacy_torch_state_dict

EGYPTIAN_CAT = 285
ESPRESSO = 967


@pytest.fixture(scope="module")
def state_dict():
    return load_legacy_torch_state_dict(efficientnet_lite0_weights_path())


@pytest.fixture(scope="module")
def model(state_dict):
    return build_efficientnet_lite0(state_dict, with_logits=True)


def _image_224(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize((224, 224), Image.BICUBIC))


@pytest.fixture(scope="module")
def outputs(model):
    batch = preprocess_efficientnet_lite(np.stack([_image_224(skimage.data.chelsea()), _image_224(skimage.data.coffee())]))
    features, logits = model(batch, training=False)
    return np.asarray(features), np.asarray(logits)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_preprocess():
    out = preprocess_efficientnet_lite(np.array([[0, 127, 255]], dtype=np.uint8))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[-127 / 128, 0.0, 1.0]])
    np.testing.assert_allclose(preprocess_efficientnet_lite(np.full((1, 2, 2, 3), 255.0)), 1.0)


def test_classifies_known_images(outputs):
    _, logits = outputs
    assert logits.shape == (2, 1000)
    assert list(logits.argmax(axis=1)) == [EGYPTIAN_CAT, ESPRESSO]
    probs = _softmax(logits)
    assert probs[0, EGYPTIAN_CAT] > 0.5
    assert probs[1, ESPRESSO] > 0.5


def test_features_at_224(outputs):
    features, _ = outputs
    assert features.shape == (2, 7, 7, 1280)
    assert features.dtype == np.float32
    assert features.min() >= 0.0 and features.max() <= 6.0
    assert features.max() > 0.0


def test_any_spatial_size(model):
    features, logits = model(np.zeros((1, 100, 130, 3), np.float32), training=False)
    assert tuple(features.shape) == (1, 4, 5, 1280)
    assert tuple(logits.shape) == (1, 1000)


def test_layers_named_after_pytorch_modules(model):
    names = {layer.name for layer in model.layers}
    assert {"_conv_stem", "_bn0", "_blocks.0._depthwise_conv", "_blocks.15._project_conv", "_conv_head", "_bn1", "_fc"} <= names
    assert "_blocks.0._expand_conv" not in names  # expand ratio 1: no expansion conv
    assert sum(1 for n in names if n.endswith("._add")) == 9  # stride-1 blocks that keep their channel count
    assert model.count_params() == sum(int(np.prod(s)) for s in expected_weight_shapes().values())


def test_weights_copied_with_layout_conversion(model, state_dict):
    stem = model.get_layer("_conv_stem").get_weights()[0]
    np.testing.assert_array_equal(stem, state_dict["_conv_stem.weight"].transpose(2, 3, 1, 0))
    depthwise = model.get_layer("_blocks.3._depthwise_conv").get_weights()[0]
    assert depthwise.shape == (5, 5, 144, 1)
    np.testing.assert_array_equal(depthwise, state_dict["_blocks.3._depthwise_conv.weight"].transpose(2, 3, 0, 1))
    gamma, beta, mean, var = model.get_layer("_bn1").get_weights()
    np.testing.assert_array_equal(var, state_dict["_bn1.running_var"])
    assert model.get_layer("_bn1").epsilon == pytest.approx(1e-3)


def test_features_only_model_matches(state_dict, outputs):
    features_only = build_efficientnet_lite0(state_dict)
    batch = preprocess_efficientnet_lite(_image_224(skimage.data.chelsea())[None])
    features = np.asarray(features_only(batch, training=False))
    assert features.shape == (1, 7, 7, 1280)
    np.testing.assert_allclose(features[0], outputs[0][0], atol=1e-4)


def test_state_dict_checks(state_dict):
    check_state_dict(state_dict)
    missing = {k: v for k, v in state_dict.items() if k != "_fc.bias"}
    with pytest.raises(WeightsError, match=r"lack _fc\.bias"):
        build_efficientnet_lite0(missing)
    extra = dict(state_dict, **{"_blocks.16._bn0.weight": np.zeros(3, np.float32)})
    with pytest.raises(WeightsError, match=r"unexpected entry _blocks\.16\._bn0\.weight"):
        build_efficientnet_lite0(extra)
    reshaped = dict(state_dict, **{"_conv_stem.weight": state_dict["_conv_stem.weight"][:16]})
    with pytest.raises(WeightsError, match=r"_conv_stem\.weight has shape \(16, 3, 3, 3\), expected \(32, 3, 3, 3\)"):
        build_efficientnet_lite0(reshaped)
    without_counters = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    check_state_dict(without_counters)  # num_batches_tracked is optional
