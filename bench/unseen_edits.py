#!/usr/bin/env python3
"""Edits the copy-detection set never makes: a held-out check of the ``copy-detection`` preset, per edit type.

    python -m bench.unseen_edits               # seeds 0 and 1 (about 11 minutes on 2 cores)
    python -m bench.unseen_edits --seeds 1

The preset's settings were chosen on the copy-detection set's eight edit types (``bench/copy_detection.py``), so its
score there flatters it. Here each group original of that set (``references/<group>/original.jpg``) is edited in
ways the set does not contain: composites (side-by-side collages of two, three and four pictures, a 2 x 2 grid, a
stack, a picture inset on another picture, a thick border), geometric ones (rotated 90 degrees, flipped upside down,
stretched, sheared, rotated and cropped, seen in perspective), photometric ones (grey, blur, brightness + contrast,
JPEG quality 10, a 96 px thumbnail, noise, faded towards white), and overlays (opaque stripes, a drawn picture 70 %
opaque over part of it). The other pictures of a composite are drawn shapes, never a database image, so the original is
the only right answer. Each edit is a query against the set's references (originals + distractors), indexed by
``index.py`` once per preset and scored by ``evaluate.py --queries``, as bench/presets.py does. Reports AP and
hit@1 per edit type.

Then the other way round ("where was my photo used?"): the edits and the distractors are the database and each
original is a query, relevant to the 22 edits of its group. Scored in-process through ``RetrievalEngine.search_image``
(what server.py and query_online.py call) with the trapezoid AP evaluate.py uses; per edit type, the share of the
originals that find it among their first 22 results. Writes bench/out/unseen_edits.md (and .json).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from bench import copy_detection
from bench.presets import OUT, PRESETS, indexed, script
from bench.run import machine

GAP = 12  # pixels between the pictures of a composite


def shapes(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A picture of drawn ellipses and rectangles on a flat colour: the other pictures of a composite."""
    def colour() -> tuple[int, int, int]:
        return tuple(int(c) for c in rng.integers(0, 256, 3))

    image = Image.new("RGB", (width, height), colour())
    draw = ImageDraw.Draw(image)
    for _ in range(50):
        x, y, r = int(rng.integers(0, width)), int(rng.integers(0, height)), int(rng.integers(5, max(6, width // 6)))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x - r, y - r, x + r, y + r + int(rng.integers(0, r + 1))), fill=colour())
    return image.filter(ImageFilter.GaussianBlur(1))


def to_height(image: Image.Image, height: int) -> Image.Image:
    return image.resize((max(1, round(image.width * height / image.height)), height), Image.Resampling.BICUBIC)


def to_width(image: Image.Image, width: int) -> Image.Image:
    return image.resize((width, max(1, round(image.height * width / image.width))), Image.Resampling.BICUBIC)


def side_by_side(image: Image.Image, rng: np.random.Generator, others: int, height: int = 360) -> Image.Image:
    """The picture and ``others`` drawn pictures of random widths in a row, in a random order, ``GAP`` apart."""
    tiles = [shapes(int(rng.integers(260, 500)), height, rng) for _ in range(others)]
    tiles.insert(int(rng.integers(0, others + 1)), to_height(image, height))
    canvas = Image.new("RGB", (sum(t.width for t in tiles) + GAP * others, height), "white")
    x = 0
    for tile in tiles:
        canvas.paste(tile, (x, 0))
        x += tile.width + GAP
    return canvas


def stacked(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    top, other = to_width(image, 500), shapes(500, 380, rng)
    tiles = [top, other] if rng.random() < 0.5 else [other, top]
    canvas = Image.new("RGB", (500, top.height + other.height + GAP), "black")
    canvas.paste(tiles[0], (0, 0))
    canvas.paste(tiles[1], (0, tiles[0].height + GAP))
    return canvas


def grid(image: Image.Image, rng: np.random.Generator, cell: int = 300) -> Image.Image:
    canvas = Image.new("RGB", (2 * cell + GAP, 2 * cell + GAP), "white")
    where = int(rng.integers(0, 4))
    for i in range(4):
        tile = image.resize((cell, cell), Image.Resampling.BICUBIC) if i == where else shapes(cell, cell, rng)
        canvas.paste(tile, ((i % 2) * (cell + GAP), (i // 2) * (cell + GAP)))
    return canvas


def inset(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The picture at 340 px wide pasted somewhere on an 800 x 600 drawn picture (no page background around it)."""
    canvas, small = shapes(800, 600, rng), to_width(image, 340)
    canvas.paste(small, (int(rng.integers(0, 800 - small.width + 1)), int(rng.integers(0, max(1, 600 - small.height + 1)))))
    return canvas


def bordered(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    border = round(0.15 * max(image.size))
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    return ImageOps.expand(image, border, fill=colour)


def sheared(image: Image.Image, rng: np.random.Generator, shear: float = 0.15) -> Image.Image:
    width, height = image.size
    return image.transform((round(width + shear * height), height), Image.Transform.AFFINE,
                           (1, shear, -shear * height, 0, 1, 0), Image.Resampling.BICUBIC)


def rotated_crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    turned = image.transpose(Image.Transpose.ROTATE_270)
    width, height = turned.size
    return turned.crop((round(0.15 * width), round(0.15 * height), round(0.85 * width), round(0.85 * height)))


def striped(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Opaque parallel stripes of one colour at a random angle over about 40 % of the picture (AugLy's
    ``overlay_stripes``, DISC21's occlusion edits)."""
    width, height = image.size
    angle = np.deg2rad(rng.uniform(-60, 60))
    period = rng.uniform(0.2, 0.3) * max(width, height)
    y, x = np.mgrid[0:height, 0:width]
    phase = (x * np.cos(angle) + y * np.sin(angle)) % period
    pixels = np.asarray(image).copy()
    pixels[phase < 0.4 * period] = rng.integers(0, 256, 3) if rng.random() < 0.5 else 255
    return Image.fromarray(pixels)


def overlaid(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A drawn picture 40 % of the size, 70 % opaque, over a random place in the picture (AugLy's ``overlay_image``)."""
    width, height = image.size
    other = shapes(max(1, round(0.4 * width)), max(1, round(0.4 * height)), rng)
    x, y = int(rng.integers(0, width - other.width + 1)), int(rng.integers(0, height - other.height + 1))
    out = image.copy()
    out.paste(Image.blend(image.crop((x, y, x + other.width, y + other.height)), other, 0.7), (x, y))
    return out


def noisy(image: Image.Image, rng: np.random.Generator, sigma: float = 40.0) -> Image.Image:
    """Gaussian noise of ``sigma`` grey levels on every channel (AugLy's ``random_noise`` at variance ~0.025)."""
    noise = rng.normal(0.0, sigma, (image.height, image.width, 3))
    return Image.fromarray(np.clip(np.asarray(image, np.float64) + noise, 0, 255).astype(np.uint8))


def perspective(image: Image.Image, rng: np.random.Generator, shift: float = 0.08) -> Image.Image:
    """The picture seen at an angle: each corner moved by up to ``shift`` of the picture's size (AugLy's
    ``perspective_transform``), black outside."""
    width, height = image.size
    corners = np.array([(0, 0), (width, 0), (width, height), (0, height)], np.float64)
    moved = corners + rng.uniform(-shift, shift, (4, 2)) * (width, height)
    rows = []
    for (u, v), (x, y) in zip(moved, corners):  # PIL maps each output pixel (u, v) back to the input pixel (x, y)
        rows += [[u, v, 1, 0, 0, 0, -x * u, -x * v], [0, 0, 0, u, v, 1, -y * u, -y * v]]
    coefficients = np.linalg.solve(np.array(rows), corners.reshape(-1))
    return image.transform((width, height), Image.Transform.PERSPECTIVE, tuple(coefficients), Image.Resampling.BICUBIC)


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


EDITS: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "collage of 2": lambda image, rng: side_by_side(image, rng, 1),
    "collage of 3": lambda image, rng: side_by_side(image, rng, 2),
    "collage of 4": lambda image, rng: side_by_side(image, rng, 3, height=300),
    "2 x 2 grid": grid,
    "stacked": stacked,
    "inset": inset,
    "border": bordered,
    "rotated 90": lambda image, rng: image.transpose(Image.Transpose.ROTATE_90),
    "upside down": lambda image, rng: image.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
    "stretched": lambda image, rng: image.resize((round(image.width * 1.5), image.height), Image.Resampling.BICUBIC),
    "sheared": sheared,
    "rotated + cropped": rotated_crop,
    "grey": lambda image, rng: ImageOps.grayscale(image).convert("RGB"),
    "blur": lambda image, rng: image.filter(ImageFilter.GaussianBlur(2.5)),
    "brightness + contrast": lambda image, rng: ImageEnhance.Contrast(ImageEnhance.Brightness(image).enhance(1.4)).enhance(0.6),
    "JPEG 10": lambda image, rng: jpeg(image, 10),
    "96 px thumbnail": lambda image, rng: to_width(image, 96) if image.width >= image.height else to_height(image, 96),
    "stripes": striped,
    "overlaid picture": overlaid,
    "noise": noisy,
    "faded": lambda image, rng: Image.blend(image, Image.new("RGB", image.size, "white"), 0.55),
    "perspective": perspective,
}


def file_name(edit: str) -> str:
    return edit.replace(" ", "_").replace("+", "and") + ".jpg"


def write_queries(references: Path, out: Path, seed: int) -> int:
    """``out/<group>/<edit>.jpg`` for every group original under ``references``; the number of queries."""
    count = 0
    for group in sorted(p for p in references.iterdir() if p.is_dir() and not p.name.startswith("_")):
        original = Image.open(group / "original.jpg").convert("RGB")
        (out / group.name).mkdir(parents=True, exist_ok=True)
        for n, (edit, make) in enumerate(EDITS.items()):
            rng = np.random.default_rng([seed, n, count])
            make(original, rng).save(out / group.name / file_name(edit), quality=90)
        count += len(EDITS)
    return count


def per_edit(report: Path) -> dict[str, tuple[float, float]]:
    """evaluate.py's JSON -> {edit: (mean AP, mean hit@1)}, the edit read from each query's file name."""
    names = {file_name(edit): edit for edit in EDITS}
    values: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for query in json.loads(report.read_text())["per_query"]:
        values[names[Path(query["query"]).name]].append((query["ap"], query["P@1"]))
    return {edit: tuple(float(np.mean(column)) for column in zip(*values[edit])) for edit in EDITS}


def write_reverse_database(references: Path, queries: Path, out: Path) -> None:
    """``out/<group>/<edit>.jpg`` (the edits, hard-linked where the file system allows) and ``out/_distractors``."""
    for source in [*queries.glob("*/*.jpg"), *(references / "_distractors").glob("*.jpg")]:
        target = out / source.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            target.hardlink_to(source)
        except OSError:
            shutil.copyfile(source, target)


def reverse_scores(index: Path, references: Path) -> dict:
    """Each group original searched in the reverse database ``index``: mAP over the 22 edits of its group, and per
    edit type the share of originals with it among their first ``len(EDITS)`` results."""
    from retrieval.engine import RetrievalEngine
    from retrieval.evaluation.metrics import average_precision

    found: dict[str, list[bool]] = defaultdict(list)
    precisions = []
    engine = RetrievalEngine.open(index)
    try:
        for original in sorted(references.glob("*/original.jpg")):
            group = original.parent.name
            ranked = [hit.path for hit in engine.search_image(original, k=len(engine))]
            relevant = {f"{group}/{file_name(edit)}" for edit in EDITS}
            precisions.append(average_precision(ranked, relevant))
            first = set(ranked[: len(EDITS)])
            for edit in EDITS:
                found[edit].append(f"{group}/{file_name(edit)}" in first)
    finally:
        engine.close()
    return {"mAP": float(np.mean(precisions)), "per_edit": {edit: float(np.mean(found[edit])) for edit in EDITS}}


def fresh_set(work: Path, seed: int) -> Path:
    """The copy-detection set of ``seed``, built anew in ``work/copy-detection-<seed>``."""
    copies = work / f"copy-detection-{seed}"
    if copies.exists():
        shutil.rmtree(copies)
    copy_detection.build(copies, seed=seed)
    return copies


def scored_per_preset(copies: Path, queries: Path, work: Path, seed: int) -> dict[str, tuple[dict, Path]]:
    """Per preset: the set's references indexed by index.py (``work/references-<seed>-<preset>.h5``) and ``queries``
    scored against them by evaluate.py -> (its metrics, its JSON report ``work/<queries' name>-<preset>.json``)."""
    scored = {}
    for preset, flags in PRESETS.items():
        index = work / f"references-{seed}-{preset}.h5"
        indexed(copies / "references", index, flags)
        report = work / f"{queries.name}-{preset}.json"
        script("evaluate.py", "--index", index, "--ground-truth", "folders", "--queries", queries, "--json", report)
        scored[preset] = (json.loads(report.read_text())["metrics"], report)
    return scored


def run_seed(seed: int, work: Path) -> dict:
    copies = fresh_set(work, seed)
    queries = work / f"unseen-{seed}"
    count = write_queries(copies / "references", queries, seed)
    result = {"queries": count}
    for preset, (metrics, report) in scored_per_preset(copies, queries, work, seed).items():
        result[preset] = {"mAP": metrics["mAP"], "P@1": metrics["P@1"], "per_edit": per_edit(report)}
    reverse = work / f"reverse-{seed}"
    if reverse.exists():
        shutil.rmtree(reverse)
    write_reverse_database(copies / "references", queries, reverse)
    for preset, flags in PRESETS.items():
        index = work / f"reverse-{seed}-{preset}.h5"
        indexed(reverse, index, flags)
        result[preset]["reverse"] = reverse_scores(index, copies / "references")
    return result


def table(results: dict[int, dict], first_column: str, rows: list[str], cell: Callable[[dict, str], str]) -> list[str]:
    """Markdown table lines: one row per entry of ``rows``, one column per seed and preset; ``cell(scores, row)``
    formats one preset's scores of one seed."""
    seeds = sorted(results)
    lines = [
        f"| {first_column} | " + " | ".join(f"seed {s}: classic | seed {s}: copy-detection" for s in seeds) + " |",
        "|---|" + "---|---|" * len(seeds),
    ]
    for row in rows:
        cells = [cell(results[seed][preset], row) for seed in seeds for preset in PRESETS]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def forward_cell(scores: dict, row: str) -> str:
    ap, hit = (scores["mAP"], scores["P@1"]) if row == "**all**" else scores["per_edit"][row]
    return f"{ap:.3f} / {hit:.3f}"


def reverse_cell(scores: dict, row: str) -> str:
    reverse = scores["reverse"]
    return f"{reverse['mAP'] if row == '**mAP**' else reverse['per_edit'][row]:.3f}"


def markdown(results: dict[int, dict]) -> str:
    cpu = machine()
    lines = [
        "# Edits the copy-detection set never makes (held out)",
        "",
        f"Machine: {cpu['cpu']}, {cpu['cores']} cores. Each group original of the copy-detection set (seed "
        f"{', '.join(map(str, sorted(results)))}) edited {len(EDITS)} ways, searched against its references "
        "(originals + distractors) through evaluate.py. AP / hit@1.",
        "",
        *table(results, "edit", [*EDITS, "**all**"], forward_cell),
        "",
        "The other way round: the edits (and the distractors) are the database, each original a query relevant to the "
        f"{len(EDITS)} edits of its group. Share of the originals that find the edit among their first {len(EDITS)} "
        "results; last row: mAP.",
        "",
        *table(results, "edit in the database", [*EDITS, "**mAP**"], reverse_cell),
    ]
    return "\n".join(lines) + "\n"


def seeded_bench(argv, description: str, name: str, run_seed: Callable[[int, Path, argparse.Namespace], dict],
                 markdown: Callable[[dict[int, dict]], str],
                 add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None) -> int:
    """The command line of a bench run once per copy-detection set seed (``--seeds``, ``--keep`` and what
    ``add_arguments`` adds): ``run_seed(seed, work folder, args)`` per seed, then ``markdown(results)`` printed and
    written to ``bench/out/<name>.md`` with the results as ``.json``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", default="0,1", help="copy-detection set seeds, comma-separated (default: 0,1)")
    add_arguments(parser)
    parser.add_argument("--keep", type=Path, help="keep the sets, queries and indexes in this folder")
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds: expected integers separated by commas, got {args.seeds!r}")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = {}
        for seed in seeds:
            results[seed] = run_seed(seed, work, args)
            print(f"seed {seed}: done", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = markdown(results)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.md").write_text(text)
    (OUT / f"{name}.json").write_text(json.dumps({str(s): r for s, r in results.items()}, indent=1))
    print(text)
    return 0


def main(argv=None) -> int:
    return seeded_bench(argv, __doc__.splitlines()[1], "unseen_edits", lambda seed, work, args: run_seed(seed, work), markdown)


if __name__ == "__main__":
    sys.exit(main())
