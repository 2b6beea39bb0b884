"""The copy-detection set (bench/copy_detection.py) and its protocols in bench/quality.py, on the quick set: layout,
manifest and licences, determinism, the AugLy edits, the peers, and index.py + evaluate.py --queries scoring exactly
what the benchmark scores."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from bench import copy_detection as cds
from bench import quality

pytestmark = pytest.mark.skipif(
    not all(cds.dpkg_files(p) for p in cds.WALLPAPER_PACKAGES),
    reason="needs the Debian wallpaper packages (scripts/setup.sh --dev): " + " ".join(cds.WALLPAPER_PACKAGES),
)


@pytest.fixture(scope="module")
def quick_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("copy-detection") / "set"
    return out, cds.build(out, quick=True, seed=0)


@pytest.fixture(scope="module")
def bench_set(quick_set):
    out, manifest = quick_set
    paths = quality.list_image_files(out / "all")
    return quality.CopyDetectionSet(out, paths, [quality.open_image(out / "all" / p) for p in paths], manifest,
                                    quality.list_image_files(out / "references"), quality.list_image_files(out / "queries"))


def test_layout_and_counts(quick_set):
    out, manifest = quick_set
    counts = manifest["counts"]
    assert (counts["groups"], counts["distractors"]) == (cds.QUICK_GROUPS, cds.QUICK_DISTRACTORS)
    assert counts["queries"] == cds.QUICK_GROUPS * cds.EDITS_PER_GROUP
    assert set(counts["queries_per_edit"]) == set(cds.EDIT_TYPES)
    assert max(counts["queries_per_edit"].values()) - min(counts["queries_per_edit"].values()) <= 1
    for group in manifest["groups"]:
        members = sorted(p.stem for p in (out / "all" / group).glob("*.jpg"))
        assert "original" in members and len(members) == 1 + cds.EDITS_PER_GROUP
        assert [p.name for p in (out / "references" / group).iterdir()] == ["original.jpg"]
        assert sorted(p.stem for p in (out / "queries" / group).glob("*.jpg")) == [m for m in members if m != "original"]
    assert len(list((out / "all" / "_distractors").glob("*.jpg"))) == cds.QUICK_DISTRACTORS
    assert len(list((out / "references" / "_distractors").glob("*.jpg"))) == cds.QUICK_DISTRACTORS
    assert not (out / "queries" / "_distractors").exists()
    # quick mode: scikit-image photos and JPEG wallpapers only
    assert all(s["package"] == "scikit-image" or s["path"].lower().endswith((".jpg", ".jpeg")) for s in manifest["sources"])


def test_manifest_lists_every_file_with_its_licence(quick_set):
    out, manifest = quick_set
    assert {str(p.relative_to(out)) for p in out.rglob("*.jpg")} == {f["path"] for f in manifest["files"]}
    for f in manifest["files"]:
        assert f["licence"] and f["source"] and f["package"]
        assert hashlib.sha1((out / f["path"]).read_bytes()).hexdigest() == f["sha1"]
        assert (f["group"] is None) == (f["role"] == "distractor")
    group_sources = {f["source"] for f in manifest["files"] if f["role"] == "original"}
    assert len(group_sources) == len(manifest["groups"])
    assert not any(f["source"] in group_sources for f in manifest["files"] if f["role"] == "distractor")
    assert json.loads((out / "manifest.json").read_text())["counts"] == manifest["counts"]
    sources = (out / "LICENSES" / "SOURCES.md").read_text()
    assert "| fashion-mnist | distractor |" in sources and "## Candidates left out" in sources
    assert (out / "LICENSES" / "AUGLY-ASSETS.txt").is_file()


def test_the_screenshot_edit_holds_the_photo(quick_set):
    """Every method fails on screenshots, so check the edit is fair: the template's photo box holds the original
    (letterboxed when not cropped to fit), correlation above 0.9."""
    out, manifest = quick_set
    shots = [f for f in manifest["files"] if f["protocol"] == "all" and f["role"] == "query"
             and f["edit"] == "screenshot" and not f["params"]["crop_src_to_fit"]]
    assert shots, "no uncropped screenshot in the quick set"
    for f in shots:
        shot = np.asarray(Image.open(out / f["path"]).convert("L"), np.float32)
        original = Image.open(out / "all" / f["group"] / "original.jpg").convert("L")
        boxes = {"web.png": (254, 424, 783, 710), "mobile.png": (27, 411, 389, 689)}  # the templates' photo boxes
        left, top, right, bottom = boxes[f["params"]["template"]]
        scale = min((right - left) / original.width, (bottom - top) / original.height)
        width, height = int(original.width * scale), int(original.height * scale)
        x0, y0 = left + (right - left - width) // 2, top + (bottom - top - height) // 2
        inner = shot[y0 + 4 : y0 + height - 4, x0 + 4 : x0 + width - 4]
        expected = np.asarray(original.resize((width, height), Image.BILINEAR), np.float32)[4:-4, 4:-4]
        assert np.corrcoef(inner.ravel(), expected.ravel())[0, 1] > 0.9, f["path"]


def test_deterministic_and_groups_independent_of_counts(quick_set, tmp_path):
    _, manifest = quick_set
    again = cds.build(tmp_path / "again", groups=3, distractors=10, seed=0, quick=True)
    first = {f["path"]: f["sha1"] for f in manifest["files"]}
    assert all(first[f["path"]] == f["sha1"] for f in again["files"] if f["group"] is not None)
    other = cds.build(tmp_path / "other", groups=3, distractors=10, seed=1, quick=True)
    assert {f["sha1"] for f in other["files"]} != {f["sha1"] for f in again["files"]}
    with pytest.raises(FileExistsError):
        cds.build(tmp_path / "again", quick=True)


def test_every_edit_type_runs_and_the_known_augly_failures():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 200, 3), dtype=np.uint8))
    for edit in cds.EDIT_TYPES:
        edited, params = cds.apply_edit(image, edit, np.random.default_rng(1))
        assert edited.mode == "RGB" and min(edited.size) > 8
        json.dumps(params)
    with pytest.raises(ValueError, match="unknown edit 'meme_format'"):
        cds.apply_edit(image, "meme_format", np.random.default_rng(0))
    status = cds.probe_augly(size=64)
    assert status["overlay_onto_screenshot"] == "ok" and status["pixelization"] == "ok"
    assert status["meme_format"] != "ok" and status["perspective_transform"] != "ok"


def test_licence_lookup_and_near_duplicate_rule():
    paragraphs = cds.parse_dep5(
        "Format: x\n\nFiles: *\nCopyright: A\nLicense: GPL-2+\n\nFiles: desktop/Foo-*.png\nCopyright: B\nLicense: CC0\n"
    )
    assert cds.dep5_lookup(paragraphs, "/usr/share/backgrounds/mate/desktop/Foo-1.png") == ("B", "CC0")
    assert cds.dep5_lookup(paragraphs, "/usr/share/backgrounds/mate/nature/Bar.jpg") == ("A", "GPL-2+")
    assert cds.parse_dep5("free-form text") is None
    assert cds.near_duplicate(1.0, 1.0) and cds.near_duplicate(0.993, 0.885) and cds.near_duplicate(0.908, 0.80)
    assert not cds.near_duplicate(0.897, -0.1) and not cds.near_duplicate(0.5, 0.5)
    assert cds.theme_family("Elephants_3840x2160") == "elephants" and cds.theme_family("adwaita-d") == "adwaita"


def test_protocols_oracle_scores_one_and_peers_are_far_from_it(bench_set):
    groups = sorted({p.split("/")[0] for p in bench_set.paths})
    oracle = np.zeros((len(bench_set.paths), len(groups) + len(bench_set.paths)), np.float32)
    for row, path in enumerate(bench_set.paths):
        group = path.split("/")[0]
        oracle[row, len(groups) + row if group.startswith("_") else groups.index(group)] = 1.0  # distractors: alone
    scores = quality.copy_detection_scores(bench_set, oracle)
    for protocol in quality.PROTOCOLS:
        assert scores[protocol]["mAP"] == 1.0 and scores[protocol]["hit@1"] == 1.0 and scores[protocol]["µAP"] == 1.0
    assert scores["all"]["queries"] == cds.QUICK_GROUPS * (1 + cds.EDITS_PER_GROUP) and scores["all"]["database"] == 196
    assert (scores["copy_detection"]["queries"], scores["copy_detection"]["database"]) == (84, 112)
    assert set(scores["copy_detection"]["per_edit_AP"]) == set(cds.EDIT_TYPES)
    assert set(scores["all"]["per_edit_AP"]) == {*cds.EDIT_TYPES, "original"}
    hashes = quality.hash_vectors(bench_set.images[:3], __import__("imagehash").phash)
    np.testing.assert_allclose(np.linalg.norm(hashes, axis=1), 1.0, rtol=1e-6)
    for row in quality.peer_rows(bench_set):
        for protocol in quality.PROTOCOLS:
            assert 0.0 < row[protocol]["mAP"] < 0.95, row["method"]


def test_evaluate_py_queries_scores_what_the_benchmark_scores(quick_set, bench_set, capsys):
    """index.py over references/, evaluate.py --queries queries/: the mAP, hit@1 and µAP of bench/quality.py's
    copy-detection protocol for the default settings."""
    from retrieval.cli.evaluate import main
    from retrieval.descriptors.extractor import Extractor
    from retrieval.indexing import build_index
    from retrieval.storage.database import read_database

    out, _ = quick_set
    index = out.parent / "references.h5"
    build_index(out / "references", index, backbone="efficientnet-lite0", progress=False)
    report = out.parent / "copies.json"
    assert main(["--index", str(index), "--ground-truth", "folders", "--queries", str(out / "queries"),
                 "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "84 queries evaluated, 0 skipped" in printed and "database: 112 images, 100 of them named by no query" in printed
    cli = json.loads(report.read_text())["metrics"]

    database = read_database(index)
    extractor = Extractor(database.encoder, quality.backbones.efficientnet_lite0_weights())
    images = bench_set.decoded_for(quality.SQUASH, 224)
    extraction = quality.extract(extractor, images, (quality.SQUASH,), (1.0,), [quality.Variant.of("max")], 224)
    bench = quality.copy_detection_scores(bench_set, extraction.descriptors(quality.DEFAULT))["copy_detection"]
    # the vectors agree to cosine 0.99999 (TF batches of another size); that can swap a far-down screenshot query's
    # neighbours: AP 0.0227 here against 0.0217 there, 1e-4 on the mean
    assert cli["mAP"] == pytest.approx(bench["mAP"], abs=1e-3) and cli["P@1"] == pytest.approx(bench["hit@1"], abs=1e-6)
    assert cli["µAP"] == pytest.approx(bench["µAP"], abs=5e-3)  # evaluate.py pools each query's top 100 of 112


def test_the_unseen_edits_bench_writes_every_edit_of_every_group_the_same_way_twice(quick_set, tmp_path):
    from PIL import Image

    from bench import unseen_edits

    out, manifest = quick_set
    count = unseen_edits.write_queries(out / "references", tmp_path / "a", seed=0)
    assert count == len(unseen_edits.EDITS) * manifest["counts"]["groups"]
    assert unseen_edits.write_queries(out / "references", tmp_path / "b", seed=0) == count
    names = sorted(unseen_edits.file_name(edit) for edit in unseen_edits.EDITS)
    for group in sorted((tmp_path / "a").iterdir()):
        assert sorted(p.name for p in group.iterdir()) == names
        for name in names:
            assert (group / name).read_bytes() == (tmp_path / "b" / group.name / name).read_bytes()
        width, height = Image.open(group / unseen_edits.file_name("collage of 4")).size
        assert width >= 3 * height  # the composites the preset's strip windows are for
    unseen_edits.write_reverse_database(out / "references", tmp_path / "a", tmp_path / "reverse")
    distractors = manifest["counts"]["distractors"]
    assert sum(1 for _ in (tmp_path / "reverse").rglob("*.jpg")) == count + distractors
    assert not any((tmp_path / "reverse").glob("*/original.jpg"))  # the originals are the queries
    report = tmp_path / "report.json"
    first, second = (str(tmp_path / "a" / g / unseen_edits.file_name("blur")) for g in ("g0", "g1"))
    rows = [{"query": first, "ap": 1.0, "P@1": 1.0}, {"query": second, "ap": 0.5, "P@1": 0.0}]
    report.write_text(json.dumps({"per_query": rows}))
    assert unseen_edits.per_edit(report)["blur"] == (0.75, 0.5)


def test_the_chained_edits_bench_chains_two_or_three_edits_the_same_way_twice(quick_set, tmp_path):
    from bench import chained_edits

    out, manifest = quick_set
    chains = chained_edits.write_queries(out / "references", tmp_path / "a", seed=0, per_group=3)
    assert len(chains) == 3 * manifest["counts"]["groups"]
    assert chained_edits.write_queries(out / "references", tmp_path / "b", seed=0, per_group=3) == chains
    known = set(chained_edits.SET_EDITS + chained_edits.HELD_OUT_EDITS)
    for name, edits in chains.items():
        assert 2 <= len(edits) <= 3 and len(set(edits)) == len(edits)
        assert set(edits[:-1]) <= known and (edits[-1] in known or edits[-1] in chained_edits.CONTAINERS)
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert any(edits[-1] in chained_edits.CONTAINERS for edits in chains.values())
    report = tmp_path / "report.json"
    first, second = sorted(chains)[:2]
    rows = [{"query": str(tmp_path / "a" / first), "ap": 1.0}, {"query": str(tmp_path / "a" / second), "ap": 0.5}]
    report.write_text(json.dumps({"per_query": rows}))
    expected = {}
    for name, ap in ((first, 1.0), (second, 0.5)):
        for edit in chains[name]:
            expected.setdefault(edit, []).append(ap)
    assert chained_edits.per_edit(report, {n: chains[n] for n in (first, second)}) == {e: sum(v) / len(v) for e, v in expected.items()}
