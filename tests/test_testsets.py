"""Tests of retrieval.testsets: seeded view groups of bundled photos, and the Fashion-MNIST loader."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import testsets
from retrieval.errors import RetrievalError

NAMES = ("chelsea", "camera", "logo")  # colour, grey, RGBA


@pytest.fixture(scope="module")
def groups():
    return testsets.make_view_groups(NAMES, views_per_group=4, seed=7, max_side=200)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def _same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(_pixels(a), _pixels(b))


def test_bundled_photos_load_offline_as_rgb():
    assert set(testsets.PHOTO_LICENCES) == set(testsets.BUNDLED_PHOTOS)
    assert len(set(testsets.BUNDLED_PHOTOS)) == len(testsets.BUNDLED_PHOTOS)
    for name in testsets.BUNDLED_PHOTOS:
        image = testsets.load_bundled_photo(name)
        assert image.mode == "RGB", name
        assert min(image.size) >= 150, name


def test_logo_is_composited_on_white():
    logo = _pixels(testsets.load_bundled_photo("logo"))
    assert tuple(logo[0, 0]) == (255, 255, 255)


def test_unknown_photo_is_a_clear_error():
    with pytest.raises(RetrievalError, match="unknown bundled photo 'nope'"):
        testsets.load_bundled_photo("nope")


def test_groups_shapes_and_modes(groups):
    assert [name for name, _ in groups] == list(NAMES)
    for name, images in groups:
        assert len(images) == 4
        original = images[0]
        assert max(original.size) == 200  # all three sources are larger than 200 px
        for view in images:
            assert isinstance(view, Image.Image)
            assert view.mode == "RGB"
            assert max(view.size) <= 200
            # sane size: not degenerate, not far off the original
            for side, full in zip(view.size, original.size):
                assert 0.2 * full <= side <= 1.4 * full, (name, view.size, original.size)


def test_original_is_downscaled_photo_with_aspect_kept(groups):
    full = testsets.load_bundled_photo("chelsea")  # 451 x 300
    original = dict(groups)["chelsea"][0]
    assert original.size == (200, round(300 * 200 / 451))
    assert np.abs(_pixels(original).astype(int).mean() - _pixels(full).astype(int).mean()) < 3


def test_views_differ_from_original(groups):
    for name, images in groups:
        original = images[0]
        for view in images[1:]:
            assert not _same(view, original), name


def test_same_seed_same_pixels(groups):
    again = testsets.make_view_groups(NAMES, views_per_group=4, seed=7, max_side=200)
    for (name_a, images_a), (name_b, images_b) in zip(groups, again):
        assert name_a == name_b
        assert all(_same(a, b) for a, b in zip(images_a, images_b))


def test_different_seed_different_views(groups):
    other = testsets.make_view_groups(NAMES, views_per_group=4, seed=8, max_side=200)
    for (_, images_a), (_, images_b) in zip(groups, other):
        assert _same(images_a[0], images_b[0])  # originals do not depend on the seed
        assert not any(_same(a, b) for a, b in zip(images_a[1:], images_b[1:]))


def test_group_does_not_depend_on_other_names_and_more_views_append(groups):
    alone = testsets.make_view_groups(["camera"], views_per_group=6, seed=7, max_side=200)[0][1]
    in_set = dict(groups)["camera"]
    assert all(_same(a, b) for a, b in zip(in_set, alone[:4]))


def test_random_view_deterministic_given_rng():
    image = testsets.load_bundled_photo("coffee")
    first = [testsets.random_view(image, np.random.default_rng(3)) for _ in range(2)]
    assert _same(*first)
    assert image.size == (600, 400)  # input untouched


def test_view_groups_validate_arguments():
    with pytest.raises(ValueError):
        testsets.make_view_groups(["camera"], views_per_group=0, seed=0)


def test_write_view_groups_layout(groups, tmp_path):
    out = tmp_path / "db ü"
    paths = testsets.write_view_groups(groups, out, quality=80)
    expected = [
        out / name / file
        for name in NAMES
        for file in ("original.jpg", "view-01.jpg", "view-02.jpg", "view-03.jpg")
    ]
    assert paths == expected
    for path, image in zip(paths, (im for _, images in groups for im in images)):
        with Image.open(path) as written:
            assert written.format == "JPEG"
            assert written.mode == "RGB"
            assert written.size == image.size
    assert sorted(p.name for p in out.iterdir()) == sorted(NAMES)


def test_write_view_groups_rejects_path_names(tmp_path):
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError):
        testsets.write_view_groups([("../escape", [image])], tmp_path)


# ---------------------------------------------------------------------------- Fashion-MNIST


def _load_or_fail(**kwargs):
    try:
        return testsets.load_fashion_mnist(**kwargs)
    except RetrievalError as exc:  # must fail, not skip: CI installs the Debian package
        pytest.fail(
            f"Fashion-MNIST unavailable ({exc}). Install it with "
            f"`apt-get install -y {testsets.FASHION_MNIST_PACKAGE}` (CI does this in .ci/run)."
        )


def test_fashion_mnist_full_test_split():
    images, labels = _load_or_fail(split="test")
    assert images.shape == (10000, 28, 28)
    assert images.dtype == np.uint8
    assert labels.shape == (10000,)
    assert np.issubdtype(labels.dtype, np.integer)
    assert set(np.unique(labels).tolist()) == set(range(10))
    assert np.bincount(labels).tolist() == [1000] * 10
    assert images.max() == 255 and images.min() == 0


def test_fashion_mnist_balanced_subset():
    images, labels = _load_or_fail(split="test", per_class=7, seed=1)
    assert images.shape == (70, 28, 28)
    assert labels.shape == (70,)
    assert np.bincount(labels, minlength=10).tolist() == [7] * 10
    again_images, again_labels = _load_or_fail(split="test", per_class=7, seed=1)
    assert np.array_equal(images, again_images) and np.array_equal(labels, again_labels)
    other_images, _ = _load_or_fail(split="test", per_class=7, seed=2)
    assert not np.array_equal(images, other_images)


def test_fashion_mnist_missing_files_error_names_package(tmp_path, monkeypatch):
    monkeypatch.setattr(testsets, "FASHION_MNIST_DIRS", (tmp_path,))
    with pytest.raises(RetrievalError) as info:
        testsets.load_fashion_mnist()
    message = str(info.value)
    assert "dataset-fashion-mnist" in message
    assert str(tmp_path) in message
    assert "t10k-images-idx3-ubyte" in message


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def test_fashion_mnist_reads_plain_and_gzip_idx(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    labels = np.repeat(np.arange(10), 3).astype(np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images, compress=False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels, compress=True)
    monkeypatch.setattr(testsets, "FASHION_MNIST_DIRS", (tmp_path,))
    got_images, got_labels = testsets.load_fashion_mnist()
    assert np.array_equal(got_images, images)
    assert np.array_equal(got_labels, labels)
    with pytest.raises(ValueError):
        testsets.load_fashion_mnist(per_class=4)  # only 3 per class


def test_fashion_mnist_corrupt_idx_is_clear(tmp_path, monkeypatch):
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(bytes([0, 0, 0x08, 3]) + np.asarray([5, 28, 28], ">u4").tobytes() + b"\0" * 10)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"not an idx file")
    monkeypatch.setattr(testsets, "FASHION_MNIST_DIRS", (tmp_path,))
    with pytest.raises(RetrievalError, match="idx header promises"):
        testsets.load_fashion_mnist()
