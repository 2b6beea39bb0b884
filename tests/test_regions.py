"""Regional search for copy detection: the stored regions (retrieval.descriptors.regions), the query windows, and how
their scores become image scores (retrieval.search.copies). Pure numpy; the end-to-end copy search is in
tests/test_copy_detection.py and tests/test_verification.py."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from retrieval.descriptors import regions
from retrieval.search.backends.memory import MemoryBackend
from retrieval.search.backends.regions import ExactRegions, RankedRegions, distinct_images
from retrieval.search.copies import BACKGROUND_RANK, QueryFeatures, background, calibrated, fuse, weighted_lists
from retrieval.search.pipeline import QueryPipeline


def test_database_regions_of_a_7x7_map_are_four_overlapping_thirds():
    boxes = regions.database_region_boxes(7, 7)
    assert len(boxes) == 4
    assert {(h, w) for _, _, h, w in boxes} == {(4, 4)}  # R-MAC level 2: side floor(2 * 7 / 3)
    assert {(y, x) for y, x, _, _ in boxes} == {(0, 0), (0, 3), (3, 0), (3, 3)}  # the corners, overlapping by one cell


@pytest.mark.parametrize("height, width", [(7, 7), (7, 10), (10, 7), (5, 14), (14, 14), (2, 3)])
def test_database_regions_lie_inside_the_map_and_are_bounded(height, width):
    boxes = regions.database_region_boxes(height, width)
    assert 0 < len(boxes) <= regions.MAX_DATABASE_REGIONS
    for y, x, h, w in boxes:
        assert 0 <= y and 0 <= x and y + h <= height and x + w <= width
        assert h < height or w < width  # a region is never the whole map (the global descriptor is that)


def test_a_one_cell_map_has_no_regions():
    assert regions.database_region_boxes(1, 1) == []
    vectors = regions.region_vectors(np.ones((2, 1, 1, 8), np.float32))
    assert [v.shape for v in vectors] == [(0, 8), (0, 8)]


def test_region_vectors_are_the_unit_max_of_each_box():
    rng = np.random.default_rng(0)
    maps = rng.random((3, 7, 7, 16)).astype(np.float32)
    vectors = regions.region_vectors(maps)
    boxes = regions.database_region_boxes(7, 7)
    assert len(vectors) == 3
    for image, per_image in enumerate(vectors):
        assert per_image.shape == (len(boxes), 16) and per_image.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(per_image, axis=1), 1.0, rtol=1e-6)
        for row, (y, x, h, w) in enumerate(boxes):
            expected = maps[image, y : y + h, x : x + w].max(axis=(0, 1))
            np.testing.assert_allclose(per_image[row], expected / np.linalg.norm(expected), rtol=1e-6)


def test_a_region_sees_a_corner_the_global_maximum_misses():
    maps = np.zeros((1, 7, 7, 4), np.float32)
    maps[0, :, :, 0] = 1.0  # everywhere: what the whole image is about
    maps[0, 0:3, 0:3, 1] = 5.0  # only in the top-left corner
    top_left = regions.region_vectors(maps)[0][0]
    bottom_right = regions.region_vectors(maps)[0][3]
    assert top_left[1] > 0.9 and bottom_right[1] == 0.0


def test_query_windows_cover_the_picture_at_two_scales():
    boxes = regions.window_boxes(640, 480)
    assert len(boxes) == len(regions.QUERY_WINDOWS) == 13
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= 640 and 0 <= top < bottom <= 480
    widths = sorted({right - left for left, _, right, _ in boxes})
    assert widths == [288, 384]  # 0.45 and 0.6 of the width
    covered = np.zeros((480, 640), bool)
    for left, top, right, bottom in boxes:
        covered[top:bottom, left:right] = True
    assert covered.all()


def test_an_elongated_picture_also_gets_windows_as_deep_as_its_short_side():
    """A collage of three 4:3 pictures side by side (1452 x 360, 12 px gaps): a window covers at least 3/4 of each
    picture (the grid windows are 0.45-0.6 of the width and of the height: none covers more than 0.6 of one)."""
    assert regions.strip_boxes(640, 480) == [] and regions.strip_boxes(480, 640) == []
    boxes = regions.window_boxes(1452, 360)
    strips = regions.strip_boxes(1452, 360)
    assert boxes[-len(strips):] == strips and len(boxes) == len(regions.QUERY_WINDOWS) + len(strips)
    assert all(top == 0 and bottom == 360 and right - left == 480 for left, top, right, bottom in strips)
    assert strips[0][0] == 0 and strips[-1][2] == 1452
    assert all(b[0] - a[0] <= 240 for a, b in zip(strips, strips[1:]))  # half a window apart at most
    for start, end in ((0, 480), (492, 972), (984, 1452)):
        assert max(min(end, right) - max(start, left) for left, _, right, _ in strips) >= 0.75 * 480
    assert regions.strip_boxes(300, 1200) == [(0, y, 300, y + 400) for y in (0, 200, 400, 600, 800)]  # stacked
    # a database image stores at most MAX_DATABASE_REGIONS of them, spread from one end to the other
    assert regions.database_strip_boxes(1452, 360) == strips
    long_strip = regions.strip_boxes(4000, 300)
    stored = regions.database_strip_boxes(4000, 300)
    assert len(long_strip) > len(stored) == regions.MAX_DATABASE_REGIONS
    assert stored[0] == long_strip[0] and stored[-1] == long_strip[-1] and set(stored) <= set(long_strip)


def test_an_extremely_elongated_picture_gets_a_bounded_number_of_windows():
    """A 20,000 x 10 picture would slide 3,076 strip windows, each encoded by the model: a query of that shape was
    killed for its memory. At most ``MAX_QUERY_STRIPS`` of them, spread from one end to the other."""
    for width, height in ((20_000, 10), (10, 20_000), (65_000, 300)):
        unbounded = regions.strip_boxes(width, height)
        strips = regions.window_boxes(width, height)[-regions.MAX_QUERY_STRIPS:]
        assert len(unbounded) > regions.MAX_QUERY_STRIPS and strips == regions.strip_boxes(width, height, regions.MAX_QUERY_STRIPS)
        assert len(regions.window_boxes(width, height)) <= len(regions.QUERY_WINDOWS) + regions.MAX_QUERY_STRIPS
        assert strips[0] == unbounded[0] and strips[-1] == unbounded[-1] and set(strips) <= set(unbounded)
        assert len(regions.database_strip_boxes(width, height)) == regions.MAX_DATABASE_REGIONS


def test_an_extremely_elongated_query_is_searched(tmp_path):
    """End to end on an index with regions and local features: a 20,000 x 10 noise picture as a query (the
    process was killed before the strip windows were bounded) gives a ranking, through query_online.py."""
    import subprocess
    import sys

    from PIL import Image

    from conftest import REPO
    from retrieval.indexing import build_index
    from test_verification import photo

    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("coffee", "chelsea"):
        photo(name, 320).save(folder / f"{name}.jpg")
    index = tmp_path / "copies.h5"
    build_index(folder, index, backbone="efficientnet-lite0", regions=True, local_features=True, progress=False,
                notice=lambda line: None)
    query = tmp_path / "strip.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (10, 20_000, 3), dtype=np.uint8)).save(query)
    result = subprocess.run([sys.executable, str(REPO / "query_online.py"), "--index", str(index), "--query", str(query)],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "coffee.jpg" in result.stdout and "chelsea.jpg" in result.stdout


def regions_index(tmp_path, names=("coffee", "chelsea"), width: int = 320):
    """An index with regions (no local features) of the demo photos ``names``, ``width`` px wide, as ``<name>.jpg``."""
    from retrieval.indexing import build_index
    from test_verification import photo

    folder = tmp_path / "images"
    folder.mkdir()
    for name in names:
        photo(name, width).save(folder / f"{name}.jpg")
    index = tmp_path / "copies.h5"
    build_index(folder, index, backbone="efficientnet-lite0", regions=True, progress=False, notice=lambda line: None)
    return index


def test_query_windows_go_through_the_model_smaller_than_whole_pictures(tmp_path):
    """A plain query's windows are encoded at ``window_input_side`` (192 px for a 224 px model), the query itself and
    its quarter turns at the model's input size: the same vectors as encoding the crops at those sizes by hand, not
    those at 224. The turns count like windows."""
    from retrieval.engine import QUARTER_TURNS, RetrievalEngine
    from test_verification import photo

    assert regions.window_input_side(224) == 192 and regions.window_input_side(448) == 384
    engine = RetrievalEngine.open(regions_index(tmp_path))
    try:
        query = photo("coffee", 400).convert("RGB")
        features = engine.query_features(query)
        boxes = regions.detailed_windows(np.asarray(query), regions.window_boxes(*query.size))
        crops = [query.crop(box) for box in boxes]
        turned = [query.transpose(turn) for turn in QUARTER_TURNS]
        assert len(boxes) + 3 == len(features.windows) > 3 and regions.content_boxes(np.asarray(query)) == []
        np.testing.assert_allclose(features.vector, engine.encode_images([query])[0], atol=1e-5)
        by_hand = engine.encode_images(crops, [192] * len(crops))
        np.testing.assert_allclose(features.windows[: len(boxes)], by_hand, atol=1e-5)
        assert np.abs(features.windows[: len(boxes)] - engine.encode_images(crops)).max() > 1e-2
        np.testing.assert_allclose(features.windows[len(boxes) :], engine.encode_images(turned), atol=1e-5)
        assert (features.window_weights == regions.WINDOW_WEIGHT).all() and features.window_parts.all()
        with pytest.raises(ValueError, match="input sizes"):  # one size per image, or none
            engine.encode_images(crops, [192])
    finally:
        engine.close()


def test_windows_too_small_to_encode_are_left_out():
    assert regions.window_boxes(12, 12) == []  # the 0.6 windows are 7 px: under 8
    boxes = regions.window_boxes(14, 14)
    assert len(boxes) == 4 and all(right - left == 8 for left, _, right, _ in boxes)  # only the 0.6 ones


def test_flat_windows_are_not_searched():
    """A query padded with black (pad + rotate) or with a sky: the windows that see only the flat part are dropped,
    the ones over the photo kept."""
    from test_verification import photo

    pixels = np.full((480, 640, 3), 180, np.uint8)  # left half: a flat grey sky with a little sensor noise
    pixels[:, :320] += np.random.default_rng(0).integers(0, 2, (480, 320, 1), dtype=np.uint8)
    pixels[:, 320:] = np.asarray(photo("astronaut", 480))[:, :320]  # right half: a photo
    boxes = regions.window_boxes(640, 480)
    kept = regions.detailed_windows(pixels, boxes)
    grey = pixels.mean(axis=2)
    for box in boxes:
        left, top, right, bottom = box
        touches_photo = right > 320
        assert (box in kept) == touches_photo, box
        assert (regions.window_detail(grey.astype(np.uint8), box) >= regions.WINDOW_MIN_DETAIL) == touches_photo
    assert regions.detailed_windows(np.zeros((100, 100, 3), np.uint8), [(0, 0, 50, 50)]) == []


def test_exact_regions_score_each_image_by_its_best_region():
    rng = np.random.default_rng(1)
    matrix = rng.standard_normal((7, 5)).astype(np.float32)
    image = np.array([0, 0, 0, 2, 2, 3, 3])  # image 1 has no regions
    queries = rng.standard_normal((2, 5)).astype(np.float32)
    exact = ExactRegions(matrix, image, count=5)
    scores = exact.image_scores(queries)
    assert scores.shape == (2, 5)
    brute = queries @ matrix.T
    for q in range(2):
        for row in (0, 2, 3):
            assert scores[q, row] == pytest.approx(brute[q, image == row].max())
        assert scores[q, 1] == -np.inf and scores[q, 4] == -np.inf
    rows, best = exact.search(queries, 4)  # images without regions are padding, not results
    for q in range(2):
        expected = sorted((0, 2, 3), key=lambda row: -brute[q, image == row].max())
        assert rows[q].tolist() == expected + [-1]
        assert best[q, 3] == -np.inf


def test_empty_exact_regions_find_nothing():
    exact = ExactRegions(np.zeros((0, 5), np.float32), np.zeros(0, np.int64), count=3)
    assert np.isneginf(exact.image_scores(np.ones((1, 5)))).all()
    rows, scores = exact.search(np.ones((1, 5), np.float32), 2)
    assert rows.tolist() == [[-1, -1]] and np.isneginf(scores).all()


def test_distinct_images_keep_each_images_first_hit():
    rows = np.array([[3, 3, 1, -1, 3, 0], [2, -1, -1, -1, -1, -1]])
    scores = np.array([[0.9, 0.8, 0.7, -np.inf, 0.5, 0.4], [0.3, -np.inf, -np.inf, -np.inf, -np.inf, -np.inf]], np.float32)
    out_rows, out_scores = distinct_images(rows, scores, 3)
    assert out_rows.tolist() == [[3, 1, 0], [2, -1, -1]]
    np.testing.assert_allclose(out_scores[0], [0.9, 0.7, 0.4])
    assert np.isneginf(out_scores[1, 1:]).all()


def test_ranked_regions_through_a_backend_equal_exact_regions():
    """A backend over region vectors whose rows are image rows, asked per_image times deeper, returns the same images
    as the exact search: k * per_image hits always hold k distinct images."""
    rng = np.random.default_rng(4)
    counts = rng.integers(0, 5, size=40)  # some images without regions
    image = np.repeat(np.arange(40), counts)
    matrix = rng.standard_normal((len(image), 8)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    queries = rng.standard_normal((3, 8)).astype(np.float32)

    class ImageRows(MemoryBackend):  # the exact backend with region rows mapped to image rows, as faiss' id map does
        def search_batch(self, queries, k):
            rows, scores = super().search_batch(queries, k)
            return np.where(rows >= 0, image[np.maximum(rows, 0)], -1), scores

    ranked = RankedRegions(ImageRows(matrix), per_image=int(counts.max()))
    exact = ExactRegions(matrix, image, count=40)
    for k in (1, 5, 20):
        got_rows, got_scores = ranked.search(queries, k)
        want_rows, want_scores = exact.search(queries, k)
        assert got_rows.tolist() == want_rows.tolist()
        np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5)


def test_fuse_takes_each_images_best_evidence_and_ignores_padding():
    ranked = (np.array([2, 0, -1]), np.array([0.9, 0.5, 0.0]))  # a backend's top-k, padded with -1
    windows = (np.array([0, 1]), np.array([0.7, 0.2]))
    regional = (np.array([2, 0, -1]), np.array([0.95, 0.1, -np.inf]))
    scores = fuse(4, [ranked, windows, regional])
    np.testing.assert_allclose(scores, [0.7, 0.2, 0.95, -np.inf])


def test_a_lists_background_is_its_score_at_the_background_rank_or_its_last():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, -np.inf], np.float32)
    assert background(scores) == pytest.approx(scores[BACKGROUND_RANK])
    assert background(scores[:3]) == pytest.approx(0.7)  # shorter than the rank: its last
    assert background(np.array([0.9, -np.inf, -np.inf], np.float32)) == pytest.approx(0.9)  # padding is no score
    assert background(np.array([], np.float32)) == 0.0


def test_calibration_lowers_a_window_that_resembles_everything_and_never_raises_one():
    """A window of a flat sky is 0.80 like image 10 but also 0.78-0.70 like everything else; the whole query is 0.75
    like image 3 and 0.40-0.30 like the rest. Uncalibrated, the sky's maximum wins; calibrated, the window's scores
    are lowered by its background's excess over the whole query's, and image 3 wins. A window whose background is
    below the whole query's keeps its scores."""
    rows = np.arange(3, 11)
    ranked = (rows, np.array([0.75, 0.40, 0.38, 0.36, 0.34, 0.32, 0.31, 0.30], np.float32))
    sky = (rows[::-1].copy(), np.array([0.80, 0.78, 0.76, 0.75, 0.74, 0.72, 0.71, 0.70], np.float32))
    quiet = (rows, np.array([0.60, 0.20, 0.15, 0.10, 0.10, 0.05, 0.05, 0.0], np.float32))
    assert np.argmax(fuse(12, [ranked, sky, quiet])) == 10
    lowered = calibrated([sky, quiet], ranked[1])
    excess = background(sky[1]) - background(ranked[1])
    np.testing.assert_allclose(lowered[0][1], sky[1] - excess, rtol=1e-6)
    np.testing.assert_array_equal(lowered[1][1], quiet[1])
    assert lowered[0][0] is sky[0] and lowered[1][0] is quiet[0]
    assert np.argmax(fuse(12, [ranked, *lowered])) == 3
    assert calibrated([], ranked[1]) == []
    whole, part = calibrated([sky, sky], ranked[1], np.array([False, True]))  # the first a whole view, not a part
    assert whole[1] is sky[1]
    np.testing.assert_allclose(part[1], sky[1] - excess, rtol=1e-6)


def test_a_copy_search_ranks_the_same_whatever_the_number_of_results_asked():
    """The backgrounds come from lists searched at least ``BACKGROUND_RANK`` + 1 deep, so asking for the first result
    gives the first of ten, and so on."""
    rng = np.random.default_rng(5)
    matrix = rng.normal(size=(60, 16)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    pipeline = QueryPipeline(MemoryBackend(matrix), matrix)
    vectors, windows = rng.normal(size=(30, 16)).astype(np.float32), rng.normal(size=(30, 6, 16)).astype(np.float32)
    queries = [QueryFeatures(vector, views) for vector, views in zip(vectors, windows)]
    ten = pipeline.search_copies(queries, 10)[0]
    for k in range(1, 10):
        assert pipeline.search_copies(queries, k)[0].tolist() == ten[:, :k].tolist(), k


def web_page(inner: np.ndarray, at=(400, 200), size=(900, 640)) -> np.ndarray:
    """A plain page with a little clutter (a header bar, lines of text) and the picture ``inner`` at ``at``."""
    page = np.full((size[1], size[0], 3), 246, np.uint8)
    page[0:40] = (40, 60, 90)
    rng = np.random.default_rng(0)
    for row in range(60, size[1] - 40, 24):
        page[row : row + 6, 20 : 20 + int(rng.integers(80, 260))] = 90
    page[at[1] : at[1] + inner.shape[0], at[0] : at[0] + inner.shape[1]] = inner
    return page


def test_a_photo_in_a_page_is_its_content_box():
    from test_verification import photo

    inner = np.asarray(photo("chelsea", 360))
    boxes = regions.content_boxes(web_page(inner))
    assert len(boxes) >= 1
    expected = (400, 200, 400 + inner.shape[1], 200 + inner.shape[0])
    assert all(abs(a - b) <= 8 for a, b in zip(boxes[0], expected)), (boxes[0], expected)


def test_letterbox_bars_are_trimmed_from_a_content_box():
    from test_verification import photo

    page = np.full((700, 420, 3), 250, np.uint8)
    inner = np.asarray(photo("coffee", 380))
    page[300:560, 20:400] = 0  # black bars above and below the photo
    page[330 : 330 + 200, 20:400] = inner[:200]
    (box,) = regions.content_boxes(page)
    assert abs(box[1] - 330) <= 6 and abs(box[3] - 530) <= 6 and abs(box[0] - 20) <= 6 and abs(box[2] - 400) <= 6


def test_page_furniture_at_the_edge_of_a_content_box_is_cut_off():
    # a phone screenshot: the letterboxed photo, then a thin white gap and a navigation bar of icons touching its
    # bottom, all one connected region; the bars are narrower than that region, so its full rows look busy
    from test_verification import photo

    page = np.full((736, 414, 3), 250, np.uint8)
    inner = np.asarray(photo("coffee", 360))
    page[400:640, 27:387] = 0  # black bars above and below the photo
    page[430 : 430 + 180, 27:387] = inner[:180]
    page[640:650, 20:394] = 235  # the bar's light divider, just off the page colour
    for left in range(30, 380, 60):  # icons
        page[656:676, left : left + 22] = 60
        page[660:672, left + 4 : left + 18] = 250
    (box,) = regions.content_boxes(page)
    assert abs(box[1] - 430) <= 6 and abs(box[3] - 610) <= 6 and abs(box[0] - 27) <= 6 and abs(box[2] - 387) <= 6, box


def test_a_post_header_above_a_narrow_letterboxed_picture_is_cut_off():
    # a web post: an avatar and a name, a white gap, then a portrait picture between black bars wider than it, all
    # one connected region. Cutting the bars would keep less than half of the region's width; the header goes anyway
    from test_verification import photo

    page = np.full((736, 1200, 3), 246, np.uint8)
    page[356:400, 260:304] = 60  # the avatar
    page[362:372, 316:400] = 40  # the name
    page[380:386, 316:370] = 140  # "a minute ago"
    page[420:712, 250:790] = 0  # the black bars
    inner = np.asarray(photo("coffee", 360).transpose(Image.Transpose.ROTATE_90).resize((250, 292)))
    page[420:712, 395:645] = inner
    (box,) = regions.content_boxes(page)
    assert box[1] >= 414 and abs(box[3] - 712) <= 6 and box[0] <= 400 and box[2] >= 640, box


def product_shot_page(bars: str) -> np.ndarray:
    """A web post whose picture, a product shot on the page's own white, was fitted into its slot with black bars at
    its sides (``bars`` "sides") or above and below it ("above"); "none": the product on the page without bars."""
    from test_verification import photo

    page = np.full((800, 1200, 3), 246, np.uint8)
    page[356:400, 260:304] = 60  # the avatar
    page[362:372, 316:400] = 40  # the name
    item = np.asarray(photo("coffee", 300))[20:150, 60:200]  # the product: a busy patch on the white
    page[500:630, 450:590] = item
    if bars == "sides":
        page[420:712, 250:395] = 0
        page[420:712, 645:790] = 0
    elif bars == "above":
        page[330:420, 250:790] = 0
        page[712:760, 250:790] = 0
    return page


@pytest.mark.parametrize("bars, expected", [("sides", (395, 420, 645, 712)), ("above", (250, 420, 790, 712))])
def test_a_picture_on_the_page_colour_between_letterbox_bars_is_the_content(bars, expected):
    """The bars, the product and the page are three regions, none of them a picture; the bars frame it. Without them
    the product alone is too small to be a page's picture, and the page is all content."""
    (box,) = regions.content_boxes(product_shot_page(bars), patterns=True)
    assert all(abs(a - b) <= 8 for a, b in zip(box, expected)), (box, expected)
    assert regions.content_boxes(product_shot_page("none"), patterns=True) == []


def striped(image: Image.Image, count: int = 4, width: float = 0.09) -> np.ndarray:
    """``image`` under ``count`` opaque white stripes, tilted, each ``width`` of its side wide (AugLy's overlay_stripes)."""
    from PIL import ImageDraw

    out = image.convert("RGB")
    side = max(out.size)
    draw = ImageDraw.Draw(out)
    for i in range(count):
        x = (i + 0.5) * side / count
        draw.polygon([(x, 0), (x + width * side, 0), (x + width * side + 0.3 * side, side), (x + 0.3 * side, side)], fill="white")
    return np.asarray(out)


def test_a_photo_under_opaque_stripes_is_no_page_and_two_pictures_in_a_page_are():
    """Stripes cut a photo into alike bands: searched as one band, the copy was lost. A page with two pictures side
    by side keeps its content boxes."""
    from test_verification import photo

    bands = striped(photo("chelsea", 512))
    assert regions.content_boxes(bands) == []
    assert regions.content_boxes(bands, patterns=True) != []  # the database side keeps the band besides (the docstring)
    page = np.full((600, 900, 3), 248, np.uint8)
    page[150:390, 60:430] = np.asarray(photo("coffee", 370))[:240]
    page[150:390, 470:840] = np.asarray(photo("rocket", 370))[:240]
    assert len(regions.content_boxes(page)) == 2


@pytest.mark.parametrize("name", ["chelsea", "coffee", "rocket", "astronaut"])
def test_a_plain_photo_has_no_content_box(name):
    from test_verification import photo

    assert regions.content_boxes(np.asarray(photo(name, 512))) == []


def test_content_boxes_of_tiny_flat_and_blank_pictures():
    assert regions.content_boxes(np.zeros((10, 10, 3), np.uint8)) == []
    item = np.zeros((56, 56, 3), np.uint8)  # a Fashion-MNIST-like item on black: a thumbnail, not a page
    item[8:48, 12:44] = np.random.default_rng(0).integers(60, 255, (40, 32, 1), dtype=np.uint8)
    assert regions.content_boxes(item) == []
    larger = np.asarray(Image.fromarray(item).resize((224, 224), Image.Resampling.NEAREST))
    assert len(regions.content_boxes(larger)) == 1  # the same layout at page size is a page around a picture
    assert regions.content_boxes(np.full((300, 400, 3), 255, np.uint8)) == []
    assert regions.content_boxes(np.zeros((300, 400, 3), np.uint8)) == []


def test_a_page_view_counts_less_than_the_content_it_holds():
    """The whole screenshot matches a distractor made with the same frame (0.95) a little better than its content
    matches the original (0.93); weighted at 0.9, the page view no longer wins."""
    rows = np.array([[7, 3], [3, 7]])  # window 0: the content crop; window 1: the whole page
    scores = np.array([[0.93, 0.40], [0.95, 0.50]], np.float32)
    plain = fuse(8, weighted_lists(rows, scores, None))
    assert np.argmax(plain) == 3
    weighted = fuse(8, weighted_lists(rows, scores, np.array([1.0, regions.PAGE_WEIGHT], np.float32)))
    assert np.argmax(weighted) == 7 and weighted[3] == pytest.approx(0.95 * regions.PAGE_WEIGHT)


def page_database(pages):
    """A 3-image FeatureDatabase whose first two images have two regions each; ``pages`` flags them."""
    from retrieval.descriptors.encoder import EncoderConfig
    from retrieval.storage.copy_features import CopyFeatures
    from retrieval.storage.database import FeatureDatabase

    rng = np.random.default_rng(2)
    dim = 8
    vectors = rng.normal(size=(3, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    regions = [np.eye(dim, dtype=np.float32)[[i, i + 1]] for i in range(2)] + [np.zeros((0, dim), np.float32)]
    encoder = EncoderConfig("efficientnet-lite0", "imagenet", "md5:0", "top", "max", 224, "squash-bicubic", "float32", dim)
    return FeatureDatabase(
        encoder=encoder, vectors=vectors, paths=["a.jpg", "b.jpg", "c.jpg"],
        file_sizes=np.ones(3, np.int64), file_mtimes_ns=np.ones(3, np.int64),
        copies=CopyFeatures.assemble(regions, None, dim, pages=pages),
    )


def test_page_flags_round_trip_and_older_files_have_none(tmp_path):
    import h5py

    from retrieval.errors import IndexFileError
    from retrieval.storage.database import read_database, write_database

    path = tmp_path / "db.h5"
    write_database(path, page_database([True, False, True]))  # the third has no region: it cannot be a page
    back = read_database(path).copies
    assert [back.is_page(row) for row in range(3)] == [True, False, False]
    with h5py.File(path, "r+") as h5:
        del h5["regions/page"]  # a file from before page flags
    assert not any(read_database(path).copies.is_page(row) for row in range(3))
    with h5py.File(path, "r+") as h5:
        h5["regions"].create_dataset("page", data=np.array([2, 0, 0], np.uint8))
    with pytest.raises(IndexFileError, match="corrupt"):
        read_database(path)


def test_an_image_may_store_up_to_max_stored_regions_and_more_is_a_corrupt_file(tmp_path):
    """A 3 x 3 grid stores its map's regions and its 9 cells (more than ``MAX_DATABASE_REGIONS``); more than
    ``MAX_STORED_REGIONS`` for one image is no file the index writes."""
    from dataclasses import replace

    import h5py

    from retrieval.errors import IndexFileError
    from retrieval.storage.copy_features import CopyFeatures
    from retrieval.storage.database import read_database, write_database

    path = tmp_path / "db.h5"
    database = page_database([False, False, False])
    dim = database.vectors.shape[1]
    many = np.tile(np.eye(dim, dtype=np.float32), (2, 1))[: regions.MAX_STORED_REGIONS]
    copies = CopyFeatures.assemble([many, many[:1], np.zeros((0, dim), np.float32)], None, dim)
    write_database(path, replace(database, copies=copies))
    assert len(read_database(path).copies.regions_of(0)) == regions.MAX_STORED_REGIONS > regions.MAX_DATABASE_REGIONS
    with h5py.File(path, "r+") as h5:
        image = h5["regions/image"][...]
        image[regions.MAX_STORED_REGIONS] = 0  # the second image's region given to the first: one too many
        h5["regions/image"][...] = image
    with pytest.raises(IndexFileError, match=f"more than {regions.MAX_STORED_REGIONS} regions"):
        read_database(path)


def test_a_stored_page_is_searched_as_the_picture_inside_it():
    from retrieval.search.copies import stored_query

    database = page_database([True, False, False])
    copies = database.copies
    page = stored_query(database.vectors[0], copies, 0)
    np.testing.assert_allclose(page.vector, copies.regions_of(0)[-1].astype(np.float32))  # the picture, not the page
    np.testing.assert_allclose(page.windows[0], database.vectors[0])  # the page itself is one view ...
    assert len(page.windows) == 2 and (page.window_weights == regions.PAGE_WEIGHT).all()  # ... and counts less
    plain = stored_query(database.vectors[1], copies, 1)
    np.testing.assert_allclose(plain.vector, database.vectors[1])
    assert len(plain.windows) == 2 and plain.window_weights is None


def test_index_time_pages_get_the_picture_as_one_more_region(tmp_path):
    from PIL import Image

    from retrieval.indexing import build_index
    from retrieval.storage.database import read_database
    from test_verification import photo

    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(web_page(np.asarray(photo("chelsea", 360)))).save(folder / "screenshot.png")
    photo("coffee", 512).save(folder / "coffee.jpg")
    index = tmp_path / "copies.h5"
    build_index(folder, index, backbone="efficientnet-lite0", regions=True, progress=False, notice=lambda line: None)
    database = read_database(index)
    row = {path: i for i, path in enumerate(database.paths)}
    copies = database.copies
    assert copies.is_page(row["screenshot.png"]) and not copies.is_page(row["coffee.jpg"])
    assert len(copies.regions_of(row["screenshot.png"])) == len(copies.regions_of(row["coffee.jpg"])) + 1


def test_a_stored_page_is_verified_by_its_picture_not_by_its_page_template():
    """A stored screenshot as a query (its stored local features: a search by id, the duplicates finder) against
    another screenshot of the same page template and its picture's original. A page's stored keypoints are its
    picture's, so the template gives no inliers; with the whole page's, the template's header and lines matched."""
    from retrieval.descriptors.local_features import LocalFeatures, extract_local_features
    from retrieval.search.verification import MIN_INLIERS, QueryLocalFeatures, verify
    from test_verification import photo

    def stored(name: str) -> tuple[LocalFeatures, LocalFeatures]:
        page = web_page(np.asarray(photo(name, 360)))
        left, top, right, bottom = regions.content_boxes(page)[0]
        return extract_local_features(page, picture=page[top:bottom, left:right]), extract_local_features(page)

    (page, whole_page), (other, other_whole_page) = stored("chelsea"), stored("coffee")
    assert abs(page.size[0] - 360) <= 8 and abs(page.size[1] - 240) <= 8  # the picture's coordinates (its content box)
    original = extract_local_features(np.asarray(photo("chelsea", 512)))
    result = verify(QueryLocalFeatures(page, LocalFeatures.empty()), [other, original])
    assert result.verified.tolist() == [False, True] and result.inliers[0] < MIN_INLIERS
    template = verify(QueryLocalFeatures(whole_page, LocalFeatures.empty()), [other_whole_page, original])
    assert template.inliers[0] >= 20


def drawn_shapes(width: int, height: int, seed: int = 0) -> Image.Image:
    """A busy drawn picture (flat ellipses and rectangles, blurred a little): what a photo gets pasted on."""
    from PIL import ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)

    def colour() -> tuple[int, int, int]:
        return tuple(int(c) for c in rng.integers(0, 256, 3))

    canvas = Image.new("RGB", (width, height), colour())
    draw = ImageDraw.Draw(canvas)
    for _ in range(50):
        x, y, r = int(rng.integers(0, width)), int(rng.integers(0, height)), int(rng.integers(5, width // 6))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x - r, y - r, x + r, y + r), fill=colour())
    return canvas.filter(ImageFilter.GaussianBlur(1))


def pasted(name: str, at: tuple[int, int], seed: int = 0, width: int = 340) -> tuple[Image.Image, tuple]:
    """Photo ``name`` ``width`` px wide pasted at ``at`` on an 800 x 600 drawn picture, and where it lies (a box)."""
    from test_verification import photo

    canvas, inner = drawn_shapes(800, 600, seed), photo(name, width)
    canvas.paste(inner, at)
    return canvas, (at[0], at[1], at[0] + inner.width, at[1] + inner.height)


@pytest.mark.parametrize("name, at, seed", [
    ("chelsea", (200, 150), 0), ("coffee", (300, 300), 1), ("rocket", (60, 0), 2), ("coffee", (100, 60), 4),
])
def test_a_picture_pasted_on_another_is_its_inset_box(name, at, seed):
    """Anywhere on the drawn picture, touching its border or not (then one side is the border). Not every one: a
    side along which the photo and the drawing have alike colours can be missed (16 of 20 random placements of
    these photos are found, 110 of bench/unseen_edits.py's 120 insets)."""
    composite, expected = pasted(name, at, seed)
    box = regions.inset_box(np.asarray(composite))
    assert box is not None and all(abs(a - b) <= 8 for a, b in zip(box, expected)), (box, expected)
    assert regions.content_boxes(np.asarray(composite)) == []  # no page around it: the page detector cannot see it


def test_an_inset_with_one_side_along_its_own_colours_is_found_but_not_with_two(monkeypatch):
    """Where the drawing under a pasted picture has the picture's colours along a side, that side shows no edge. One
    such side of four (the picture inside) is allowed, at half its length (here 40 % of the left side has no edge);
    two are not (40 % of the right side too)."""
    composite, expected = pasted("chelsea", (200, 150))
    pixels = np.asarray(composite).copy()
    left, top, right, bottom = expected
    start, stop = top + 10, top + 10 + (bottom - top) * 2 // 5
    pixels[start:stop, left - 12 : left] = pixels[start:stop, left : left + 1]  # the picture's colours left of it
    box = regions.inset_box(pixels)
    assert box is not None and all(abs(a - b) <= 8 for a, b in zip(box, expected)), (box, expected)
    monkeypatch.setattr(regions, "INSET_WEAK_SUPPORT", regions.INSET_SUPPORT)
    assert regions.inset_box(pixels) is None
    monkeypatch.undo()
    pixels[start:stop, right : right + 12] = pixels[start:stop, right - 1 : right]  # ... and right of it
    assert regions.inset_box(pixels) is None


@pytest.mark.parametrize("width", [800, 256, 200])
def test_the_detectors_read_the_same_picture_whether_its_shrunk_copy_is_given_or_not(width):
    """Indexing shrinks a picture once (``content_sized``) for the page and straight-edge detectors: the same boxes and
    edges as each shrinking it itself; a picture at most ``CONTENT_SIDE`` wide is read at its own size for edges."""
    composite, _ = pasted("chelsea", (200, 150))
    page = Image.new("RGB", (800, 1000), (245, 245, 245))
    page.paste(composite.resize((600, 450)), (100, 200))
    for picture in (composite, page):
        picture = picture.resize((width, round(picture.height * width / picture.width)))
        pixels = np.asarray(picture)
        small = regions.content_sized(pixels)
        assert max(small.shape[:2]) == regions.CONTENT_SIDE
        assert regions.content_boxes(pixels, patterns=True, small=small) == regions.content_boxes(pixels, patterns=True)
        given, own = regions.straight_edges(pixels, small), regions.straight_edges(pixels)
        assert np.array_equal(given.small, own.small) and np.array_equal(given.across_rows, own.across_rows)
        assert np.array_equal(given.across_cols, own.across_cols) and given.scale == own.scale
        assert regions.inset_box(pixels, given) == regions.inset_box(pixels, own)
    assert regions.content_boxes(np.asarray(page)) != []  # the page is one: its picture is its content box
    assert regions.inset_box(np.asarray(composite)) is not None


@pytest.mark.parametrize("name", ["astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins",
                                  "hubble_deep_field", "immunohistochemistry", "retina", "rocket"])
def test_a_plain_photo_has_no_inset(name):
    from test_verification import photo

    assert regions.inset_box(np.asarray(photo(name, 512))) is None


def test_noise_flat_drawn_rectangles_and_tiny_pictures_have_no_inset():
    rng = np.random.default_rng(0)
    for height, width in [(600, 800), (200, 200), (65, 65)]:  # edges everywhere (below 256 px at its own size)
        assert regions.inset_box((rng.random((height, width, 3)) * 255).astype(np.uint8)) is None
    assert regions.inset_box(np.zeros((100, 20000, 3), np.uint8)) is None  # a strip: one row at the detector's scale
    assert regions.inset_box(np.zeros((600, 800, 3), np.uint8)) is None
    flat = np.full((600, 800, 3), 200, np.uint8)
    flat[150:450, 200:600] = (30, 90, 160)  # a drawn rectangle: four straight edges around nothing
    assert regions.inset_box(flat) is None
    composite, _ = pasted("chelsea", (200, 150))
    assert regions.inset_box(np.asarray(composite.resize((60, 45)))) is None  # smaller than PAGE_MIN_SIDE
    sticker, _ = pasted("chelsea", (200, 150), width=220)  # 6 % of the picture: a sticker, not a picture to search
    assert regions.inset_box(np.asarray(sticker)) is None
    assert regions.inset_box(np.asarray(pasted("chelsea", (200, 150), width=300)[0])) is not None  # 12 %


def test_a_turned_copy_meets_its_original_through_a_quarter_turn(tmp_path):
    """The CNN's descriptor is not invariant to rotation: a photo turned a quarter, a half or three quarters is far
    from its original as it is (cosine 0.45-0.84), and the view that turns it back is the original's vector."""
    from retrieval.engine import QUARTER_TURNS, RetrievalEngine
    from test_verification import photo

    assert len(QUARTER_TURNS) == 3
    engine = RetrievalEngine.open(regions_index(tmp_path))
    try:
        for name in ("coffee", "chelsea", "rocket", "astronaut"):
            original = photo(name, 320)
            vector = engine.encode_images([original])[0]
            for turn in QUARTER_TURNS:
                features = engine.query_features(original.transpose(turn))
                assert features.vector @ vector < 0.9, (name, turn)
                assert (features.windows[-len(QUARTER_TURNS) :] @ vector).max() > 0.99, (name, turn)
    finally:
        engine.close()


def test_a_query_with_a_pasted_picture_is_searched_as_that_picture(tmp_path):
    """The pasted photo is the query's own descriptor; the whole query is one more view (weight 1, calibrated like the
    windows, at the full input side), and the windows are the whole query's, as for a plain query."""
    from retrieval.engine import RetrievalEngine

    engine = RetrievalEngine.open(regions_index(tmp_path))
    try:
        query, box = pasted("chelsea", (200, 150))
        features = engine.query_features(query)
        inset = regions.inset_box(np.asarray(query))
        assert all(abs(a - b) <= 8 for a, b in zip(inset, box))
        np.testing.assert_allclose(features.vector, engine.encode_images([query.crop(inset)])[0], atol=1e-5)
        np.testing.assert_allclose(features.windows[0], engine.encode_images([query])[0], atol=1e-5)
        windows = regions.detailed_windows(np.asarray(query), regions.window_boxes(*query.size))
        assert len(features.windows) == 1 + len(windows) + 3  # the whole query, its windows and its quarter turns
        assert features.window_weights[0] == 1.0 and features.window_parts.all()
        query.save(tmp_path / "query.png")
        assert engine.search_image(tmp_path / "query.png", k=1)[0].path == "chelsea.jpg"
    finally:
        engine.close()


def grid_of(names: tuple, columns: int, cell: tuple[int, int] = (300, 240), gap: int = 12) -> tuple[Image.Image, list]:
    """Photos ``names`` (None: a drawn picture) in ``columns`` columns on white, ``gap`` px apart, each resized to
    ``cell``; and where each lies (boxes, reading order)."""
    from test_verification import photo

    rows = -(-len(names) // columns)
    canvas = Image.new("RGB", (columns * cell[0] + (columns - 1) * gap, rows * cell[1] + (rows - 1) * gap), "white")
    boxes = []
    for i, name in enumerate(names):
        x, y = (i % columns) * (cell[0] + gap), (i // columns) * (cell[1] + gap)
        tile = drawn_shapes(*cell, seed=i) if name is None else photo(name, 512).resize(cell)
        canvas.paste(tile, (x, y))
        boxes.append((x, y, x + cell[0], y + cell[1]))
    return canvas, boxes


@pytest.mark.parametrize("names, columns", [
    (("chelsea", None, None, "coffee"), 2),  # a 2 x 2 grid
    (("rocket", None), 1),  # two pictures stacked
    (("astronaut", None, "camera", None, "coins", None), 3),  # 2 rows of 3
])
def test_the_pictures_of_a_grid_are_its_cells(names, columns):
    composite, expected = grid_of(names, columns)
    cells = regions.grid_boxes(np.asarray(composite))
    assert len(cells) == len(expected)
    near = 3 * max(composite.size) / regions.CONTENT_SIDE  # 3 px at the detector's scale (its blur widens edges)
    for cell, box in zip(cells, expected):
        assert all(abs(a - b) <= near for a, b in zip(cell, box)), (cell, box)


@pytest.mark.parametrize("name", ["astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins",
                                  "hubble_deep_field", "immunohistochemistry", "retina", "rocket"])
def test_a_plain_photo_is_no_grid(name):
    """(The brick wall has a mortar joint with edges straight down the whole picture; with no gap of one colour
    beside them it is no cut: it was, before the gap was asked for.)"""
    from test_verification import photo

    assert regions.grid_boxes(np.asarray(photo(name, 512))) == []


def test_a_straight_line_without_a_gap_cuts_nothing():
    """A horizon (a photo darker below a straight full-width line) and two pictures that touch: edges along the whole
    picture with no gap of one colour beside them."""
    from test_verification import photo

    horizon = np.asarray(photo("coffee", 600)).astype(np.int16)
    horizon[horizon.shape[0] // 2 :] -= 90
    assert regions.grid_boxes(np.clip(horizon, 0, 255).astype(np.uint8)) == []
    touching, _ = grid_of(("chelsea", "coffee"), 1, gap=0)
    assert regions.grid_boxes(np.asarray(touching)) == []
    apart, _ = grid_of(("chelsea", "coffee"), 1, gap=12)
    assert len(regions.grid_boxes(np.asarray(apart))) == 2


def test_grid_cells_of_noise_flat_pasted_and_tiny_pictures():
    rng = np.random.default_rng(0)
    assert regions.grid_boxes((rng.random((600, 800, 3)) * 255).astype(np.uint8)) == []  # edges everywhere
    assert regions.grid_boxes(np.zeros((600, 800, 3), np.uint8)) == []
    assert regions.grid_boxes(np.zeros((100, 20000, 3), np.uint8)) == []
    assert regions.grid_boxes(np.asarray(pasted("chelsea", (200, 150))[0])) == []  # an inset: no line runs across
    composite, _ = grid_of(("chelsea", None, None, "coffee"), 2)
    assert regions.grid_boxes(np.asarray(composite.resize((60, 48)))) == []  # smaller than PAGE_MIN_SIDE
    thin, _ = grid_of(("chelsea", "coffee"), 2, cell=(300, 240))
    flat = np.asarray(thin).copy()
    flat[:, 312:] = 255  # one picture beside a white band: one cell, with structure
    assert len(regions.grid_boxes(flat)) == 1
    nine, _ = grid_of(tuple(["coffee", "rocket", "chelsea"] * 3), 3, cell=(200, 160))
    assert len(regions.grid_boxes(np.asarray(nine))) == 9 == regions.GRID_MAX_CELLS
    twelve, _ = grid_of(tuple(["coffee", "rocket", "chelsea"] * 4), 4, cell=(200, 160))
    assert regions.grid_boxes(np.asarray(twelve)) == []  # more pieces than a database image stores


def test_a_photo_in_a_stored_3_x_3_grid_is_found_by_its_original(tmp_path):
    """Searched for by its original, a grid of nine pictures that holds it comes first (its cell is one of its stored
    regions, more than ``MAX_DATABASE_REGIONS``: the file must accept them), among photos that are not it."""
    from retrieval.engine import RetrievalEngine
    from retrieval.indexing import build_index
    from retrieval.storage.database import read_database
    from test_verification import photo

    folder = tmp_path / "images"
    folder.mkdir()
    names = ("coffee", "rocket", "astronaut", "camera", "chelsea", "coins", "clock", "retina", "cell")
    composite, _ = grid_of(names, 3, cell=(200, 160))
    composite.save(folder / "grid.png")
    for name in ("coffee", "rocket", "astronaut", "immunohistochemistry"):
        photo(name, 400).save(folder / f"{name}.jpg")
    index = tmp_path / "copies.h5"
    build_index(folder, index, backbone="efficientnet-lite0", regions=True, progress=False, notice=lambda line: None)
    database = read_database(index)
    grid_regions = database.copies.regions_of(database.paths.index("grid.png"))
    assert len(grid_regions) == len(database.copies.regions_of(database.paths.index("coffee.jpg"))) + 9
    assert len(grid_regions) > regions.MAX_DATABASE_REGIONS
    photo("chelsea", 400).save(tmp_path / "query.jpg")
    engine = RetrievalEngine.open(index)
    try:
        assert engine.search_image(tmp_path / "query.jpg", k=1)[0].path == "grid.png"
    finally:
        engine.close()
