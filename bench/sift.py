#!/usr/bin/env python3
"""SIFT for copy detection, side by side in one run: OpenCV's and the project's own (``retrieval.descriptors.sift``).

    python -m bench.sift            # the copy-detection set's source pictures (about 2 minutes on 2 cores)
    python -m bench.sift --quick    # the quick set's sources (scikit-image photos and JPEG wallpapers)

Each source picture, its longest side at ``DATABASE_SIDE`` (512) px as the preset stores it, is a database picture:
the strongest 2 x 256 keypoints detected, 256 kept by the preset's spread-out choice (``spread_choice``), RootSIFT.
Its copies (rotated 20 degrees and scaled 0.8; scaled 0.7; cropped to 80 % and saved as JPEG quality 25) are queries
with up to 512 keypoints. A copy's keypoint is correctly matched when its nearest database descriptor passes Lowe's
ratio test (0.8) and lies within 3 px of where the known transform puts it. Reports, per implementation: the time of
one picture's features on one core (the preset's work: OpenCV describes every keypoint it returns, the project's SIFT
only the kept ones), the mean number of correct matches per copy, and how many copies have fewer than 8
(``MIN_INLIERS``: verification cannot confirm them). Writes bench/out/sift.md (and .json).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench import copy_detection
from bench.run import machine
from retrieval.descriptors import local_features, sift
from retrieval.descriptors.local_features import CONTRAST_THRESHOLD, DATABASE_KEYPOINTS, DATABASE_SIDE, root_sift, spread_choice

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
QUERY_KEYPOINTS = 512
RATIO = 0.8
TOLERANCE_PX = 3.0
MIN_INLIERS = 8


def transforms(grey: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, copy, 2 x 3 affine map from the picture to the copy) for each copy of a uint8 grey picture."""
    import cv2

    height, width = grey.shape
    turn = cv2.getRotationMatrix2D((width / 2, height / 2), 20, 0.8)
    shrink = np.array([[0.7, 0, 0], [0, 0.7, 0]])
    left, top = int(width * 0.12), int(height * 0.1)
    crop = grey[top : top + int(height * 0.8), left : left + int(width * 0.8)]
    saved = io.BytesIO()
    Image.fromarray(crop).save(saved, "JPEG", quality=25)
    return [
        ("rotated 20 deg, scaled 0.8", cv2.warpAffine(grey, turn, (width, height), flags=cv2.INTER_LINEAR), turn),
        ("scaled 0.7", cv2.resize(grey, (round(width * 0.7), round(height * 0.7)), interpolation=cv2.INTER_AREA), shrink),
        ("cropped 80 %, JPEG 25", np.asarray(Image.open(saved)), np.array([[1.0, 0, -left], [0, 1.0, -top]])),
    ]


def opencv_features(grey: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's SIFT as the preset ran it before: 2 x ``keep`` detected and described, ``keep`` chosen."""
    import cv2

    detector = cv2.SIFT_create(nfeatures=2 * keep, contrastThreshold=CONTRAST_THRESHOLD)
    keypoints, descriptors = detector.detectAndCompute(grey, None)
    if not keypoints:
        return np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32)
    points = np.array([k.pt for k in keypoints], np.float32)
    chosen = spread_choice(points, np.array([k.response for k in keypoints], np.float32), grey.shape[::-1], keep)
    return points[chosen], root_sift(descriptors[chosen])


def own_features(grey: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """The project's SIFT as the preset runs it: 2 x ``keep`` detected, ``keep`` chosen and described."""
    space = sift.scale_space(grey)
    found = sift.detect(space, 2 * keep, CONTRAST_THRESHOLD)
    kept = found.take(spread_choice(found.table[:, :2], found.response, grey.shape[::-1], keep))
    return kept.table[:, :2], root_sift(sift.describe(space, kept))


IMPLEMENTATIONS = {"OpenCV SIFT": opencv_features, "own SIFT": own_features}


def correct_matches(points, descriptors, copy_points, copy_descriptors, affine: np.ndarray) -> int:
    """Keypoints of the picture whose ratio-tested nearest copy keypoint is where ``affine`` puts them."""
    if len(points) < 2 or len(copy_points) < 2:
        return 0
    similarity = descriptors @ copy_descriptors.T
    nearest = np.argsort(-similarity, axis=1)[:, :2]
    rows = np.arange(len(points))
    first = np.sqrt(np.maximum(2 - 2 * similarity[rows, nearest[:, 0]], 0))
    second = np.sqrt(np.maximum(2 - 2 * similarity[rows, nearest[:, 1]], 0))
    projected = np.c_[points, np.ones(len(points))] @ affine.T
    near = np.hypot(*(projected - copy_points[nearest[:, 0]]).T) < TOLERANCE_PX
    return int(((first < RATIO * second) & near).sum())


def pictures(quick: bool) -> list[np.ndarray]:
    """The copy-detection set's source pictures as uint8 grey, longest side ``DATABASE_SIDE``."""
    greys = []
    for source in copy_detection.load_sources(quick)[0]:
        image = source.loader().convert("RGB")
        image.thumbnail((DATABASE_SIDE, DATABASE_SIDE), Image.Resampling.LANCZOS)
        greys.append(local_features._grey(np.asarray(image), DATABASE_SIDE)[0])
    return greys


def timed(function, greys: list[np.ndarray]) -> float:
    """Milliseconds per picture of ``function(grey, DATABASE_KEYPOINTS)``, best of two passes, one thread."""
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        for grey in greys:
            function(grey, DATABASE_KEYPOINTS)
        best = min(best, (time.perf_counter() - start) * 1000 / len(greys))
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick copy-detection set's sources")
    args = parser.parse_args(argv)
    import cv2

    cv2.setNumThreads(1)
    greys = pictures(args.quick)
    local_features.warm_up()
    rows = []
    for name, function in IMPLEMENTATIONS.items():
        row = {"implementation": name, "ms_per_picture": timed(function, greys), "copies": {}}
        for grey in greys:
            points, descriptors = function(grey, DATABASE_KEYPOINTS)
            for label, copy, affine in transforms(grey):
                matched = correct_matches(points, descriptors, *function(np.ascontiguousarray(copy), QUERY_KEYPOINTS), affine)
                row["copies"].setdefault(label, []).append(matched)
        rows.append(row)
        print(f"{name}: done", file=sys.stderr)
    cpu = machine()
    labels = list(rows[0]["copies"])
    lines = [f"# SIFT for copy detection: OpenCV's and the project's own ({len(greys)} pictures, {'quick' if args.quick else 'full'})",
             "", f"Machine: {cpu['cpu']}, {cpu['cores']} cores; times on one core.", "",
             "| implementation | ms per picture (ratio) | " + " | ".join(f"{label}: mean correct / copies < {MIN_INLIERS}" for label in labels) + " |",
             "|---|---|" + "---|" * len(labels)]
    reference = rows[0]["ms_per_picture"]
    for row in rows:
        cells = [f"{np.mean(row['copies'][label]):.1f} / {sum(m < MIN_INLIERS for m in row['copies'][label])}" for label in labels]
        lines.append(f"| {row['implementation']} | {row['ms_per_picture']:.1f} ({row['ms_per_picture'] / reference:.2f}x) | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "sift.md").write_text(text)
    (OUT / "sift.json").write_text(json.dumps({"pictures": len(greys), "rows": rows, "machine": cpu}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
