"""SIFT with the finest octave at the picture's own resolution (retrieval.descriptors.sift): its steps against a
direct computation, its keypoints and descriptors against OpenCV's SIFT, and the invariances verification relies on."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from retrieval.descriptors import sift
from retrieval.descriptors.local_features import root_sift

from conftest import DEMO_DATABASE


def grey_photo(name: str = "astronaut", width: int = 400) -> np.ndarray:
    image = Image.open(DEMO_DATABASE / name / "original.jpg").convert("L")
    return np.asarray(image.resize((width, round(image.height * width / image.width)), Image.Resampling.BICUBIC))


def keypoints_of(grey: np.ndarray, count: int = 400, contrast: float = 0.01):
    space = sift.scale_space(grey)
    found = sift.detect(space, count, contrast)
    return space, found, sift.describe(space, found)


def test_fast_atan2_is_opencvs_to_a_third_of_a_degree():
    rng = np.random.default_rng(0)
    y, x = rng.normal(size=(2, 5000)).astype(np.float32) * 50
    ours = np.array([sift._fast_atan2(np.float32(a), np.float32(b)) for a, b in zip(y, x)])
    exact = np.degrees(np.arctan2(y, x)) % 360
    error = np.abs((ours - exact + 180) % 360 - 180)
    assert error.max() < 0.3
    assert ((ours >= 0) & (ours <= 360)).all()


def test_candidates_are_exactly_the_strict_neighbourhood_extremes():
    rng = np.random.default_rng(1)
    dog = rng.normal(size=(5, 30, 40)).astype(np.float32)
    found = {tuple(row) for row in sift._candidates(dog, 1, 3, 0.5)}
    expected = set()
    for layer in range(1, 4):
        for r in range(sift.BORDER, 30 - sift.BORDER):
            for c in range(sift.BORDER, 40 - sift.BORDER):
                block = dog[layer - 1 : layer + 2, r - 1 : r + 2, c - 1 : c + 2]
                v = dog[layer, r, c]
                if (v > 0.5 and v >= block.max()) or (v < -0.5 and v <= block.min()):
                    expected.add((layer, r, c))
    assert found == expected and expected


@pytest.mark.parametrize("blob_sigma", [1.2, 2.0, 4.0])
def test_a_gaussian_blob_is_found_where_and_as_large_as_it_is(blob_sigma):
    y, x = np.mgrid[0:96, 0:128].astype(np.float32)
    centre = (61.3, 40.6)
    blob = 60 + 150 * np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2) / (2 * blob_sigma**2))
    _, found, _ = keypoints_of(blob.astype(np.uint8), count=5)
    assert len(found) >= 1
    x0, y0, size, _ = found.table[0]
    assert abs(x0 - centre[0]) < 0.6 and abs(y0 - centre[1]) < 0.6
    # the scale-normalised DoG of a Gaussian blob peaks at sigma = the blob's; the keypoint's size is 2 sigma
    assert 0.75 < size / (2 * blob_sigma) < 1.35


def test_keypoints_and_descriptors_agree_with_opencvs_sift():
    grey = grey_photo("astronaut", 400)
    _, ours, described = keypoints_of(grey, 600)
    theirs, their_descriptors = cv2.SIFT_create(nfeatures=600, contrastThreshold=0.01).detectAndCompute(grey, None)
    table = np.array([(k.pt[0], k.pt[1], k.size, k.angle) for k in theirs], np.float32)
    distance = np.hypot(ours.table[:, None, 0] - table[None, :, 0], ours.table[:, None, 1] - table[None, :, 1])
    ratio = ours.table[:, None, 2] / table[None, :, 2]
    turn = np.abs((ours.table[:, None, 3] - table[None, :, 3] + 180) % 360 - 180)
    same = (distance < 1.5) & (ratio > 0.8) & (ratio < 1.25) & (turn < 10)
    assert same.any(axis=1).mean() > 0.5  # the same keypoints, most of them (different sampling of the finest octave)
    ours_root, theirs_root = root_sift(described), root_sift(their_descriptors)
    best = [max(float(ours_root[i] @ theirs_root[j]) for j in np.flatnonzero(same[i])) for i in np.flatnonzero(same.any(axis=1))]
    assert np.median(best) > 0.98  # and the same descriptors: compatible with OpenCV's


def test_mirror_descriptors_are_those_of_the_flipped_picture():
    grey = grey_photo("coffee", 360)
    space, found, _ = keypoints_of(grey, 200)
    mirrored = sift.mirrored(found, grey.shape[1])
    direct_on_flipped = sift.describe(sift.scale_space(np.ascontiguousarray(grey[:, ::-1])), mirrored)
    via_flag = sift.describe(space, found, mirror=True)
    similarity = np.sum(root_sift(direct_on_flipped) * root_sift(via_flag), axis=1)
    assert np.median(similarity) > 0.99 and similarity.min() > 0.9


def correct_matches(points, descriptors, copy_points, copy_descriptors, affine) -> tuple[int, int]:
    """(ratio-test matches, those within 3 px of where ``affine`` puts the keypoint)."""
    similarity = root_sift(descriptors) @ root_sift(copy_descriptors).T
    nearest = np.argsort(-similarity, axis=1)[:, :2]
    rows = np.arange(len(points))
    first, second = similarity[rows, nearest[:, 0]], similarity[rows, nearest[:, 1]]
    good = np.sqrt(np.maximum(2 - 2 * first, 0)) < 0.8 * np.sqrt(np.maximum(2 - 2 * second, 0))
    projected = np.c_[points, np.ones(len(points))] @ affine.T
    near = np.hypot(*(projected - copy_points[nearest[:, 0]]).T) < 3
    return int(good.sum()), int((good & near).sum())


def test_descriptors_match_under_rotation_and_scale_about_as_well_as_opencvs():
    ours, theirs = np.zeros(2), np.zeros(2)
    detector = cv2.SIFT_create(nfeatures=300, contrastThreshold=0.01)
    for name in ("rocket", "astronaut", "coffee", "chelsea"):
        grey = grey_photo(name, 400)
        height, width = grey.shape
        turn = cv2.getRotationMatrix2D((width / 2, height / 2), 30, 0.75)
        turned = cv2.warpAffine(grey, turn, (width, height), flags=cv2.INTER_LINEAR, borderValue=0)
        _, a, da = keypoints_of(grey, 300)
        _, b, db = keypoints_of(turned, 300)
        ours += correct_matches(a.table[:, :2], da, b.table[:, :2], db, turn)
        (ka, ca), (kb, cb) = detector.detectAndCompute(grey, None), detector.detectAndCompute(turned, None)
        theirs += correct_matches(np.array([k.pt for k in ka]), ca, np.array([k.pt for k in kb]), cb, turn)
    # bench/sift.py on 40 photos: 88-92 % of OpenCV's correct matches under rotation and scale, as many under JPEG
    assert ours[1] > 0.6 * theirs[1]
    assert ours[1] / ours[0] > 0.75  # most matches that pass the ratio test are right


@pytest.mark.parametrize("pixels", [np.zeros((200, 300), np.uint8), np.full((64, 64), 200, np.uint8)])
def test_flat_pictures_have_no_keypoints(pixels):
    space, found, described = keypoints_of(pixels)
    assert len(found) == 0 and described.shape == (0, 128)


def test_small_pictures_and_the_bad_input_errors():
    space, found, described = keypoints_of(grey_photo("chelsea", 24))
    assert described.shape == (len(found), 128)
    with pytest.raises(ValueError, match="uint8 grey"):
        sift.scale_space(np.zeros((20, 20, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8 grey"):
        sift.scale_space(np.zeros((20, 20), np.float32))


def test_detect_keeps_the_strongest_first_and_respects_the_count():
    grey = grey_photo("astronaut", 400)
    space = sift.scale_space(grey)
    many = sift.detect(space, 500, 0.01)
    few = sift.detect(space, 50, 0.01)
    assert len(few) == 50 and len(many) == 500
    assert (np.diff(many.response) <= 1e-6).all()
    assert np.array_equal(few.table, many.table[:50])
