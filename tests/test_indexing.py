import os
import shutil

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import DEMO_DATABASE
from retrieval.errors import IndexFileError, RetrievalError
from retrieval.indexing import build_index
from retrieval.storage.checkpoint import Checkpoint
from retrieval.storage.database import read_database


def index(folder, path, **options):
    options.setdefault("backbone", "efficientnet-lite0")
    return build_index(folder, path, progress=False, **options)


def test_build_then_incremental_add_change_delete(image_folder, tmp_path):
    path = tmp_path / "i.h5"
    first = index(image_folder, path)
    assert (first.total, first.extracted, first.written) == (6, 6, True)
    db = read_database(path)
    assert db.paths == sorted(db.paths) and "sub dir é/café crème.JPG" in db.paths
    assert db.vectors.shape == (6, 1280) and db.encoder.pooling == "max"

    # nothing changed: nothing extracted, the file is not rewritten
    stamp = path.stat().st_mtime_ns
    again = index(image_folder, path)
    assert (again.extracted, again.reused, again.written) == (0, 6, False) and path.stat().st_mtime_ns == stamp

    # add one, replace one with another picture, delete one
    shutil.copy(DEMO_DATABASE / "clock" / "original.jpg", image_folder / "clock.jpg")
    old_vector = db.vectors[db.paths.index("rocket.jpg")]
    shutil.copy(DEMO_DATABASE / "brick" / "original.jpg", image_folder / "rocket.jpg")
    os.utime(image_folder / "rocket.jpg", ns=(1, 1))  # a replaced file may keep its size: the mtime still differs
    (image_folder / "astronaut.jpg").unlink()
    report = index(image_folder, path)
    assert (report.extracted, report.reused, report.removed, report.total) == (2, 4, 1, 6)
    db2 = read_database(path)
    assert "astronaut.jpg" not in db2.paths and "clock.jpg" in db2.paths
    assert float(db2.vectors[db2.paths.index("rocket.jpg")] @ old_vector) < 0.9


def test_image_sizes_are_recorded_and_kept_across_updates(image_folder, tmp_path):
    path = tmp_path / "i.h5"
    wide = Image.new("RGB", (300, 120), "green")
    wide.save(image_folder / "wide.png")
    index(image_folder, path)
    expected = {rel: Image.open(image_folder / rel).size for rel in read_database(path).paths}
    db = read_database(path)
    assert {rel: db.image_size(i) for i, rel in enumerate(db.paths)} == expected and expected["wide.png"] == (300, 120)
    Image.new("RGB", (50, 70), "red").save(image_folder / "tall.png")
    index(image_folder, path)  # the kept images keep their sizes, the new one gets its own
    db2 = read_database(path)
    assert db2.image_size(db2.paths.index("tall.png")) == (50, 70)
    assert all(db2.image_size(db2.paths.index(rel)) == size for rel, size in expected.items())


def test_bad_files_are_skipped_and_listed_never_abort(image_folder, tmp_path):
    (image_folder / "empty.jpg").write_bytes(b"")
    (image_folder / "text.png").write_text("hello")
    good = (DEMO_DATABASE / "coins" / "original.jpg").read_bytes()
    (image_folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    Image.new("1", (20_000, 20_000)).save(image_folder / "bomb.png")
    report = index(image_folder, tmp_path / "i.h5")
    skipped = dict(report.skipped)
    assert set(skipped) == {"empty.jpg", "text.png", "truncated.jpg", "bomb.png"}
    assert "empty" in skipped["empty.jpg"] and "decompression bomb" in skipped["bomb.png"]
    assert report.total == 6 and len(read_database(tmp_path / "i.h5")) == 6
    assert "skipped 4" in report.summary()


def test_missing_empty_and_wrong_folders(tmp_path):
    with pytest.raises(RetrievalError, match="no such folder"):
        index(tmp_path / "missing", tmp_path / "i.h5")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(RetrievalError, match="no image files found"):
        index(tmp_path / "empty", tmp_path / "i.h5")
    with pytest.raises(RetrievalError, match="not a folder"):
        index(tmp_path / "empty" / "readme.txt", tmp_path / "i.h5")
    with pytest.raises(RetrievalError, match="is a folder"):
        index(tmp_path / "empty", tmp_path)
    assert not (tmp_path / "i.h5").exists()


def test_all_files_unreadable_writes_nothing_and_keeps_the_old_index(tmp_path, image_folder):
    path = tmp_path / "i.h5"
    index(image_folder, path)
    before = path.read_bytes()
    for file in image_folder.rglob("*.*"):
        file.write_bytes(b"garbage")
    with pytest.raises(RetrievalError, match="none of the 6 image files could be read"):
        index(image_folder, path)
    assert path.read_bytes() == before


def test_existing_index_settings_are_kept_or_rebuilt_explicitly(image_folder, tmp_path):
    path = tmp_path / "i.h5"
    index(image_folder, path)
    with pytest.raises(IndexFileError, match="was built with pooling max; rerun with --rebuild"):
        index(image_folder, path, pooling="avg")
    with pytest.raises(IndexFileError, match="backbone efficientnet-lite0"):
        index(image_folder, path, backbone="vgg16")
    assert index(image_folder, path, backbone="auto").extracted == 0  # auto means: whatever the index has
    rebuilt = index(image_folder, path, pooling="avg", rebuild=True)
    assert rebuilt.extracted == 6 and read_database(path).encoder.pooling == "avg"


def test_reference_demo_index_is_not_overwritten_silently(image_folder, tmp_path):
    legacy = tmp_path / "legacy.h5"
    with h5py.File(legacy, "w") as h5:
        h5.create_dataset("dataset_1", data=np.ones((1, 512), np.float32))
        h5.create_dataset("dataset_2", data=np.array([b"a.jpg"]))
    with pytest.raises(IndexFileError, match="--rebuild"):
        index(image_folder, legacy)
    assert index(image_folder, legacy, rebuild=True).total == 6


def test_checkpoint_of_an_interrupted_run_is_resumed(image_folder, tmp_path):
    path = tmp_path / "i.h5"
    first = index(image_folder, tmp_path / "reference.h5")
    encoder = first.encoder
    stat = (image_folder / "coffee.jpg").stat()
    marker = np.zeros(1280, np.float32)
    marker[0] = 1.0  # a vector no real extraction produces: proves the checkpoint was used
    Checkpoint(path, encoder, str(image_folder.resolve())).add(["coffee.jpg"], [stat.st_size], [stat.st_mtime_ns], marker[None])
    report = index(image_folder, path)
    assert (report.resumed, report.extracted, report.total) == (1, 5, 6)
    db = read_database(path)
    np.testing.assert_array_equal(db.vectors[db.paths.index("coffee.jpg")], marker)
    # a checkpoint without image sizes leaves that row unknown; the extracted ones have theirs
    assert db.image_size(db.paths.index("coffee.jpg")) == (-1, -1)
    assert db.image_size(db.paths.index("rocket.jpg")) == Image.open(image_folder / "rocket.jpg").size
    assert not (tmp_path / "i.h5.partial").exists()


def test_vgg16_with_seeded_weights_writes_512_d_vectors(image_folder, tmp_path, seeded_vgg16_weights):
    path = tmp_path / "vgg.h5"
    report = build_index(image_folder, path, backbone="vgg16", weights_file=seeded_vgg16_weights, progress=False)
    db = read_database(path)
    assert report.total == 6 and db.vectors.shape == (6, 512)
    assert db.encoder.backbone == "vgg16" and db.encoder.layer == "block5_conv3" and db.encoder.weights_name == "seeded_vgg16.weights.h5"
    np.testing.assert_allclose(np.linalg.norm(db.vectors, axis=1), 1, rtol=1e-5)


def test_whitening_learned_on_the_database_is_stored_and_relearned_on_update(tmp_path):
    from retrieval.indexing import WhiteningRequest

    folder = tmp_path / "demo"
    shutil.copytree(DEMO_DATABASE, folder)
    path = tmp_path / "w.h5"
    index(folder, path, whitening=WhiteningRequest(learn=True))
    db = read_database(path)
    assert db.whitening is not None and db.whitening_source == "database" and db.whitening.samples == 49
    assert db.whitening.dim == 49 // 4 and db.whitening.power == 0.5  # at most one dimension per 4 images
    assert db.vectors.shape == (49, 1280)  # raw vectors stay; readers whiten
    for extra in range(3):
        shutil.copy(DEMO_DATABASE / "clock" / "original.jpg", folder / f"clock-{extra}.jpg")
    index(folder, path)
    again = read_database(path)
    assert again.whitening.samples == 52 and again.whitening.dim == 13  # re-learned on the grown database

    index(folder, path, rebuild=True, whitening=WhiteningRequest(learn=True, dim=5, power=0.0))
    (folder / "clock-0.jpg").unlink()
    index(folder, path)
    kept = read_database(path)
    assert (kept.whitening.dim, kept.whitening.power, kept.whitening_requested_dim) == (5, 0.0, 5)  # choices kept


def test_whitening_refuses_more_dimensions_than_the_images_support(image_folder, tmp_path):
    from retrieval.indexing import WhiteningRequest

    with pytest.raises(RetrievalError, match="needs 4 images per dimension; use --whiten-dim 1 or less"):
        index(image_folder, tmp_path / "w.h5", whitening=WhiteningRequest(learn=True, dim=3))
    (image_folder / "coffee.jpg").unlink()
    (image_folder / "rocket.jpg").unlink()
    (image_folder / "astronaut.jpg").unlink()
    with pytest.raises(RetrievalError, match="from 3 images: it needs at least 4"):
        index(image_folder, tmp_path / "w.h5", whitening=WhiteningRequest(learn=True))
    assert not (tmp_path / "w.h5").exists()


def test_whitening_from_another_index_must_match_its_encoder(image_folder, tmp_path):
    from retrieval.indexing import WhiteningRequest

    training = tmp_path / "training.h5"
    index(image_folder, training)
    path = tmp_path / "w.h5"
    index(image_folder, path, whitening=WhiteningRequest(source=training))
    db = read_database(path)
    assert db.whitening is not None and db.whitening_source == str(training.resolve())
    other = tmp_path / "avg.h5"
    index(image_folder, other, pooling="avg")
    with pytest.raises(RetrievalError, match="other encoder settings"):
        index(image_folder, tmp_path / "x.h5", whitening=WhiteningRequest(source=other))


def test_float16_storage_halves_the_matrix_and_keeps_the_ranking(image_folder, tmp_path):
    from retrieval.engine import RetrievalEngine

    index(image_folder, tmp_path / "f32.h5")
    index(image_folder, tmp_path / "f16.h5", storage="float16")
    f32, f16 = read_database(tmp_path / "f32.h5"), read_database(tmp_path / "f16.h5")
    assert f16.vectors.dtype == np.float16 and f16.vectors.nbytes * 2 == f32.vectors.nbytes
    for row in range(len(f32)):
        exact = RetrievalEngine(f32, None).search(f32.vectors[row], 6)
        half = RetrievalEngine(f16, None).search(f32.vectors[row], 6)
        assert [h.id for h in exact] == [h.id for h in half]
    assert index(image_folder, tmp_path / "f16.h5").written is False  # an update keeps float16


def test_hnsw_graph_follows_the_database_version(image_folder, tmp_path):
    from retrieval.engine import RetrievalEngine
    from retrieval.search.backends.memory import hnsw_path

    path = tmp_path / "i.h5"
    assert index(image_folder, path, ann="hnsw").ann == "hnsw"
    first = read_database(path)
    assert hnsw_path(path, first.database_id).is_file()
    engine = RetrievalEngine.open(path, with_extractor=False)
    assert engine.pipeline.kind == "hnsw"
    assert engine.search(first.vectors[2], 1)[0].id == 2
    shutil.copy(DEMO_DATABASE / "clock" / "original.jpg", image_folder / "clock.jpg")
    index(image_folder, path, ann="hnsw")
    second = read_database(path)
    graphs = sorted(p.name for p in tmp_path.glob("i.h5.*.hnsw"))
    assert graphs == [hnsw_path(path, second.database_id).name]  # the stale graph is gone
    index(image_folder, path, ann="off")
    assert not list(tmp_path.glob("i.h5.*.hnsw"))
    assert RetrievalEngine.open(path, with_extractor=False).pipeline.kind == "exact"


def test_multi_scale_aspect_and_pooling_parameters_are_recorded(image_folder, tmp_path):
    path = tmp_path / "ms.h5"
    report = index(image_folder, path, pooling="gem", pooling_params={"p": 4}, scales=(1.0, 0.707), resize_rule="aspect-bicubic", input_size=256)
    encoder = read_database(path).encoder
    assert (encoder.pooling, encoder.pooling_params, encoder.scales, encoder.resize_rule, encoder.input_size) == (
        "gem", {"p": 4.0}, [1.0, 0.707], "aspect-bicubic", 256)
    assert report.extracted == 6
    with pytest.raises(IndexFileError, match="scales"):
        index(image_folder, path, scales=(1.0,))
    with pytest.raises(IndexFileError, match="pooling parameters"):
        index(image_folder, path, pooling_params={"p": 2})
    with pytest.raises(RetrievalError, match="scales must be"):
        index(image_folder, tmp_path / "bad.h5", scales=(2.0,))
    with pytest.raises(RetrievalError, match="takes no parameter p"):
        index(image_folder, tmp_path / "bad.h5", pooling="max", pooling_params={"p": 2})
