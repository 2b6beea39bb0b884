"""The photometric check of copy search (retrieval.descriptors.thumbnails, retrieval.search.photometric, its place in
retrieval.search.copies.verified_ranking) and the thumbnails' stored form: a smooth picture whose copy SIFT cannot
verify is still ranked first; look-alikes, flat pictures and files without thumbnails gain nothing."""

from __future__ import annotations

import io

import h5py
import numpy as np
import pytest
from PIL import Image, ImageDraw

from retrieval.descriptors.regions import content_boxes
from retrieval.descriptors.local_features import LocalFeatures, extract_local_features, query_local_features
from retrieval.descriptors.thumbnails import THUMBNAIL_SIDE, colour_thumbnail
from retrieval.errors import IndexFileError
from retrieval.search import photometric
from retrieval.search.copies import photometric_boost, verified_ranking
from retrieval.search.verification import QueryLocalFeatures
from retrieval.storage.copy_features import CopyFeatures


def misty(seed: int, size=(512, 320)) -> np.ndarray:
    """A smooth 'wallpaper': a few large blurred colour blobs over a vertical gradient (few or no SIFT keypoints)."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    top, bottom = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
    image = top + (bottom - top) * (y / height)[..., None]
    for _ in range(3):
        cx, cy, radius = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(60, 160)
        image += rng.uniform(-60, 60, 3) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * radius**2))[..., None]
    return np.clip(image, 0, 255).astype(np.uint8)


def captioned_jpeg(pixels: np.ndarray, quality: int = 12) -> np.ndarray:
    """A caption drawn over the picture, saved as a low-quality JPEG (the 'text + JPEG' copy edit)."""
    image = Image.fromarray(pixels)
    ImageDraw.Draw(image).text((image.width // 3, image.height // 2), "look at this mood", fill=(230, 200, 230))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def test_thumbnail_keeps_the_aspect_at_its_longest_side():
    assert colour_thumbnail(misty(0, (512, 320))).shape == (20, THUMBNAIL_SIDE, 3)
    assert colour_thumbnail(np.zeros((400, 100, 3), np.uint8)).shape == (THUMBNAIL_SIDE, 8, 3)
    assert colour_thumbnail(np.zeros((3, 2, 3), np.uint8)).shape == (THUMBNAIL_SIDE, 21, 3)  # tiny pictures grow
    with pytest.raises(ValueError):
        colour_thumbnail(np.zeros((10, 10), np.uint8))


def test_similarity_of_copies_crops_look_alikes_and_flat_pictures():
    original = misty(1)
    thumb = colour_thumbnail(original)
    assert photometric.similarity(colour_thumbnail(captioned_jpeg(original)), thumb) > 0.95
    crop = original[20:300, 40:470]  # 84 % of the width: found at one of the scales
    assert photometric.similarity(colour_thumbnail(crop), thumb) > 0.9
    assert photometric.similarity(thumb, colour_thumbnail(crop)) > 0.9  # the candidate inside the query
    look_alikes = [photometric.similarity(thumb, colour_thumbnail(misty(seed))) for seed in range(2, 12)]
    assert max(look_alikes) < photometric.MIN_SIMILARITY
    flat = colour_thumbnail(np.full((320, 512, 3), 128, np.uint8))
    assert photometric.similarity(flat, thumb) == 0.0 and photometric.similarity(thumb, flat) == 0.0


def test_likeness_finds_a_mirrored_copy():
    original = misty(1)
    mirrored = colour_thumbnail(np.ascontiguousarray(captioned_jpeg(original)[:, ::-1]))
    thumb = colour_thumbnail(original)
    assert photometric.similarity(mirrored, thumb) < photometric.MIN_SIMILARITY  # as it is, the layout is reversed
    assert photometric.likeness(mirrored, [colour_thumbnail(misty(2)), thumb]) > 0.95
    assert photometric.likeness(mirrored, []) == -1.0


def test_likeness_finds_a_copy_upside_down_or_turned_half():
    original = misty(1)
    thumb = colour_thumbnail(original)
    copy = captioned_jpeg(original)
    for flipped in (copy[::-1], copy[::-1, ::-1]):  # a vertical flip, a half turn: the layout is reversed
        flipped = colour_thumbnail(np.ascontiguousarray(flipped))
        assert photometric.similarity(flipped, thumb) < photometric.MIN_SIMILARITY
        assert photometric.likeness(flipped, [thumb]) > 0.95


@pytest.mark.parametrize("name", ["astronaut", "camera", "coffee", "rocket"])
def test_flipped_views_count_as_whole_pictures_only(name):
    """The mirror image is tried at every size (a mirrored crop is a copy); upside down or turned half, only the whole
    picture: at smaller sizes, flipped parts of one photo's tiles matched its other tiles."""
    from conftest import demo_photo

    original = np.asarray(demo_photo(name))
    height, width = original.shape[:2]
    thumb = colour_thumbnail(original)
    crop = original[height // 10 : height // 10 + height * 4 // 5, width // 10 : width // 10 + width * 4 // 5]
    assert photometric.likeness(colour_thumbnail(np.ascontiguousarray(crop[:, ::-1])), [thumb]) > 0.95
    for whole in (original[::-1], original[::-1, ::-1]):
        assert photometric.likeness(colour_thumbnail(np.ascontiguousarray(whole)), [thumb]) > 0.95
    for part in (crop[::-1], crop[::-1, ::-1]):
        assert photometric.likeness(colour_thumbnail(np.ascontiguousarray(part)), [thumb]) < photometric.MIN_SIMILARITY


def noisy(pixels: np.ndarray, sigma: float = 60.0, seed: int = 0) -> np.ndarray:
    """Heavy Gaussian noise over a picture (each channel, sigma in grey levels)."""
    rng = np.random.default_rng(seed)
    return np.clip(pixels + rng.normal(0, sigma, pixels.shape), 0, 255).astype(np.uint8)


def test_squashed_thumbnails_correlate_a_picture_with_its_copies_and_not_with_look_alikes():
    original = misty(1)
    thumb = photometric.squashed(colour_thumbnail(original))
    assert thumb.shape == (photometric.SEARCH_SIDE**2 * 3,) and abs(float(thumb @ thumb) - 1) < 1e-5
    small = np.asarray(Image.fromarray(original).resize((64, 40), Image.Resampling.BILINEAR))
    for copy in (noisy(original), captioned_jpeg(original), small, original[:, 40:]):  # a tenth narrower: still
        assert float(photometric.squashed(colour_thumbnail(copy)) @ thumb) > photometric.MIN_SIMILARITY
    look_alikes = [float(photometric.squashed(colour_thumbnail(misty(seed))) @ thumb) for seed in range(2, 12)]
    assert max(look_alikes) < photometric.MIN_SIMILARITY
    assert not photometric.squashed(np.full((20, 32, 3), 90, np.uint8)).any()  # flat: correlates 0 with anything


def test_thumbnail_search_finds_noisy_and_flipped_copies_among_look_alikes():
    pictures = [misty(seed) for seed in range(20)]
    copies = _copies(pictures)
    search = photometric.ThumbnailSearch.of(copies.thumbnails, copies.thumbnail_sizes, copies.thumbnail_image)
    for copy in (noisy(pictures[7]), np.ascontiguousarray(captioned_jpeg(pictures[7])[::-1])):
        rows = search.top(colour_thumbnail(copy))
        assert rows.dtype == np.int64 and rows[0] == 7 and len(rows) <= photometric.SEARCH_TOP
        assert 7 not in search.top(colour_thumbnail(copy), exclude=7)
    assert len(search.top(colour_thumbnail(misty(99)))) == 0  # a look-alike of them all is a copy of none
    empty = photometric.ThumbnailSearch.of(np.zeros((0, THUMBNAIL_SIDE, THUMBNAIL_SIDE, 3), np.uint8), np.zeros((0, 2), np.int32), np.zeros(0, np.int32))
    assert len(empty.top(colour_thumbnail(pictures[0]))) == 0


def test_the_pipeline_checks_the_thumbnail_search_candidates_wherever_they_rank():
    """End to end through ``QueryPipeline.search_copies``: heavy noise took the smooth original's CNN descriptor far
    from the query's (none of the searched lists reaches it) and its keypoints; the thumbnail search brings it to the
    photometric check with its own cosine, and it comes first. A file without thumbnails finds nothing more."""
    from retrieval.search.backends.memory import MemoryBackend
    from retrieval.search.copies import QueryFeatures
    from retrieval.search.pipeline import QueryPipeline

    pictures = [misty(seed) for seed in range(30)]
    cosines = np.append(np.linspace(0.39, 0.33, len(pictures) - 1), 0.30).astype(np.float32)  # the original last
    matrix = np.zeros((len(pictures), len(pictures) + 1), np.float32)  # row i: cosines[i] with the query, e_0
    matrix[:, 0] = cosines
    matrix[np.arange(len(pictures)), np.arange(len(pictures)) + 1] = np.sqrt(1 - cosines**2)
    vector = np.eye(1, len(pictures) + 1, dtype=np.float32)[0]
    local = QueryLocalFeatures(*query_local_features(noisy(pictures[-1])))
    query = QueryFeatures(vector, None, local)
    copies = _copies(pictures)
    pipeline = QueryPipeline(MemoryBackend(matrix), matrix, copies=copies)
    rows, scores, inliers = pipeline.search_copies([query], 5, verify=True, verify_top=3)
    assert rows[0, 0] == len(pictures) - 1 and inliers[0, 0] <= 0 and cosines[-1] < scores[0, 0] < 1.0 + 1e-6
    older = _copies(pictures)
    older.thumbnails = older.thumbnail_sizes = older.thumbnail_image = None  # a file written before thumbnails
    rows, _, _ = QueryPipeline(MemoryBackend(matrix), matrix, copies=older).search_copies([query], 5, verify=True, verify_top=3)
    assert len(pictures) - 1 not in rows[0]


def test_boost_is_zero_below_the_threshold_and_stays_below_a_verified_score():
    values = photometric.boost(np.array([-1.0, 0.5, photometric.MIN_SIMILARITY, 0.95, 1.0]))
    np.testing.assert_allclose(values, [0, 0, 0, photometric.MAX_BOOST / 2, photometric.MAX_BOOST])
    from retrieval.search.verification import MIN_STRENGTH, STRENGTH_HALF

    weakest_verified = 1 + MIN_STRENGTH / (MIN_STRENGTH + STRENGTH_HALF)
    assert 1.0 + photometric.MAX_BOOST < weakest_verified  # a cosine (<= 1) plus the most it gains


def _copies(pictures: list[np.ndarray]) -> CopyFeatures:
    return CopyFeatures.assemble(None, [extract_local_features(p) for p in pictures], 8)


def test_a_smooth_picture_sift_cannot_verify_is_ranked_first_by_its_thumbnail():
    pictures = [misty(seed) for seed in range(6)]
    copies = _copies(pictures)
    query = QueryLocalFeatures(*query_local_features(captioned_jpeg(pictures[3])))
    scores = np.array([0.60, 0.66, 0.64, 0.58, 0.62, 0.30], np.float32)  # look-alikes' cosines above the original's
    order, fused, inliers = verified_ranking(scores, query, copies)
    assert order[0] == 3 and inliers[0] <= 0  # ranked first without being verified
    assert fused[0] < 1.0 + 1e-6  # still below anything verified
    np.testing.assert_allclose(np.sort(fused[1:])[::-1], np.sort(np.delete(scores, 3))[::-1])  # the others unchanged


def test_beyond_the_checked_top_and_without_thumbnails_nothing_is_gained():
    pictures = [misty(seed) for seed in range(photometric.CHECK_TOP + 2)]
    copies = _copies(pictures)
    query = QueryLocalFeatures(*query_local_features(captioned_jpeg(pictures[-1])))
    scores = np.linspace(0.9, 0.5, len(pictures)).astype(np.float32)  # the original is last: not checked
    order, fused, _ = verified_ranking(scores, query, copies)
    assert order[-1] == len(pictures) - 1
    np.testing.assert_allclose(fused, np.sort(scores)[::-1])
    scores[-1] = 0.85  # now within the checked top, second: the thumbnail lifts it, unless one side has none
    assert verified_ranking(scores, query, copies)[0][0] == len(pictures) - 1
    no_query_thumbnail = QueryLocalFeatures(
        LocalFeatures(query.direct.keypoints, query.direct.descriptors, query.direct.size), query.mirrored)
    older = _copies(pictures)
    older.thumbnails = older.thumbnail_sizes = older.thumbnail_image = None  # a file written before thumbnails
    for q, c in ((no_query_thumbnail, copies), (query, older)):
        order, fused, _ = verified_ranking(scores, q, c)
        assert order[0] == 0
        np.testing.assert_allclose(fused, np.sort(scores)[::-1])


def test_the_first_unverified_candidates_are_checked_however_many_were_verified_above_them():
    """A photo searched among many verified copies of it: its noisy copy (SIFT finds nothing in it) ranks below them
    and is still among the first CHECK_TOP unverified, so its thumbnail is compared."""
    pictures = [misty(seed) for seed in range(photometric.CHECK_TOP + 4)]
    candidates = [extract_local_features(p) for p in pictures]
    query = query_local_features(captioned_jpeg(pictures[-1]))[0]
    verified = np.zeros(len(pictures), bool)
    verified[: photometric.CHECK_TOP + 2] = True  # more verified candidates above it than CHECK_TOP
    gained = photometric_boost(query, candidates, verified)
    assert gained[-1] > 0.1 and (gained[:-1] == 0).all()
    verified[:] = False  # with nothing verified, it is the 14th unverified: not checked
    assert photometric_boost(query, candidates, verified)[-1] == 0


def test_thumbnails_round_trip_and_damage(tmp_path):
    from retrieval.storage.copy_features import read_copy_features, write_copy_features

    pictures = [misty(0, (512, 320)), misty(1, (200, 400)), np.zeros((50, 50, 3), np.uint8)]
    features = _copies(pictures)
    path = tmp_path / "copies.h5"
    with h5py.File(path, "w") as h5:
        write_copy_features(h5, features, len(pictures))
    with h5py.File(path, "r") as h5:
        back = read_copy_features(h5, path, len(pictures), 8)
    for row, picture in enumerate(pictures):
        (thumbnail,) = back.local_of(row).thumbnails
        np.testing.assert_array_equal(thumbnail, colour_thumbnail(picture))
    assert back.local_bytes_per_image() > features.local_bytes_per_image() - 1  # the thumbnails are counted
    with h5py.File(path, "r+") as h5:  # an older file: no thumbnails, read as such
        del h5["local/thumbnail"], h5["local/thumbnail_size"], h5["local/thumbnail_image"]
    with h5py.File(path, "r") as h5:
        older = read_copy_features(h5, path, len(pictures), 8)
    assert older.thumbnails is None and older.local_of(0).thumbnails == ()
    with h5py.File(path, "r+") as h5:  # damaged sizes: refused in one line
        write_copy_features(h5.create_group("again"), features, len(pictures))
        h5["again/local/thumbnail_size"][0] = (THUMBNAIL_SIDE + 5, 3)
    with h5py.File(path, "r") as h5, pytest.raises(IndexFileError) as caught:
        read_copy_features(h5["again"], path, len(pictures), 8)
    assert caught.value.kind == "corrupt" and "\n" not in str(caught.value)


def test_a_page_is_checked_by_the_picture_inside_it():
    from test_regions import web_page

    smooth = misty(7, (360, 240))
    page = web_page(smooth)
    as_plain_image = extract_local_features(page)  # one thumbnail, the whole page's
    (box, *_) = content_boxes(page)
    left, top, right, bottom = box
    as_page = extract_local_features(page, picture=page[top:bottom, left:right])
    assert len(as_plain_image.thumbnails) == 1 and len(as_page.thumbnails) == 2
    others = [extract_local_features(misty(seed, (360, 240))) for seed in range(3)]
    query = QueryLocalFeatures(*query_local_features(captioned_jpeg(smooth)))
    scores = np.array([0.62, 0.58, 0.60, 0.55], np.float32)  # the page last among look-alikes
    for page_features, first in ((as_page, 3), (as_plain_image, 0)):
        copies = CopyFeatures.assemble(None, others + [page_features], 8)
        assert verified_ranking(scores, query, copies)[0][0] == first


def test_an_index_keeps_thumbnails_through_an_incremental_update(tmp_path):
    from retrieval.indexing import build_index
    from retrieval.storage.database import read_database
    from test_regions import web_page

    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(web_page(misty(3, (360, 240)))).save(folder / "screenshot.png")
    Image.fromarray(misty(4)).save(folder / "misty.png")
    index = tmp_path / "copies.h5"
    options = dict(backbone="efficientnet-lite0", regions=True, local_features=True, progress=False, notice=lambda line: None)
    build_index(folder, index, **options)
    Image.fromarray(misty(5)).save(folder / "added.png")
    build_index(folder, index, **options)  # the first two are carried over, with their thumbnails
    copies = read_database(index).copies
    paths = read_database(index).paths
    counts = {path: len(copies.local_of(row).thumbnails) for row, path in enumerate(paths)}
    assert counts == {"added.png": 1, "misty.png": 1, "screenshot.png": 2}
    np.testing.assert_array_equal(copies.local_of(paths.index("misty.png")).thumbnails[0], colour_thumbnail(misty(4)))
