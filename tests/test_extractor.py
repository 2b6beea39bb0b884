import numpy as np
import pytest
from PIL import Image

from conftest import DEMO_DATABASE, write_rgb
from retrieval.descriptors import encoder as encoder_module
from retrieval.errors import ImageError
from retrieval.images import load_for_backbone


def test_descriptors_are_unit_length_with_the_backbone_dimension(effnet_extractor):
    arrays = np.stack([load_for_backbone(DEMO_DATABASE / "coffee" / "original.jpg", 224)] * 2)
    vectors = effnet_extractor.encode_arrays(arrays)
    assert vectors.shape == (2, 1280) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, rtol=1e-5)


def test_file_bytes_and_pil_paths_agree(effnet_extractor):
    path = DEMO_DATABASE / "rocket" / "original.jpg"
    from_file = effnet_extractor.encode_source(path)
    from_bytes = effnet_extractor.encode_source(path.read_bytes())
    from_pil = effnet_extractor.encode_pil([Image.open(path)])[0]
    assert float(from_file @ from_bytes) > 0.99999
    assert float(from_file @ from_pil) > 0.999  # PIL path resizes without the JPEG draft shortcut


def test_batched_equals_one_by_one(effnet_extractor):
    paths = sorted((DEMO_DATABASE / "chelsea").glob("*.jpg"))
    batched = np.stack([item.vector for batch in effnet_extractor.encode_files(paths, batch_size=3) for item in batch])
    single = np.stack([effnet_extractor.encode_source(p) for p in paths])
    np.testing.assert_allclose(np.sum(batched * single, axis=1), 1, atol=1e-5)


def test_bad_files_become_skips_in_order(effnet_extractor, tmp_path):
    good = write_rgb(tmp_path / "good.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    items = [item for batch in effnet_extractor.encode_files([good, bad, tmp_path / "missing.png", good], batch_size=2) for item in batch]
    assert [item.position for item in items] == [0, 1, 2, 3]
    assert [item.error is None for item in items] == [True, False, False, True]
    assert isinstance(items[1].error, ImageError) and items[0].vector.shape == (1280,)


def test_shape_and_argument_checks(effnet_extractor):
    with pytest.raises(ValueError, match="expected RGB images"):
        effnet_extractor.encode_arrays(np.zeros((1, 100, 100), np.uint8))
    with pytest.raises(ValueError, match="batch size"):
        next(effnet_extractor.encode_files([], batch_size=0))
    assert effnet_extractor.encode_arrays(np.zeros((0, 224, 224, 3), np.uint8)).shape == (0, 1280)


def test_precision_resolution(monkeypatch):
    assert encoder_module.resolve_precision("float32") == "float32"
    monkeypatch.setenv("CBIR_RUNTIME", "keras")  # the OpenVINO side: tests/test_runtime.py
    monkeypatch.setattr(encoder_module, "cpu_has_bf16", lambda: True)
    assert encoder_module.resolve_precision("auto") == "bfloat16"
    with pytest.raises(ValueError, match="unknown precision"):
        encoder_module.resolve_precision("fp8")
