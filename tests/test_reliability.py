"""Faults a hostile audit found, each kept fixed: resumed descriptors kept, corruption refused, special files and
odd names handled, leftovers cleaned, ids and versions strict. Real HDF5 files, real scripts, a real Flask app."""

import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import DEMO_DATABASE, REPO
from retrieval.errors import IndexFileError, RetrievalError
from retrieval.indexing import WhiteningRequest, build_index
from retrieval.storage.checkpoint import Checkpoint
from retrieval.storage.database import read_database


def index(folder, path, **options):
    options.setdefault("backbone", "efficientnet-lite0")
    return build_index(folder, path, progress=False, notice=lambda line: None, **options)


def script(name, *args, timeout=120):
    return subprocess.run(
        [sys.executable, str(REPO / name), *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=timeout
    )


def one_line_error(result, fragment):
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and fragment in lines[-1], result.stderr
    assert "Traceback" not in result.stderr


def test_descriptors_resumed_from_a_killed_run_are_written(image_folder, tmp_path):
    """Audit item 1: a run killed after its checkpoint, before its commit; the next run must write those rows."""
    path = tmp_path / "i.h5"
    index(image_folder, path)
    db = read_database(path)
    shutil.copy(DEMO_DATABASE / "clock" / "original.jpg", image_folder / "clock.jpg")
    stat = (image_folder / "clock.jpg").stat()
    checkpoint = Checkpoint(path, db.encoder, str(image_folder.resolve()))
    checkpoint.add(["clock.jpg"], [stat.st_size], [stat.st_mtime_ns], db.vectors[:1].astype(np.float32))
    report = index(image_folder, path)
    assert (report.extracted, report.resumed, report.total, report.written) == (0, 1, 7, True)
    assert any("interrupted run" in reason for reason in report.reasons)
    assert "clock.jpg" in read_database(path).paths and not checkpoint.folder.exists()


def test_corrupted_vector_bytes_are_refused_by_every_reader(image_folder, tmp_path):
    """Audit item 2: overwrite bytes inside the vectors chunk; fletcher32 catches it, no NaN reaches anyone."""
    path = tmp_path / "i.h5"
    index(image_folder, path)
    with h5py.File(path, "r") as h5:
        offset = h5["vectors"].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as raw:
        raw.seek(offset + 64)
        raw.write(b"\xff" * 4096)
    with pytest.raises(IndexFileError, match="corrupt") as caught:
        read_database(path)
    assert caught.value.kind == "corrupt"
    one_line_error(script("query_online.py", "--query", DEMO_DATABASE / "coffee" / "original.jpg", "--index", path), "corrupt")
    one_line_error(script("evaluate.py", "--index", path, "--ground-truth", "folders"), "corrupt")
    one_line_error(script("index.py", "--database", image_folder, "--index", path, "--backbone", "efficientnet-lite0"), "corrupt")


def test_non_finite_vectors_in_an_old_file_are_refused(tmp_path, image_folder):
    path = tmp_path / "i.h5"
    index(image_folder, path)
    with h5py.File(path, "r+") as h5:  # a file without checksums (format 1) whose numbers went bad
        data = h5["vectors"][...]
        del h5["vectors"]
        data[0, 0] = np.nan
        h5.create_dataset("vectors", data=data)
        h5.attrs["format_version"] = 1
    with pytest.raises(IndexFileError, match="NaN"):
        read_database(path)


def test_special_files_never_hang(tmp_path, image_folder):
    """Audit item 9: a FIFO as --index, --whiten-from or ground truth gets one line at once."""
    fifo = tmp_path / "x.h5"
    os.mkfifo(fifo)
    one_line_error(script("query_online.py", "--query", DEMO_DATABASE / "coffee" / "original.jpg", "--index", fifo, timeout=30), "not a regular file")
    one_line_error(script("evaluate.py", "--index", fifo, "--ground-truth", "folders", timeout=30), "not a regular file")
    one_line_error(script("index.py", "--database", image_folder, "--index", fifo, timeout=30), "not a regular file")
    one_line_error(script("server.py", "--index", fifo, "--port", "0", timeout=30), "not a regular file")
    with pytest.raises(RetrievalError, match="not a regular file"):
        index(image_folder, tmp_path / "w.h5", whitening=WhiteningRequest(source=fifo))


def test_a_file_name_that_is_not_utf8_is_skipped_not_fatal(tmp_path, image_folder):
    """Audit item 10: one undecodable name never aborts the run."""
    shutil.copy(DEMO_DATABASE / "clock" / "original.jpg", os.fsencode(image_folder) + b"/bad-\xff.jpg")
    result = script("index.py", "--database", image_folder, "--index", tmp_path / "i.h5", "--backbone", "efficientnet-lite0", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "not valid UTF-8" in result.stderr and "indexed 6 images" in result.stdout
    assert not (tmp_path / "i.h5.partial").exists()


def test_unwritable_and_empty_locations_fail_before_extracting(tmp_path, image_folder):
    """Audit items 11 and 15."""
    (tmp_path / "file.txt").write_text("x")
    for target, fragment in ((tmp_path / "file.txt" / "x.h5", "cannot create its folder"),
                             (tmp_path / ("n" * 300) / "x.h5", "longer than 255 bytes"),
                             ("/proc/x.h5", "cannot write there")):
        one_line_error(script("index.py", "--database", image_folder, "--index", target, "--backbone", "efficientnet-lite0"), fragment)
    empty = script("index.py", "--database", "", "--index", tmp_path / "x.h5")
    assert empty.returncode == 2 and "empty path" in empty.stderr


def test_leftover_temporaries_of_killed_commits_are_removed(tmp_path, image_folder):
    """Audit item 4."""
    path = tmp_path / "i.h5"
    index(image_folder, path)
    for n in range(3):
        (tmp_path / f".i.h5.dead{n}.tmp").write_bytes(b"half a file")
    shutil.copy(DEMO_DATABASE / "clock" / "original.jpg", image_folder / "clock.jpg")
    index(image_folder, path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_paths_that_are_not_strings_or_not_relative_are_refused(tmp_path, image_folder):
    """Audit item 16."""
    path = tmp_path / "i.h5"
    index(image_folder, path)
    for bad in (np.arange(6), ["/etc/passwd"] + [f"x{i}.jpg" for i in range(5)], ["../up.jpg"] + [f"x{i}.jpg" for i in range(5)]):
        broken = tmp_path / "broken.h5"
        shutil.copy(path, broken)
        with h5py.File(broken, "r+") as h5:
            del h5["paths"]
            if isinstance(bad, np.ndarray):
                h5.create_dataset("paths", data=bad)
            else:
                h5.create_dataset("paths", data=bad, dtype=h5py.string_dtype("utf-8"))
            h5.attrs["format_version"] = 1
        with pytest.raises(IndexFileError, match="strings|relative path"):
            read_database(broken)


@pytest.fixture
def app_and_index(tmp_path, image_folder):
    from retrieval.web import create_app

    path = tmp_path / "i.h5"
    index(image_folder, path)
    app = create_app(path, config={"TESTING": True, "INDEX_CHECK_INTERVAL": 0})
    return app, path, image_folder


def test_ids_are_plain_ascii_digits(app_and_index):
    """Audit item 13."""
    client = app_and_index[0].test_client()
    assert client.get("/image/1").status_code == 200
    for odd in ("01", "%D9%A1", "%EF%BC%91", "+1", "-0", "1.0"):
        assert client.get(f"/image/{odd}").status_code == 404, odd
        assert client.get(f"/thumb/{odd}").status_code == 404, odd
    assert client.get("/api/search?id=01").status_code == 400


def test_old_image_urls_never_show_another_image(app_and_index):
    """Audit item 14: after an update, a URL of the old version answers 409, never a different picture."""
    app, path, folder = app_and_index
    client = app.test_client()
    old = client.get("/api/sample?n=6").get_json()
    (folder / "astronaut.jpg").unlink()
    shutil.copy(DEMO_DATABASE / "clock" / "original.jpg", folder / "a-clock.jpg")
    index(folder, path)
    assert client.get("/healthz").get_json()["version"] != old["version"]
    for item in old["items"]:
        assert client.get(item["image_url"]).status_code == 409
        assert client.get(item["thumb_url"]).status_code == 409
    new = client.get("/api/sample?n=6").get_json()
    assert all(client.get(item["image_url"]).status_code == 200 for item in new["items"])


def test_upload_limit_is_the_file_limit_and_form_parts_are_bounded(app_and_index):
    """Audit item 8."""
    import io

    app = app_and_index[0]
    app.config["MAX_UPLOAD_BYTES"] = 100_000
    app.config["MAX_CONTENT_LENGTH"] = 100_000 + 64 * 1024
    client = app.test_client()
    just_under = b"\xff\xd8" + b"\0" * (100_000 - 2)
    response = client.post("/api/search", data={"image": (io.BytesIO(just_under), "q.jpg")}, content_type="multipart/form-data")
    assert response.status_code == 415  # judged as an image (it is not one), not refused for its size
    over = b"\0" * 100_001
    response = client.post("/api/search", data={"image": (io.BytesIO(over), "q.jpg")}, content_type="multipart/form-data")
    assert response.status_code == 413 and "limit is 100000 bytes" in response.get_json()["error"]
    fields = {f"f{i}": "x" for i in range(200)}
    response = client.post("/api/search", data=fields, content_type="multipart/form-data")
    assert response.status_code == 413 and "too many form fields" in response.get_json()["error"]
