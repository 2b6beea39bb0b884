"""Named index settings (``index.py --preset NAME``): combinations measured by bench/quality.py.

Each preset is a set of ``EncoderRequest`` fields plus whitening; explicit command-line options override it.

``rmac-multiscale`` is what bench/quality.py chose with EfficientNet-Lite0 (full run, bench/out/quality.md): the best
mAP on hard near-duplicates (scikit-image photos cut into tiles, seeded views) among index-time settings that lose at
most 0.01 mAP on Fashion-MNIST categories. Against ``classic`` (trapezoid AP, as the benchmarks' own code computes it):
hard near-duplicates 0.760 -> 0.793 mAP (+0.033, 95% bootstrap interval +0.015..+0.051), easy near-duplicates 0.998 ->
1.000, categories 0.554 -> 0.548 (-0.006), AugLy copy detection (edits against originals + distractors) 0.841 ->
0.863; the extra scales roughly double the extraction time. No whitening: PCA-whitening as index.py learns it (power 0.5) lowered
mAP on every set, whether learned on the database or on a disjoint set (and learned on a database of N <= D images
with all N - 1 components it makes all database vectors equidistant). Query expansion is a query-time choice
(``query_online.py --qe``), not part of a preset: with these settings alpha-QE over the top 3 adds +0.001 mAP on hard
near-duplicates, average QE over the top 10 adds +0.028 on categories.
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    "classic": {
        "description": "the classic recipe: max pooling (MAC) of the last conv layer, 224x224 squash, no whitening",
        "encoder": {"pooling": "max"},
        "whiten": False,
    },
    "rmac-multiscale": {
        "description": "R-MAC (3 levels) over input scales 1, 0.707, 0.5, 224x224 squash, no whitening: the best "
        "near-duplicate settings in bench/quality.py (+0.03 mAP on hard near-duplicates, -0.006 on categories "
        "against classic); about twice the extraction time",
        "encoder": {"pooling": "rmac", "pooling_params": {"levels": 3}, "scales": (1.0, 0.707, 0.5), "resize_rule": "squash-bicubic"},
        "whiten": False,
    },
    "copy-detection": {
        "description": "find copies (screenshots, crops, captions, rotations, mirrored): classic global max pooling plus "
        "4 region vectors and 256 SIFT keypoints per image (about 35 KB local features + 10 KB regions per image), "
        "queries searched with their own windows too and the top 100 verified geometrically by default "
        "(query_online.py --no-verify, evaluate.py --no-verify, verify=0 turn it off)",
        "encoder": {"pooling": "max"},
        "whiten": False,
        "copies": {"regions": True, "local_features": True, "verify": True},
    },
}


def preset_help() -> str:
    return "; ".join(f"{name}: {spec['description']}" for name, spec in PRESETS.items())
