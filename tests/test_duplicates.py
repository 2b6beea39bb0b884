"""The duplicates finder: graph, threshold, components, keep rule, the incremental cache (same groups as a full run),
the API route, and the real find_duplicates.py on an index built by the real index.py."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import DEMO_DATABASE, REPO, copy_duplicate_photos
from retrieval.descriptors.encoder import EncoderConfig
from retrieval.errors import RetrievalError
from retrieval.search.backends.faiss import FaissBackend
from retrieval.search.backends.memory import MemoryBackend
from retrieval.search.duplicates import (
    DEFAULT_THRESHOLD, VERIFIED_THRESHOLD, DuplicateFinder, GraphCache, NeighbourGraph, build_graph, cache_path, connected_components,
    find_duplicates, search_neighbours, vector_fingerprints,
)
from retrieval.storage.database import FeatureDatabase, read_database, write_database
from retrieval.vectors import l2_normalize

DIM = 32


def encoder(dim: int = DIM) -> EncoderConfig:
    return EncoderConfig(backbone="test", weights_name="none", weights_hash="none", layer="x", pooling="max",
                         input_size=32, resize_rule="squash-bicubic", precision="float32", dim=dim)


def clustered(count: int = 200, copies: int = 40, seed: int = 0, noise: float = 0.05):
    """Unit vectors: ``count`` random ones plus ``copies`` noisy copies of the first ones (rows at the end)."""
    rng = np.random.default_rng(seed)
    base = l2_normalize(rng.normal(size=(count, DIM)))
    near = l2_normalize(base[:copies] + noise * rng.normal(size=(copies, DIM)))
    return np.concatenate([base, near]).astype(np.float32)


def database_of(vectors, paths=None, mtimes=None, sizes=None) -> FeatureDatabase:
    count = len(vectors)
    paths = paths or [f"img{i:04d}.jpg" for i in range(count)]
    order = np.argsort(paths)
    database = FeatureDatabase(
        encoder=encoder(vectors.shape[1]), vectors=np.asarray(vectors, np.float32)[order], paths=[paths[i] for i in order],
        file_sizes=np.full(count, 1000, np.int64),
        file_mtimes_ns=(np.asarray(mtimes, np.int64) if mtimes is not None else np.arange(count, dtype=np.int64) + 10**18)[order],
    )
    if sizes is not None:
        database.image_sizes = np.asarray(sizes, np.int64)[order]
    return database


def brute_force_pairs(matrix, threshold):
    scores = matrix @ matrix.T
    np.fill_diagonal(scores, -np.inf)
    i, j = np.nonzero(np.triu(scores >= threshold, 1))
    return {(int(a), int(b)) for a, b in zip(i, j)}


def group_paths(report) -> list[list[str]]:
    return sorted(sorted(member.path for member in group.members) for group in report.groups)


# ---------------------------------------------------------------------------------------------------- units


def test_connected_components_join_chains_and_ignore_singletons():
    pairs = np.array([[0, 5], [5, 9], [2, 3], [7, 8], [8, 2]])
    assert connected_components(pairs) == [[0, 5, 9], [2, 3, 7, 8]]
    assert connected_components(np.empty((0, 2), np.int64)) == []


def test_pairs_are_unordered_unique_and_the_threshold_is_inclusive():
    rows = np.array([[1, 2], [0, -1], [0, 1]])
    scores = np.array([[0.9, 0.5], [0.91, -np.inf], [0.5, 0.8]], np.float32)
    graph = NeighbourGraph(rows, scores)
    pairs, found = graph.pairs(0.8)
    assert pairs.tolist() == [[0, 1], [1, 2]]
    assert found.tolist() == pytest.approx([0.91, 0.8])  # the higher direction of (0, 1); 0.8 itself counts
    assert graph.pairs(0.95)[0].shape == (0, 2)


def test_graph_leaves_each_image_out_even_among_identical_copies():
    matrix = l2_normalize(np.random.default_rng(1).normal(size=(30, DIM))).astype(np.float32)
    matrix[10:20] = matrix[10]  # ten exact copies: ties at score 1
    rows, scores = search_neighbours(MemoryBackend(matrix), matrix, np.arange(30), 5, batch=7)
    assert rows.shape == (30, 5) and (rows != np.arange(30)[:, None]).all()
    assert set(rows[15].tolist()) <= set(range(10, 20)) and scores[15].min() == pytest.approx(1.0)


def test_finder_finds_every_pair_above_the_threshold():
    matrix = clustered()
    database = database_of(matrix)
    report = find_duplicates(database, 0.9, k=10)
    expected = brute_force_pairs(database.vectors, 0.9)
    found = {(a, b) for group in report.groups for a, b, _ in group.pairs}
    assert found == expected and report.pairs == len(expected) > 30
    assert {frozenset(c) for c in connected_components(np.array(sorted(expected)))} == {
        frozenset(member.id for member in group.members) for group in report.groups}
    looser = find_duplicates(database, 0.5, k=10)
    assert looser.pairs > report.pairs  # a lower threshold finds more


def test_threshold_and_k_out_of_range_are_refused():
    database = database_of(clustered(20, 4))
    for bad in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(RetrievalError, match="threshold"):
            find_duplicates(database, bad)
    with pytest.raises(RetrievalError, match="k"):
        find_duplicates(database, 0.9, k=0)


def test_empty_database_is_refused(tmp_path):
    empty = FeatureDatabase(encoder(), np.zeros((0, DIM), np.float32), [], np.zeros(0, np.int64), np.zeros(0, np.int64))
    with pytest.raises(RetrievalError, match="no images"):
        find_duplicates(empty)
    path = tmp_path / "empty.h5"
    write_database(path, empty)
    with pytest.raises(RetrievalError, match="no images"):
        find_duplicates(path)


def test_keep_rule_largest_then_oldest_then_path():
    vector = l2_normalize(np.ones(DIM)).astype(np.float32)
    matrix = np.stack([vector] * 4)
    paths = ["d.jpg", "c.jpg", "b.jpg", "a.jpg"]
    # c and d share the largest resolution; d is older; b is oldest of all but smaller
    sizes = [(800, 600), (600, 800), (400, 300), (800, 600)]
    database = database_of(matrix, paths, mtimes=[50, 90, 10, 90], sizes=sizes)
    group = find_duplicates(database, 0.99).groups[0]
    assert [m.path for m in group.members][0] == "d.jpg" and group.keep.keep
    assert sum(m.keep for m in group.members) == 1
    database = database_of(matrix, paths, mtimes=[90, 50, 10, 50], sizes=sizes)  # c and a: same size, same age
    assert find_duplicates(database, 0.99).groups[0].keep.path == "a.jpg"


def test_keep_rule_reads_image_headers_with_exif_orientation(tmp_path):
    """Without recorded sizes the header is read: a 300x100 JPEG marked 'rotate 90' is 100x300 as displayed."""
    Image.new("RGB", (120, 120), "red").save(tmp_path / "a.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (300, 100), "red").save(tmp_path / "b.jpg", exif=exif.tobytes())
    Image.new("RGB", (90, 90), "red").save(tmp_path / "c.jpg")
    matrix = np.stack([l2_normalize(np.ones(DIM)).astype(np.float32)] * 3)
    database = database_of(matrix, ["a.jpg", "b.jpg", "c.jpg"])
    group = find_duplicates(database, 0.99, image_root=tmp_path).groups[0]
    sizes = {m.path: (m.width, m.height) for m in group.members}
    assert sizes == {"a.jpg": (120, 120), "b.jpg": (100, 300), "c.jpg": (90, 90)}
    assert group.keep.path == "b.jpg"


def test_verification_stage_is_pluggable():
    database = database_of(clustered())
    plain = find_duplicates(database, 0.9)
    seen = []

    def odd_rows_only(pairs):
        seen.append(pairs.copy())
        return (pairs % 2 == 1).all(axis=1)

    verified = find_duplicates(database, 0.9, verify=odd_rows_only)
    assert len(seen) == 1 and len(seen[0]) == plain.pairs
    assert verified.verified == "odd_rows_only" and verified.rejected == plain.pairs - verified.pairs > 0
    assert all(member.id % 2 == 1 for group in verified.groups for member in group.members)
    # no threshold: DEFAULT_THRESHOLD for cosine alone, the lower VERIFIED_THRESHOLD when a stage confirms the pairs
    assert find_duplicates(database).threshold == DEFAULT_THRESHOLD
    assert find_duplicates(database, verify=odd_rows_only).threshold == VERIFIED_THRESHOLD < DEFAULT_THRESHOLD


def test_faiss_backend_gives_the_exact_groups_on_clear_copies():
    matrix = clustered(500, 50, noise=0.02)
    database = database_of(matrix)
    exact = find_duplicates(database, 0.9)
    backend = FaissBackend.build(database.vectors, "hnsw")
    approximate = DuplicateFinder(database, backend, database.vectors, k=10).report(0.9)
    assert group_paths(approximate) == group_paths(exact) and len(exact.groups) == 50
    assert approximate.search == "faiss-hnsw"


# ---------------------------------------------------------------------------------------------------- incremental


def changed_version(database: FeatureDatabase, seed: int = 5) -> FeatureDatabase:
    """Remove 15 images, change 5, add 30 (10 of them near-copies of kept ones): the next version of ``database``."""
    rng = np.random.default_rng(seed)
    count = len(database)
    keep = np.ones(count, bool)
    keep[rng.choice(count, 15, replace=False)] = False
    vectors = database.vectors[keep].copy()
    paths = [p for p, k in zip(database.paths, keep) if k]
    vectors[:5] = l2_normalize(vectors[:5] + 0.5 * rng.normal(size=(5, DIM)))
    added = l2_normalize(np.concatenate([
        vectors[50:60] + 0.03 * rng.normal(size=(10, DIM)), rng.normal(size=(20, DIM))]))
    return database_of(np.concatenate([vectors, added]).astype(np.float32), paths + [f"new{i:03d}.jpg" for i in range(30)])


def test_incremental_graph_equals_a_full_run():
    first = database_of(clustered(300, 60))
    backend = MemoryBackend(first.vectors)
    graph, run = build_graph(backend, first.vectors, 6, paths=first.paths, fingerprints=vector_fingerprints(first.vectors))
    assert run.mode == "full" and run.searched == len(first)
    cache = GraphCache(graph, list(first.paths), vector_fingerprints(first.vectors), "v1", "exact")
    second = changed_version(first)
    prints = vector_fingerprints(second.vectors)
    full, _ = build_graph(MemoryBackend(second.vectors), second.vectors, 6, paths=second.paths, fingerprints=prints)
    updated, run = build_graph(MemoryBackend(second.vectors), second.vectors, 6, paths=second.paths, fingerprints=prints, previous=cache)
    assert run.mode == "incremental" and run.removed == 20 and 35 <= run.searched < len(second) // 2
    assert (updated.rows == full.rows).all()
    np.testing.assert_allclose(updated.scores, full.scores, atol=1e-5)
    for threshold in (0.6, 0.9, 0.97):
        assert connected_components(updated.pairs(threshold)[0]) == connected_components(full.pairs(threshold)[0])


def test_cache_file_beside_the_index_is_reused_updated_and_survives_damage(tmp_path):
    index = tmp_path / "photos.h5"
    first = database_of(clustered(300, 60))
    write_database(index, first)
    report = find_duplicates(index, 0.9, k=6)
    assert report.run.mode == "full" and cache_path(index).is_file()
    again = find_duplicates(index, 0.95, k=6)  # another threshold: no search at all
    assert again.run.mode == "cached" and again.run.searched == 0
    write_database(index, changed_version(read_database(index)))
    updated = find_duplicates(index, 0.9, k=6)
    fresh = find_duplicates(index, 0.9, k=6, cache=False)
    assert updated.run.mode == "incremental" and updated.run.searched < len(read_database(index)) // 2
    assert fresh.run.mode == "full"
    assert group_paths(updated) == group_paths(fresh) and len(fresh.groups) > 20
    assert [g.keep.path for g in updated.groups] == [g.keep.path for g in fresh.groups]
    cache_path(index).write_bytes(b"PK\x03\x04 not a cache")
    damaged = find_duplicates(index, 0.9, k=6)
    assert damaged.run.mode == "full" and group_paths(damaged) == group_paths(fresh)
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary file left


def test_engine_source_uses_the_engines_backend():
    from retrieval.engine import RetrievalEngine

    database = database_of(clustered())
    engine = RetrievalEngine(database, None)
    assert group_paths(find_duplicates(engine, 0.9)) == group_paths(find_duplicates(database, 0.9))


# ---------------------------------------------------------------------------------------------------- web API


def test_api_duplicates_route(tmp_path):
    from retrieval.engine import RetrievalEngine
    from retrieval.web import create_app

    database = database_of(clustered())
    app = create_app(engine=RetrievalEngine(database, None, image_root=tmp_path))
    client = app.test_client()
    body = client.get("/api/duplicates?threshold=0.9").get_json()
    expected = find_duplicates(database, 0.9)
    assert body["groups_count"] == len(expected.groups) and body["threshold"] == 0.9
    first = body["groups"][0]
    assert first["members"][0]["keep"] and first["members"][0]["thumb_url"].startswith("/thumb/")
    assert [m["path"] for m in first["members"]] == [m.path for m in expected.groups[0].members]
    assert client.get("/api/duplicates").get_json()["threshold"] == DEFAULT_THRESHOLD
    assert client.get("/api/duplicates?threshold=0.9&limit=2").get_json()["truncated"] is True
    for bad in ("1.5", "0", "abc", "nan"):
        response = client.get(f"/api/duplicates?threshold={bad}")
        assert response.status_code == 400 and "threshold" in response.get_json()["error"]
    assert client.get("/api/duplicates?k=0").status_code == 400


# ---------------------------------------------------------------------------------------------------- end to end


def run(script, *args, timeout=300):
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def assert_one_line_error(result, *fragments, code=1):
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def photo_index(tmp_path_factory):
    """A folder with exact copies, a half-size copy and unrelated photos, indexed by the real index.py."""
    folder = copy_duplicate_photos(tmp_path_factory.mktemp("dups") / "photos")
    index = folder.parent / "photos.h5"
    result = run("index.py", "--database", folder, "--index", index, "--quiet", "--backbone", "efficientnet-lite0")
    assert result.returncode == 0, result.stderr
    return folder, index


def test_script_reports_groups_in_every_format(photo_index, tmp_path):
    folder, index = photo_index
    before = sorted((p.relative_to(folder), p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*"))
    out_json, out_csv, out_html = tmp_path / "d.json", tmp_path / "d.csv", tmp_path / "r" / "d.html"
    result = run("find_duplicates.py", "--index", index, "--json", out_json, "--csv", out_csv, "--html", out_html)
    assert result.returncode == 0, result.stderr
    assert "groups" in result.stdout.splitlines()[0]
    report = json.loads(out_json.read_text())
    groups = {frozenset(m["path"] for m in g["members"]): g for g in report["groups"]}
    coffee = frozenset({"coffee.jpg", "backup/coffee copy.jpg", "backup/coffee small.jpg"})
    assert coffee in groups and frozenset({"rocket.jpg", "backup/rocket.jpg"}) in groups
    assert all(len(g["members"]) >= 2 for g in report["groups"])
    members = groups[coffee]["members"]
    assert members[0]["keep"] and members[0]["path"] != "backup/coffee small.jpg"  # the full-size one is kept
    assert members[0]["width"] and members[-1]["score"] > 0.9
    assert report["threshold"] == DEFAULT_THRESHOLD and report["run"]["mode"] == "full"
    rows = list(csv.DictReader(io.StringIO(out_csv.read_text())))
    assert {r["path"] for r in rows} >= set(coffee) and sum(r["keep"] == "1" for r in rows) == len(report["groups"])
    page = out_html.read_text()
    assert page.count('src="data:image/jpeg;base64,') == sum(len(g["members"]) for g in report["groups"])
    assert "http://" not in page and "https://" not in page and "<script" not in page and "backup/coffee copy.jpg" in page
    # it reported and touched nothing
    assert sorted((p.relative_to(folder), p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")) == before
    cached = run("find_duplicates.py", "--index", index, "--json", "-", "--threshold", "0.99")
    assert cached.returncode == 0, cached.stderr
    assert json.loads(cached.stdout)["run"]["mode"] == "cached"


def test_script_is_incremental_after_index_adds_images(photo_index, tmp_path):
    folder, index = photo_index
    copy_folder, copy_index = tmp_path / "photos", tmp_path / "photos.h5"
    shutil.copytree(folder, copy_folder)
    shutil.copy(index, copy_index)
    assert run("find_duplicates.py", "--index", copy_index, "--quiet", "--k", "2").returncode == 0
    shutil.copy(DEMO_DATABASE / "astronaut" / "original.jpg", copy_folder / "astronaut again.jpg")
    (copy_folder / "backup" / "rocket.jpg").unlink()
    assert run("index.py", "--database", copy_folder, "--index", copy_index, "--quiet").returncode == 0
    # k = 2: with 7 images and k = 10 every image would have lost a neighbour and be searched again
    result = run("find_duplicates.py", "--index", copy_index, "--json", "-", "--k", "2")
    full = run("find_duplicates.py", "--index", copy_index, "--json", "-", "--no-cache", "--k", "2")
    report, expected = json.loads(result.stdout), json.loads(full.stdout)
    assert report["run"]["mode"] == "incremental" and report["run"]["searched"] < report["images"]
    assert [sorted(m["path"] for m in g["members"]) for g in report["groups"]] == \
        [sorted(m["path"] for m in g["members"]) for g in expected["groups"]]
    assert any({"astronaut.jpg", "astronaut again.jpg"} == {m["path"] for m in g["members"]} for g in report["groups"])


@pytest.fixture(scope="module")
def preset_index(tmp_path_factory):
    """``photo_index``'s photos and a mirrored crop of coffee, indexed by index.py --preset copy-detection; the image
    folder is then moved away, so that whatever verifies must do it from the stored features alone."""
    from PIL import ImageOps

    root = tmp_path_factory.mktemp("dups-preset")
    folder = copy_duplicate_photos(root / "photos")
    with Image.open(DEMO_DATABASE / "coffee" / "original.jpg") as image:
        width, height = image.size
        crop = image.crop((width // 8, height // 8, width - width // 8, height - height // 8))
        ImageOps.mirror(crop).save(folder / "backup" / "coffee mirrored crop.jpg", quality=85)
    index = root / "photos.h5"
    indexed = run("index.py", "--database", folder, "--index", index, "--quiet", "--preset", "copy-detection",
                  "--backbone", "efficientnet-lite0")
    assert indexed.returncode == 0, indexed.stderr
    folder.rename(root / "moved")
    return index


def test_verify_confirms_copies_from_the_stored_features_alone(preset_index):
    """On an index built with the preset, verification is the default: the copies (exact, half size, a mirrored
    crop) are confirmed and the unrelated pairs a low threshold lets through are rejected, with no image to read;
    --no-verify turns it off."""
    def report(*args):
        result = run("find_duplicates.py", "--index", preset_index, "--json", "-", "--no-cache", *args)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    coffee = sorted(["coffee.jpg", "backup/coffee copy.jpg", "backup/coffee small.jpg", "backup/coffee mirrored crop.jpg"])
    expected = sorted([coffee, sorted(["rocket.jpg", "backup/rocket.jpg"])])
    for args in ((), ("--verify",)):
        verified = report("--threshold", "0.1", *args)
        assert sorted(sorted(m["path"] for m in g["members"]) for g in verified["groups"]) == expected
        assert verified["verified"] == "local features" and verified["rejected_by_verification"] > 0
    assert report()["threshold"] == VERIFIED_THRESHOLD
    plain = report("--threshold", "0.1", "--no-verify")
    assert plain["verified"] is None and plain["rejected_by_verification"] == 0
    assert len(plain["groups"]) == 1 and plain["groups"][0]["size"] == 8  # all 8 join at 0.1 unverified
    assert report("--no-verify")["threshold"] == DEFAULT_THRESHOLD


def test_api_duplicates_verify(preset_index, tmp_path):
    """/api/duplicates verifies by default on a preset index (its threshold then the verified one), verify=0 turns it
    off, a bad value is 400; on an index without local features verify=1 is 400."""
    from retrieval.engine import RetrievalEngine
    from retrieval.web import create_app

    client = create_app(engine=RetrievalEngine.open(preset_index)).test_client()
    body = client.get("/api/duplicates?threshold=0.1").get_json()
    assert body["verified"] == "local features" and body["rejected_by_verification"] > 0 and body["groups_count"] == 2
    assert client.get("/api/duplicates").get_json()["threshold"] == VERIFIED_THRESHOLD
    plain = client.get("/api/duplicates?threshold=0.1&verify=0").get_json()
    assert plain["verified"] is None and plain["groups_count"] == 1
    assert client.get("/api/duplicates?verify=0").get_json()["threshold"] == DEFAULT_THRESHOLD
    response = client.get("/api/duplicates?verify=maybe")
    assert response.status_code == 400 and "verify" in response.get_json()["error"]
    classic = create_app(engine=RetrievalEngine(database_of(clustered()), None, image_root=tmp_path)).test_client()
    response = classic.get("/api/duplicates?verify=1")
    assert response.status_code == 400 and "local features" in response.get_json()["error"]
    assert classic.get("/api/duplicates").get_json()["verified"] is None


def test_script_bad_inputs_give_one_error_line(photo_index, tmp_path):
    folder, index = photo_index
    assert_one_line_error(run("find_duplicates.py", "--index", tmp_path / "missing.h5"), "no such index file")
    empty = tmp_path / "empty.h5"
    write_database(empty, FeatureDatabase(encoder(), np.zeros((0, DIM), np.float32), [], np.zeros(0, np.int64), np.zeros(0, np.int64)))
    assert_one_line_error(run("find_duplicates.py", "--index", empty), "no images")
    for bad in ("1.5", "0", "-0.2", "nan", "high"):
        assert_one_line_error(run("find_duplicates.py", "--index", index, "--threshold", bad), "--threshold", code=2)
    assert_one_line_error(run("find_duplicates.py", "--index", index, "--k", "0"), "--k", code=2)
    assert_one_line_error(run("find_duplicates.py", "--index", index, "--json", tmp_path), "is a folder")
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked").chmod(0o500)
    try:
        result = run("find_duplicates.py", "--index", index, "--csv", tmp_path / "locked" / "d.csv")
        if result.returncode == 0:  # running as root: permissions do not stop it; a path under a file does
            result = run("find_duplicates.py", "--index", index, "--csv", index / "d.csv")
        assert_one_line_error(result, "d.csv")
    finally:
        (tmp_path / "locked").chmod(0o700)
    assert_one_line_error(run("find_duplicates.py", "--index", index, "--verify"), "--verify", "no local features")
    not_hdf5 = tmp_path / "x.h5"
    not_hdf5.write_text("hello")
    assert_one_line_error(run("find_duplicates.py", "--index", not_hdf5), "x.h5")
