"""Search backends: memory (exact), faiss (HNSW, IVF) and Milvus (embedded Milvus Lite), built by build_index and
opened through RetrievalEngine.open like the terminal query, the server and the evaluator do. All offline."""

import json
import os
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from conftest import DEMO_DATABASE, REPO, copy_demo_pairs
from retrieval.engine import RetrievalEngine
from retrieval.errors import IndexFileError, RetrievalError
from retrieval.indexing import build_index
from retrieval.vectors import top_k
from retrieval.storage.database import read_database
from retrieval.search.backends.faiss import FaissBackend as FaissIndex, faiss_paths

import faiss  # noqa: E402,F401  (requirements.txt: a missing package must fail the suite, not skip it)
import milvus_lite  # noqa: E402,F401
import pymilvus  # noqa: E402,F401

K = 10


def build(folder, path, **options):
    options.setdefault("progress", False)
    options.setdefault("notice", lambda line: None)
    return build_index(folder, path, backbone="efficientnet-lite0", **options)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """24 demo photos (12 originals, 12 views) indexed once in memory; other backends are built from this file."""
    root = tmp_path_factory.mktemp("backends")
    folder = copy_demo_pairs(root / "images")
    build(folder, root / "memory.h5")
    return folder, root


def derived(corpus, name, **options):
    """A copy of the in-memory index switched to another backend: no image is extracted again."""
    folder, root = corpus
    path = root / f"{name}.h5"
    if not path.exists():
        shutil.copy(root / "memory.h5", path)
        report = build(folder, path, **options)
        assert report.extracted == 0 and report.written
    return path


def recall_against_exact(path) -> tuple[float, float]:
    """(recall@10, largest score difference) of the backend recorded in ``path`` against exact search, every image
    querying with its own vector."""
    engine = RetrievalEngine.open(path, with_extractor=False)
    try:
        found, worst = [], 0.0
        for row in range(len(engine)):
            exact_rows, exact_scores = top_k(engine.matrix, engine.matrix[row], K)
            hits = engine.search(engine.database.vectors[row], K)
            found.append(len({h.id for h in hits} & set(exact_rows.tolist())) / len(exact_rows))
            worst = max(worst, float(np.max(np.abs(np.array([h.score for h in hits]) - exact_scores))))
        return float(np.mean(found)), worst
    finally:
        close(engine)


def close(engine):
    engine.close()  # Milvus Lite serves one process at a time: let go of it


@pytest.mark.parametrize(
    "name, options, kind",
    [
        ("memory", {}, "exact"),
        ("faiss_hnsw", {"backend": "faiss", "faiss_index": "hnsw"}, "faiss-hnsw"),
        ("faiss_ivf", {"backend": "faiss", "faiss_index": "ivf"}, "faiss-ivf"),
        ("milvus_hnsw", {"backend": "milvus"}, "milvus-HNSW"),
        ("milvus_ivf", {"backend": "milvus", "milvus_index": "IVF_FLAT"}, "milvus-IVF_FLAT"),
    ],
)
def test_every_backend_agrees_with_exact_search(corpus, name, options, kind):
    path = derived(corpus, name, **options) if name != "memory" else corpus[1] / "memory.h5"
    engine = RetrievalEngine.open(path, with_extractor=False)
    assert engine.pipeline.kind == kind
    close(engine)
    recall, worst = recall_against_exact(path)
    print(f"{name}: recall@{K} {recall:.3f} against exact search, largest score difference {worst:.2e}")
    assert recall == 1.0 and worst < 1e-4


def test_the_backend_is_recorded_in_the_database(corpus):
    folder, root = corpus
    memory = read_database(root / "memory.h5")
    assert memory.search_backend == {"backend": "memory"}
    assert read_database(derived(corpus, "faiss_hnsw", backend="faiss", faiss_index="hnsw")).search_backend == {
        "backend": "faiss", "index": "hnsw"}
    path = derived(corpus, "milvus_hnsw", backend="milvus")
    record = read_database(path).search_backend
    assert record["backend"] == "milvus" and record["uri"] == "milvus_hnsw.h5.milvus.db"  # beside it, relative
    assert record["collection"] == "cbir_milvus_hnsw" and record["index_type"] == "HNSW" and record["metric_type"] == "IP"
    assert (root / "milvus_hnsw.h5.milvus.db").is_dir()
    with h5py.File(path, "r") as h5:  # plain JSON for other tools, and the vectors stay in the file
        assert json.loads(h5.attrs["search_backend"])["collection"] == "cbir_milvus_hnsw"
        assert h5["vectors"].shape == (24, 1280)
    # an update without --backend keeps the recorded one and touches nothing
    report = build(folder, path)
    assert not report.written and report.backend == "milvus" and report.backend_detail.startswith("unchanged")


def change_folder(folder):
    """Remove one image, change one (new content, same path), add one."""
    (folder / "rocket" / "view-01.jpg").unlink()
    shutil.copy(DEMO_DATABASE / "coins" / "view-02.jpg", folder / "coins" / "view-01.jpg")
    shutil.copy(DEMO_DATABASE / "clock" / "view-02.jpg", folder / "clock" / "view-02.jpg")


def test_incremental_updates_keep_faiss_and_milvus_in_step(corpus, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(corpus[0], folder)
    faiss_path, milvus_path = tmp_path / "f.h5", tmp_path / "m.h5"
    build(folder, faiss_path, backend="faiss", faiss_index="hnsw")
    shutil.copy(faiss_path, milvus_path)
    build(folder, milvus_path, backend="milvus")
    first = read_database(faiss_path)
    change_folder(folder)

    report = build(folder, faiss_path)
    assert (report.extracted, report.removed) == (2, 1) and report.backend_detail.startswith("updated: 2 added")
    database = read_database(faiss_path)
    graph = FaissIndex.load(faiss_path, database.database_id)
    assert graph.index.ntotal == 26 and graph.dead == 2  # HNSW cannot remove: the ids of the old vectors are masked
    assert sorted(p.name for p in tmp_path.glob("f.h5.*")) == sorted(p.name for p in faiss_paths(faiss_path, database.database_id))
    assert FaissIndex.load(faiss_path, first.database_id) is None  # the previous version's files are gone

    report = build(folder, milvus_path)
    assert report.backend_detail.startswith("updated: 2 upserted, 1 deleted")
    for path in (faiss_path, milvus_path):
        recall, worst = recall_against_exact(path)
        assert recall == 1.0 and worst < 1e-4, path
        engine = RetrievalEngine.open(path, with_extractor=False)
        changed = engine.database.paths.index("coins/view-01.jpg")
        hits = engine.search(engine.database.vectors[changed], len(engine))
        assert hits[0].id == changed and hits[0].score > 0.9999  # its new vector, not the replaced one
        assert len(hits) == len(engine) == 24 and "rocket/view-01.jpg" not in {h.path for h in hits}
        close(engine)


def test_a_whitening_learned_again_replaces_every_vector(corpus, tmp_path):
    from retrieval.indexing import WhiteningRequest

    folder = tmp_path / "images"
    shutil.copytree(corpus[0], folder)
    faiss_path, milvus_path = tmp_path / "f.h5", tmp_path / "m.h5"
    shutil.copy(corpus[1] / "memory.h5", faiss_path)
    assert build(folder, faiss_path, backend="faiss", whitening=WhiteningRequest(learn=True, dim=6)).extracted == 0
    shutil.copy(faiss_path, milvus_path)
    build(folder, milvus_path, backend="milvus")
    shutil.copy(DEMO_DATABASE / "clock" / "view-02.jpg", folder / "clock" / "view-02.jpg")  # whitening re-learned
    assert build(folder, faiss_path).backend_detail == "built hnsw"
    assert build(folder, milvus_path).backend_detail.startswith("reconciled: 25 upserted, 0 deleted")
    for path in (faiss_path, milvus_path):
        recall, worst = recall_against_exact(path)
        assert recall == 1.0 and worst < 1e-4, path


def test_milvus_collection_out_of_step_is_reconciled(corpus, tmp_path):
    from pymilvus import MilvusClient

    folder = corpus[0]
    path = tmp_path / "m.h5"
    shutil.copy(corpus[1] / "memory.h5", path)
    build(folder, path, backend="milvus", milvus_collection="photos")
    client = MilvusClient(str(tmp_path / "m.h5.milvus.db"))
    client.delete("photos", ids=["coffee/original.jpg"])
    client.upsert("photos", data=[{"path": "ghost.jpg", "vector": np.full(1280, 0.028, np.float32),
                                   "file_size": 1, "file_mtime_ns": 1}])
    client.alter_collection_properties("photos", properties={"cbir.database_id": "lost"})
    client.close()
    report = build(folder, path)
    assert report.backend_detail.startswith("reconciled: 1 upserted, 1 deleted")
    recall, _ = recall_against_exact(path)
    assert recall == 1.0


def test_switching_backends_and_serving_with_another(corpus, tmp_path):
    folder = corpus[0]
    path = tmp_path / "s.h5"
    shutil.copy(corpus[1] / "memory.h5", path)
    build(folder, path, backend="faiss")
    database = read_database(path)
    assert all(p.exists() for p in faiss_paths(path, database.database_id))
    # a faiss database whose index file is missing: a clear error, and the vectors still serve it in memory
    faiss_paths(path, database.database_id)[0].unlink()
    with pytest.raises(IndexFileError, match="no faiss index"):
        RetrievalEngine.open(path, with_extractor=False)
    assert RetrievalEngine.open(path, with_extractor=False, backend="memory").pipeline.kind == "exact"
    report = build(folder, path)  # the next run rebuilds it
    assert report.backend_detail == "built hnsw" and report.extracted == 0
    build(folder, path, backend="memory")
    assert not list(tmp_path.glob("s.h5.*")) and read_database(path).search_backend == {"backend": "memory"}


@pytest.mark.parametrize(
    "options, message",
    [
        ({"backend": "nope"}, "unknown backend 'nope'"),
        ({"backend": "faiss", "faiss_index": "pq"}, "unknown faiss index"),
        ({"backend": "milvus", "milvus_index": "IVF_PQ"}, "not supported here"),
        ({"backend": "milvus", "milvus_uri": "somewhere"}, "local path ending in .db"),
        ({"backend": "milvus", "milvus_collection": "9 lives"}, "collection name"),
        ({"backend": "faiss", "ann": "hnsw"}, "--ann applies to --backend memory, not faiss"),
        ({"backend": "memory", "milvus_uri": "x.db"}, "--milvus-uri applies to --backend milvus"),
        ({"backend": "milvus", "milvus_uri": "http://127.0.0.1:1"}, "cannot reach Milvus at http://127.0.0.1:1"),
        ({"backend": "milvus", "milvus_uri": "/no/such/folder/x.db"}, "does not exist"),
    ],
)
def test_bad_backend_choices_fail_before_any_work(corpus, tmp_path, options, message):
    started = time.monotonic()
    with pytest.raises(RetrievalError, match=message):
        build(corpus[0], tmp_path / "bad.h5", **options)
    assert time.monotonic() - started < 15 and not (tmp_path / "bad.h5").exists()


def test_unreachable_milvus_is_one_line_from_the_scripts(corpus, tmp_path):
    env = {**os.environ, "RETRIEVAL_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "index.py"), "--database", corpus[0], "--index", tmp_path / "x.h5",
         "--backend", "milvus", "--milvus-uri", "http://127.0.0.1:1", "--backbone", "efficientnet-lite0", "--quiet"],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=env,
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach Milvus"), result.stderr
    result = subprocess.run(
        [sys.executable, str(REPO / "index.py"), "--database", corpus[0], "--index", tmp_path / "x.h5", "--backend", "nope"],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=env,
    )
    assert result.returncode == 2 and "invalid choice: 'nope'" in result.stderr


def test_terminal_query_works_unchanged_on_milvus(corpus):
    """query_online.py knows nothing of backends: it opens the index, which names its Milvus collection."""
    folder, root = corpus
    path = derived(corpus, "milvus_hnsw", backend="milvus")
    result = subprocess.run(
        [sys.executable, str(REPO / "query_online.py"), "--query", folder / "coffee" / "view-01.jpg", "--index", path,
         "--json", "-k", "3"],
        capture_output=True, text=True, timeout=180, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    paths = [hit["path"] for hit in json.loads(result.stdout)["results"]]
    assert paths[:2] == ["coffee/view-01.jpg", "coffee/original.jpg"]


@pytest.fixture(scope="module")
def region_corpus(corpus, tmp_path_factory):
    """The 24 photos indexed once with region vectors (in memory); the faiss and Milvus copies reuse its features."""
    root = tmp_path_factory.mktemp("regions")
    folder = root / "images"
    shutil.copytree(corpus[0], folder)
    build(folder, root / "memory.h5", regions=True)
    return folder, root


def region_results(path) -> tuple[str, list[list[int]], list[list[float]]]:
    """(the region search's kind, and per query: the rows and scores of a copy search) where every stored region of
    every image is a query: images are found by their regions, each at most once."""
    from retrieval.search.copies import QueryFeatures

    engine = RetrievalEngine.open(path, with_extractor=False)
    try:
        copies = engine.database.copies
        queries = [QueryFeatures(np.asarray(v, np.float32)) for v in copies.region_vectors]
        rows, scores, _ = engine.pipeline.search_copies(queries, 5)
        return engine.pipeline.regions.kind, rows.tolist(), scores.tolist()
    finally:
        close(engine)


def test_regions_are_searched_by_every_backend_with_the_same_results(region_corpus, tmp_path):
    """Several vectors per image in faiss (a second index) and Milvus (a second collection): same images, same
    scores as the exact search in memory; each image at most once; kept in step by incremental updates."""
    from pymilvus import MilvusClient

    folder, root = region_corpus
    exact_kind, exact_rows, exact_scores = region_results(root / "memory.h5")
    assert exact_kind == "exact"
    regions = read_database(root / "memory.h5").copies
    assert len(regions.region_vectors) > 24
    images = folder.parent / "work"
    shutil.copytree(folder, images)
    for name, options, kind in (("f", {"backend": "faiss", "faiss_index": "hnsw"}, "faiss-hnsw"), ("m", {"backend": "milvus"}, "milvus-HNSW")):
        path = tmp_path / f"{name}.h5"
        shutil.copy(root / "memory.h5", path)
        report = build(folder, path, **options)
        assert report.extracted == 0 and "; regions " in report.backend_detail
        got_kind, rows, scores = region_results(path)
        assert got_kind == kind
        assert rows == exact_rows
        np.testing.assert_allclose(scores, exact_scores, atol=1e-4)
        assert all(len(set(r) - {-1}) == len([x for x in r if x >= 0]) for r in rows)  # images, each once
    database = read_database(tmp_path / "f.h5")
    graph = FaissIndex.load(tmp_path / "f.h5", database.database_id, ".regions")
    assert graph.index.ntotal == len(regions.region_vectors) and set(graph.rows.tolist()) == set(range(24))
    client = MilvusClient(str(tmp_path / "m.h5.milvus.db"))
    try:
        assert client.query("cbir_m__regions", filter="", output_fields=["count(*)"])[0]["count(*)"] == len(regions.region_vectors)
    finally:
        client.close()

    # an update (one image removed, one changed, one added) carries both structures; results equal exact search again
    for name in ("memory", "f", "m"):
        path = root / "memory.h5" if name == "memory" else tmp_path / f"{name}.h5"
        target = tmp_path / f"{name}-2.h5"
        shutil.copy(path, target)
        if name == "m":
            shutil.copytree(tmp_path / "m.h5.milvus.db", tmp_path / "m-2.h5.milvus.db")
        elif name == "f":
            for part in ("", ".regions"):
                for source in faiss_paths(path, database.database_id, part):
                    shutil.copy(source, str(source).replace("f.h5", "f-2.h5"))
    change_folder(images)
    outcomes = {}
    for name in ("memory", "f", "m"):
        path = tmp_path / f"{name}-2.h5"
        report = build(images, path, **({"milvus_collection": "cbir_m"} if name == "m" else {}))
        assert report.extracted == 2
        outcomes[name] = region_results(path)
        if name != "memory":
            assert "regions updated" in report.backend_detail, report.backend_detail
    assert outcomes["f"][1] == outcomes["memory"][1] == outcomes["m"][1]
    np.testing.assert_allclose(outcomes["f"][2], outcomes["memory"][2], atol=1e-4)
    np.testing.assert_allclose(outcomes["m"][2], outcomes["memory"][2], atol=1e-4)

    # region files of another version under this version's name: one clear error, not wrong results
    database = read_database(tmp_path / "f-2.h5")
    saved = [path.read_bytes() for path in faiss_paths(tmp_path / "f-2.h5", database.database_id, ".regions")]
    for source, target in zip(faiss_paths(tmp_path / "f.h5", read_database(tmp_path / "f.h5").database_id, ".regions"),
                              faiss_paths(tmp_path / "f-2.h5", database.database_id, ".regions")):
        shutil.copy(source, target)
    with pytest.raises(IndexFileError, match="faiss index of its regions does not match"):
        RetrievalEngine.open(tmp_path / "f-2.h5", with_extractor=False)
    for path, data in zip(faiss_paths(tmp_path / "f-2.h5", database.database_id, ".regions"), saved):
        path.write_bytes(data)
    assert region_results(tmp_path / "f-2.h5")[0] == "faiss-hnsw"
    # a database indexed before region structures existed: its regions are searched exactly in memory
    for source in faiss_paths(tmp_path / "f-2.h5", database.database_id, ".regions"):
        source.unlink()
    assert region_results(tmp_path / "f-2.h5")[0] == "exact"
    # a database that drops its regions drops the region collection too
    build(images, tmp_path / "m-2.h5", regions=False, rebuild=True, milvus_collection="cbir_m")
    client = MilvusClient(str(tmp_path / "m-2.h5.milvus.db"))
    try:
        assert not client.has_collection("cbir_m__regions") and client.has_collection("cbir_m")
    finally:
        client.close()
