import shutil

import numpy as np
import pytest

from conftest import DEMO_DATABASE
from retrieval.engine import RetrievalEngine
from retrieval.errors import ImageError
from retrieval.indexing import build_index
from bench.testsets import random_view


@pytest.fixture(scope="module")
def originals_engine(tmp_path_factory):
    """An EfficientNet-Lite0 index of the twelve demo originals only, with its engine."""
    folder = tmp_path_factory.mktemp("originals")
    for group in sorted(p for p in DEMO_DATABASE.iterdir() if p.is_dir()):
        shutil.copy(group / "original.jpg", folder / f"{group.name}.jpg")
    path = folder.parent / "originals.h5"
    build_index(folder, path, backbone="efficientnet-lite0", progress=False)
    return RetrievalEngine.open(path), folder


def test_transformed_copies_find_their_own_original_first(originals_engine):
    from PIL import Image

    engine, folder = originals_engine
    rng = np.random.default_rng(7)
    queries = hits = 0
    misses = []
    for original in sorted(folder.glob("*.jpg")):
        image = Image.open(original).convert("RGB")
        for _ in range(5):
            top = engine.search(engine.encode_images([random_view(image, rng)])[0], 1)[0]
            queries += 1
            hits += top.path == original.name
            if top.path != original.name:
                misses.append((original.name, top.path))
    rate = hits / queries
    print(f"top-1 hit rate {rate:.3f} over {queries} transformed queries; misses {misses}")
    assert queries == 60 and rate >= 0.9


def test_hits_are_ranked_with_paths_and_scores(originals_engine):
    engine, folder = originals_engine
    hits = engine.search_image(folder / "coffee.jpg", k=3)
    assert [h.rank for h in hits] == [1, 2, 3] and hits[0].path == "coffee.jpg"
    assert hits[0].score == pytest.approx(1.0, abs=1e-4) and hits[0].score >= hits[1].score >= hits[2].score
    assert engine.image_path(hits[0]) == folder.resolve() / "coffee.jpg"
    assert hits[0].as_dict()["path"] == "coffee.jpg"


def test_bad_query_bytes_raise_image_error(originals_engine):
    engine, _ = originals_engine
    with pytest.raises(ImageError, match="not an image"):
        engine.search_image(b"definitely not an image")


def test_query_expansion_and_search_by_id(originals_engine):
    from retrieval.search.expansion import QueryExpansion

    engine, _ = originals_engine
    row = engine.database.paths.index("coffee.jpg")
    plain = engine.search_id(row, 4)
    expanded = engine.search_id(row, 4, QueryExpansion("alpha", top_n=2))
    assert plain[0].id == row == expanded[0].id
    assert [h.score for h in plain] != [h.score for h in expanded]
    with pytest.raises(IndexError):
        engine.search_id(len(engine), 1)
    with pytest.raises(ValueError, match="unknown query expansion"):
        QueryExpansion("magic")


def test_whitened_database_whitens_queries_too(originals_engine):
    from retrieval.engine import RetrievalEngine
    from retrieval.descriptors.whitening import learn_pca_whitening

    engine, folder = originals_engine
    database = engine.database
    whitened = type(database)(**{**database.__dict__, "whitening": learn_pca_whitening(database.vectors, 8)})
    other = RetrievalEngine(whitened, engine.extractor)
    assert other.matrix.shape == (len(database), 8)
    hits = other.search_image(folder / "rocket.jpg", k=2)
    assert hits[0].path == "rocket.jpg" and hits[0].score == pytest.approx(1.0, abs=1e-4)


def test_a_large_query_is_worked_on_at_a_bounded_size():
    """A copy search reads a query at most twice SIFT's query side on its longest side, keeping its shortest side at
    twice the model's input or more (a panorama's strip windows keep their detail); a small one is left as it is."""
    from PIL import Image

    from retrieval.engine import at_working_size

    assert at_working_size(Image.new("RGB", (4032, 3024)), 224).size == (1280, 960)
    assert at_working_size(Image.new("RGB", (3024, 4032)), 224).size == (960, 1280)
    assert at_working_size(Image.new("RGB", (8000, 1000)), 224).size == (3584, 448)
    for size in ((1280, 720), (600, 400), (20000, 100)):
        image = Image.new("RGB", size)
        assert at_working_size(image, 224) is image


def test_a_large_jpeg_query_is_decoded_scaled_down(tmp_path):
    """A 12-megapixel JPEG is decoded at half its size (both sides still above what a copy search reads), its full
    size kept in ``source_size``; a PNG, which cannot be decoded smaller, is decoded whole."""
    from retrieval.engine import open_query
    from conftest import demo_photo

    photo = demo_photo("coffee").resize((4032, 3024))
    photo.save(tmp_path / "large.jpg", quality=90)
    decoded = open_query(tmp_path / "large.jpg")
    assert decoded.size == (2016, 1512) and decoded.info["source_size"] == (4032, 3024)
    photo.resize((2000, 1500)).save(tmp_path / "large.png")
    assert open_query(tmp_path / "large.png").size == (2000, 1500)
    with pytest.raises(ImageError, match="not an image"):
        open_query(b"definitely not an image")


def test_phone_sized_screenshots_find_their_photos(demo_photos_copy_index):
    """Each demo photo at 1,600 px inside a 4,032 x 3,024 page (a screenshot from a phone or a large screen), as a
    JPEG upload: searched at the working size, its picture is cut from the page where it is in the full page, found
    first and verified, as at 512 px."""
    import io

    from PIL import Image

    from conftest import DEMO_NAMES, demo_copies_first, demo_photo

    queries = []
    for n, name in enumerate(DEMO_NAMES):
        page = Image.new("RGB", (4032, 3024), (246, 246, 246))
        photo = demo_photo(name)
        page.paste(photo.resize((1600, round(1600 * photo.height / photo.width))), (300 + 97 * n, 420 + 31 * n))
        buffer = io.BytesIO()
        page.save(buffer, "JPEG", quality=90)
        queries.append(buffer.getvalue())
    engine = RetrievalEngine.open(demo_photos_copy_index)
    try:
        found, verified = demo_copies_first(engine, queries)
    finally:
        engine.close()
    assert found == len(DEMO_NAMES) and verified == len(DEMO_NAMES)
