"""SIFT as OpenCV computes it, with less work (retrieval.descriptors.sift): its extremum test against a direct
computation, its keypoints and descriptors against OpenCV's own on photos, and the pictures it must survive."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from retrieval.descriptors import local_features, sift

from conftest import DEMO_DATABASE

PHOTOS = ("astronaut", "coffee", "chelsea", "hubble_deep_field")


def grey_photo(name: str, width: int = 512) -> np.ndarray:
    image = Image.open(DEMO_DATABASE / name / "original.jpg").convert("L")
    return np.asarray(image.resize((width, round(image.height * width / image.width)), Image.Resampling.BICUBIC))


def opencvs(grey: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's keypoints (n, 5: x, y, size, angle, response) and descriptors (n, 128) at the preset's contrast floor."""
    keypoints, descriptors = cv2.SIFT_create(nfeatures=count, contrastThreshold=local_features.CONTRAST_THRESHOLD).detectAndCompute(grey, None)
    return np.array([(k.pt[0], k.pt[1], k.size, k.angle, k.response) for k in keypoints], np.float32).reshape(-1, 5), descriptors


def matched(theirs: np.ndarray, ours: sift.Keypoints) -> np.ndarray:
    """For each of OpenCV's keypoints, the index of the same keypoint among ours (-1: none): the same position and
    size to 0.01 px and angle to 0.05 degrees."""
    mine = ours.table
    same = ((np.abs(theirs[:, None, :3] - mine[None, :, :3]).max(axis=2) < 0.01)
            & (np.abs((theirs[:, None, 3] - mine[None, :, 3] + 180) % 360 - 180) < 0.05))
    return np.where(same.any(axis=1), same.argmax(axis=1), -1)


@pytest.mark.parametrize("shape", [(680, 1024), (341, 512), (40, 24), (7, 13), (3, 100), (100, 3), (1, 9), (2, 2), (1, 1)])
def test_blurs_are_opencvs(shape):
    """The scale space's Gaussian blurs: OpenCV's values, bit for bit where OpenCV's vectorised loops run (widths a
    multiple of 8 columns; a picture of one row OpenCV filters another way), to float rounding elsewhere, at every
    layer's blur."""
    rng = np.random.default_rng(sum(shape))
    picture = cv2.GaussianBlur(rng.random(shape, np.float32) * 255, (0, 0), 2.0)
    blurs = [float(np.sqrt(np.float32(sift.SIGMA) ** 2 - np.float32(1.0)))] + sift.layer_blurs()[1:]
    for sigma in blurs:
        ours = np.empty_like(picture)
        sift._blurred(picture, sift.gaussian_kernel(sigma), ours)
        theirs = cv2.GaussianBlur(picture, (0, 0), sigma, sigmaY=sigma)
        body = shape[1] - shape[1] % 8 if shape[0] > 1 else 0
        assert np.array_equal(ours[:, :body], theirs[:, :body])
        assert np.abs(ours - theirs).max() < 1e-3


def test_candidates_are_exactly_opencvs_extremum_test():
    rng = np.random.default_rng(1)
    gaussians = np.cumsum(rng.normal(size=(sift.LAYERS + 3, 30, 40)), axis=0).astype(np.float32)
    dog = gaussians[1:] - gaussians[:-1]
    found = {tuple(row) for row in sift._candidates(gaussians, np.float32(0.5))}
    expected = set()
    for layer in range(1, sift.LAYERS + 1):
        for r in range(sift.BORDER, 30 - sift.BORDER):
            for c in range(sift.BORDER, 40 - sift.BORDER):
                block = dog[layer - 1 : layer + 2, r - 1 : r + 2, c - 1 : c + 2]
                v = dog[layer, r, c]
                if (v > 0.5 and v >= block.max()) or (v < -0.5 and v <= block.min()):
                    expected.add((layer, r, c))
    assert found == expected and expected


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("prethreshold", [sift.OPENCV_PRETHRESHOLD, local_features.PRETHRESHOLD])
def test_keypoints_and_descriptors_are_opencvs(name, prethreshold):
    grey = grey_photo(name)
    theirs, their_descriptors = opencvs(grey, 512)
    space = sift.scale_space(grey)
    ours = sift.detect(space, 512, local_features.CONTRAST_THRESHOLD, prethreshold=prethreshold)
    assert len(theirs) >= 512 and abs(len(ours) - len(theirs)) <= 2  # 512 and the ties at the boundary, as OpenCV keeps
    same = matched(theirs, ours)
    assert np.mean(same >= 0) > 0.99
    found = same >= 0
    assert np.allclose(theirs[found, 4], ours.response[same[found]], rtol=1e-4)
    descriptors = sift.describe(space, ours)[same[found]]
    difference = np.abs(descriptors - their_descriptors[found])
    assert np.mean(difference.max(axis=1) <= 1) > 0.99  # whole values 0..255: a rounding apart at most
    assert np.median(difference.max(axis=1)) == 0


def test_the_project_prethreshold_loses_none_of_opencvs_keypoints_on_smooth_pictures():
    """A smooth picture is where OpenCV's rounded pre-threshold (0) refines the most faint extrema: the unrounded
    one keeps the same keypoints."""
    y, x = np.mgrid[0:384, 0:512].astype(np.float32)
    smooth = (128 + 12 * np.sin(x / 37.0) * np.cos(y / 23.0) + 6 * np.sin((x + y) / 11.0) + 3 * np.cos(x * y / 900.0)).astype(np.uint8)
    space = sift.scale_space(smooth)
    exact = sift.detect(space, 512, local_features.CONTRAST_THRESHOLD, prethreshold=sift.OPENCV_PRETHRESHOLD)
    faster = sift.detect(space, 512, local_features.CONTRAST_THRESHOLD, prethreshold=local_features.PRETHRESHOLD)
    theirs, _ = opencvs(smooth, 512)
    assert len(theirs) >= 30
    assert np.mean(matched(theirs, exact) >= 0) > 0.99 and np.mean(matched(theirs, faster) >= 0) > 0.99


def test_describing_the_kept_keypoints_gives_their_descriptors_among_all():
    grey = grey_photo("coffee")
    space = sift.scale_space(grey)
    found = sift.detect(space, 512, local_features.CONTRAST_THRESHOLD)
    kept = np.arange(0, len(found), 3)
    assert np.array_equal(sift.describe(space, found.take(kept)), sift.describe(space, found)[kept])


def test_the_strongest_of_some_extrema_are_theirs_among_all_and_a_union_keeps_each_once():
    space = sift.scale_space(grey_photo("astronaut"))
    found = sift.extrema(space, 0.01, local_features.PRETHRESHOLD)
    assert (np.diff(found[:, 3]) <= 0).all()  # strongest first
    everything = sift.strongest(space, found, 100_000)
    coarse = sift.strongest(space, found[found[:, sift.EXTREMUM_OCTAVE] >= 2], 100_000)
    assert len(coarse) and (coarse.octave >= 2).all()
    assert np.array_equal(np.sort(coarse.table.view(np.int32), axis=0),
                          np.sort(everything.table[everything.octave >= 2].view(np.int32), axis=0))
    best = sift.strongest(space, found, 200)
    assert np.array_equal(best.table, sift.detect(space, 200, 0.01, local_features.PRETHRESHOLD).table)
    union = best.union(coarse)
    assert np.array_equal(union.table[: len(best)], best.table)  # its own first, in order
    assert len(union) == len(best) + len(coarse) - int(np.sum(best.octave >= 2))
    assert len(np.unique(union.table.view(np.int32), axis=0)) == len(union)


@pytest.mark.parametrize("blob_sigma", [1.2, 2.0, 4.0])
def test_a_gaussian_blob_is_found_where_and_as_large_as_it_is(blob_sigma):
    y, x = np.mgrid[0:96, 0:128].astype(np.float32)
    centre = (61.3, 40.6)
    blob = 60 + 150 * np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2) / (2 * blob_sigma**2))
    found = sift.detect(sift.scale_space(blob.astype(np.uint8)), 5, 0.01)
    assert len(found) >= 1
    x0, y0, size, _ = found.table[0]
    assert abs(x0 - centre[0]) < 0.6 and abs(y0 - centre[1]) < 0.6
    # the scale-normalised DoG of a Gaussian blob peaks at sigma = the blob's; the keypoint's size is 2 sigma
    assert 0.75 < size / (2 * blob_sigma) < 1.35


@pytest.mark.parametrize("shape", [(16, 16), (16, 1280), (1280, 17), (31, 29), (2, 2)])
def test_tiny_and_elongated_pictures(shape):
    rng = np.random.default_rng(5)
    grey = cv2.GaussianBlur(rng.integers(0, 256, shape, dtype=np.uint8), (0, 0), 1.0)
    space = sift.scale_space(grey)
    found = sift.detect(space, 64, 0.01, prethreshold=local_features.PRETHRESHOLD)
    descriptors = sift.describe(space, found)
    assert descriptors.shape == (len(found), 128) and np.isfinite(descriptors).all()
    assert ((descriptors >= 0) & (descriptors <= 255)).all()
    if len(found):
        assert (found.table[:, 0] >= 0).all() and (found.table[:, 0] < shape[1]).all()
        assert (found.table[:, 1] >= 0).all() and (found.table[:, 1] < shape[0]).all()


def test_flat_pictures_have_no_keypoints():
    for value in (0, 128, 255):
        space = sift.scale_space(np.full((200, 300), value, np.uint8))
        found = sift.detect(space, 100, 0.01, prethreshold=local_features.PRETHRESHOLD)
        assert len(found) == 0 and sift.describe(space, found).shape == (0, 128)


def test_only_grey_uint8_pictures():
    with pytest.raises(ValueError, match="uint8 grey"):
        sift.scale_space(np.zeros((20, 20, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8 grey"):
        sift.scale_space(np.zeros((20, 20), np.float32))
