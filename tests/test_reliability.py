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


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MB tmpfs (CI runs as root); the test says why when it cannot mount one."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'not root'}): the disk-full tests need one")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(folder, leave_kb):
    filler = folder / "filler"
    filler.unlink(missing_ok=True)
    free = shutil.disk_usage(folder).free
    filler.write_bytes(b"\0" * max(0, free - leave_kb * 1024))


@pytest.mark.parametrize("leave_kb", [60, 250])
def test_a_full_disk_gives_one_line_and_keeps_the_previous_index(small_disk, tmp_path, leave_kb):
    """Audit item 3: checkpoint or commit on a full disk: one error line, exit 1, old index intact, no temporaries."""
    folder = tmp_path / "few"
    folder.mkdir()
    for group in ("coffee", "chelsea"):
        shutil.copytree(DEMO_DATABASE / group, folder / group)
    path = small_disk / "demo.h5"
    index(folder, path)
    before = path.read_bytes()
    fill(small_disk, leave_kb)
    result = script("index.py", "--database", DEMO_DATABASE, "--index", path, "--backbone", "efficientnet-lite0",
                    "--quiet", "--checkpoint-every", "8")
    one_line_error(result, "space")
    assert path.read_bytes() == before
    assert not [p.name for p in small_disk.iterdir() if p.name.endswith(".tmp")]


def test_a_disk_that_fills_during_the_write_is_an_error_not_a_crash(small_disk):
    """Past the free-space check (another program filled the disk meanwhile) the write still fails cleanly."""
    code = f"""
import numpy as np
from retrieval.storage import database
from retrieval.storage.database import FeatureDatabase, write_database
from retrieval.descriptors.encoder import EncoderConfig
from retrieval.errors import IndexFileError
database.check_free_space = lambda path, needed: None
encoder = EncoderConfig("vgg16", "imagenet", "md5:0", "block5_conv3", "max", 224, "squash-bicubic", "float32", 512)
vectors = np.eye(1000, 512, dtype=np.float32)
db = FeatureDatabase(encoder, vectors, [f"{{i}}.jpg" for i in range(1000)], np.zeros(1000, np.int64), np.zeros(1000, np.int64))
try:
    write_database({str(small_disk / 'big.h5')!r}, db)
except IndexFileError as exc:
    print("refused:", exc)
"""
    fill(small_disk, 200)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout and "no space left" in result.stdout
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_a_huge_sixteen_bit_png_is_refused_before_decoding():
    """Audit item 5: a 155 kB 16-bit 8944x8944 PNG once cost 2 GB per request; now it is refused from its header."""
    import io
    import time

    from PIL import Image

    from retrieval.errors import ImageError
    from retrieval.images import open_image

    buffer = io.BytesIO()
    Image.fromarray(np.full((8944, 8944), 7, np.uint16)).save(buffer, format="PNG")
    started = time.perf_counter()
    with pytest.raises(ImageError, match="too much memory") as caught:
        open_image(buffer.getvalue())
    assert caught.value.kind == "too_large" and time.perf_counter() - started < 1.0


def test_sixteen_bit_images_convert_without_float64_copies():
    import io
    import tracemalloc

    from PIL import Image

    from retrieval.images import open_image

    values = (np.arange(3000 * 4000, dtype=np.int64) % 65535).astype(np.uint16).reshape(3000, 4000)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    tracemalloc.start()
    picture = open_image(buffer.getvalue())
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert picture.mode == "RGB" and picture.size == (4000, 3000)
    assert peak < 100 * 2**20, f"{peak / 2**20:.0f} MB"  # the float64 conversion took about 230 MB
    grey = np.asarray(picture)[..., 0]
    assert grey.min() == 0 and grey.max() == 255


@pytest.fixture
def live_server(tmp_path, image_folder):
    from conftest import start_server, stop

    path = tmp_path / "i.h5"
    index(image_folder, path)
    process, url = start_server(tmp_path / "server.log", "--index", path, "--max-upload-mb", "1")
    yield url
    stop(process)


def test_idle_connections_do_not_lock_the_server_out(live_server):
    """Audit item 6: 150 idle connections (more than waitress' default limit of 100); /healthz still answers."""
    import socket
    import time
    import urllib.request
    from urllib.parse import urlparse

    address = urlparse(live_server)
    idle = [socket.create_connection((address.hostname, address.port), timeout=5) for _ in range(150)]
    try:
        started = time.monotonic()
        with urllib.request.urlopen(live_server + "healthz", timeout=10) as response:
            assert response.status == 200
        assert time.monotonic() - started < 5
    finally:
        for connection in idle:
            connection.close()
    with urllib.request.urlopen(live_server + "healthz", timeout=10) as response:
        assert response.status == 200


def raw_request(url: str, payload: bytes) -> tuple[int, dict, bytes]:
    import socket
    from urllib.parse import urlparse

    address = urlparse(url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as connection:
        connection.sendall(payload)
        data = b""
        while True:
            try:
                chunk = connection.recv(65536)
            except ConnectionResetError:  # waitress closes at once after an error answer
                break
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {line.split(":", 1)[0].lower(): line.split(":", 1)[1].strip() for line in lines[1:] if ":" in line}
    return int(lines[0].split()[1]), headers, body


def test_errors_from_waitress_itself_are_json_with_the_security_headers(live_server):
    """Audit item 7: a body over waitress' limit (413) and headers over its limit (431)."""
    import json

    too_long = b"POST /api/search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n" \
               b"Content-Length: 50000000\r\n\r\n"
    status, headers, body = raw_request(live_server, too_long)
    assert status == 413 and headers["content-type"] == "application/json" and "error" in json.loads(body)
    assert headers["x-content-type-options"] == "nosniff" and "default-src 'self'" in headers["content-security-policy"]
    big_headers = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 1000) for i in range(80)) + b"\r\n"
    status, headers, body = raw_request(live_server, big_headers)
    assert status == 431 and headers["content-type"] == "application/json" and headers["x-frame-options"] == "DENY"


def test_an_upload_whose_file_name_is_not_utf8_is_accepted(app_and_index):
    """Audit item 10: the name is irrelevant; the part must not be dropped."""
    client = app_and_index[0].test_client()
    photo = (DEMO_DATABASE / "coffee" / "original.jpg").read_bytes()
    body = (b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"caf\xe9.jpg\"\r\n"
            b"Content-Type: image/jpeg\r\n\r\n" + photo + b"\r\n--b\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n3\r\n--b--\r\n")
    response = client.post("/api/search", data=body, content_type="multipart/form-data; boundary=b")
    assert response.status_code == 200, response.get_json()
    assert len(response.get_json()["results"]) == 3


def test_a_database_image_that_became_a_decompression_bomb_is_not_a_500(app_and_index):
    """Audit item 12."""
    from PIL import Image

    app, path, folder = app_and_index
    client = app.test_client()
    sample = client.get("/api/sample?n=1").get_json()["items"][0]
    target = folder / sample["path"]
    Image.new("1", (12000, 12000)).save(target, format="PNG")  # 144 Mpx: over the bomb limit, tiny file
    assert client.get(sample["image_url"]).status_code == 404
    assert client.get(sample["thumb_url"]).status_code in (404, 415)
