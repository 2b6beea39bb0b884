"""The Milvus backend against a real Milvus standalone server (PyPI milvus==2.3.5, started by the ``milvus_server``
fixture on loopback ports), as it runs against the embedded Milvus Lite in test_backends.py: building, updating,
the collection's state on the server, terminal queries, and faults (server down at query time, restarted during
indexing, restarted between runs)."""

import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import DEMO_DATABASE, REPO, copy_demo_pairs, start_server, stop
from retrieval.engine import RetrievalEngine
from retrieval.indexing import build_index
from retrieval.storage.database import read_database
from retrieval.vectors import top_k

K = 10


def build(folder, path, **options):
    return build_index(folder, path, backbone="efficientnet-lite0", progress=False, notice=lambda line: None, **options)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """24 demo photos (12 originals, 12 views), indexed once in memory."""
    root = tmp_path_factory.mktemp("server-corpus")
    folder = copy_demo_pairs(root / "images")
    build(folder, root / "memory.h5")
    return folder, root


def on_server(corpus, tmp_path, server, **options):
    folder, root = corpus
    path = tmp_path / "m.h5"
    shutil.copy(root / "memory.h5", path)
    report = build(folder, path, backend="milvus", milvus_uri=server.uri, **options)
    return path, report


def collection_state(server, name):
    from pymilvus import MilvusClient

    client = MilvusClient(uri=server.uri, timeout=10)
    try:
        count = client.query(name, filter="", output_fields=["count(*)"], consistency_level="Strong", timeout=30)[0]["count(*)"]
        index = client.describe_index(name, index_name="vector", timeout=10)
        return count, index, str(client.get_load_state(name, timeout=10)["state"])
    finally:
        client.close()


def recall(path):
    engine = RetrievalEngine.open(path, with_extractor=False)
    try:
        found = []
        for row in range(len(engine)):
            exact, _ = top_k(engine.matrix, engine.matrix[row], K)
            hits = engine.search(engine.database.vectors[row], K)
            found.append(len({h.id for h in hits} & set(exact.tolist())) / len(exact))
        return float(np.mean(found)), engine.pipeline.kind
    finally:
        engine.close()


def score_agreement(path) -> float:
    """Largest difference between the backend's top-k scores and exact search's, over every image as a query."""
    engine = RetrievalEngine.open(path, with_extractor=False)
    try:
        _, exact = top_k(engine.matrix, engine.matrix, K)
        served = np.array([[h.score for h in hits] for hits in engine.search_many(engine.database.vectors, K)])
        return float(np.abs(served - exact).max())
    finally:
        engine.close()


def test_build_update_and_rebuild_on_a_server(corpus, tmp_path, milvus_server):
    folder, _ = corpus
    path, report = on_server(corpus, tmp_path, milvus_server)
    assert report.backend == "milvus" and report.extracted == 0
    record = read_database(path).search_backend
    assert record["uri"] == milvus_server.uri and record["collection"] == "cbir_m"
    count, index, state = collection_state(milvus_server, "cbir_m")
    assert count == 24 and index["index_type"] == "HNSW" and index["metric_type"] == "IP" and "Loaded" in state
    assert recall(path) == (1.0, "milvus-HNSW")

    # add one image, remove two: only the difference is sent, the collection follows
    shutil.copy(DEMO_DATABASE / "clock" / "view-02.jpg", folder / "clock" / "view-02.jpg")
    removed = [folder / "rocket" / "view-01.jpg", folder / "coffee" / "view-01.jpg"]
    saved = [p.read_bytes() for p in removed]
    for p in removed:
        p.unlink()
    try:
        update = build(folder, path)
        assert update.backend_detail.startswith("updated: 1 upserted, 2 deleted"), update.backend_detail
        assert collection_state(milvus_server, "cbir_m")[0] == 23
        assert recall(path)[0] == 1.0
    finally:
        for p, data in zip(removed, saved):
            p.write_bytes(data)
        (folder / "clock" / "view-02.jpg").unlink()

    # another index type: the collection is re-created, then --rebuild drops and refills it
    assert build(folder, path, milvus_index="IVF_FLAT").backend_detail.startswith(("filled", "reconciled"))
    assert collection_state(milvus_server, "cbir_m")[1]["index_type"] == "IVF_FLAT"
    rebuilt = build(folder, path, rebuild=True)
    assert rebuilt.extracted == 24 and collection_state(milvus_server, "cbir_m")[0] == 24


def test_terminal_query_and_durability_across_a_server_restart(corpus, tmp_path, milvus_server):
    path, _ = on_server(corpus, tmp_path, milvus_server)
    query = ["query_online.py", "--query", DEMO_DATABASE / "coffee" / "original.jpg", "--index", path, "--json", "--top-k", "3"]
    before = subprocess.run([sys.executable, str(REPO / query[0]), *map(str, query[1:])], capture_output=True, text=True, cwd=REPO, timeout=180)
    assert before.returncode == 0, before.stderr
    milvus_server.restart()
    after = subprocess.run([sys.executable, str(REPO / query[0]), *map(str, query[1:])], capture_output=True, text=True, cwd=REPO, timeout=180)
    assert after.returncode == 0, after.stderr
    assert before.stdout == after.stdout  # the same answer from the restarted server: nothing lost
    assert build(corpus[0], path).backend_detail.startswith("unchanged")  # its version marker survived too


def test_server_down_at_query_time_is_one_line_and_a_503_then_recovers(corpus, tmp_path, milvus_server):
    path, _ = on_server(corpus, tmp_path, milvus_server)
    process, url = start_server(tmp_path / "server.log", "--index", path)
    try:
        import json
        import urllib.error
        import urllib.request

        def search():
            try:
                with urllib.request.urlopen(url + "api/search?id=0&k=3", timeout=60) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as error:
                return error.code, json.loads(error.read())

        assert search()[0] == 200
        milvus_server.stop()
        started = time.monotonic()
        status, body = search()
        assert status == 503 and "Milvus" in body["error"] and time.monotonic() - started < 35
        query = subprocess.run(
            [sys.executable, str(REPO / "query_online.py"), "--query", str(DEMO_DATABASE / "coffee" / "original.jpg"),
             "--index", str(path)], capture_output=True, text=True, cwd=REPO, timeout=180,
        )
        lines = [line for line in query.stderr.splitlines() if line.strip()]
        assert query.returncode == 1 and lines[-1].startswith("error: ") and "Milvus" in lines[-1], query.stderr
        assert "Traceback" not in query.stderr
        milvus_server.start()
        deadline = time.monotonic() + 90
        while search()[0] != 200:
            assert time.monotonic() < deadline, "the server did not recover after Milvus came back"
            time.sleep(2)
    finally:
        stop(process)


def test_server_restarted_during_indexing_loses_nothing(corpus, tmp_path, milvus_server):
    """A Milvus restart in the middle of index.py: a clear error or success, never a half state; a re-run completes."""
    folder, _ = corpus
    path = tmp_path / "m.h5"
    many = tmp_path / "many"
    for copy in range(3):
        shutil.copytree(folder, many / f"copy-{copy}")
    with open(tmp_path / "job.log", "w") as log:
        job = subprocess.Popen(
            [sys.executable, str(REPO / "index.py"), "--database", str(many), "--index", str(path), "--backend", "milvus",
             "--milvus-uri", milvus_server.uri, "--backbone", "efficientnet-lite0", "--quiet", "--batch-size", "4",
             "--checkpoint-every", "8"],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("m.h5.partial/chunk-*.npz")) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.3)
    milvus_server.restart()
    code = job.wait(timeout=600)
    output = (tmp_path / "job.log").read_text()
    assert "Traceback" not in output, output
    assert code == 0 or output.strip().splitlines()[-1].startswith("error: "), output
    rerun = subprocess.run(
        [sys.executable, str(REPO / "index.py"), "--database", str(many), "--index", str(path), "--backend", "milvus",
         "--milvus-uri", milvus_server.uri, "--backbone", "efficientnet-lite0", "--quiet"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )  # the same command again: the first run may have failed before it wrote the file that records the backend
    assert rerun.returncode == 0, rerun.stderr
    assert len(read_database(path)) == 72 and collection_state(milvus_server, "cbir_m")[0] == 72
    assert score_agreement(path) < 1e-4  # three copies of each photo tie: compare scores, not ids


def copy_search(path):
    """(the region search's kind, rows, scores) of a copy search where every stored region is a query."""
    from retrieval.search.copies import QueryFeatures

    engine = RetrievalEngine.open(path, with_extractor=False)
    try:
        queries = [QueryFeatures(np.asarray(v, np.float32)) for v in engine.database.copies.region_vectors]
        rows, scores, _ = engine.pipeline.search_copies(queries, 5)
        return engine.pipeline.regions.kind, rows, scores
    finally:
        engine.close()


def test_regions_live_in_a_second_collection_on_the_server(corpus, tmp_path, milvus_server):
    """Several vectors per image on a real server: the region collection is created, indexed, loaded, searched
    (images each once, as exact search in memory finds them) and kept in step by an update."""
    folder = tmp_path / "images"
    shutil.copytree(corpus[0], folder)
    memory = tmp_path / "regions.h5"
    build(folder, memory, regions=True)
    regions = len(read_database(memory).copies.region_vectors)
    path = tmp_path / "m.h5"
    shutil.copy(memory, path)
    report = build(folder, path, backend="milvus", milvus_uri=milvus_server.uri)
    assert report.extracted == 0 and "; regions filled" in report.backend_detail, report.backend_detail
    count, index, state = collection_state(milvus_server, "cbir_m__regions")
    assert count == regions > 24 and index["index_type"] == "HNSW" and "Loaded" in state
    kind, rows, scores = copy_search(path)
    exact_kind, exact_rows, exact_scores = copy_search(memory)
    assert (kind, exact_kind) == ("milvus-HNSW", "exact")
    assert rows.tolist() == exact_rows.tolist()
    np.testing.assert_allclose(scores, exact_scores, atol=1e-4)

    (folder / "rocket" / "view-01.jpg").unlink()
    shutil.copy(DEMO_DATABASE / "clock" / "view-02.jpg", folder / "clock" / "view-02.jpg")
    shutil.copy(memory, tmp_path / "after.h5")
    build(folder, tmp_path / "after.h5")
    update = build(folder, path)
    assert "; regions updated" in update.backend_detail, update.backend_detail
    assert collection_state(milvus_server, "cbir_m__regions")[0] == len(read_database(path).copies.region_vectors)
    _, rows, scores = copy_search(path)
    _, exact_rows, exact_scores = copy_search(tmp_path / "after.h5")
    assert rows.tolist() == exact_rows.tolist()
    np.testing.assert_allclose(scores, exact_scores, atol=1e-4)
