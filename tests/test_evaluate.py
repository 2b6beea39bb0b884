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
    # rankings without the query itself: a/1 -> 1,2,3 (hit at 1: AP 1); a/2 -> 2,0,3 (hit at 2: trapezoid
    # (0/1 + 1/2)/2 = 1/4, non-interpolated 1/2); b/1 -> 1,3,0 (1/4); b/2 -> 2,1,0 (1)
    prepared = prepare_queries(folders_from_paths(PATHS), PATHS, VECTORS)
    assert [q.exclude for q in prepared.queries] == [0, 1, 2, 3] and not prepared.skipped
    assert (prepared.database_size, prepared.unreferenced) == (4, 0)
    result = evaluate_queries(exact(), prepared.queries, ks=[1, 2], ns_score=True, micro_ap=4)
    assert [q.average_precision for q in result.queries] == pytest.approx([1, 0.25, 0.25, 1])
    # µAP: the 12 pooled pairs by score: .96 (2 false), .8 (4 true), .6 (4 false), 0 (2 false): the true pairs are at
    # positions 3, 4, 5, 6 -> (1/3 + 2/4 + 3/5 + 4/6) / 4
    assert result.metrics() == pytest.approx(
        {"mAP": 0.625, "P@1": 0.5, "P@2": 0.5, "R@1": 0.5, "R@2": 1.0, "N-S": 2.0, "µAP": (1 / 3 + 2 / 4 + 3 / 5 + 4 / 6) / 4}
    )
    assert list(result.metrics()) == ["mAP", "P@1", "P@2", "R@1", "R@2", "N-S", "µAP"]
    plain = evaluate_queries(exact(), prepared.queries, ks=[1, 2], ap_method="non-interpolated")
    assert plain.mean_average_precision == pytest.approx(0.75)
    # mean interpolated precision: recall 1 reached at precision 1 (two queries) and 1/2 (two queries)
    assert result.pr_precision[-1] == pytest.approx(0.75) and result.pr_recall[-1] == 1.0
    table = result.table()
    assert table.splitlines()[1].startswith("mAP") and "0.6250" in table
    data = result.as_dict()
    assert data["metrics"]["mAP"] == 0.625 and data["queries_evaluated"] == 4 and len(data["per_query"]) == 4


def test_revisitop_precision_and_queries_that_are_not_database_images():
    # a query file named like a database image is still encoded from its file and ranks the whole database
    truth = GroundTruth((Query("a/1.jpg", frozenset({"b/1.jpg", "b/2.jpg"}), image="a/1.jpg"),), "folders")
    prepared = prepare_queries(truth, PATHS, VECTORS, lambda query, row: np.array([0.0, 1.0]))
    assert [(q.exclude, q.own_row) for q in prepared.queries] == [(None, None)]
    assert prepared.unreferenced == 2  # a/1 and a/2: named by no query
    # (0, 1) ranks 3, 2, 1, 0: hits at 1 and 2 -> mP@5: kq = min(2, 5) -> 2/2; plain P@5 = 2/5
    result = evaluate_queries(exact(), prepared.queries, ks=[1, 5], precision="revisitop")
    assert result.queries[0].precision_at == {1: 1.0, 5: 1.0} and result.settings["precision"] == "revisitop"
    assert evaluate_queries(exact(), prepared.queries, ks=[5]).queries[0].precision_at == {5: 0.4}
    with pytest.raises(ValueError, match="unknown precision rule"):
        evaluate_queries(exact(), prepared.queries, precision="min-k")


def test_a_shallow_first_search_ranks_exactly_like_the_full_one(monkeypatch):
    """evaluate_queries searches FIRST_DEPTH deep, then again in full only for queries missing a relevant image:
    every number equals one full-depth search, with query expansion and µAP too."""
    from retrieval.evaluation import protocol

    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((60, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    paths = [f"g{i % 6}/{i}.jpg" for i in range(60)]
    queries = prepare_queries(folders_from_paths(paths), paths, vectors).queries
    options = dict(ks=[1, 5], expansion=QueryExpansion("avg", 2), ns_score=True, micro_ap=8)
    full = evaluate_queries(exact(vectors), queries, **options)
    monkeypatch.setattr(protocol, "FIRST_DEPTH", 5)
    shallow = evaluate_queries(exact(vectors), queries, **options)
    assert [q.as_dict() for q in shallow.queries] == [q.as_dict() for q in full.queries]
    assert shallow.metrics() == full.metrics() and shallow.micro_ap == full.micro_ap
    np.testing.assert_array_equal(shallow.pr_precision, full.pr_precision)


def test_holidays_list_counts_an_image_missing_from_the_index():
    """INRIA's holidays_map.py keeps 100001.jpg relevant though the index lacks it: query 100000 finds 100002 first,
    1 of 2 relevant -> AP 1/2 (names alone would give 1.0)."""
    paths = ["100000.jpg", "100002.jpg", "100100.jpg", "100101.jpg"]
    vectors = np.array([[1, 0], [0.9, np.sqrt(0.19)], [0, 1], [0.1, np.sqrt(0.99)]], dtype=np.float32)
    official = GroundTruth((Query("100000.jpg", frozenset({"100001.jpg", "100002.jpg"})),
                            Query("100100.jpg", frozenset({"100101.jpg"}))), "holidays")
    prepared = prepare_queries(official, paths, vectors)
    assert prepared.missing_relevant == ["100001.jpg"]
    assert [q.average_precision for q in evaluate_queries(exact(vectors), prepared.queries).queries] == [0.5, 1.0]
    from_names = prepare_queries(folders_from_paths(["h/" + p for p in paths]), ["h/" + p for p in paths], vectors)
    assert from_names.missing_relevant == []


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
    # region query (0, 1) ranks 3 (itself, not relevant), 2, 1, 0 -> hit at 2 -> AP (0 + 1/2)/2 = 1/4
    # new.jpg (1, 0) ranks 0 first -> AP 1
    assert [q.average_precision for q in result.queries] == pytest.approx([0.5, 0.25, 1.0])
    assert [q.recall_at[1] for q in result.queries] == pytest.approx([0.5, 0.0, 1.0])
    assert prepare_queries(truth, PATHS, VECTORS).skipped[1][1].startswith("needs the model")


def test_query_expansion_whitening_and_settings():
    prepared = prepare_queries(folders_from_paths(PATHS), PATHS, VECTORS).queries
    # avg QE with 1 neighbour, own row excluded: a/2 + b/1 and b/1 + a/2 both give (1.4, 1.4), where rows 0 and 3
    # tie and the lower row ranks first: a/2 -> 2, 0, 3 (hit at 2: AP 1/4); b/1 -> 1, 0, 3 (hit at 3: (0 + 1/3)/2)
    result = evaluate_queries(exact(), prepared, expansion=QueryExpansion("avg", 1))
    assert [q.average_precision for q in result.queries] == pytest.approx([1, 1 / 4, 1 / 6, 1])
    assert result.settings == {
        "qe": "avg", "ap": "trapezoid", "precision": "plain", "whitening": None, "search": "exact", "depth": 4,
        "qe_top_n": 1,
    }
    alpha = evaluate_queries(exact(), prepared, expansion=QueryExpansion("alpha"), ap_method="non-interpolated")
    assert alpha.settings["qe_alpha"] == 3.0 and alpha.settings["ap"] == "non-interpolated"
    whitened = evaluate_queries(exact(whitening=learn_pca_whitening(VECTORS, dim=1)), prepared)
    assert whitened.settings["whitening"] == 1
    with pytest.raises(RetrievalError, match="no query left"):
        evaluate_queries(exact(), [])


def test_crop_to_box_pads_like_revisitop_and_pr_plot(tmp_path):
    from PIL import Image

    pixels = (np.arange(30 * 40 * 3) % 251 + 1).astype(np.uint8).reshape(30, 40, 3)  # no black pixel
    image = Image.fromarray(pixels)
    crop = crop_to_box(image, (2.5, 3.5, 7.5, 8.5))  # Pillow rounds half to even: 2, 4, 8, 8
    assert crop.size == (6, 4)
    np.testing.assert_array_equal(np.asarray(crop), pixels[4:8, 2:8])
    padded = np.asarray(crop_to_box(image, (-3, -2, 45, 32)))  # past the border: black, not clipped
    assert padded.shape == (34, 48, 3)
    np.testing.assert_array_equal(padded[2:32, 3:43], pixels)
    assert (padded.sum(axis=-1) == 0).sum() == 34 * 48 - 30 * 40
    assert not np.asarray(crop_to_box(image, (50, 0, 60, 10))).any()  # wholly outside: all black, as officially
    with pytest.raises(ImageError, match="holds no pixel"):
        crop_to_box(image, (15.2, 1, 15.4, 5))  # both sides round to 15
    result = evaluate_queries(exact(), prepare_queries(folders_from_paths(PATHS), PATHS, VECTORS).queries)
    written = write_pr_plot(tmp_path / "plots" / "pr.png", result)
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- evaluate.py end to end


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory):
    """3 groups x 2 demo photos, file names unique across folders (so Oxford-style bare names resolve), and three
    distractors in ``_distractors/`` named like Holidays images (100000 and 100002 show the same cup)."""
    from retrieval.indexing import build_index

    root = tmp_path_factory.mktemp("evaluate")
    images = root / "images"
    for group in ("coffee", "chelsea", "rocket"):
        (images / group).mkdir(parents=True)
        shutil.copy(DEMO_DATABASE / group / "original.jpg", images / group / f"{group}_1.jpg")
        shutil.copy(DEMO_DATABASE / group / "view-01.jpg", images / group / f"{group}_2.jpg")
    (images / "_distractors").mkdir()
    for name, photo in (("100000", "coffee/view-02"), ("100002", "coffee/view-03"), ("100100", "astronaut/original")):
        shutil.copy(DEMO_DATABASE / f"{photo}.jpg", images / "_distractors" / f"{name}.jpg")
    index = root / "index.h5"
    build_index(images, index, backbone="efficientnet-lite0", progress=False)
    return index


def evaluate_here(capsys, *args):
    """evaluate.py's main in this process (the model is built once per test, not one Python start per run)."""
    from retrieval.cli.evaluate import main

    code = main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return code, out, err


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
    assert "database: 9 images, 3 of them named by no query (distractors" in done.stdout
    assert "AP: trapezoid (the benchmarks' rule (Oxford compute_ap)" in done.stdout
    assert any(line.startswith("mAP") for line in done.stdout.splitlines())
    report = json.loads(out_json.read_text("utf-8"))
    assert list(report["metrics"]) == ["mAP", "P@1", "P@2", "R@1", "R@2"]
    assert 0 <= report["metrics"]["mAP"] <= 1 and report["queries_evaluated"] == 6
    assert report["ground_truth"] == "folders" and report["settings"]["qe"] == "avg" and report["distractors"] == 3
    assert report["encoder"]["backbone"] == "efficientnet-lite0" and len(report["per_query"]) == 6
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_oxford_query_region_is_cropped_and_encoded(tiny_index, tmp_path, capsys):
    gt = tmp_path / "gt"
    gt.mkdir()
    (gt / "coffee_1_query.txt").write_text("oxc1_coffee_1 20.0 10.0 300.5 200.0\n")
    (gt / "coffee_1_good.txt").write_text("coffee_1\ncoffee_2\n")
    (gt / "coffee_1_ok.txt").write_text("")
    (gt / "coffee_1_junk.txt").write_text("rocket_1\n")
    code, out, err = evaluate_here(capsys, "--index", tiny_index, "--ground-truth", "oxford", "--gt-path", gt)
    assert code == 0, err
    assert "1 queries evaluated, 0 skipped" in out and "AP: trapezoid (as Oxford/Paris compute_ap.cpp)" in out
    code, out, _ = evaluate_here(capsys, "--index", tiny_index, "--ground-truth", "oxford", "--gt-path", gt,
                                 "--ap", "non-interpolated")
    assert code == 0 and "AP: non-interpolated (not the official trapezoid AP of this ground truth)" in out


def test_queries_outside_the_database(tiny_index, tmp_path, capsys):
    from PIL import Image, ImageOps

    queries = tmp_path / "queries"
    for group, photo in (("coffee", "coffee/café crème"), ("rocket", "rocket/view-02"), ("nothing", "clock/original")):
        (queries / group).mkdir(parents=True)
        ImageOps.mirror(Image.open(DEMO_DATABASE / f"{photo}.jpg")).save(queries / group / "flip.jpg")
    shutil.copy(DEMO_DATABASE / "coffee/original.jpg", queries / "loose.jpg")
    (queries / "_unmatched").mkdir()
    Image.open(DEMO_DATABASE / "clock/original.jpg").rotate(90, expand=True).save(queries / "_unmatched" / "clock.jpg")
    out_json = tmp_path / "copies.json"
    code, out, err = evaluate_here(capsys, "--index", tiny_index, "--ground-truth", "folders", "--queries", queries,
                                   "--json", out_json)
    assert code == 0, err
    assert "folders ground truth: 2 queries evaluated (+1 with no copy in the database, counted in µAP only), 1 skipped" in out
    assert (f"queries: 3 images under {queries}/<group>/ and 1 with no copy in the database under {queries}/_*/, "
            "encoded from their files (1 outside a group folder not used)") in out
    assert "database: 9 images, 5 of them named by no query" in out  # chelsea and the 3 distractors
    assert "µAP: DISC21, each query's first 100 results pooled" in out and "\nµAP" in out
    assert "skipped query: nothing/flip.jpg: no relevant images in the ground truth" in err
    report = json.loads(out_json.read_text("utf-8"))
    assert {q["query"]: q["relevant"] for q in report["per_query"]} == {"coffee/flip.jpg": 2, "rocket/flip.jpg": 2}
    assert 0 < report["metrics"]["µAP"] <= 1
    assert [q["query"] for q in report["unmatched_queries"]] == ["_unmatched/clock.jpg"]
    assert report["unmatched_queries"][0]["top_score"] > 0  # its best (false) match, pooled into µAP


def test_queries_with_no_copy_in_the_database_lower_micro_ap_only():
    """DISC21's queries without a reference: their predictions are false pairs in µAP's one list; mAP ignores them."""
    from retrieval.evaluation.protocol import PreparedQuery

    matrix = np.eye(3, 4, dtype=np.float32)
    pipeline = QueryPipeline(MemoryBackend(matrix), matrix)
    found = PreparedQuery("copy", np.array([0.9, 0.1, 0, 0], np.float32), np.array([0]), np.array([], np.int64), 1)
    lookalike = PreparedQuery("_unmatched/x", np.array([1.0, 0, 0, 0], np.float32), np.array([], np.int64), np.array([], np.int64), 0)
    alone = evaluate_queries(pipeline, [found], micro_ap=2)
    both = evaluate_queries(pipeline, [found, lookalike], micro_ap=2)
    assert alone.micro_ap == 1.0 and both.unmatched == 1 and both.unmatched_top == {"_unmatched/x": pytest.approx(1.0)}
    assert both.micro_ap == pytest.approx(0.5)  # the unmatched query's match outscores the true one
    assert both.mean_average_precision == alone.mean_average_precision == 1.0 and len(both.queries) == 1
    with pytest.raises(RetrievalError, match="no query left"):
        evaluate_queries(pipeline, [lookalike], micro_ap=2)


def test_holidays_official_list_end_to_end(tiny_index, tmp_path, capsys):
    listing = tmp_path / "holidays_images.dat"
    listing.write_text("100000.jpg\n100001.jpg\n100002.jpg\n100100.jpg\n100101.jpg\n")
    code, out, err = evaluate_here(capsys, "--index", tiny_index, "--ground-truth", "holidays", "--gt-path", listing,
                                   "--json", tmp_path / "h.json")
    assert code == 0, err
    assert "holidays ground truth: 2 queries evaluated, 0 skipped" in out
    assert "2 relevant images of the ground truth are not in the index (counted as misses)" in out
    assert "AP: trapezoid (as INRIA holidays_map.py)" in out
    per_query = {q["query"]: q["ap"] for q in json.loads((tmp_path / "h.json").read_text())["per_query"]}
    assert per_query["100100.jpg"] == 0.0 and per_query["100000.jpg"] <= 0.5  # 1 of its 2 relevant is missing


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ground-truth", "oxford"], "error: --ground-truth oxford needs --gt-path"),
        (["--ground-truth", "holidays"], "is not named like 100000.jpg"),
        (["--ground-truth", "csv", "--gt-path", "missing.csv"], "missing.csv: no such file"),
        (["--ground-truth", "revisited"], "needs --gt-path gnd_roxford5k.pkl"),
        (["--ground-truth", "folders", "--queries", "no-such-dir"], "no-such-dir: no such query folder"),
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
        per_query.append(metrics.average_precision_from_flags(flags, relevant, "trapezoid"))
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
