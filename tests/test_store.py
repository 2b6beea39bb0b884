import json

import h5py
import numpy as np
import pytest

from retrieval.storage import database as store
from retrieval.errors import IndexFileError
from retrieval.descriptors.encoder import EncoderConfig
from retrieval.storage.checkpoint import Checkpoint
from retrieval.vectors import l2_normalize
from retrieval.storage.database import FeatureDatabase, read_database, write_database


def encoder(dim=4, **changes):
    fields = dict(
        backbone="efficientnet-lite0", weights_name="imagenet", weights_hash="md5:abc", layer="_relu_head",
        pooling="max", input_size=224, resize_rule="squash-bicubic", precision="float32", dim=dim,
    )
    fields.update(changes)
    return EncoderConfig(**fields)


def database(paths=("a.jpg", "sub dir/café é.png", "日本.gif"), dim=4):
    rng = np.random.default_rng(0)
    vectors = l2_normalize(rng.normal(size=(len(paths), dim)))
    return FeatureDatabase(
        encoder=encoder(dim), vectors=vectors, paths=list(paths),
        file_sizes=np.arange(len(paths), dtype=np.int64) + 100, file_mtimes_ns=np.arange(len(paths), dtype=np.int64) * 7,
        image_root="/images",
    )


def test_round_trip_keeps_everything_including_non_ascii_paths(tmp_path):
    original = database()
    write_database(tmp_path / "i.h5", original)
    loaded = read_database(tmp_path / "i.h5")
    assert loaded.paths == original.paths
    np.testing.assert_array_equal(loaded.vectors, original.vectors)
    np.testing.assert_array_equal(loaded.file_sizes, original.file_sizes)
    np.testing.assert_array_equal(loaded.file_mtimes_ns, original.file_mtimes_ns)
    assert loaded.encoder == original.encoder and loaded.image_root == "/images" and not loaded.legacy
    with h5py.File(tmp_path / "i.h5") as h5:  # self-explaining for other tools too
        assert h5.attrs["format"] == store.FORMAT_NAME and h5.attrs["encoder_pooling"] == "max"
        assert "numpy" in json.loads(h5.attrs["software"])
    assert loaded.image_sizes is None and loaded.image_size(0) == (-1, -1)  # not recorded: unknown


def test_image_sizes_round_trip_with_checksums_and_wrong_shapes_are_refused(tmp_path):
    sized = database()
    sized.image_sizes = np.array([[640, 480], [-1, -1], [1, 2]], np.int64)
    write_database(tmp_path / "i.h5", sized)
    loaded = read_database(tmp_path / "i.h5")
    np.testing.assert_array_equal(loaded.image_sizes, sized.image_sizes)
    assert loaded.image_size(0) == (640, 480) and loaded.image_size(1) == (-1, -1)
    with h5py.File(tmp_path / "i.h5", "a") as h5:
        assert h5["image_sizes"].fletcher32
        del h5["image_sizes"]
        h5.create_dataset("image_sizes", data=np.zeros((2, 2), np.int64))
    with pytest.raises(IndexFileError, match="image_sizes has shape"):
        read_database(tmp_path / "i.h5")


def test_empty_database_round_trips(tmp_path):
    write_database(tmp_path / "e.h5", database(paths=()))
    assert len(read_database(tmp_path / "e.h5")) == 0


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "i.h5"
    write_database(target, database())
    before = target.read_bytes()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", crash)
    with pytest.raises(IndexFileError, match="disk full.*previous one is unchanged"):
        write_database(target, database(paths=("only.jpg",)))
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.h5"]


def test_reads_the_reference_demo_format(tmp_path):
    legacy = tmp_path / "featureCNN.h5"
    feats = np.random.default_rng(1).normal(size=(3, 512)).astype(np.float32) * 5
    with h5py.File(legacy, "w") as h5:
        h5.create_dataset("dataset_1", data=feats)
        h5.create_dataset("dataset_2", data=np.array([b"a.jpg", "é.jpg".encode(), b"c.png"]))
    loaded = read_database(legacy)
    assert loaded.legacy and loaded.paths == ["a.jpg", "é.jpg", "c.png"]
    assert loaded.encoder.backbone == "vgg16" and loaded.encoder.resize_rule == "squash-nearest"
    np.testing.assert_allclose(np.linalg.norm(loaded.vectors, axis=1), 1, rtol=1e-5)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "no such index file"),
        (lambda p: p.write_bytes(b"not hdf5 at all"), "not a readable HDF5"),
        (lambda p: p.write_bytes(b""), "not a readable HDF5"),
        (lambda p: h5py.File(p, "w").close(), "not a feature database"),
    ],
)
def test_unusable_files_get_one_line_errors(tmp_path, make, message):
    path = tmp_path / "x.h5"
    make(path)
    with pytest.raises(IndexFileError, match=message) as caught:
        read_database(path)
    assert "\n" not in str(caught.value)


def test_newer_format_and_wrong_dimension_are_refused(tmp_path):
    path = tmp_path / "i.h5"
    write_database(path, database())
    with h5py.File(path, "a") as h5:
        h5.attrs["format_version"] = store.FORMAT_VERSION + 1
    with pytest.raises(IndexFileError, match="newer"):
        read_database(path)
    write_database(path, database())
    with h5py.File(path, "a") as h5:
        h5.attrs["encoder"] = encoder(dim=8).to_json()
    with pytest.raises(IndexFileError, match="expected"):
        read_database(path)
    with pytest.raises(IndexFileError, match="is a folder"):
        read_database(tmp_path)


def test_checkpoint_append_resume_and_discard(tmp_path):
    index = tmp_path / "i.h5"
    first = Checkpoint(index, encoder(), "/root")
    assert first.load() == {}
    first.add(["a.jpg", "é b.jpg"], [1, 2], [10, 20], np.eye(2, 4, dtype=np.float32))
    first.add(["c.jpg"], [3], [30], np.ones((1, 4), np.float32), [(640, 480)])
    again = Checkpoint(index, encoder(), "/root")
    entries = again.load()
    assert sorted(entries) == ["a.jpg", "c.jpg", "é b.jpg"] and entries["c.jpg"][:2] == (3, 30)
    assert entries["c.jpg"][3] == (640, 480) and entries["a.jpg"][3] == (-1, -1)
    again.add(["d.jpg"], [4], [40], np.ones((1, 4), np.float32))  # does not overwrite an earlier chunk
    assert len(Checkpoint(index, encoder(), "/root").load()) == 4
    # a checkpoint made with other settings is thrown away, not mixed in
    assert Checkpoint(index, encoder(pooling="avg"), "/root").load() == {}
    assert not (tmp_path / "i.h5.partial").exists()


def test_damaged_checkpoint_chunk_is_ignored(tmp_path):
    index = tmp_path / "i.h5"
    checkpoint = Checkpoint(index, encoder(), "/root")
    checkpoint.add(["a.jpg"], [1], [10], np.ones((1, 4), np.float32))
    (tmp_path / "i.h5.partial" / "chunk-000007.npz").write_bytes(b"garbage")
    assert list(Checkpoint(index, encoder(), "/root").load()) == ["a.jpg"]


def test_encoder_config_rejects_unknown_fields():
    text = json.dumps({**json.loads(encoder().to_json()), "new_field": 1})
    with pytest.raises(IndexFileError, match="newer version"):
        EncoderConfig.from_json(text)
