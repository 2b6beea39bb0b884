#!/usr/bin/env python3
"""The ``copy-detection`` preset against the default (classic) on every labelled set, through the real scripts.

    python -m bench.presets            # every set (about 12 minutes on 2 cores)
    python -m bench.presets --quick    # bench.quality's quick sizes, the quick copy-detection set

A preset is more than a descriptor (regions, query windows, local features, verification by default), so
bench/quality.py's descriptor tables cannot show what it does to the other sets. Here every set is written as image
folders (PNG: lossless, the pixels bench/quality.py evaluates), indexed by ``index.py`` once per preset, and scored by
``evaluate.py --ground-truth folders`` all-vs-all (each image a query by id, left out of its own ranking; for the
preset that is its regions as windows and its stored local features verified), as a user would run them. The
copy-detection set adds its own protocol (edits as queries against originals + distractors). Reports mAP, P@1 and the
indexing time of each, and the difference preset - classic; and the indexing time alone on photo-sized files (the
sets are small pictures; local features cost more on large ones), and the copy-detection set's indexing time with the
card's VGG16 as well (the ratio is SIFT's time over the model's, and VGG16 costs ~10x EfficientNet-Lite0 per image).
The copy-detection set's all-vs-all indexing (the issue's target) is timed on ``TIMING_PAIRS`` + 1 runs per preset,
alternated, and reported as medians with each pair's ratio: this machine's speed drifts by a fifth within minutes.
Writes bench/out/presets.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import copy_detection, quality
from bench.run import machine, make_seeded_vgg16

REPO = Path(__file__).resolve().parent.parent

OUT = REPO / "bench" / "out"
TIMING_PAIRS = 3  # more alternated classic / preset indexing runs of the copy-detection set, for the ratio
PRESETS = {"classic": [], "copy-detection": ["--preset", "copy-detection"]}
PHOTO_SIDE = 2048  # photo-sized files: a phone photo as a gallery keeps it, longest side at most this
PHOTO_COUNT = 150
LITE0 = ("--backbone", "efficientnet-lite0")
LABELLED = {"near-duplicate": quality.near_duplicate_set, "near-duplicate-hard": quality.hard_near_duplicate_set,
            "categories": quality.categories_set}


def write_set(bench, folder: Path) -> int:
    """A bench.quality set as ``folder/<label>/<n>.png`` (one folder per group or class)."""
    for n, (image, label) in enumerate(zip(bench.images, bench.labels)):
        target = folder / label.replace("/", "_")
        target.mkdir(parents=True, exist_ok=True)
        image.convert("RGB").save(target / f"{n:05d}.png")
    return len(bench.images)


def write_photo_sized(folder: Path, quick: bool) -> int:
    """The copy-detection set's source photos at their own size (longest side <= PHOTO_SIDE) as JPEG files: the bench
    sets are small pictures (median 341 px wide), and local features cost more on large ones. Timing only, no labels."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = [s for s in copy_detection.load_sources(quick)[0] if s.role == "photo"][:PHOTO_COUNT]
    for n, source in enumerate(sources):
        image = source.loader().convert("RGB")
        image.thumbnail((PHOTO_SIDE, PHOTO_SIDE))
        image.save(folder / f"{n:04d}.jpg", quality=90)
    return len(sources)


def script(*args, timeout: int = 3600) -> str:
    """Run one of the project's scripts; its standard output. Exits with its error line when it fails."""
    done = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"error: {args[0]} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return done.stdout


def indexed(images: Path, index: Path, flags: list[str], backbone: tuple[str, ...] = LITE0) -> float:
    """Build ``index`` from ``images`` with ``backbone`` (index.py's flags): the indexing time index.py reports
    (seconds, start-up excluded)."""
    report = script("index.py", "--database", images, "--index", index, *backbone, "--quiet", *flags)
    found = re.search(r" in ([0-9.]+) s", report)
    if not found:
        raise SystemExit(f"error: index.py printed no time: {report.strip()[:200]}")
    return float(found.group(1))


def alternated_timings(images: Path, work: Path, pairs: int) -> dict[str, list[float]]:
    """Index ``images`` ``pairs`` more times with each preset, alternated (classic, preset, classic, ...): seconds."""
    times: dict[str, list[float]] = {preset: [] for preset in PRESETS}
    for _ in range(pairs):
        for preset, flags in PRESETS.items():
            index = work / f"timing-{preset}.h5"
            index.unlink(missing_ok=True)
            times[preset].append(indexed(images, index, flags))
    return times


def scored(index: Path, out: Path, queries: Path | None = None) -> dict:
    report = out / f"{index.stem}{'-queries' if queries else ''}.json"
    script("evaluate.py", "--index", index, "--ground-truth", "folders", "--json", report, *(["--queries", queries] if queries else []))
    metrics = json.loads(report.read_text())["metrics"]
    return {"mAP": metrics["mAP"], "P@1": metrics["P@1"]}


def run_set(name: str, images: Path, work: Path, queries: Path | None = None) -> list[dict]:
    rows = []
    for preset, flags in PRESETS.items():
        index = work / f"{name}-{preset}.h5"
        row = {"set": name, "preset": preset, "index_s": indexed(images, index, flags)}
        if queries is None:
            row.update(scored(index, work))
        else:  # the references: originals (one per group) + distractors, searched with the edits
            copy = scored(index, work, queries)
            row.update({"cd_mAP": copy["mAP"], "cd_P@1": copy["P@1"]})
        rows.append(row)
    return rows


def auto_precision() -> str:
    """The precision index.py's ``auto`` gives EfficientNet-Lite0 on this machine (what the rows ran in)."""
    from retrieval.descriptors.encoder import resolve_precision
    from retrieval.models.backbones import efficientnet_lite0_weights

    return resolve_precision("auto", "efficientnet-lite0", efficientnet_lite0_weights())


def markdown(rows: list[dict], sizes: dict, quick: bool) -> str:
    cpu = machine()
    lines = [
        f"# The copy-detection preset on every set ({'quick' if quick else 'full'} sizes)",
        "",
        f"Machine: {cpu['cpu']}, {cpu['cores']} cores; EfficientNet-Lite0 in {auto_precision()} (`auto`; OpenVINO: {', '.join(cpu['openvino_capabilities'])}).",
        "The VGG16 row (timing only) runs the card's backbone with seeded random weights: the same arithmetic as ImageNet's.",
        "All-vs-all through evaluate.py (each image a query by id); copy detection: the edits as queries.",
        "",
        "| set | images | classic mAP / P@1 | copy-detection mAP / P@1 | difference (mAP) | indexing s, classic / preset (ratio) |",
        "|---|---|---|---|---|---|",
    ]
    by_set: dict[str, dict] = {}
    for row in rows:
        by_set.setdefault(row["set"], {})[row["preset"]] = row
    for name, pair in by_set.items():
        classic, preset = pair["classic"], pair["copy-detection"]
        if "mAP" not in classic:  # timing only
            lines.append(
                f"| {name} (indexing time only) | {sizes[name]} | | | | "
                f"{classic['index_s']:.1f} / {preset['index_s']:.1f} ({preset['index_s'] / classic['index_s']:.1f}x) |"
            )
            continue
        timing = f"{classic['index_s']:.1f} / {preset['index_s']:.1f} ({preset['index_s'] / classic['index_s']:.1f}x)"
        if "index_runs" in classic:
            ratios = sorted(p / c for c, p in zip(classic["index_runs"], preset["index_runs"]))
            timing += (f", medians of {len(ratios)} alternated runs; each pair's ratio {ratios[0]:.2f}-{ratios[-1]:.2f}x, "
                       f"median {statistics.median(ratios):.2f}x")
        lines.append(
            f"| {name} (all-vs-all) | {sizes[name]} | {classic['mAP']:.3f} / {classic['P@1']:.3f} | "
            f"{preset['mAP']:.3f} / {preset['P@1']:.3f} | {preset['mAP'] - classic['mAP']:+.3f} | {timing} |"
        )
        if "cd_mAP" in classic:
            lines.append(
                f"| {name} (copy detection: edits vs references) | | {classic['cd_mAP']:.3f} / {classic['cd_P@1']:.3f} | "
                f"{preset['cd_mAP']:.3f} / {preset['cd_P@1']:.3f} | {preset['cd_mAP'] - classic['cd_mAP']:+.3f} | |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true", help="bench.quality's quick sizes and the quick copy-detection set")
    parser.add_argument("--keep", type=Path, help="keep the written sets and indexes in this folder")
    args = parser.parse_args(argv)
    sizes = quality.QUICK if args.quick else quality.FULL
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-presets-"))
    work.mkdir(parents=True, exist_ok=True)
    rows, counts = [], {}
    try:
        for name, make in LABELLED.items():
            folder = work / name
            if folder.exists():
                shutil.rmtree(folder)
            counts[name] = write_set(make(sizes), folder)
            rows += run_set(name, folder, work)
            print(f"{name}: done", file=sys.stderr)
        photos = work / "photo-sized"
        if photos.exists():
            shutil.rmtree(photos)
        counts["photo-sized"] = write_photo_sized(photos, args.quick)
        rows += [{"set": "photo-sized", "preset": preset, "index_s": indexed(photos, work / f"photos-{preset}.h5", flags)}
                 for preset, flags in PRESETS.items()]
        print("photo-sized: done", file=sys.stderr)
        copies = work / "copy-detection"
        if copies.exists():
            shutil.rmtree(copies)
        copy_detection.build(copies, quick=args.quick, seed=quality.COPY_SEED)
        counts["copy-detection"] = sum(1 for p in (copies / "all").rglob("*.jpg"))
        rows += run_set("copy-detection", copies / "references", work, copies / "queries")
        # all-vs-all of the copy-detection set is on all/ (originals, edits and distractors together)
        for row in rows[-2:]:
            index = work / f"copy-all-{row['preset']}.h5"
            row["index_s"] = indexed(copies / "all", index, PRESETS[row["preset"]])
            row.update(scored(index, work))
        # this machine's speed drifts within minutes: the target's ratio is timed on alternated runs, their median
        timings = alternated_timings(copies / "all", work, TIMING_PAIRS)
        for row in rows[-2:]:
            row["index_runs"] = [row["index_s"]] + timings[row["preset"]]
            row["index_s"] = statistics.median(row["index_runs"])
        # the card's VGG16 costs ~10x EfficientNet-Lite0 per image, and the ratio is SIFT's time over the model's
        vgg16 = ("--backbone", "vgg16", "--weights", str(make_seeded_vgg16(work / "vgg16-seeded.weights.h5")))
        counts["copy-detection, VGG16"] = counts["copy-detection"]
        rows += [{"set": "copy-detection, VGG16", "preset": preset,
                  "index_s": indexed(copies / "all", work / f"copy-all-vgg16-{preset}.h5", flags, vgg16)}
                 for preset, flags in PRESETS.items()]
        print("copy-detection with VGG16: done", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = markdown(rows, counts, args.quick)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "presets.md").write_text(text)
    (OUT / "presets.json").write_text(json.dumps({"rows": rows, "images": counts, "quick": args.quick}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
