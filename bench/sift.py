#!/usr/bin/env python3
"""The project's SIFT (``retrieval.descriptors.sift``) against OpenCV's, side by side in one run, on one core.

    python -m bench.sift            # every picture of the copy-detection set (about 3 minutes)
    python -m bench.sift --quick    # every 10th

Each picture of the copy-detection set (bench/out/copy-detection/all: references, distractors and edited copies,
built when missing) is decoded and made grey and smaller as ``local_features`` does it, twice: as a database
picture (longest side 512 px, the strongest 2 x 256 keypoints, 256 kept and described) and as a query (640 px,
4 x 512 found, 512 kept). Per picture, OpenCV's ``detectAndCompute`` (what local_features used before: it describes
every keypoint it returns) and the project's detect + describe of the kept ones, alternated picture by picture so that
the machine's speed changes hit both. Reports the time per picture of each and their ratio, and how many of OpenCV's
keypoints the project's SIFT returns (same position and size to 0.01 px, angle to 0.05 degrees), with the project's
pre-threshold and with OpenCV's, and how many of their descriptors are equal. Writes bench/out/sift.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bench.run import machine

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
ROLES = {  # role -> (longest side, pixels for an elongated picture, kept keypoints, detect factor)
    "database": (512, 0, 256, 2),
    "query": (640, 640 * 480, 512, 4),
}


def pictures(quick: bool) -> list[Path]:
    from bench.copy_detection import build

    folder = OUT / "copy-detection" / "all"
    if not folder.is_dir():
        build(folder.parent, log=print)
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    return paths[::10] if quick else paths


def compared(grey: np.ndarray, count: int, kept: int) -> dict:
    """One picture: OpenCV's time and keypoints, ours (detect ``count``, describe ``kept``), and how they agree."""
    import cv2

    from retrieval.descriptors import local_features, sift

    started = time.perf_counter()
    keypoints, descriptors = cv2.SIFT_create(nfeatures=count, contrastThreshold=local_features.CONTRAST_THRESHOLD).detectAndCompute(grey, None)
    opencv_s = time.perf_counter() - started
    started = time.perf_counter()
    space = sift.scale_space(grey)
    found = sift.detect(space, count, local_features.CONTRAST_THRESHOLD, prethreshold=local_features.PRETHRESHOLD)
    sift.describe(space, found.take(np.arange(min(kept, len(found)))))
    ours_s = time.perf_counter() - started
    exact = sift.detect(space, count, local_features.CONTRAST_THRESHOLD, prethreshold=sift.OPENCV_PRETHRESHOLD)
    theirs = np.array([(k.pt[0], k.pt[1], k.size, k.angle) for k in keypoints], np.float32).reshape(-1, 4)
    row = {"opencv_s": opencv_s, "ours_s": ours_s, "opencv_keypoints": len(theirs)}
    for name, ours in (("same", found), ("same_opencv_prethreshold", exact)):
        if not len(theirs) or not len(ours):
            row[name] = 0
            continue
        table = ours.table
        same = ((np.abs(theirs[:, None, :3] - table[None, :, :3]).max(axis=2) < 0.01)
                & (np.abs((theirs[:, None, 3] - table[None, :, 3] + 180) % 360 - 180) < 0.05))
        row[name] = int(same.any(axis=1).sum())
        if name == "same":
            hit = same.any(axis=1)
            difference = np.abs(sift.describe(space, ours.take(same.argmax(axis=1)[hit])) - descriptors[hit]).max(axis=1)
            row["descriptors_equal"] = int((difference == 0).sum())
            row["descriptors_within_one"] = int((difference <= 1).sum())
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every 10th picture")
    args = parser.parse_args(argv)
    import cv2

    from retrieval.descriptors import local_features, sift
    from retrieval.images import open_image

    cv2.setNumThreads(1)
    local_features.keep_freed_memory()
    sift.warm_up()
    paths = pictures(args.quick)
    rows = {role: [] for role in ROLES}
    for path in paths:
        pixels = np.asarray(open_image(path))
        for role, (side, pixel_floor, kept, factor) in ROLES.items():
            grey, _ = local_features._grey(pixels, side, pixel_floor)
            if min(grey.shape) >= local_features.MIN_SIDE:
                rows[role].append(compared(grey, kept * factor, kept))
    report = {"machine": machine(), "pictures": len(paths), "roles": {}}
    lines = [f"# SIFT: the project's against OpenCV's ({len(paths)} pictures of the copy-detection set, one core)", "",
             f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores.", "",
             "| role | OpenCV ms / picture | project ms / picture | ratio | OpenCV's keypoints returned (OpenCV's pre-threshold) "
             "| descriptors equal / within one |", "|---|---|---|---|---|---|"]
    for role, found in rows.items():
        total = {key: float(sum(row.get(key, 0) for row in found)) for key in found[0]}
        report["roles"][role] = total | {"count": len(found)}
        lines.append(
            f"| {role} ({ROLES[role][2]} kept of {ROLES[role][2] * ROLES[role][3]}) | {total['opencv_s'] / len(found) * 1e3:.1f} "
            f"| {total['ours_s'] / len(found) * 1e3:.1f} | {total['ours_s'] / total['opencv_s']:.2f}x "
            f"| {total['same']:,.0f} of {total['opencv_keypoints']:,.0f} ({total['same_opencv_prethreshold']:,.0f}) "
            f"| {total['descriptors_equal']:,.0f} / {total['descriptors_within_one']:,.0f} |")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "sift.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (OUT / "sift.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
