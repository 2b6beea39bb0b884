"""The evaluation loop by hand, then ``evaluate.py`` end to end on a tiny real index."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import DEMO_DATABASE, REPO
from retrieval.errors import ImageError, RetrievalError
from retrieval.evaluation.protocol import PathResolver, crop_to_box, evaluate_queries, prepare_queries, write_pr_plot
from retrieval.evaluation.groundtruth import GroundTruth, Query, folders_from_paths
from retrieval.descriptors.whitening import learn_pca_whitening
from retrieval.search.backends.memory import MemoryBackend
from retrieval.search.expansion import QueryExpansion
from retrieval.search.pipeline import QueryPipeline, searched_matrix

# four 2-d unit vectors; cosines: 0-1 .8, 0-2 .6, 0-3 0, 1-2 .96, 1-3 .6, 2-3 .8
PATHS = ["a/1.jpg", "a/2.jpg", "b/1.jpg", "b/2.jpg"]
VECTORS = np.array([[1, 0], [0.8, 0.6], [0.6, 0.8], [0, 1]], dtype=np.float32)


def exact(vectors=VECTORS, whitening=None):
    """The pipeline the server would serve for a database of ``vectors``: exact search in memory."""
    matrix = searched_matrix(vectors, whitening)
    return QueryPipeline(MemoryBackend(matrix), matrix, whitening)


def test_path_resolver_exact_then_unique_stem_for_bare_names():
    resolver = PathResolver(["x/all_souls_000013.jpg", "a/1.jpg", "b/1.jpg"])
    assert resolver.row("a/1.jpg") == 1
    assert resolver.row("all_souls_000013.jpg") == 0  # bare name, unique stem
    assert resolver.row("all_souls_000013") == 0
    assert resolver.row("1.jpg") is None  # two images have stem "1"
    assert resolver.row("c/all_souls_000013.jpg") is None  # a path with a folder must match exactly


def test_folders_protocol_by_hand():
    # rankings without the query itself: a/1 -> 1,2,3 (AP 1); a/2 -> 2,0,3 (AP 1/2); b/1 -> 1,3,0 (AP 1/2);
    # b/2 -> 2,1,0 (AP 1)
    prepared = prepare_queries(folders_from_paths(PATHS), PATHS, VECTORS)
    assert [q.exclude for q in prepared.queries] == [0, 1, 2, 3] and not prepared.skipped
    result = evaluate_queries(exact(), prepared.queries, ks=[1, 2], ns_score=True)
    assert [q.average_precision for q in result.queries] == pytest.approx([1, 0.5, 0.5, 1])
    assert result.metrics() == pytest.approx({"mAP": 0.75, "P@1": 0.5, "P@2": 0.5, "R@1": 0.5, "R@2": 1.0, "N-S": 2.0})
    assert list(result.metrics()) == ["mAP", "P@1", "P@2", "R@1", "R@2", "N-S"]
    # mean interpolated precision: recall 1 reached at precision 1 (two queries) and 1/2 (two queries)
    assert result.pr_precision[-1] == pytest.approx(0.75) and result.pr_recall[-1] == 1.0
    table = result.table()
    assert table.splitlines()[1].startswith("mAP") and "0.7500" in table
    data = result.as_dict()
    assert data["metrics"]["mAP"] == 0.75 and data["queries_evaluated"] == 4 and len(data["per_query"]) == 4


def test_junk_missing_relevant_skips_and_encoded_queries():
    truth = GroundTruth(
        (
            Query("a/1.jpg", frozenset({"a/2.jpg", "gone.jpg"}), frozenset({"b/1.jpg"})),
            Query("b/2.jpg", frozenset()),  # nothing relevant: skipped
            Query("b/2.jpg", frozenset({"b/1.jpg"}), bbox=(0, 0, 5, 5)),  # a region: encoded, ranks everything
            Query("new.jpg", frozenset({"a/1.jpg"})),  # not in the index: encoded
            Query("bad.jpg", frozenset({"a/1.jpg"})),  # the encoder cannot read it: skipped
        ),
        "csv",
    )
    calls = []

    def encode(query, row):
        calls.append((query.path, row))
        if query.path == "bad.jpg":
            raise ImageError("bad.jpg: not an image")
        return np.array([0.0, 1.0]) if query.bbox else np.array([1.0, 0.0])

    prepared = prepare_queries(truth, PATHS, VECTORS, encode)
    assert calls == [("b/2.jpg", 3), ("new.jpg", None), ("bad.jpg", None)]
    assert prepared.missing_relevant == ["gone.jpg"]
    assert prepared.skipped == [("b/2.jpg", "no relevant images in the ground truth"), ("bad.jpg", "bad.jpg: not an image")]
    assert [(q.exclude, q.own_row, q.n_relevant) for q in prepared.queries] == [(0, 0, 2), (None, 3, 1), (None, None, 1)]
    result = evaluate_queries(exact(), prepared.queries, ks=[1])
    # a/1: 1, 2, 3 with junk 2 deleted -> 1, 3: hit at 1 of 2 relevant -> AP 1/2, R@1 1/2
    # region query (0, 1) ranks 3 (itself, not relevant), 2, 1, 0 -> hit at 2 -> AP 1/2
    # new.jpg (1, 0) ranks 0 first -> AP 1
    assert [q.average_precision for q in result.queries] == pytest.approx([0.5, 0.5, 1.0])
    assert [q.recall_at[1] for q in result.queries] == pytest.approx([0.5, 0.0, 1.0])
    assert prepare_queries(truth, PATHS, VECTORS).skipped[1][1].startswith("needs the model")


def test_query_expansion_whitening_and_settings():
    prepared = prepare_queries(folders_from_paths(PATHS), PATHS, VECTORS).queries
    # avg QE with 1 neighbour, own row excluded: a/2 + b/1 and b/1 + a/2 both give (1.4, 1.4), where rows 0 and 3
    # tie and the lower row ranks first: a/2 -> 2, 0, 3 (AP 1/2); b/1 -> 1, 0, 3 (AP 1/3, QE hurt it)
    result = evaluate_queries(exact(), prepared, expansion=QueryExpansion("avg", 1))
    assert [q.average_precision for q in result.queries] == pytest.approx([1, 0.5, 1 / 3, 1])
    assert result.settings == {
        "qe": "avg", "ap": "non-interpolated", "whitening": None, "search": "exact", "depth": 4, "qe_top_n": 1,
    }
    alpha = evaluate_queries(exact(), prepared, expansion=QueryExpansion("alpha"), ap_method="trapezoid")
    assert alpha.settings["qe_alpha"] == 3.0 and alpha.settings["ap"] == "trapezoid"
    whitened = evaluate_queries(exact(whitening=learn_pca_whitening(VECTORS, dim=1)), prepared)
    assert whitened.settings["whitening"] == 1
    with pytest.raises(RetrievalError, match="no query left"):
        evaluate_queries(exact(), [])


def test_crop_to_box_and_pr_plot(tmp_path):
    from PIL import Image

    image = Image.new("RGB", (40, 30))
    assert crop_to_box(image, (10.4, 5.6, 20.5, 50)).size == (10, 24)  # rounded, clipped to the image
    with pytest.raises(ImageError, match="outside"):
        crop_to_box(image, (50, 0, 60, 10))
    result = evaluate_queries(exact(), prepare_queries(folders_from_paths(PATHS), PATHS, VECTORS).queries)
    written = write_pr_plot(tmp_path / "plots" / "pr.png", result)
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- evaluate.py end to end


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory):
    """3 groups x 2 demo photos, file names unique across folders (so Oxford-style bare names resolve)."""
    from retrieval.indexing import build_index

    root = tmp_path_factory.mktemp("evaluate")
    images = root / "images"
    for group in ("coffee", "chelsea", "rocket"):
        (images / group).mkdir(parents=True)
        shutil.copy(DEMO_DATABASE / group / "original.jpg", images / group / f"{group}_1.jpg")
        shutil.copy(DEMO_DATABASE / group / "view-01.jpg", images / group / f"{group}_2.jpg")
    index = root / "index.h5"
    build_index(images, index, backbone="efficientnet-lite0", progress=False)
    return index


def run_evaluate(*args):
    return subprocess.run(
        [sys.executable, str(REPO / "evaluate.py"), *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=300
    )


def test_folders_end_to_end_with_json_and_plot(tiny_index, tmp_path):
    out_json, out_png = tmp_path / "out" / "metrics.json", tmp_path / "pr.png"
    done = run_evaluate("--index", tiny_index, "--ground-truth", "folders", "--k", "1,2", "--qe", "avg",
                        "--json", out_json, "--pr-plot", out_png)
    assert done.returncode == 0, done.stderr
    assert "6 queries evaluated, 0 skipped" in done.stdout
    assert any(line.startswith("mAP") for line in done.stdout.splitlines())
    report = json.loads(out_json.read_text("utf-8"))
    assert list(report["metrics"]) == ["mAP", "P@1", "P@2", "R@1", "R@2"]
    assert 0 <= report["metrics"]["mAP"] <= 1 and report["queries_evaluated"] == 6
    assert report["ground_truth"] == "folders" and report["settings"]["qe"] == "avg"
    assert report["encoder"]["backbone"] == "efficientnet-lite0" and len(report["per_query"]) == 6
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_oxford_query_region_is_cropped_and_encoded(tiny_index, tmp_path):
    gt = tmp_path / "gt"
    gt.mkdir()
    (gt / "coffee_1_query.txt").write_text("oxc1_coffee_1 20.0 10.0 300.5 200.0\n")
    (gt / "coffee_1_good.txt").write_text("coffee_1\ncoffee_2\n")
    (gt / "coffee_1_ok.txt").write_text("")
    (gt / "coffee_1_junk.txt").write_text("rocket_1\n")
    done = run_evaluate("--index", tiny_index, "--ground-truth", "oxford", "--gt-path", gt, "--ap", "trapezoid")
    assert done.returncode == 0, done.stderr
    assert "1 queries evaluated, 0 skipped" in done.stdout and "mAP" in done.stdout


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ground-truth", "oxford"], "error: --ground-truth oxford needs --gt-path"),
        (["--ground-truth", "holidays"], "is not named like 100000.jpg"),
        (["--ground-truth", "csv", "--gt-path", "missing.csv"], "missing.csv: no such file"),
    ],
)
def test_bad_ground_truth_gives_one_line_error(tiny_index, extra, message):
    done = run_evaluate("--index", tiny_index, *extra)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and message in done.stderr and done.stderr.startswith("error: ")


def test_missing_index_and_bad_k(tmp_path):
    done = run_evaluate("--index", tmp_path / "none.h5", "--ground-truth", "folders")
    assert done.returncode == 1 and done.stderr.startswith("error: ") and "no such index file" in done.stderr
    assert done.stderr.strip().count("\n") == 0
    done = run_evaluate("--index", tmp_path / "none.h5", "--ground-truth", "folders", "--k", "0,5")
    assert done.returncode == 2 and "every k must be at least 1" in done.stderr  # argparse usage error


def served_average_precision(client, paths, k):
    """AP of every image's ranking as ``/api/search?id=`` serves it, the image itself left out, relevant = its folder."""
    from retrieval.evaluation import metrics

    groups = [path.split("/")[0] for path in paths]
    per_query = []
    for row, path in enumerate(paths):
        response = client.get(f"/api/search?id={row}&k={k}&qe=avg&qe_top_n=2")
        assert response.status_code == 200, response.get_json()
        ranked = [hit["id"] for hit in response.get_json()["results"] if hit["id"] != row]
        flags = np.array([groups[other] == groups[row] for other in ranked])
        relevant = sum(1 for other, group in enumerate(groups) if group == groups[row] and other != row)
        per_query.append(metrics.average_precision_from_flags(flags, relevant, "non-interpolated"))
    return per_query


@pytest.mark.parametrize("backend_options", [["--whiten", "--whiten-dim", "8"], ["--backend", "faiss"]])
def test_evaluator_scores_exactly_what_the_server_serves(tmp_path, backend_options):
    """The same rankings in evaluate.py and in server.py's search by id: stored whitening applied, query expansion
    through the database's own backend (faiss here), for every query of the demo database."""
    from retrieval.web import create_app

    index = tmp_path / "demo.h5"
    built = subprocess.run(
        [sys.executable, str(REPO / "index.py"), "--database", DEMO_DATABASE, "--index", index,
         "--backbone", "efficientnet-lite0", "--quiet", *backend_options],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert built.returncode == 0, built.stderr
    report = tmp_path / "eval.json"
    result = run_evaluate("--index", index, "--ground-truth", "folders", "--qe", "avg", "--qe-top-n", "2", "--json", report)
    assert result.returncode == 0, result.stderr
    evaluated = {q["query"]: q["ap"] for q in json.loads(report.read_text())["per_query"]}
    app = create_app(index, config={"TESTING": True})
    engine, _ = app.extensions["retrieval"].current()
    assert engine.pipeline.kind == ("faiss-hnsw" if "faiss" in backend_options else "exact")
    assert (engine.pipeline.whitening is not None) == ("--whiten" in backend_options)
    paths = engine.database.paths
    served = served_average_precision(app.test_client(), paths, len(paths))
    assert [evaluated[path] for path in paths] == pytest.approx(served, abs=1e-6)
    engine.close()
