"""End-to-end: the real index.py and query_online.py in subprocesses, on temporary folders."""

import json
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import DEMO_DATABASE, REPO
from retrieval.storage.database import read_database


def run(script, *args, timeout=180):
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """image_folder-like tree indexed once by the real script; returns (folder, index path, stdout)."""
    folder = tmp_path_factory.mktemp("e2e") / "photos à voir"
    (folder / "sub dir").mkdir(parents=True)
    for group in ("coffee", "chelsea", "rocket"):
        shutil.copy(DEMO_DATABASE / group / "original.jpg", folder / f"{group}.jpg")
        shutil.copy(DEMO_DATABASE / group / "view-01.jpg", folder / "sub dir" / f"{group} vue é.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    index = folder.parent / "features.h5"
    result = run("index.py", "--database", folder, "--index", index, "--quiet")
    assert result.returncode == 0, result.stderr
    return folder, index, result


def test_index_summary_and_skip_report(indexed):
    folder, index, result = indexed
    assert "indexed 6 images (6 extracted" in result.stdout and "skipped 1" in result.stdout
    assert "skipped: broken.jpg:" in result.stderr and "Traceback" not in result.stderr
    assert "EfficientNet-Lite0 instead" in result.stderr  # no VGG16 weights here: one clear line says so
    assert "sub dir/coffee vue é.jpg" in read_database(index).paths


def test_query_prints_ranked_results(indexed):
    folder, index, _ = indexed
    result = run("query_online.py", "--query", folder / "sub dir" / "coffee vue é.jpg", "--index", index, "--top-k", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["rank", "score", "path"] and len(lines) == 4
    rank, score, path = lines[1].split(maxsplit=2)
    assert rank == "1" and float(score) > 0.999 and path == "sub dir/coffee vue é.jpg"
    assert lines[2].split(maxsplit=2)[2] == "coffee.jpg"


def test_query_json_montage_and_reference_flags(indexed, tmp_path):
    folder, index, _ = indexed
    montage = tmp_path / "montage.png"
    result = run("query_online.py", "-query", folder / "rocket.jpg", "-index", index, "-result", folder, "--json", "-k", "2", "--montage", montage)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert [r["path"] for r in payload["results"]] == ["rocket.jpg", "sub dir/rocket vue é.jpg"]
    assert payload["results"][0]["rank"] == 1 and payload["backbone"] == "efficientnet-lite0"
    with Image.open(montage) as picture:
        assert picture.width > 400 and picture.height > 200


def test_reference_demo_database_can_be_queried(tmp_path, indexed):
    folder, index, _ = indexed
    legacy = tmp_path / "featureCNN.h5"
    with h5py.File(legacy, "w") as h5:  # the reference's layout; its vectors are VGG16 ImageNet (none here)
        h5.create_dataset("dataset_1", data=np.ones((2, 512), np.float32))
        h5.create_dataset("dataset_2", data=np.array([b"a.jpg", b"b.jpg"]))
    result = run("query_online.py", "--query", folder / "rocket.jpg", "--index", legacy)
    assert_one_line_error(result, "VGG16", "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", "--weights FILE")
    assert "--backbone" not in result.stderr  # query_online.py has no such option


def test_reference_demo_database_made_with_other_weights_is_queried_with_them(tmp_path, indexed, seeded_vgg16_weights):
    folder, _, _ = indexed
    from retrieval.descriptors.extractor import Extractor
    from retrieval.storage.database import legacy_encoder
    from retrieval.models.backbones import file_md5

    encoder = legacy_encoder(weights_name="mine", weights_hash=file_md5(seeded_vgg16_weights))
    extractor = Extractor.for_database(encoder, seeded_vgg16_weights)
    vectors = extractor.encode_arrays([
        np.asarray(Image.open(folder / name).convert("RGB").resize((224, 224), Image.Resampling.NEAREST))
        for name in ("rocket.jpg", "coffee.jpg")
    ])
    legacy = tmp_path / "featureCNN.h5"
    with h5py.File(legacy, "w") as h5:  # what the reference demo writes: its own weights, recorded nowhere
        h5.create_dataset("dataset_1", data=vectors)
        h5.create_dataset("dataset_2", data=np.array([b"rocket.jpg", b"coffee.jpg"]))
    result = run("query_online.py", "--query", folder / "rocket.jpg", "--index", legacy, "--weights", seeded_vgg16_weights)
    assert result.returncode == 0, result.stderr
    first = [line.split() for line in result.stdout.splitlines() if line.strip().startswith("1 ")][0]
    assert first[-1] == "rocket.jpg" and float(first[1]) > 0.999


@pytest.mark.parametrize(
    "make_query, fragment",
    [
        (lambda d: d / "missing.jpg", "no such file"),
        (lambda d: d / "broken.jpg", "corrupt or truncated"),
    ],
)
def test_query_image_missing_or_corrupt(indexed, make_query, fragment):
    folder, index, _ = indexed
    assert_one_line_error(run("query_online.py", "--query", make_query(folder), "--index", index), fragment)


@pytest.mark.parametrize(
    "make_index, fragment",
    [
        (lambda d: d / "missing.h5", "no such index file"),
        (lambda d: (d / "corrupt.h5").write_bytes(b"\x89HDF\r\n\x1a\n garbage") and d / "corrupt.h5", "not a readable HDF5"),
        (lambda d: h5py.File(d / "foreign.h5", "w").close() or d / "foreign.h5", "not a feature database"),
    ],
)
def test_index_file_missing_corrupt_or_foreign(indexed, tmp_path, make_index, fragment):
    folder, _, _ = indexed
    assert_one_line_error(run("query_online.py", "--query", folder / "rocket.jpg", "--index", make_index(tmp_path)), fragment)


def test_index_bad_inputs(tmp_path):
    assert_one_line_error(run("index.py", "--database", tmp_path / "nope", "--index", tmp_path / "i.h5"), "no such folder")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("index.py", "--database", tmp_path / "empty", "--index", tmp_path / "i.h5"), "no image files found")
    result = run("index.py", "--database", tmp_path / "empty", "--index", tmp_path / "i.h5", "--batch-size", "0")
    assert result.returncode == 2 and "must be at least 1" in result.stderr
    assert_one_line_error(
        run("index.py", "--database", DEMO_DATABASE, "--index", tmp_path / "i.h5", "--backbone", "vgg16"),
        "VGG16 ImageNet weights not found", "--weights",
    )
    assert not (tmp_path / "i.h5").exists()


def test_vgg16_seeded_weights_through_the_scripts(tmp_path, seeded_vgg16_weights):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for group in ("coffee", "coins"):
        shutil.copy(DEMO_DATABASE / group / "original.jpg", folder / f"{group}.jpg")
    index = tmp_path / "vgg.h5"
    result = run("index.py", "-database", folder, "-index", index, "--backbone", "vgg16", "--weights", seeded_vgg16_weights, "--quiet")
    assert result.returncode == 0, result.stderr
    assert "[vgg16 max 512-d " in result.stdout
    result = run("query_online.py", "--query", folder / "coins.jpg", "--index", index, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["results"][0]["path"] == "coins.jpg"


def test_killed_run_keeps_the_old_index_and_the_rerun_resumes(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    sources = sorted(DEMO_DATABASE.rglob("*.jpg"))
    shutil.copy(sources[0], folder / "first.jpg")
    index = tmp_path / "i.h5"
    assert run("index.py", "--database", folder, "--index", index, "--quiet").returncode == 0
    old = index.read_bytes()
    for copy in range(4):
        for i, source in enumerate(sources):
            shutil.copy(source, folder / f"{copy}-{i}.jpg")
    total = 1 + 4 * len(sources)
    process = subprocess.Popen(
        [sys.executable, str(REPO / "index.py"), "--database", str(folder), "--index", str(index), "--quiet",
         "--batch-size", "4", "--checkpoint-every", "4"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    partial = tmp_path / "i.h5.partial"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None and len(list(partial.glob("chunk-*.npz"))) < 2:
        time.sleep(0.02)
    assert process.poll() is None, "indexing finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert index.read_bytes() == old  # the old index survived the kill untouched
    assert read_database(index).paths == ["first.jpg"]
    result = run("index.py", "--database", folder, "--index", index, "--quiet")
    assert result.returncode == 0, result.stderr
    assert ", 1 unchanged, " in result.stdout and "resumed" in result.stdout
    assert len(read_database(index)) == total and not partial.exists()


def test_query_expansion_flag_and_bad_values(indexed):
    folder, index, _ = indexed
    result = run("query_online.py", "--query", folder / "rocket.jpg", "--index", index, "--qe", "alpha", "--qe-top-n", "2", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["query_expansion"] == "alpha" and payload["results"][0]["path"] == "rocket.jpg"
    bad_alpha = run("query_online.py", "--query", folder / "rocket.jpg", "--index", index, "--qe", "avg", "--qe-alpha", "-1")
    assert bad_alpha.returncode == 2 and "--qe-alpha: must be a finite number >= 0" in bad_alpha.stderr
    assert run("query_online.py", "--query", folder / "rocket.jpg", "--index", index, "--qe", "best").returncode == 2


def test_index_option_errors_are_one_line(tmp_path):
    result = run("index.py", "--database", DEMO_DATABASE, "--index", tmp_path / "i.h5", "--pooling", "gem", "--pooling-param", "q=2")
    assert_one_line_error(result, "takes no parameter q")
    result = run("index.py", "--database", DEMO_DATABASE, "--index", tmp_path / "i.h5", "--scales", "1,abc")
    assert result.returncode == 2 and "comma-separated" in result.stderr
    assert not (tmp_path / "i.h5").exists()
