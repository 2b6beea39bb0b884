import os
import shutil

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import DEMO_DATABASE, write_rgb
from retrieval.errors import IndexFileError, RetrievalError
from retrieval.indexing import build_index
from retrieval.store import Checkpoint, read_database


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
    with pytest.raises(IndexFileError, match="is a folder"):
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
    assert not (tmp_path / "i.h5.partial").exists()


def test_vgg16_with_seeded_weights_writes_512_d_vectors(image_folder, tmp_path, seeded_vgg16_weights):
    path = tmp_path / "vgg.h5"
    report = build_index(image_folder, path, backbone="vgg16", weights_file=seeded_vgg16_weights, progress=False)
    db = read_database(path)
    assert report.total == 6 and db.vectors.shape == (6, 512)
    assert db.encoder.backbone == "vgg16" and db.encoder.layer == "block5_conv3" and db.encoder.weights_name == "seeded_vgg16.weights.h5"
    np.testing.assert_allclose(np.linalg.norm(db.vectors, axis=1), 1, rtol=1e-5)
