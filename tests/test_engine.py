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
