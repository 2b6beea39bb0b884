"""bench/duplicates.py's ground truth: pairs inside a group are positives, pairs of images made from one source photo
outside a group are unlabelled (left out of the precision), every other pair is a negative."""

from __future__ import annotations

import json

import numpy as np

from bench.duplicates import false_pair_kinds, score_pairs, truth_of

PATHS = ["g0/original.jpg", "g0/crop.jpg", "g1/original.jpg", "_distractors/d0.jpg", "_distractors/d1.jpg",
         "_distractors/d2.jpg"]
SOURCES = ["cat", "cat", "boat", "lake", "lake", "wood"]


def manifest(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"files": [{"path": f"all/{p}", "source": s} for p, s in zip(PATHS, SOURCES)]}))
    return path


def test_pairs_of_one_source_outside_a_group_are_left_out_of_the_precision(tmp_path):
    truth = truth_of(PATHS, manifest(tmp_path))
    assert truth.labels.tolist() == [0, 0, 1, -1, -1, -1] and truth.positives == 1
    pairs = np.array([[0, 1], [3, 4], [3, 5]])  # a positive, two tiles of one lake photo, two unrelated distractors
    scores = score_pairs(pairs, truth)
    assert scores["unlabelled"] == 1 and scores["tp"] == 1
    assert scores["precision"] == 0.5 and scores["recall"] == 1.0
    kinds = false_pair_kinds(pairs, truth, ["original", "crop", "original", "distractor", "distractor", "distractor"])
    assert kinds == {"same source": 1, "screenshot-screenshot": 0, "distractor-distractor": 1, "other": 0}


def test_without_a_manifest_every_pair_outside_a_group_is_a_negative(tmp_path):
    truth = truth_of(PATHS, tmp_path / "missing.json")
    scores = score_pairs(np.array([[0, 1], [3, 4]]), truth)
    assert scores["unlabelled"] == 0 and scores["precision"] == 0.5
