"""The web app through Flask's test client, around one real EfficientNet-Lite0 index built for this module."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import DEMO_DATABASE, REPO
from retrieval.engine import RetrievalEngine
from retrieval.errors import IndexFileError
from retrieval.indexing import build_index
from retrieval.storage.database import FeatureDatabase, read_database, write_database
from retrieval.web import CONTENT_SECURITY_POLICY, create_app
from retrieval.web import routes
from retrieval.web.routes import NO_INDEX_MESSAGE

GROUPS = ("coffee", "chelsea", "rocket", "astronaut")


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """(image folder, index path): two photos of four demo groups, in sub-folders, one with a non-ASCII name."""
    root = tmp_path_factory.mktemp("web")
    folder = root / "images"
    for group in GROUPS:
        (folder / group).mkdir(parents=True)
        shutil.copy(DEMO_DATABASE / group / "original.jpg", folder / group / "original.jpg")
        shutil.copy(DEMO_DATABASE / group / "view-01.jpg", folder / group / "vue é.jpg")
    index = root / "index.h5"
    build_index(folder, index, backbone="efficientnet-lite0", precision="float32", progress=False)
    return folder, index


@pytest.fixture(scope="module")
def engine(indexed, effnet_extractor):
    """The module's engine, sharing the session's extractor (same encoder as the index, so no second model)."""
    database = read_database(indexed[1])
    assert database.encoder.identity() == effnet_extractor.encoder.identity()
    return RetrievalEngine(database, effnet_extractor)


@pytest.fixture(scope="module")
def app(indexed, engine):
    return create_app(indexed[1], engine=engine, config={"TESTING": True})


@pytest.fixture
def client(app):
    return app.test_client()


def jpeg_bytes(group: str, name: str = "original.jpg") -> bytes:
    return (DEMO_DATABASE / group / name).read_bytes()


def post_image(client, data: bytes, filename: str = "query.jpg", **fields):
    return client.post("/api/search", data={"image": (io.BytesIO(data), filename), **fields}, content_type="multipart/form-data")


def assert_security_headers(response):
    assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "default-src 'self'" in CONTENT_SECURITY_POLICY and "unsafe-inline" not in CONTENT_SECURITY_POLICY
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Referrer-Policy"] == "no-referrer"


def assert_json_error(response, status: int, *fragments: str):
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) >= {"error"} and isinstance(body["error"], str) and body["error"]
    assert "Traceback" not in body["error"]
    for fragment in fragments:
        assert fragment in body["error"]
    assert_security_headers(response)
    return body


# ---------------------------------------------------------------------------------------------------- page, info


def test_page_shows_database_info_and_loads_only_local_assets(client):
    response = client.get("/")
    assert response.status_code == 200 and response.mimetype == "text/html"
    html = response.get_data(as_text=True)
    assert 'id="info-size">8<' in html and "efficientnet-lite0" in html and 'id="info-pooling">max<' in html
    scripts = re.findall(r'<script src="/static/([a-z]+\.js)" defer></script>', html)
    assert scripts == ["common.js", "app.js", "duplicates.js"]  # the shared helpers first
    assert "<script>" not in html and " on" + "click=" not in html and "style=" not in html  # CSP: no inline code
    assert "http://" not in html and "https://" not in html  # no CDN: works offline
    assert 'for="k-select"' in html and 'type="file"' in html and 'id="choose-button"' in html
    assert "<h1" in html and 'for="folder-select"' in html and 'data-max-k="200"' in html
    accept = re.search(r'accept="([^"]*)"', html).group(1)
    assert "svg" not in accept and "image/*" not in accept and ".tiff" in accept  # what the server reads, no SVG
    assert html.index("<noscript>") < html.index("<main") < html.index("<footer")  # not hidden under the footer
    assets = [(script, "text/javascript") for script in scripts] + [("style.css", "text/css"), ("favicon.svg", "image/svg+xml")]
    for asset, mimetype in assets:
        static = client.get(f"/static/{asset}")
        assert static.status_code == 200 and static.mimetype == mimetype
        assert_security_headers(static)
    assert_security_headers(response)


def test_info_and_healthz(client, engine):
    info = client.get("/api/info").get_json()
    assert info["size"] == 8 and info["backbone"] == "efficientnet-lite0" and info["pooling"] == "max"
    assert info["dimension"] == engine.database.encoder.dim == 1280
    assert info["created"] and info["updated"] and info["version"]
    assert info["limits"] == {"default_k": 10, "max_k": 200, "k_choices": [10, 20, 50], "max_upload_bytes": 20 * 1024 * 1024}
    health = client.get("/healthz")
    assert health.status_code == 200 and health.get_json()["status"] == "ok" and health.get_json()["size"] == 8


def test_sample_lists_database_items_by_id(client, engine):
    body = client.get("/api/sample?n=5").get_json()
    assert len(body["items"]) == 5 and body["total"] == 8
    for item in body["items"]:
        assert item["path"] == engine.database.paths[item["id"]]
        assert item["thumb_url"] == f"/thumb/{item['id']}?v={body['version']}"
    assert len(client.get("/api/sample?n=200").get_json()["items"]) == 8
    assert_json_error(client.get("/api/sample?n=0"), 400, "n must be between 1 and 200")


# ---------------------------------------------------------------------------------------------------- searching


def test_upload_search_ranks_the_same_photo_first(client):
    response = post_image(client, jpeg_bytes("coffee"), k="5")
    assert response.status_code == 200
    body = response.get_json()
    results = body["results"]
    assert [r["rank"] for r in results] == [1, 2, 3, 4, 5]
    assert results[0]["path"] == "coffee/original.jpg" and results[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert results[1]["path"] == "coffee/vue é.jpg"
    assert all(a["score"] >= b["score"] for a, b in zip(results, results[1:]))
    first = results[0]
    assert first["image_url"] == f"/image/{first['id']}?v={body['version']}"
    assert first["thumb_url"] == f"/thumb/{first['id']}?v={body['version']}"
    assert body["query"] == {"type": "upload", "bytes": len(jpeg_bytes("coffee"))}
    assert body["k"] == 5 and body["total"] == 8 and body["has_more"] is True
    assert body["took_ms"] > 0 and body["timing"]["encode_ms"] > 0
    assert_security_headers(response)


def test_k_default_offset_and_load_more(client):
    data = jpeg_bytes("rocket")
    everything = post_image(client, data).get_json()  # default k = 10 > 8 images
    assert len(everything["results"]) == 8 and everything["has_more"] is False
    page = post_image(client, data, k="3", offset="3").get_json()
    assert [r["rank"] for r in page["results"]] == [4, 5, 6] and page["has_more"] is True
    assert [r["id"] for r in page["results"]] == [r["id"] for r in everything["results"][3:6]]
    # k may also come in the query string
    assert len(client.post("/api/search?k=2", data={"image": (io.BytesIO(data), "q.jpg")}).get_json()["results"]) == 2


def test_search_by_database_id(client, engine):
    row = engine.database.paths.index("chelsea/vue é.jpg")
    body = client.get(f"/api/search?id={row}&k=3").get_json()
    assert body["query"]["type"] == "database" and body["query"]["id"] == row and body["query"]["path"] == "chelsea/vue é.jpg"
    assert body["results"][0]["id"] == row and body["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert body["results"][1]["path"] == "chelsea/original.jpg"
    assert client.get(f"/api/search?id={row}&v={body['version']}").status_code == 200
    assert_json_error(client.get(f"/api/search?id={row}&v=oldversion"), 409, "updated")


def test_query_expansion_per_request(client, engine):
    row = engine.database.paths.index("coffee/original.jpg")
    plain = client.get(f"/api/search?id={row}&k=8").get_json()
    expanded = client.get(f"/api/search?id={row}&k=8&qe=alpha&qe_top_n=2&qe_alpha=3").get_json()
    assert plain["qe"] == "none" and expanded["qe"] == "alpha"
    assert expanded["results"][0]["path"].startswith("coffee/")
    assert [r["score"] for r in expanded["results"]] != [r["score"] for r in plain["results"]]
    upload = post_image(client, jpeg_bytes("rocket"), qe="avg").get_json()
    assert upload["qe"] == "avg" and upload["results"][0]["path"].startswith("rocket/")


@pytest.mark.parametrize(
    "query, message",
    [("qe=best", "qe must be one of"), ("qe=avg&qe_top_n=0", "qe_top_n must be"), ("qe=alpha&qe_alpha=x", "qe_alpha must be a number"),
     ("qe=alpha&qe_alpha=nan", "qe_alpha must be between"), ("qe=alpha&qe_alpha=99", "qe_alpha must be between")],
)
def test_bad_query_expansion_is_400(client, query, message):
    assert_json_error(client.get(f"/api/search?id=0&{query}"), 400, message)


@pytest.mark.parametrize("k", ["abc", "0", "-3", "201", "1.5", "1e3", "10 0", "９"])
def test_bad_k_is_400(client, k):
    assert_json_error(client.get(f"/api/search?id=0&k={k}"), 400, "k must be")
    assert_json_error(post_image(client, jpeg_bytes("coffee"), k=k), 400, "k must be")


def test_bad_offset_and_ids(client):
    assert_json_error(client.get("/api/search?id=0&offset=-1"), 400, "offset must be")
    assert_json_error(client.get("/api/search?id=abc"), 400, "id must be")
    assert_json_error(client.get("/api/search?id=-1"), 400, "id must be")
    assert_json_error(client.get("/api/search?id=8"), 404, "no database image with id 8")
    assert_json_error(client.get("/api/search?id=99999999"), 404, "no database image")
    assert_json_error(client.get("/api/search"), 400, "POST an image")


def bomb_png(width=20000, height=20000) -> bytes:
    """A tiny PNG that claims 400 megapixels."""

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "data, status, fragment",
    [
        (b"%PDF-1.4 this is not an image at all", 415, "not an image"),
        (b"GIF89a" + b"\0" * 3, 415, "cannot use this file as an image"),
        (None, 415, "corrupt or truncated"),  # a JPEG cut in half
        (b"", 400, "empty"),
        ("bomb", 413, "too many pixels"),
    ],
    ids=["not-an-image", "garbage-gif", "truncated-jpeg", "empty", "decompression-bomb"],
)
def test_unusable_uploads_get_readable_errors(client, data, status, fragment):
    if data is None:
        full = jpeg_bytes("coffee")
        data = full[: len(full) // 2]
    elif data == "bomb":
        data = bomb_png()
    # the name and declared type do not matter: the content decides
    response = client.post(
        "/api/search", data={"image": (io.BytesIO(data), "photo.jpg", "image/jpeg")}, content_type="multipart/form-data"
    )
    assert_json_error(response, status, fragment)


def test_type_is_decided_by_content_not_name(client):
    response = post_image(client, jpeg_bytes("coffee"), filename="notes.txt")
    assert response.status_code == 200 and response.get_json()["results"][0]["path"] == "coffee/original.jpg"


def test_missing_field_and_too_large_upload(client):
    assert_json_error(client.post("/api/search", data={"k": "3"}), 400, "missing file field 'image'")
    assert_json_error(client.post("/api/search", data={"file": (io.BytesIO(b"x"), "a.jpg")}), 400, "'image'")
    too_big = b"\xff\xd8" + b"\0" * (20 * 1024 * 1024)
    assert_json_error(post_image(client, too_big), 413, "too large", "20 MB")


def test_limit_is_configurable_and_uploads_stay_in_memory(engine, monkeypatch):
    import werkzeug.formparser

    def no_disk(*args, **kwargs):
        raise AssertionError("an upload was spooled to a temporary file")

    monkeypatch.setattr(werkzeug.formparser, "SpooledTemporaryFile", no_disk)  # werkzeug's default for uploads
    monkeypatch.setattr("tempfile.SpooledTemporaryFile", no_disk)
    monkeypatch.setattr("tempfile.TemporaryFile", no_disk)
    monkeypatch.setattr("tempfile.NamedTemporaryFile", no_disk)
    client = create_app(engine=engine, config={"MAX_UPLOAD_BYTES": 3 * 1024 * 1024}).test_client()
    noise = np.random.default_rng(0).integers(0, 255, (600, 600, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(noise).save(png, format="PNG")
    assert 600_000 < len(png.getvalue()) < 3 * 1024 * 1024  # over werkzeug's 500 kB spooling threshold
    assert post_image(client, png.getvalue(), k="1").status_code == 200
    assert_json_error(post_image(client, b"\0" * (3 * 1024 * 1024 + 1)), 413, "3 MB")


def test_other_methods_and_routes_are_json_errors(client):
    assert_json_error(client.delete("/api/search"), 405)
    assert_json_error(client.get("/nope"), 404, "not found")
    assert_json_error(client.post("/api/info"), 405)


# ---------------------------------------------------------------------------------------------------- no index


def test_server_without_an_index_answers_503_and_says_so(tmp_path):
    app = create_app(tmp_path / "missing.h5", config={"TESTING": True})
    client = app.test_client()
    for response in (
        post_image(client, jpeg_bytes("coffee")),
        client.get("/api/search?id=0"),
        client.get("/api/info"),
        client.get("/api/sample"),
        client.get("/image/0"),
        client.get("/thumb/0"),
    ):
        assert_json_error(response, 503, NO_INDEX_MESSAGE)
    health = client.get("/healthz")
    assert health.status_code == 503 and health.get_json()["index_loaded"] is False
    page = client.get("/")
    assert page.status_code == 200 and "No index loaded: build one with index.py" in page.get_data(as_text=True)
    # bad parameters are still reported as such
    assert_json_error(client.get("/api/search?id=0&k=0"), 400, "k must be")
    assert create_app(config={"TESTING": True}).test_client().get("/api/info").status_code == 503


def test_unreadable_index_raises_at_creation(tmp_path):
    broken = tmp_path / "broken.h5"
    broken.write_bytes(b"not an HDF5 file")
    with pytest.raises(IndexFileError, match="not a readable HDF5"):
        create_app(broken)


# ---------------------------------------------------------------------------------------------------- images


def test_images_and_thumbnails_by_id_with_caching(app, client, engine, indexed):
    row = engine.database.paths.index("rocket/original.jpg")
    version = client.get("/api/info").get_json()["version"]
    image = client.get(f"/image/{row}?v={version}")
    assert image.status_code == 200 and image.mimetype == "image/jpeg"
    assert image.data == (indexed[0] / "rocket" / "original.jpg").read_bytes()
    assert image.headers["ETag"] and "max-age=" in image.headers["Cache-Control"]
    assert_security_headers(image)
    assert client.get(f"/image/{row}?v={version}", headers={"If-None-Match": image.headers["ETag"]}).status_code == 304
    assert client.get(f"/image/{row}").headers["Cache-Control"] == "no-cache"  # unversioned URL: revalidate

    cache = app.extensions["retrieval.thumbs"]
    cache.clear()
    thumb = client.get(f"/thumb/{row}?v={version}")
    assert thumb.status_code == 200 and thumb.mimetype == "image/jpeg" and len(cache) == 1
    picture = Image.open(io.BytesIO(thumb.data))
    assert max(picture.size) <= app.config["THUMB_SIZE"] and len(thumb.data) < len(image.data)
    again = client.get(f"/thumb/{row}?v={version}")
    assert again.data == thumb.data and len(cache) == 1 and again.headers["ETag"] == thumb.headers["ETag"]
    assert client.get(f"/thumb/{row}", headers={"If-None-Match": thumb.headers["ETag"]}).status_code == 304
    assert_json_error(client.get("/image/8"), 404, "no database image with id 8")
    assert_json_error(client.get("/thumb/123456"), 404, "no database image")


def test_thumbnail_cache_is_bounded(engine):
    app = create_app(engine=engine, config={"THUMB_CACHE_ITEMS": 3})
    client = app.test_client()
    for row in range(6):
        assert client.get(f"/thumb/{row}").status_code == 200
    assert len(app.extensions["retrieval.thumbs"]) == 3


TRAVERSALS = [
    "/image/../../etc/passwd",
    "/thumb/../../etc/passwd",
    "/image/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/thumb/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/image/..%2f..%2f..%2fetc%2fpasswd",
    "/image//etc/passwd",
    "/thumb//etc/passwd",
    "/image/%2Fetc%2Fpasswd",
    "/image/0/../../../etc/passwd",
    "/image/0%2f..%2f..%2fetc%2fpasswd",
    "/image/-1",
    "/thumb/-1",
    "/image/1.0",
    "/image/0x1",
    "/image/coffee/original.jpg",
    "/thumb/coffee%2foriginal.jpg",
    "/image/%00",
    "/static/../server.py",
    "/static/%2e%2e/server.py",
    "/static/..%2fserver.py",
    "/static//etc/passwd",
    "/static/%2fetc%2fpasswd",
    "/etc/passwd",
    "//etc/passwd",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_path_traversal_is_404_and_leaks_nothing(client, path):
    response = client.get(path)
    assert response.status_code == 404, path
    body = response.get_data()
    assert b"root:" not in body and b"import argparse" not in body and b"\xff\xd8" not in body[:2]
    assert_security_headers(response)


@pytest.mark.parametrize("query", ["../../etc/passwd", "%2e%2e%2fetc%2fpasswd", "/etc/passwd", "coffee/original.jpg", "0;1"])
def test_search_ids_that_are_paths_are_rejected(client, query):
    response = client.get(f"/api/search?id={query}")
    assert_json_error(response, 400, "id must be")
    assert b"root:" not in response.get_data()


def test_index_paths_that_leave_the_image_folder_are_never_served(tmp_path, engine):
    """Defence in depth: even a crafted index whose paths climb out of the image folder cannot serve those files."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(DEMO_DATABASE / "coffee" / "original.jpg", tmp_path / "outside.jpg")
    database = FeatureDatabase(
        encoder=engine.database.encoder,
        vectors=engine.database.vectors[:2],
        paths=["../outside.jpg", str(tmp_path / "outside.jpg")],
        file_sizes=np.zeros(2, np.int64),
        file_mtimes_ns=np.zeros(2, np.int64),
        image_root=str(root),
    )
    client = create_app(engine=RetrievalEngine(database, engine.extractor)).test_client()
    for route in ("image", "thumb"):
        for row in (0, 1):
            assert client.get(f"/{route}/{row}").status_code == 404


# ---------------------------------------------------------------------------------------------------- concurrency


def test_concurrent_searches_match_sequential_ones(app, engine):
    queries = [("upload", jpeg_bytes(group, name)) for group in GROUPS for name in ("original.jpg", "view-02.jpg")]
    queries += [("id", row) for row in range(len(engine))]

    def ask(query):
        kind, value = query
        client = app.test_client()
        response = post_image(client, value, k="8") if kind == "upload" else client.get(f"/api/search?id={value}&k=8")
        assert response.status_code == 200, response.get_data(as_text=True)
        return [(r["id"], r["score"]) for r in response.get_json()["results"]]

    sequential = [ask(query) for query in queries]
    with ThreadPoolExecutor(max_workers=16) as pool:
        concurrent = list(pool.map(ask, queries * 2))
    for expected, got in zip(sequential * 2, concurrent):
        assert [i for i, _ in got] == [i for i, _ in expected]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=1e-5)


# ---------------------------------------------------------------------------------------------------- live reload


def replace_atomically(target: Path, database: FeatureDatabase) -> None:
    staging = target.parent / "staging" / target.name
    write_database(staging, database)
    os.replace(staging, target)


def subset(database: FeatureDatabase, rows) -> FeatureDatabase:
    rows = list(rows)
    return FeatureDatabase(
        encoder=database.encoder,
        vectors=database.vectors[rows],
        paths=[database.paths[i] for i in rows],
        file_sizes=database.file_sizes[rows],
        file_mtimes_ns=database.file_mtimes_ns[rows],
        image_root=database.image_root,
        created_at=database.created_at,
        updated_at="2030-01-01T00:00:00+00:00",
    )


def test_replaced_index_is_picked_up_without_restart(tmp_path, indexed, engine, caplog):
    live_path = tmp_path / "live.h5"
    shutil.copy(indexed[1], live_path)
    app = create_app(live_path, engine=engine, config={"INDEX_CHECK_INTERVAL": 0})
    client = app.test_client()
    before = client.get("/api/info").get_json()
    assert before["size"] == 8

    replace_atomically(live_path, subset(engine.database, range(0, 8, 2)))
    after = client.get("/api/info").get_json()
    assert after["size"] == 4 and after["updated"] == "2030-01-01T00:00:00+00:00" and after["version"] != before["version"]
    current, _ = app.extensions["retrieval"].current()
    assert current.extractor is engine.extractor  # same encoder: the model is reused, not rebuilt
    assert current.image_root == engine.image_root
    hits = post_image(client, jpeg_bytes("coffee"), k="10").get_json()["results"]
    assert len(hits) == 4 and hits[0]["path"] == "coffee/original.jpg"
    assert client.get("/thumb/3").status_code == 200 and client.get("/thumb/4").status_code == 404
    # an id shown by the old version is refused rather than silently naming another image
    assert_json_error(client.get(f"/api/search?id=0&v={before['version']}"), 409)

    # a broken new version: logged, and the previous one keeps being served
    staging = tmp_path / "garbage.h5"
    staging.write_bytes(b"\x89HDF\r\n\x1a\n but truncated")
    with caplog.at_level(logging.ERROR, logger="retrieval.web"):
        os.replace(staging, live_path)
        assert client.get("/api/info").get_json()["size"] == 4
    assert "could not load new version" in caplog.text
    assert post_image(client, jpeg_bytes("rocket"), k="1").get_json()["results"][0]["path"] == "rocket/original.jpg"

    # and a good file after it is taken again
    replace_atomically(live_path, subset(engine.database, range(8)))
    assert client.get("/api/info").get_json()["size"] == 8
    assert app.extensions["retrieval"].reloads == 2


def test_reload_is_checked_at_most_once_per_interval(tmp_path, indexed, engine):
    live_path = tmp_path / "live.h5"
    shutil.copy(indexed[1], live_path)
    client = create_app(live_path, engine=engine, config={"INDEX_CHECK_INTERVAL": 3600}).test_client()
    assert client.get("/api/info").get_json()["size"] == 8
    replace_atomically(live_path, subset(engine.database, range(3)))
    assert client.get("/api/info").get_json()["size"] == 8  # not checked again within the interval


def test_index_that_appears_later_or_changes_encoder_builds_a_matching_extractor(tmp_path, indexed, engine, monkeypatch):
    built = []

    def fake_for_database(encoder, *args, **kwargs):  # weights file, codebook, image root: unused by the stand-in
        built.append(encoder.pooling)
        return engine.extractor  # stands in for a newly built model (building one costs seconds)

    monkeypatch.setattr("retrieval.engine.Extractor.for_database", fake_for_database)
    live_path = tmp_path / "later.h5"
    client = create_app(live_path, config={"INDEX_CHECK_INTERVAL": 0}).test_client()
    assert client.get("/api/info").status_code == 503
    shutil.copy(indexed[1], live_path)
    assert client.get("/api/info").get_json()["size"] == 8 and built == ["max"]
    assert client.get("/api/search?id=1&k=1").status_code == 200

    import dataclasses

    other = subset(engine.database, range(5))
    other.encoder = dataclasses.replace(other.encoder, pooling="avg")
    replace_atomically(live_path, other)
    info = client.get("/api/info").get_json()
    assert info["pooling"] == "avg" and info["size"] == 5 and built == ["max", "avg"]


# ---------------------------------------------------------------------------------------------------- server.py


def run_server(*args, timeout=60):
    return subprocess.run(
        [sys.executable, str(REPO / "server.py"), *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


@pytest.mark.parametrize(
    "make_args, fragment",
    [
        (lambda tmp: ["--index", tmp / "corrupt.h5"], "not a readable HDF5 feature database"),
        (lambda tmp: ["--index", tmp / "missing.h5", "--require-index"], "no such index file"),
        (lambda tmp: ["--index", tmp, "--port", "0"], "is a folder"),
        (lambda tmp: ["--index", tmp / "missing.h5", "--debug", "--host", "0.0.0.0"], "loopback"),
    ],
    ids=["corrupt", "missing-required", "folder", "debug-exposed"],
)
def test_server_script_refuses_to_start_with_one_line(tmp_path, make_args, fragment):
    (tmp_path / "corrupt.h5").write_bytes(b"garbage")
    result = run_server(*make_args(tmp_path))
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_server_module_does_nothing_at_import():
    code = "import sys; sys.argv = ['x', '--bogus']; import server; print('tensorflow' in sys.modules, 'flask' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0 and result.stdout.split() == ["False", "False"], result.stderr


# ---------------------------------------------------------------------------------------------------- what a result says


def test_results_carry_file_size_and_pixel_size_when_the_index_has_it(client, engine, indexed):
    row = engine.database.paths.index("coffee/original.jpg")
    body = client.get(f"/api/search?id={row}&k=8").get_json()
    for item in [body["query"], *body["results"]]:
        assert item["bytes"] == (indexed[0] / item["path"]).stat().st_size
        assert item["download_url"] == f"/image/{item['id']}?v={body['version']}&download=1"
        assert "width" in item and "height" in item
    sample = client.get("/api/sample?n=3").get_json()["items"]
    assert all(item["bytes"] > 0 and "width" in item for item in sample)

    # pixel sizes recorded at indexing (database.image_sizes, (N, 2) width/height; <= 0 = unknown) are passed on
    database = dataclasses.replace(engine.database)
    sizes = np.array([Image.open(indexed[0] / path).size for path in database.paths], dtype=np.int64)
    sizes[1] = (0, 0)
    database.image_sizes = sizes
    database.file_sizes = database.file_sizes.copy()
    database.file_sizes[2] = -1  # a reference-demo file has no stats
    other = create_app(engine=RetrievalEngine(database, engine.extractor)).test_client()
    items = {item["id"]: item for item in other.get("/api/sample?n=8").get_json()["items"]}
    assert (items[0]["width"], items[0]["height"]) == tuple(int(v) for v in sizes[0])
    assert items[1]["width"] is None and items[1]["height"] is None and items[2]["bytes"] is None


def test_download_is_the_original_file_as_an_attachment(client, engine, indexed):
    row = engine.database.paths.index("chelsea/vue é.jpg")
    version = client.get("/api/info").get_json()["version"]
    response = client.get(f"/image/{row}?v={version}&download=1")
    assert response.status_code == 200 and response.mimetype == "image/jpeg"
    assert response.data == (indexed[0] / "chelsea" / "vue é.jpg").read_bytes()
    disposition = response.headers["Content-Disposition"]
    assert disposition.startswith("attachment") and "filename*=UTF-8''vue%20%C3%A9.jpg" in disposition
    shown = client.get(f"/image/{row}?v={version}")
    assert "Content-Disposition" not in shown.headers and shown.headers["ETag"] != response.headers["ETag"]
    assert client.get(f"/image/{row}?v={version}&download=1", headers={"If-None-Match": response.headers["ETag"]}).status_code == 304
    assert_security_headers(response)


def test_truncated_upload_says_so_without_the_decoders_words(client):
    data = jpeg_bytes("coffee")
    body = assert_json_error(post_image(client, data[:-22]), 415, "corrupt or truncated image")
    assert body["error"] == "cannot use this file as an image: corrupt or truncated image"


def test_an_upload_of_exactly_the_limit_is_accepted(engine):
    client = create_app(engine=engine, config={"MAX_UPLOAD_BYTES": 1024 * 1024}).test_client()
    data = jpeg_bytes("rocket")
    exact = data + b"\0" * (1024 * 1024 - len(data))
    assert post_image(client, exact, k="1").get_json()["results"][0]["path"] == "rocket/original.jpg"
    assert_json_error(post_image(client, exact + b"\0"), 413, "too large")


def test_no_index_page_names_the_file_the_server_watches(tmp_path):
    watched = tmp_path / "my index.h5"
    html = create_app(watched, config={"TESTING": True}).test_client().get("/").get_data(as_text=True)
    assert f"--index {shlex.quote(str(watched))}" in html.replace("&#39;", "'")
    assert "<var>IMAGE_FOLDER</var>" in html and 'id="choose-button"' in html and 'aria-disabled="true"' in html
    html = create_app(watched, config={"IMAGE_ROOT": "/srv/photos"}).test_client().get("/").get_data(as_text=True)
    assert "--database /srv/photos" in html


# ---------------------------------------------------------------------------------------------------- the folder filter


def test_folder_filter_keeps_the_ranking_within_the_folder(client, engine):
    row = engine.database.paths.index("coffee/original.jpg")
    everything = client.get(f"/api/search?id={row}&k=8").get_json()["results"]
    body = client.get(f"/api/search?id={row}&k=2&folder=rocket").get_json()
    expected = [r for r in everything if r["path"].startswith("rocket/")]
    assert [r["id"] for r in body["results"]] == [r["id"] for r in expected]
    assert [r["rank"] for r in body["results"]] == [1, 2]
    assert [r["overall_rank"] for r in body["results"]] == [r["rank"] for r in expected]
    assert body["total"] == 2 and body["has_more"] is False and body["folder"] == "rocket"
    assert body["database_size"] == 8 and body["truncated"] is False
    first = client.get(f"/api/search?id={row}&k=1&folder=rocket/").get_json()  # one trailing "/" is the same folder
    assert [r["id"] for r in first["results"]] == [expected[0]["id"]] and first["has_more"] is True
    second = client.get(f"/api/search?id={row}&k=1&offset=1&folder=rocket").get_json()
    assert [r["id"] for r in second["results"]] == [expected[1]["id"]] and second["results"][0]["rank"] == 2
    upload = post_image(client, jpeg_bytes("chelsea"), k="5", folder="coffee").get_json()
    assert [r["path"].split("/")[0] for r in upload["results"]] == ["coffee", "coffee"] and upload["total"] == 2
    unfiltered = client.get(f"/api/search?id={row}&k=3").get_json()
    assert "folder" not in unfiltered and unfiltered["total"] == 8


@pytest.mark.parametrize("folder", ["/etc", "../x", "coffee/..", "a//b", "a\\b", ".", "/", "x%00y", "a%0Ab", "a" * 1001])
def test_malformed_folder_is_400(client, folder):
    assert_json_error(client.get(f"/api/search?id=0&folder={folder}"), 400, "folder must be a folder of the database")
    assert_json_error(client.get(f"/api/sample?folder={folder}"), 400, "folder must be")


@pytest.mark.parametrize("folder", ["nope", "coff", "coffee/deeper", "é"])
def test_unknown_folder_is_simply_empty(client, folder):
    body = client.get(f"/api/search?id=0&folder={folder}").get_json()
    assert body["results"] == [] and body["total"] == 0 and body["has_more"] is False
    sample = client.get(f"/api/sample?folder={folder}").get_json()
    assert sample["items"] == [] and sample["total"] == 0


def test_folder_sample_and_folder_list(client):
    sample = client.get("/api/sample?folder=chelsea").get_json()
    assert sorted(item["path"] for item in sample["items"]) == ["chelsea/original.jpg", "chelsea/vue é.jpg"]
    assert sample["total"] == 2 and sample["folder"] == "chelsea"
    listed = client.get("/api/folders").get_json()
    assert listed["folders"] == [{"folder": group, "count": 2} for group in sorted(GROUPS)] and listed["truncated"] is False


def test_folder_search_asks_the_engine_for_more_hits_but_only_so_deep(app, client, engine, monkeypatch):
    asked = []
    real = engine.search_id

    def recording(row, k, expansion=None, **options):  # options: verify
        asked.append(k)
        return real(row, k, expansion, **options) if expansion is not None else real(row, k, **options)

    monkeypatch.setattr(engine, "search_id", recording)
    row = engine.database.paths.index("coffee/original.jpg")
    ranked = [r["path"] for r in client.get(f"/api/search?id={row}&k=8").get_json()["results"]]
    last_group = ranked[-1].split("/")[0]  # the folder whose images rank lowest
    asked.clear()
    body = client.get(f"/api/search?id={row}&k=2&folder={last_group}").get_json()
    assert len(body["results"]) == 2 and asked and max(asked) <= 8  # more than k hits, never beyond the database

    monkeypatch.setattr(routes, "FOLDER_SCAN_LIMIT", 3)
    asked.clear()
    body = client.get(f"/api/search?id={row}&k=2&folder={last_group}").get_json()
    assert max(asked) <= 3 and body["truncated"] is True and body["has_more"] is False
    assert len(body["results"]) < 2


def test_folder_rows_without_sorted_paths_are_found_by_a_scan():
    fake = type("E", (), {"database": type("D", (), {"paths": ["b/1.jpg", "a/2.jpg", "b/c/3.jpg", "bb/4.jpg"]})()})()
    assert list(routes._folder_rows(fake, "unsorted-test", "b")) == [0, 2]
    ordered = type("E", (), {"database": type("D", (), {"paths": ["a/2.jpg", "b/1.jpg", "b/c/3.jpg", "bb/4.jpg"]})()})()
    assert routes._folder_rows(ordered, "sorted-test", "b") == range(1, 3)


def test_a_verifying_database_has_its_word_search_built_at_load_not_on_a_request():
    """``live.warmed`` (applied by LiveIndex to every version it loads) builds the visual-word search of a database
    with local features; a database without them builds nothing."""
    from retrieval.descriptors.encoder import EncoderConfig
    from retrieval.descriptors.local_features import extract_local_features
    from retrieval.storage.copy_features import CopyFeatures
    from retrieval.web.live import warmed

    pictures = [np.asarray(Image.open(DEMO_DATABASE / name / "original.jpg").convert("RGB")) for name in GROUPS]
    vectors = np.eye(len(GROUPS), 8, dtype=np.float32)
    encoder = EncoderConfig("efficientnet-lite0", "imagenet", "md5:0", "top", "max", 224, "squash-bicubic", "float32", 8)

    def database(copies):
        return FeatureDatabase(
            encoder=encoder, vectors=vectors, paths=[f"{name}.jpg" for name in GROUPS],
            file_sizes=np.ones(len(GROUPS), np.int64), file_mtimes_ns=np.ones(len(GROUPS), np.int64), copies=copies,
        )

    local = CopyFeatures.assemble(None, [extract_local_features(p) for p in pictures], 8, verify_default=True)
    engine = warmed(RetrievalEngine(database(local), None))
    assert "words" in vars(engine.pipeline) and engine.pipeline.words is not None
    plain = warmed(RetrievalEngine(database(None), None))
    assert "words" not in vars(plain.pipeline)


def test_heic_and_avif_photos_are_indexed_searched_and_shown(tmp_path, effnet_extractor):
    """A phone's HEIC photo and an AVIF file are indexed like any photo; a HEIC upload finds its own file first; the
    page gets the AVIF as it is (every current browser shows it) and the HEIC transcoded to PNG, and a JPEG thumbnail
    of each; the file picker offers both."""
    folder = tmp_path / "images"
    folder.mkdir()
    heic = Path(__file__).with_name("rotated-coffee.heic")
    shutil.copy(heic, folder / "coffee.heic")
    Image.open(DEMO_DATABASE / "chelsea" / "original.jpg").save(folder / "chelsea.avif", quality=80)
    shutil.copy(DEMO_DATABASE / "rocket" / "original.jpg", folder / "rocket.jpg")
    index = tmp_path / "formats.h5"
    report = build_index(folder, index, backbone="efficientnet-lite0", precision="float32", progress=False)
    assert report.total == 3 and not report.skipped
    database = read_database(index)
    client = create_app(index, engine=RetrievalEngine(database, effnet_extractor), config={"TESTING": True}).test_client()
    found = post_image(client, heic.read_bytes(), filename="IMG_0001.HEIC", k="3")
    assert found.status_code == 200
    top = found.get_json()["results"][0]
    assert top["path"] == "coffee.heic" and top["score"] == pytest.approx(1.0, abs=1e-4)
    avif = client.get(f"/image/{database.paths.index('chelsea.avif')}")
    assert avif.status_code == 200 and avif.mimetype == "image/avif"
    shown = client.get(f"/image/{database.paths.index('coffee.heic')}")
    assert shown.status_code == 200 and shown.mimetype == "image/png"
    assert Image.open(io.BytesIO(shown.data)).size == (80, 120)  # upright, as the phone shows it
    for name in database.paths:
        thumb = client.get(f"/thumb/{database.paths.index(name)}")
        assert thumb.status_code == 200 and thumb.mimetype == "image/jpeg"
    accept = re.search(r'accept="([^"]*)"', client.get("/").get_data(as_text=True)).group(1)
    assert ".heic" in accept and ".avif" in accept and "image/heic" in accept
