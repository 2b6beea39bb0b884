import os

import numpy as np
import pytest

from retrieval.models import backbones
from retrieval.errors import WeightsError


def test_auto_falls_back_to_efficientnet_with_one_notice(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    notices = []
    weights = backbones.choose_weights("auto", notice=notices.append)
    assert weights.backbone == "efficientnet-lite0" and weights.name == "imagenet"
    assert len(notices) == 1 and "EfficientNet-Lite0" in notices[0] and str(tmp_path) in notices[0]


def test_explicit_vgg16_never_falls_back_and_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(WeightsError) as caught:
        backbones.choose_weights("vgg16", notice=lambda line: pytest.fail("no fallback expected"))
    message = str(caught.value)
    assert backbones.VGG16_IMAGENET_FILE in message and str(tmp_path / "models") in message and "--weights" in message


def test_cached_vgg16_file_with_wrong_checksum_is_not_trusted(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / backbones.VGG16_IMAGENET_FILE).write_bytes(b"not the real weights")
    assert backbones.vgg16_imagenet_weights() is None


def test_cached_vgg16_file_is_found_when_checksum_matches(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    fake = tmp_path / "models" / backbones.VGG16_IMAGENET_FILE
    fake.write_bytes(b"pretend")
    monkeypatch.setattr(backbones, "VGG16_IMAGENET_MD5", backbones.file_md5(fake).removeprefix("md5:"))
    found = backbones.vgg16_imagenet_weights()
    assert found is not None and found.path == fake and found.name == "imagenet"


def test_no_download_is_attempted_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(backbones, "_download", lambda *a: pytest.fail("download attempted while offline"))
    assert backbones.vgg16_imagenet_weights() is None


def test_unknown_backbone_and_missing_weights_file(tmp_path):
    with pytest.raises(WeightsError, match="unknown backbone"):
        backbones.choose_weights("resnet")
    with pytest.raises(WeightsError, match="no such weights file"):
        backbones.choose_weights("vgg16", tmp_path / "missing.h5")
    with pytest.raises(WeightsError, match="EfficientNet-Lite0 always uses"):
        backbones.choose_weights("efficientnet-lite0", tmp_path / "missing.h5")


def test_database_weights_must_match_the_recorded_hash(tmp_path, seeded_vgg16_weights):
    recorded = backbones.custom_weights("vgg16", seeded_vgg16_weights)
    found = backbones.weights_for_database("vgg16", recorded.name, recorded.hash, str(seeded_vgg16_weights))
    assert found.path == seeded_vgg16_weights
    other = tmp_path / "other.weights.h5"
    other.write_bytes(b"different")
    with pytest.raises(WeightsError, match="not the ones the database was built with"):
        backbones.weights_for_database("vgg16", recorded.name, recorded.hash, "", other)
    with pytest.raises(WeightsError, match="pass them with --weights"):
        backbones.weights_for_database("vgg16", recorded.name, recorded.hash, str(tmp_path / "moved.h5"))


def test_seeded_vgg16_builds_and_gives_block5_conv3_maps(seeded_vgg16_weights):
    weights = backbones.custom_weights("vgg16", seeded_vgg16_weights)
    model = backbones.build_feature_model(weights)
    maps = model(backbones.preprocess_vgg16(np.zeros((1, 224, 224, 3), np.uint8))).numpy()
    assert maps.shape == (1, 14, 14, 512)


def test_a_file_that_is_not_vgg16_weights_is_refused(tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(WeightsError, match="not usable as VGG16 weights"):
        backbones.build_feature_model(backbones.custom_weights("vgg16", junk))


def test_vgg16_preprocessing_is_keras_caffe_mode():
    rgb = np.array([[[[10, 20, 30]]]], dtype=np.uint8)
    np.testing.assert_allclose(backbones.preprocess_vgg16(rgb)[0, 0, 0], [30 - 103.939, 20 - 116.779, 10 - 123.68], rtol=1e-6)
