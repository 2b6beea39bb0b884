"""Visual words over stored local features (retrieval.search.visual_words) and the candidates they add to
verification (retrieval.search.copies.verified_ranking, QueryPipeline.search_copies)."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.descriptors.encoder import EncoderConfig
from retrieval.descriptors.local_features import extract_local_features, query_local_features
from retrieval.storage.copy_features import CopyFeatures
from retrieval.search.backends.memory import MemoryBackend
from retrieval.search.copies import QueryFeatures, verified_ranking
from retrieval.search.pipeline import QueryPipeline
from retrieval.search.verification import QueryLocalFeatures
from retrieval.search.visual_words import FAR, Vocabulary, VisualWords, learned, lloyd, nearest

from test_verification import PHOTOS, photo


def test_nearest_and_lloyd_find_separated_clusters():
    rng = np.random.default_rng(0)
    centres = np.eye(4, 8, dtype=np.float32) * 10
    points = np.concatenate([c + rng.normal(0, 0.1, (50, 8)).astype(np.float32) for c in centres])
    found = lloyd(points, 4, 8, np.random.default_rng(1))
    assert np.allclose(np.sort(np.abs(found).max(axis=1)), 10, atol=0.2)  # each centre found once
    labels = nearest(points, found)
    assert all(len(set(labels[i * 50 : (i + 1) * 50])) == 1 for i in range(4))
    assert len(set(labels)) == 4


def test_lloyd_with_fewer_points_than_centres_keeps_them_and_parks_the_rest_far_away():
    points = np.eye(3, 8, dtype=np.float32)
    centres = lloyd(points, 5, 8, np.random.default_rng(0))
    assert np.array_equal(centres[:3], points)
    assert np.all(centres[3:] == FAR)
    assert np.array_equal(nearest(points, centres), [0, 1, 2])


def random_unit(count: int, rng: np.random.Generator) -> np.ndarray:
    values = np.abs(rng.normal(size=(count, 128))).astype(np.float32)
    return values / np.linalg.norm(values, axis=1, keepdims=True)


def test_the_vocabulary_is_deterministic_and_its_words_in_range():
    points = random_unit(3000, np.random.default_rng(0))
    first, second = Vocabulary.learn(points, branch=8), Vocabulary.learn(points, branch=8)
    words = first.words(points)
    assert np.array_equal(words, second.words(points))
    assert first.size == 64 and words.min() >= 0 and words.max() < 64
    assert len(np.unique(words)) > 32  # the tree spreads them


def as_stored(unit: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(unit * 255), 0, 255).astype(np.uint8)


def test_a_query_sharing_an_images_descriptors_finds_it_first():
    rng = np.random.default_rng(0)
    count, per_image = 40, 60
    descriptors = as_stored(random_unit(count * per_image, rng))
    image = np.repeat(np.arange(count), per_image)
    words = VisualWords.of(descriptors, image, count)
    part = descriptors[image == 17][:30]  # half of image 17's keypoints, among others nobody has
    query = np.concatenate([part, as_stored(random_unit(40, rng))])
    scores = words.scores(query)
    assert scores.shape == (count,) and int(np.argmax(scores)) == 17
    assert words.top(query, 5)[0] == 17 and len(words.top(query, 5)) <= 5
    assert words.top(np.zeros((0, 128), np.uint8)).size == 0
    assert not scores[image[:: per_image] != 17].max() >= scores[17]


def test_no_descriptors_no_word_search():
    assert VisualWords.of(np.zeros((0, 128), np.uint8), np.zeros(0, np.int32), 3) is None


@pytest.fixture(scope="module")
def four_photos():
    return CopyFeatures.assemble(None, [extract_local_features(np.asarray(photo(name))) for name in PHOTOS], 8)


def test_a_word_candidate_the_descriptors_did_not_rank_is_verified_into_first_place(four_photos):
    query = QueryLocalFeatures(*query_local_features(np.asarray(photo("rocket", 330))))
    scores = np.array([0.5, 0.4, -np.inf, 0.3], np.float32)  # the rocket (row 2) not found by the descriptors
    order, fused, inliers = verified_ranking(scores, query, four_photos, top=2)
    assert 2 not in order  # verification alone never sees it
    order, fused, inliers = verified_ranking(scores, query, four_photos, top=2, also=[2, 3])
    assert order[0] == 2 and inliers[0] > 0 and fused[0] > 1
    assert list(order[1:]) == [0, 1, 3]  # the others keep their order: 3 was verified without success
    assert inliers[list(order).index(3)] == 0 and np.all(np.isfinite(fused))


def test_a_word_candidate_that_does_not_verify_stays_out_of_the_ranking(four_photos):
    query = QueryLocalFeatures(*query_local_features(np.asarray(photo("rocket", 330))))
    scores = np.array([0.5, 0.4, 0.6, -np.inf], np.float32)
    order, fused, inliers = verified_ranking(scores, query, four_photos, top=2, also=[3])
    assert 3 not in order and len(order) == 3 and np.all(np.isfinite(fused))
    assert order[0] == 2 and inliers[0] > 0


def test_the_mirror_image_is_verified_against_the_candidates_its_own_words_found(four_photos):
    """A mirrored copy ranked beyond the candidates the mirror image is checked against is verified when the mirror
    image's word search names it."""
    from PIL import ImageOps

    query = QueryLocalFeatures(*query_local_features(np.asarray(ImageOps.mirror(photo("rocket", 330)))))
    scores = np.array([0.5, 0.4, 0.3, 0.2], np.float32)  # the rocket (row 2) third
    order, _, inliers = verified_ranking(scores, query, four_photos, top=4, mirror_top=1)
    assert order[0] != 2 and inliers[list(order).index(2)] == 0  # only checked unmirrored: no match
    order, fused, inliers = verified_ranking(scores, query, four_photos, top=4, mirror_top=1, also_mirrored=[2])
    assert order[0] == 2 and inliers[0] > 0 and fused[0] > 1
    assert verified_ranking(scores, query, four_photos, top=4, mirror_top=4)[0][0] == 2  # the default reach finds it too


def test_without_word_candidates_the_ranking_is_the_verified_top(four_photos):
    query = QueryLocalFeatures(*query_local_features(np.asarray(photo("coffee", 330))))
    scores = np.array([0.1, 0.9, 0.2, 0.8], np.float32)
    plain = verified_ranking(scores, query, four_photos, top=4)
    same = verified_ranking(scores, query, four_photos, top=4, also=[1, 3])  # already verified: nothing changes
    assert all(np.array_equal(a, b) for a, b in zip(plain, same))
    assert plain[0][0] == 1 and plain[2][0] > 0


def test_the_pipeline_verifies_the_word_search_candidates(four_photos):
    """End to end through ``QueryPipeline.search_copies``: the descriptors rank the rocket last and only the first
    candidate is verified, yet the word search brings the rocket to verification and it comes first."""
    matrix = np.eye(4, 8, dtype=np.float32)
    pipeline = QueryPipeline(MemoryBackend(matrix), matrix, copies=four_photos)
    vector = np.array([0.8, 0.5, 0.1, 0.3, 0, 0, 0, 0], np.float32)  # the rocket (row 2) the least similar
    local = QueryLocalFeatures(*query_local_features(np.asarray(photo("rocket", 330))))
    rows, scores, inliers = pipeline.search_copies([QueryFeatures(vector, None, local)], 4, verify=True, verify_top=1)
    assert rows[0, 0] == 2 and inliers[0, 0] > 0 and scores[0, 0] > 1
    rows, _, inliers = pipeline.search_copies([QueryFeatures(vector, None, local)], 4, verify=False)
    assert list(rows[0]) == [0, 1, 3, 2] and np.all(inliers == -1)


@pytest.fixture
def commit():
    """The module ``retrieval.indexing.commit`` (the package exports a function of that name)."""
    import importlib

    return importlib.import_module("retrieval.indexing.commit")


def test_stored_words_round_trip_and_give_the_search_learned_ones_give(tmp_path, monkeypatch, four_photos, commit):
    """index.py stores the vocabulary and every keypoint's word from ``STORED_FROM_IMAGES`` images on; read back, they
    build the same inverted file as learning them when the database is loaded. A smaller database stores none."""
    import h5py

    from retrieval.errors import IndexFileError
    from retrieval.storage.database import FeatureDatabase, read_database, write_database

    features = CopyFeatures.assemble(None, [four_photos.local_of(row) for row in range(4)], 8)
    assert commit.with_visual_words(features).words is None  # 4 images: learned when loaded
    monkeypatch.setattr(commit, "STORED_FROM_IMAGES", 4)
    features = commit.with_visual_words(features)
    assert features.words.dtype == np.uint16 and features.words.shape == (len(features.descriptors),)
    database = FeatureDatabase(
        encoder=EncoderConfig("efficientnet-lite0", "imagenet", "md5:0", "top", "max", 224, "squash-bicubic", "float32", 8),
        vectors=np.eye(4, 8, dtype=np.float32), paths=list("abcd"), file_sizes=np.ones(4, np.int64),
        file_mtimes_ns=np.ones(4, np.int64), copies=features,
    )
    path = tmp_path / "words.h5"
    write_database(path, database)
    back = read_database(path).copies
    np.testing.assert_array_equal(back.words, features.words)
    np.testing.assert_array_equal(back.word_children, features.word_children)
    stored = QueryPipeline(MemoryBackend(database.vectors), database.vectors, copies=back).words
    learned = VisualWords.of(back.descriptors, back.keypoint_image, back.count)
    for name in ("image", "weight", "starts", "idf"):
        np.testing.assert_array_equal(getattr(stored, name), getattr(learned, name))
    query = query_local_features(np.asarray(photo("rocket", 330)))[0].descriptors
    assert stored.top(query)[0] == learned.top(query)[0] == 2
    back.words = np.zeros_like(back.words)  # the stored words are the ones used: every image's keypoints in word 0
    assert QueryPipeline(MemoryBackend(database.vectors), database.vectors, copies=back).words.starts[1] == 4

    # a word beyond the vocabulary is refused as corruption, in one line
    with h5py.File(path, "r+") as h5:
        h5["local/word"][0] = 64 * 64
    with pytest.raises(IndexFileError) as caught:
        read_database(path)
    assert caught.value.kind == "corrupt" and "visual words" in str(caught.value) and "\n" not in str(caught.value)


def test_index_py_stores_the_words_of_every_version(image_folder, tmp_path, monkeypatch, commit):
    """Built and updated through the indexing API: each version's words are learned on its own descriptors."""
    import shutil

    from conftest import DEMO_DATABASE
    from retrieval.indexing import build_index
    from retrieval.storage.database import read_database

    monkeypatch.setattr(commit, "STORED_FROM_IMAGES", 2)
    path = tmp_path / "words.h5"
    build_index(image_folder, path, backbone="efficientnet-lite0", local_features=True, progress=False, notice=lambda line: None)
    first = read_database(path).copies
    assert first.words is not None and first.words.shape == (len(first.descriptors),)
    shutil.copy(DEMO_DATABASE / "clock" / "original.jpg", image_folder / "clock.jpg")
    build_index(image_folder, path, backbone="efficientnet-lite0", progress=False, notice=lambda line: None)
    second = read_database(path).copies
    assert len(second.descriptors) > len(first.descriptors) and second.words.shape == (len(second.descriptors),)
    assert np.array_equal(second.words, learned(second.descriptors)[1])


def test_a_stored_image_searched_by_id_finds_its_mirrored_copy():
    """Searched by id, an image's mirror image comes from its stored features (no pixels): a mirrored copy verifies."""
    from PIL import ImageOps

    from retrieval.descriptors.local_features import LocalFeatures
    from retrieval.search.copies import stored_query
    from retrieval.search.verification import verify

    pictures = [photo("coffee", 512), ImageOps.mirror(photo("coffee", 512)), photo("rocket", 512)]
    copies = CopyFeatures.assemble(None, [extract_local_features(np.asarray(p)) for p in pictures], 8)
    query = stored_query(np.ones(8, np.float32), copies, 0)
    result = verify(query.local, [copies.local_of(1), copies.local_of(2)], mirror=[True, True])
    assert result.verified.tolist() == [True, False] and result.mirrored[0]
    unmirrored = verify(QueryLocalFeatures(query.local.direct, LocalFeatures.empty()), [copies.local_of(1)], mirror=[True])
    assert not unmirrored.verified[0]
