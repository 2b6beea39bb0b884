"""Index-time encoding for copy detection (retrieval.descriptors.copy_encoder): global vectors, regions, pages and local
features of real files through the real EfficientNet-Lite0."""

from __future__ import annotations

import numpy as np
from PIL import Image

from retrieval.descriptors.copy_encoder import CopyEncoder
from retrieval.descriptors.regions import content_boxes, region_vectors
from retrieval.images import load_sized_for_backbone, open_image, resize_for_backbone


def test_a_page_stores_its_picture_as_its_last_region_encoded_in_the_batch(tmp_path, effnet_extractor):
    from test_regions import web_page
    from test_verification import photo

    page = tmp_path / "page.png"
    Image.fromarray(web_page(np.asarray(photo("chelsea", 360)))).save(page)
    plain = [tmp_path / f"plain-{name}.png" for name in ("coffee", "astronaut")]
    for path, name in zip(plain, ("coffee", "astronaut")):
        photo(name, 300).save(path)
    paths = [plain[0], page, plain[1]]

    (items,) = list(CopyEncoder(effnet_extractor).encode_files(paths, batch_size=8))
    encoder = effnet_extractor.encoder
    arrays = [load_sized_for_backbone(path, encoder.input_size, encoder.resize_rule)[0] for path in paths]
    expected = effnet_extractor.encode_arrays(arrays)
    own_regions = region_vectors(effnet_extractor.feature_maps(np.stack(arrays)))

    assert [item.page for item in items] == [False, True, False]
    for item, vector, regions in zip(items, expected, own_regions):
        assert item.error is None
        np.testing.assert_allclose(item.vector, vector, atol=2e-3)  # the global vector a plain index stores
        np.testing.assert_allclose(item.regions[: len(regions)], regions, atol=2e-3)
        assert len(item.local) > 0
    assert [len(item.regions) for item in items] == [len(own_regions[0]), len(own_regions[1]) + 1, len(own_regions[2])]

    picture = open_image(page, draft_size=512)
    (box, *_) = content_boxes(np.asarray(picture))
    inside = effnet_extractor.encode_arrays([resize_for_backbone(picture.crop(box), encoder.input_size, encoder.resize_rule)])[0]
    np.testing.assert_allclose(items[1].regions[-1], inside, atol=2e-3)
    assert float(items[1].regions[-1] @ items[1].vector) < 0.95  # the picture, not the page again
    # colour thumbnails: every image its own; the page also its picture's, last (what a query of it is searched as)
    from retrieval.descriptors.thumbnails import colour_thumbnail

    assert [len(item.local.thumbnails) for item in items] == [1, 2, 1]
    np.testing.assert_array_equal(items[1].local.thumbnails[0], colour_thumbnail(np.asarray(picture)))
    np.testing.assert_array_equal(items[1].local.thumbnails[1], colour_thumbnail(np.asarray(picture.crop(box))))


def test_an_elongated_picture_stores_its_strips_as_its_regions(tmp_path, effnet_extractor):
    """A collage of three photos side by side: its regions are its strip windows, each encoded as an image (its conv
    map's R-MAC regions mix neighbouring photos), so the original of each photo meets one of them."""
    from retrieval.descriptors.regions import database_strip_boxes
    from test_verification import photo

    names = ("coffee", "chelsea", "rocket")
    collage = Image.new("RGB", (3 * 400 + 2 * 12, 300), "white")
    for n, name in enumerate(names):
        collage.paste(photo(name, 400).resize((400, 300)), (n * 412, 0))
    path = tmp_path / "collage.png"
    collage.save(path)
    originals = [tmp_path / f"{name}.png" for name in names]
    for original, name in zip(originals, names):
        photo(name, 400).resize((400, 300)).save(original)

    items = [item for batch in CopyEncoder(effnet_extractor).encode_files([path, *originals]) for item in batch]
    encoder = effnet_extractor.encoder
    boxes = database_strip_boxes(*collage.size)
    strips = effnet_extractor.encode_arrays([resize_for_backbone(collage.crop(box), encoder.input_size, encoder.resize_rule) for box in boxes])
    assert not items[0].page and len(items[0].regions) == len(boxes) == 6
    np.testing.assert_allclose(items[0].regions, strips, atol=2e-3)
    array = load_sized_for_backbone(path, encoder.input_size, encoder.resize_rule)[0]
    map_regions = region_vectors(effnet_extractor.feature_maps(array[None]))[0]
    for original in items[1:]:
        assert len(original.regions) == len(map_regions)  # a picture of ordinary shape keeps its map's regions
        best_strip = float((items[0].regions @ original.vector).max())
        assert best_strip > 0.8 and best_strip > float((map_regions @ original.vector).max()) + 0.05


def encoded_with_original(tmp_path, extractor, composite, name: str = "chelsea"):
    """A composite picture (saved as a PNG) and photo ``name`` encoded by one CopyEncoder: (the composite's item, the
    photo's item, the regions of the composite's own conv map, the composite as indexing decodes it)."""
    from test_verification import photo

    path, original = tmp_path / "composite.png", tmp_path / f"{name}.png"
    composite.save(path)
    photo(name, 340).save(original)
    (items,) = list(CopyEncoder(extractor).encode_files([path, original]))
    encoder = extractor.encoder
    array = load_sized_for_backbone(path, encoder.input_size, encoder.resize_rule)[0]
    own = region_vectors(extractor.feature_maps(array[None]))[0]
    return items[0], items[1], own, open_image(path, draft_size=512)


def test_a_picture_pasted_on_another_is_one_more_region_and_keeps_the_whole_keypoints(tmp_path, effnet_extractor):
    """A photo pasted on a drawn picture: its descriptor is appended to the image's own regions (searched for by its
    original, the pasted photo meets it: here its region's cosine with the original is far above any other region's),
    the image is no page, and its local features are the whole image's (the pasted photo's keypoints among them)."""
    from retrieval.descriptors.local_features import extract_local_features
    from retrieval.descriptors.regions import inset_box
    from test_regions import pasted

    stored, original, own, picture = encoded_with_original(tmp_path, effnet_extractor, pasted("chelsea", (200, 150))[0])
    encoder = effnet_extractor.encoder
    box = inset_box(np.asarray(picture))
    crop = resize_for_backbone(picture.crop(box), encoder.input_size, encoder.resize_rule)
    inside = effnet_extractor.encode_arrays([crop])[0]
    assert not stored.page and len(stored.regions) == len(own) + 1
    np.testing.assert_allclose(stored.regions[: len(own)], own, atol=2e-3)
    np.testing.assert_allclose(stored.regions[-1], inside, atol=2e-3)
    cosines = stored.regions @ original.vector
    assert cosines[-1] > 0.8 and cosines[-1] > cosines[:-1].max() + 0.2
    whole = extract_local_features(np.asarray(picture))
    np.testing.assert_array_equal(stored.local.descriptors, whole.descriptors)
    assert len(stored.local.thumbnails) == 1


def test_the_pictures_of_a_grid_are_more_regions_and_keep_the_whole_keypoints(tmp_path, effnet_extractor):
    """A 2 x 2 grid (one photo, three drawn pictures): each cell's descriptor is appended to the image's own regions,
    and searched for by its original, the photo's cell meets it far above any other region."""
    from retrieval.descriptors.local_features import extract_local_features
    from retrieval.descriptors.regions import grid_boxes
    from test_regions import grid_of

    composite, _ = grid_of((None, None, "chelsea", None), 2)
    stored, original, own, picture = encoded_with_original(tmp_path, effnet_extractor, composite)
    encoder = effnet_extractor.encoder
    cells = grid_boxes(np.asarray(picture))
    assert len(cells) == 4
    crops = [resize_for_backbone(picture.crop(cell), encoder.input_size, encoder.resize_rule) for cell in cells]
    assert not stored.page and len(stored.regions) == len(own) + 4
    np.testing.assert_allclose(stored.regions[: len(own)], own, atol=2e-3)
    np.testing.assert_allclose(stored.regions[len(own) :], effnet_extractor.encode_arrays(crops), atol=2e-3)
    cosines = stored.regions @ original.vector
    photo_cell = len(own) + 2
    assert cosines[photo_cell] > 0.8 and cosines[photo_cell] > np.delete(cosines, photo_cell).max() + 0.2
    np.testing.assert_array_equal(stored.local.descriptors, extract_local_features(np.asarray(picture)).descriptors)


def test_opencv_runs_one_thread_per_loader_while_encoding_and_is_restored_after(tmp_path, effnet_extractor):
    """The loader threads are the parallelism of indexing: OpenCV's own threads (SIFT's blurs) would oversubscribe
    the cores while the model runs; the setting is OpenCV's global one, so it is put back however the run ends."""
    import cv2

    from test_verification import photo

    paths = [tmp_path / f"{name}.png" for name in ("coffee", "rocket")]
    for path, name in zip(paths, ("coffee", "rocket")):
        photo(name, 300).save(path)
    before = max(2, cv2.getNumThreads())
    cv2.setNumThreads(before)
    try:
        batches = CopyEncoder(effnet_extractor).encode_files(paths, batch_size=1)
        next(batches)
        assert cv2.getNumThreads() == 1
        batches.close()  # a run stopped half-way (an error, Ctrl-C)
        assert cv2.getNumThreads() == before
        assert sum(len(batch) for batch in CopyEncoder(effnet_extractor).encode_files(paths)) == 2
        assert cv2.getNumThreads() == before
    finally:
        cv2.setNumThreads(-1)
