"""MOP pooling (Gong et al. 2014): the pure maths with hand-worked values, the codebook's storage, and indexing with it
(learned once, kept at updates, taken from another file, refused when damaged), with the real EfficientNet-Lite0."""

import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import DEMO_DATABASE, REPO
from retrieval.descriptors import mop, mop_extract, pooling
from retrieval.engine import RetrievalEngine
from retrieval.errors import IndexFileError, RetrievalError
from retrieval.indexing import build_index
from retrieval.indexing.codebook import sample_paths
from retrieval.storage.database import read_database

SMALL = {"k": 4, "local_dim": 8, "level_dim": 4}  # sizes that a handful of test images can support


# --------------------------------------------------------------------------- maths, hand-worked


def test_power_normalisation_is_the_signed_power():
    np.testing.assert_allclose(mop.power_normalize(np.array([4.0, -9.0, 0.0, 0.25])), [2.0, -3.0, 0.0, 0.5])
    np.testing.assert_allclose(mop.power_normalize(np.array([-8.0, 27.0]), 1 / 3), [-2.0, 3.0])
    np.testing.assert_allclose(mop.power_normalize(np.array([-8.0, 3.0]), 1.0), [-8.0, 3.0])
    with pytest.raises(ValueError, match="power"):
        mop.power_normalize(np.ones(2), 0.0)


def test_intra_normalisation_scales_each_centroid_block_and_keeps_empty_blocks_zero():
    out = mop.intra_normalize(np.array([3.0, 4.0, 0.0, 0.0, 0.0, 2.0]), k=3)
    np.testing.assert_allclose(out, [0.6, 0.8, 0.0, 0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="multiple"):
        mop.intra_normalize(np.ones(5), k=2)


def test_vlad_residual_sums_and_normalisation_by_hand():
    x = np.array([[0.0, 1.0], [3.0, 0.0], [10.0, 10.0]])
    c = np.array([[1.0, 0.0], [10.0, 9.0]])
    # the first two go to centroid 0: (-1, 1) + (2, 0) = (1, 1); the last to centroid 1: (0, 1)
    np.testing.assert_array_equal(mop.assign(x, c), [0, 0, 1])
    np.testing.assert_allclose(mop.vlad_residuals(x, c), [1.0, 1.0, 0.0, 1.0])
    # sqrt -> [1, 1, 0, 1]; intra -> [1/√2, 1/√2, 0, 1]; L2 (norm √2) -> [1/2, 1/2, 0, 1/√2]
    np.testing.assert_allclose(mop.vlad(x, c), [0.5, 0.5, 0.0, 1 / np.sqrt(2)])
    # the power matters: residual (8, 0) and (0, -3) -> sqrt (2√2, 0), (0, -√3) -> intra (1, 0), (0, -1) -> / √2
    y = np.array([[5.0, 0.0], [5.0, 0.0], [10.0, 6.0]])
    np.testing.assert_allclose(mop.vlad_residuals(y, c), [8.0, 0.0, 0.0, -3.0])
    np.testing.assert_allclose(mop.vlad(y, c), np.array([1.0, 0.0, 0.0, -1.0]) / np.sqrt(2))
    # no descriptor near a centroid: its block stays zero
    np.testing.assert_allclose(mop.vlad(x[:2], c), [1 / np.sqrt(2), 1 / np.sqrt(2), 0.0, 0.0])


def test_kmeans_finds_two_obvious_clusters_and_is_deterministic():
    points = np.array([[0.0, 0.0], [0.0, 1.0], [10.0, 10.0], [10.0, 11.0], [0.0, 0.5]])
    centroids = mop.kmeans(points, 2)
    ordered = centroids[np.argsort(centroids[:, 0])]
    np.testing.assert_allclose(ordered, [[0.0, 0.5], [10.0, 10.5]])
    np.testing.assert_array_equal(mop.kmeans(points, 2), centroids)
    rng = np.random.default_rng(3)
    blobs = np.concatenate([rng.normal(centre, 0.1, size=(30, 3)) for centre in (0.0, 5.0, -5.0)])
    found = np.sort(mop.kmeans(blobs, 3)[:, 0])
    np.testing.assert_allclose(found, [-5.0, 0.0, 5.0], atol=0.1)
    with pytest.raises(ValueError, match="distinct points"):
        mop.kmeans(np.zeros((5, 2)), 2)


def test_window_boxes_follow_the_papers_grid():
    boxes = mop_extract.window_boxes(224, 224, 2, 8)
    assert len(boxes) == 25 and boxes[0] == (0, 0, 112, 112) and boxes[-1] == (112, 112, 112, 112)
    assert sorted({x for _, x, _, _ in boxes}) == [0, 28, 56, 84, 112]  # stride 28 = 224 / 8 (paper: 32 of 256)
    quarters = mop_extract.window_boxes(224, 160, 4, 8)
    assert len(quarters) == 49 and quarters[-1] == (168, 120, 56, 40)


def random_material(count, seed=0, dim=12, per_image=(9, 16)):
    rng = np.random.default_rng(seed)
    return mop.Material(np.abs(rng.normal(size=(count, dim))),
                        [[np.abs(rng.normal(size=(n, dim))) for _ in range(count)] for n in per_image])


def test_learned_codebook_encodes_unit_vectors_with_recorded_dims_and_survives_its_arrays():
    material = random_material(10)
    codebook = mop.learn_codebook(material, "mop", k=5, local_dim=6, level_dim=4, images_per_centroid=1)
    assert codebook.level_dims == [12, 4, 4] and codebook.dim == 20 and [lv.k for lv in codebook.levels] == [5, 5]
    vectors = mop.encode(material, codebook)
    assert vectors.shape == (10, 20) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # every level is one unit block of the concatenation: each holds 1/3 of the squared norm
    np.testing.assert_allclose((vectors[:, :12] ** 2).sum(axis=1), 1 / 3, atol=1e-5)
    arrays, attributes = mop.codebook_to_arrays(codebook)
    again = mop.codebook_from_arrays(arrays, attributes)
    assert again.digest() == codebook.digest()
    np.testing.assert_array_equal(mop.encode(material, again), vectors)
    # a batch is encoded image by image: one image alone gives the same vector
    np.testing.assert_allclose(mop.encode(material.take([3]), codebook)[0], vectors[3], atol=1e-6)
    # sizes shrink to what 3 images support (at most N - 1 VLAD components), and that is recorded
    small = mop.learn_codebook(random_material(3, seed=1), "mop", k=100, local_dim=64, level_dim=256)
    assert small.level_dims == [12, 2, 2] and [lv.k for lv in small.levels] == [2, 2]
    # k is capped at one centroid per IMAGES_PER_CENTROID training images (at least 2)
    capped = mop.learn_codebook(random_material(40, seed=2), "mop", k=100, local_dim=6, level_dim=4)
    assert [lv.k for lv in capped.levels] == [40 // mop.IMAGES_PER_CENTROID] * 2
    with pytest.raises(ValueError, match="at least 2 images"):
        mop.learn_codebook(random_material(1), "mop")


def test_damaged_codebook_arrays_are_refused():
    codebook = mop.learn_codebook(random_material(6), "mop", k=3, local_dim=4, level_dim=3, images_per_centroid=2)
    arrays, attributes = mop.codebook_to_arrays(codebook)
    broken = dict(arrays)
    broken["level2/centroids"] = broken["level2/centroids"][:, :2]
    with pytest.raises(ValueError, match="do not fit"):
        mop.codebook_from_arrays(broken, attributes)
    with pytest.raises(ValueError, match="missing"):
        mop.codebook_from_arrays({k: v for k, v in arrays.items() if not k.endswith("vlad_mean")}, attributes)
    nan = dict(arrays)
    nan["level3/centroids"] = np.full_like(arrays["level3/centroids"], np.nan)
    with pytest.raises(ValueError, match="NaN"):
        mop.codebook_from_arrays(nan, attributes)


def test_mop_names_are_poolings_that_pool_refuses():
    assert set(pooling.CODEBOOK_POOLINGS) <= set(pooling.POOLING_DEFAULTS)
    assert pooling.resolve_pooling_params("mop", {"k": 16}) == {"k": 16, "local_dim": 64, "level_dim": 256, "power": 0.5}
    with pytest.raises(ValueError, match="integer"):
        pooling.resolve_pooling_params("mop", {"k": 2.5})
    with pytest.raises(ValueError, match="at most"):
        pooling.resolve_pooling_params("mop-fast", {"fast_scale": 8})
    with pytest.raises(ValueError, match="codebook"):
        pooling.pool("mop", np.ones((1, 2, 2, 3), np.float32))


def test_sample_paths_are_evenly_spaced_and_deterministic():
    paths = [f"{i:04d}.jpg" for i in range(1000)]
    chosen = sample_paths(reversed(paths), 4)
    assert chosen == ["0000.jpg", "0250.jpg", "0500.jpg", "0750.jpg"]
    assert sample_paths(paths[:3], 4) == paths[:3]


# --------------------------------------------------------------------------- indexing with the real backbone


@pytest.fixture
def photos(tmp_path):
    """Eight demo photos (originals and views of four scenes)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for scene in ("coffee", "chelsea", "rocket", "astronaut"):
        shutil.copy(DEMO_DATABASE / scene / "original.jpg", folder / f"{scene}.jpg")
        shutil.copy(DEMO_DATABASE / scene / "view-01.jpg", folder / f"{scene}-view.jpg")
    return folder


def index(folder, path, **options):
    options.setdefault("backbone", "efficientnet-lite0")
    return build_index(folder, path, progress=False, **options)


@pytest.mark.parametrize("name", ["mop", "mop-fast"])
def test_index_learns_the_codebook_stores_it_and_queries_encode_alike(photos, tmp_path, name):
    path = tmp_path / "mop.h5"
    notes = []
    report = index(photos, path, pooling=name, pooling_params=SMALL, notice=notes.append)
    assert report.total == 8 and any("codebook learned on 8 images" in n for n in notes)
    db = read_database(path)
    codebook = db.codebook
    # dims recorded: the global 1280-d MAC plus two levels of at most N - 1 = 7 PCA components (asked: 4)
    assert codebook.level_dims == [1280, 4, 4] and db.encoder.dim == 1288 == db.vectors.shape[1]
    assert db.encoder.codebook == codebook.digest() and db.codebook_source == "database"
    with h5py.File(path, "r") as h5:
        assert h5["codebook/level2/centroids"].shape == (2, 8) and h5["codebook/level2/centroids"].fletcher32
        assert list(h5["codebook"].attrs["level_dims"]) == [1280, 4, 4]
    engine = RetrievalEngine.open(path)
    try:
        row = db.paths.index("chelsea.jpg")
        query = engine.encode(photos / "chelsea.jpg")
        assert float(query @ db.vectors[row]) == pytest.approx(1.0, abs=1e-5)
        assert engine.search(query, k=2)[0].path == "chelsea.jpg"
    finally:
        engine.close()


def test_update_keeps_the_codebook_and_encodes_new_images_with_it(photos, tmp_path):
    path = tmp_path / "mop.h5"
    index(photos, path, pooling="mop-fast", pooling_params=SMALL)
    first = read_database(path)
    shutil.copy(DEMO_DATABASE / "clock" / "original.jpg", photos / "clock.jpg")
    report = index(photos, path)
    assert (report.extracted, report.reused) == (1, 8)
    second = read_database(path)
    assert second.encoder == first.encoder and second.codebook.digest() == first.codebook.digest()
    for rel in first.paths:  # unchanged vectors kept bit for bit
        np.testing.assert_array_equal(second.vectors[second.paths.index(rel)], first.vectors[first.paths.index(rel)])
    engine = RetrievalEngine.open(path)
    try:
        query = engine.encode(photos / "clock.jpg")
        assert float(query @ second.vectors[second.paths.index("clock.jpg")]) == pytest.approx(1.0, abs=1e-5)
    finally:
        engine.close()
    # --rebuild re-learns on the current folder (9 images now)
    notes = []
    index(photos, path, rebuild=True, pooling="mop-fast", pooling_params=SMALL, notice=notes.append)
    assert read_database(path).codebook.images == 9 and any("learned on 9 images" in n for n in notes)


def test_codebook_from_another_index(photos, tmp_path):
    source = tmp_path / "source.h5"
    index(photos, source, pooling="mop-fast", pooling_params=SMALL)
    other = tmp_path / "other"
    other.mkdir()
    for name in ("coffee.jpg", "rocket.jpg"):
        shutil.copy(photos / name, other / name)
    target = tmp_path / "target.h5"
    notes = []
    index(other, target, pooling="mop-fast", codebook_from=source, notice=notes.append)  # settings from the source
    learned, taken = read_database(source), read_database(target)
    assert taken.codebook.digest() == learned.codebook.digest() and taken.encoder.identity() == learned.encoder.identity()
    assert taken.codebook_source == str(source.resolve()) and any("codebook taken from" in n for n in notes)
    # same encoder, same codebook: the same image gets the same vector in both
    np.testing.assert_allclose(taken.vectors[taken.paths.index("coffee.jpg")],
                               learned.vectors[learned.paths.index("coffee.jpg")], atol=1e-5)
    with pytest.raises(RetrievalError, match="pooling parameters"):
        index(other, tmp_path / "t2.h5", pooling="mop-fast", pooling_params={"k": 3}, codebook_from=source)
    plain = tmp_path / "plain.h5"
    index(other, plain)
    with pytest.raises(RetrievalError, match="has no MOP codebook"):
        index(other, tmp_path / "t3.h5", pooling="mop", codebook_from=plain)
    with pytest.raises(RetrievalError, match="--codebook-from is for"):
        index(other, tmp_path / "t4.h5", codebook_from=source, pooling="max")


def test_damaged_or_missing_codebook_is_refused_with_one_line(photos, tmp_path):
    path = tmp_path / "mop.h5"
    index(photos, path, pooling="mop-fast", pooling_params=SMALL)
    swapped = tmp_path / "swapped.h5"
    shutil.copy(path, swapped)
    with h5py.File(swapped, "r+") as h5:  # a well-formed but different codebook: the digest catches it
        data = h5["codebook/level2/centroids"]
        data[0, 0] = data[0, 0] + 0.5
    with pytest.raises(IndexFileError, match="not the one the vectors were encoded with") as caught:
        read_database(swapped)
    assert caught.value.kind == "corrupt" and "\n" not in str(caught.value)
    missing = tmp_path / "missing.h5"
    shutil.copy(path, missing)
    with h5py.File(missing, "r+") as h5:
        del h5["codebook"]
    with pytest.raises(IndexFileError, match="needs its codebook"):
        read_database(missing)
    # flipped bytes on disk: HDF5's checksum refuses them, and the command line prints one error line
    flipped = tmp_path / "flipped.h5"
    shutil.copy(path, flipped)
    with h5py.File(flipped, "r") as h5:
        offset = h5["codebook/level3/vlad_projection"].id.get_offset() or h5["codebook/level3/vlad_projection"].id.get_chunk_info(0).byte_offset
    raw = bytearray(flipped.read_bytes())
    raw[offset + 3] ^= 0xFF
    flipped.write_bytes(bytes(raw))
    result = subprocess.run([sys.executable, str(REPO / "query_online.py"), "--index", str(flipped), "--query",
                             str(photos / "coffee.jpg")], capture_output=True, text=True, cwd=REPO)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and "corrupt" in lines[-1], result.stderr


def test_mop_options_checked_before_any_work(photos, tmp_path):
    with pytest.raises(RetrievalError, match="leave --scales at 1"):
        index(photos, tmp_path / "x.h5", pooling="mop", scales=(1.0, 0.5))
    with pytest.raises(RetrievalError, match="--ray does not run"):
        index(photos, tmp_path / "x.h5", pooling="mop", ray="local")
