#!/usr/bin/env python3
"""Chained edits, as DISC21's queries are made: a held-out copy-detection check on which the preset is far from 1.

    python -m bench.chained_edits               # seeds 0 and 1 (about 8 minutes on 2 cores)
    python -m bench.chained_edits --seeds 1 --per-group 2

On the copy-detection set's own protocol (one edit per query) the preset scores 0.99 and classic 0.84: a set where
the candidate is that close to 1 cannot tell two versions of it apart. DISC21's queries (the Image Similarity
Challenge, made with AugLy) apply several edits one after another: a crop, then a colour change, then a caption,
then a screenshot frame. Here each group original of the copy-detection set (``references/<group>/original.jpg``)
gets ``per_group`` queries, each 2 or 3 edits drawn without repetition from the set's own edit types
(``bench/copy_detection.py``: emoji + crop, caption + JPEG, padded + rotated, pixelized, colour, small crop, mirrored)
and the held-out ones (``bench/unseen_edits.py``: border, stretched, sheared, rotated + cropped, grey, blur,
brightness + contrast, JPEG 10, stripes, overlaid picture, noise, faded, perspective); with probability
``CONTAINER_RATE`` the last one puts the result inside something (a screenshot frame, an inset on a drawn picture, a
collage of 2, a 2 x 2 grid). Every random choice comes from ``numpy.random.default_rng([seed, STREAM, group,
query])``. The queries are searched against the set's references (originals + distractors), indexed by ``index.py``
once per preset and scored by ``evaluate.py --queries`` (each query relevant to its group's original only), as
bench/presets.py does. Reports mAP, hit@1 and µAP per seed and preset, and per edit the mean AP of the queries that
contain it.

Most of DISC21's queries have no reference at all, and its µAP pools their results with the others': a system
whose best match for an unrelated image outscores its true copies loses there. So the same queries are also searched
against the references without the originals of every ``ABSENT_EVERY``-th group (a quarter of them): those groups'
queries match nothing (``evaluate.py``: queries under ``_unmatched/``). Reported: that µAP, and how many of the
unmatched queries got a best score above every cosine (above 1: verified, or nearly so by the colour thumbnail).
Writes bench/out/chained_edits.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from bench import copy_detection, unseen_edits
from bench.presets import PRESETS, indexed, script
from bench.run import machine

STREAM = 77  # the random stream of the chains (copy_detection uses small stream numbers for its own choices)
PER_GROUP = 4
CHAIN_LENGTHS = (2, 3)
CONTAINER_RATE = 0.3
SET_EDITS = ("emoji_crop", "text_jpeg", "pad_rotate", "pixelize", "colour", "small_crop", "hflip")
HELD_OUT_EDITS = ("border", "stretched", "sheared", "rotated + cropped", "grey", "blur", "brightness + contrast",
                  "JPEG 10", "stripes", "overlaid picture", "noise", "faded", "perspective")
CONTAINERS = ("screenshot", "inset", "collage of 2", "2 x 2 grid")  # only ever the last edit of a chain
QUERY_JPEG_QUALITY = 85
ABSENT_EVERY = 4  # every 4th group's original is left out of the database of the unmatched-query protocol


def apply(image: Image.Image, edit: str, rng: np.random.Generator) -> Image.Image:
    """One edit of either bench, by name."""
    if edit in copy_detection.EDITS:
        return copy_detection.apply_edit(image, edit, rng)[0].convert("RGB")
    return unseen_edits.EDITS[edit](image, rng).convert("RGB")


def chain(original: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, list[str]]:
    """``original`` after 2 or 3 edits in a row (the last maybe a container); the edited image and the edits."""
    count = int(rng.choice(CHAIN_LENGTHS))
    edits = [str(e) for e in rng.choice(SET_EDITS + HELD_OUT_EDITS, count, replace=False)]
    if rng.random() < CONTAINER_RATE:
        edits[-1] = str(rng.choice(CONTAINERS))
    image = original.convert("RGB")
    for edit in edits:
        image = apply(image, edit, rng)
    return image, edits


@dataclass(frozen=True)
class Chains:
    """How a bench's queries are made: ``make(original, rng)`` -> (the edited image, its edits' names), with ``rng``
    from ``numpy.random.default_rng([seed, stream, group, query])``; their files go under ``<work>/<name>-<seed>``."""

    name: str
    stream: int
    make: Callable[[Image.Image, np.random.Generator], tuple[Image.Image, list[str]]]


CHAINED = Chains("chained", STREAM, chain)


def write_queries(references: Path, out: Path, seed: int, per_group: int = PER_GROUP,
                  chains: Chains = CHAINED) -> dict[str, list[str]]:
    """``out/<group>/qN.jpg`` for every group original under ``references``: {"<group>/qN.jpg": edits}."""
    made = {}
    groups = sorted(p for p in references.iterdir() if p.is_dir() and not p.name.startswith("_"))
    for g, group in enumerate(groups):
        original = Image.open(group / "original.jpg").convert("RGB")
        (out / group.name).mkdir(parents=True, exist_ok=True)
        for n in range(per_group):
            image, edits = chains.make(original, np.random.default_rng([seed, chains.stream, g, n]))
            image.save(out / group.name / f"q{n}.jpg", quality=QUERY_JPEG_QUALITY)
            made[f"{group.name}/q{n}.jpg"] = edits
    return made


def per_edit(report: Path, chains: dict[str, list[str]]) -> dict[str, float]:
    """evaluate.py's JSON -> {edit: mean AP of the queries whose chain holds it}."""
    values: dict[str, list[float]] = defaultdict(list)
    for query in json.loads(report.read_text())["per_query"]:
        path = Path(query["query"])
        for edit in chains[f"{path.parent.name}/{path.name}"]:
            values[edit].append(query["ap"])
    return {edit: float(np.mean(aps)) for edit, aps in values.items()}


def linked(source: Path, target: Path) -> None:
    """``target`` as a hard link to ``source`` (a copy where links cannot be made), its folder made."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        target.hardlink_to(source)
    except OSError:
        shutil.copyfile(source, target)


def with_absent_originals(references: Path, queries: Path, out: Path) -> tuple[Path, Path, int]:
    """The unmatched-query protocol (see the module docstring) under ``out``: (references without every
    ``ABSENT_EVERY``-th group, the queries with those groups' under ``_unmatched/``, how many groups are absent)."""
    if out.exists():
        shutil.rmtree(out)
    groups = sorted(p.name for p in references.iterdir() if p.is_dir() and not p.name.startswith("_"))
    absent = set(groups[ABSENT_EVERY - 1 :: ABSENT_EVERY])
    for path in sorted(references.rglob("*")):
        relative = path.relative_to(references)
        if path.is_file() and relative.parts[0] not in absent:
            linked(path, out / "references" / relative)
    for path in sorted(queries.rglob("*.jpg")):
        group, name = path.parent.name, path.name
        linked(path, out / "queries" / (f"_unmatched/{group}-{name}" if group in absent else f"{group}/{name}"))
    return out / "references", out / "queries", len(absent)


def run_seed(seed: int, work: Path, per_group: int, chains: Chains = CHAINED) -> dict:
    """The set of ``seed`` built anew, its queries made by ``chains``, both protocols scored per preset."""
    copies = unseen_edits.fresh_set(work, seed)
    queries = work / f"{chains.name}-{seed}"
    if queries.exists():
        shutil.rmtree(queries)
    made = write_queries(copies / "references", queries, seed, per_group, chains)
    result = {"queries": len(made), "chains": made}
    for preset, (metrics, report) in unseen_edits.scored_per_preset(copies, queries, work, seed).items():
        result[preset] = {"mAP": metrics["mAP"], "P@1": metrics["P@1"], "µAP": metrics["µAP"],
                          "per_edit": per_edit(report, made)}
    unmatched = f"{chains.name}-unmatched-{seed}"
    references, mixed, absent = with_absent_originals(copies / "references", queries, work / unmatched)
    result["absent_groups"] = absent
    for preset, flags in PRESETS.items():
        index = work / f"{unmatched}-{preset}.h5"
        indexed(references, index, flags)
        report = work / f"{unmatched}-{preset}.json"
        script("evaluate.py", "--index", index, "--ground-truth", "folders", "--queries", mixed, "--json", report)
        scored = json.loads(report.read_text())
        tops = [q["top_score"] for q in scored["unmatched_queries"]]
        result[preset].update({"µAP, unmatched too": scored["metrics"]["µAP"], "unmatched": len(tops),
                               "unmatched above 1": sum(t is not None and t > 1 for t in tops)})
    return result


TITLE = "Chained edits (DISC21-style queries, held out)"
INTRO = "Each group original of the copy-detection set edited 2-3 times in a row"


def markdown(results: dict[int, dict], title: str = TITLE, intro: str = INTRO) -> str:
    """The results of every seed as tables: the metrics per seed and preset, then the mean AP per edit."""
    cpu = machine()
    seeds = sorted(results)
    head = "| " + " | ".join(f"seed {s}: classic | seed {s}: copy-detection" for s in seeds) + " |"
    rule = "|---|" + "---|---|" * len(seeds)
    lines = [
        f"# {title}",
        "",
        f"Machine: {cpu['cpu']}, {cpu['cores']} cores. {intro}, searched against the references (originals + "
        "distractors) through evaluate.py.",
        "",
        "| metric " + head,
        rule,
    ]
    for metric in ("mAP", "P@1", "µAP"):
        lines.append(f"| {metric} | " + " | ".join(f"{results[s][p][metric]:.3f}" for s in seeds for p in PRESETS) + " |")
    absent = results[seeds[0]]["absent_groups"]
    lines.append(f"| µAP, {absent} originals absent (their queries unmatched) | "
                 + " | ".join(f"{results[s][p]['µAP, unmatched too']:.3f}" for s in seeds for p in PRESETS) + " |")
    lines.append("| unmatched queries scored above 1 | "
                 + " | ".join(f"{results[s][p]['unmatched above 1']} of {results[s][p]['unmatched']}" for s in seeds for p in PRESETS) + " |")
    lines += ["", "Per edit: mean AP of the queries whose chain holds it (weakest first for the preset, first seed).", "",
              "| edit (queries) " + head, rule]
    first = results[seeds[0]]["copy-detection"]["per_edit"]
    for edit in sorted(first, key=first.get):
        counts = "/".join(str(sum(edit in c for c in results[s]["chains"].values())) for s in seeds)
        cells = [f"{results[s][p]['per_edit'].get(edit, float('nan')):.3f}" for s in seeds for p in PRESETS]
        lines.append(f"| {edit} ({counts}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def per_group_argument(parser: argparse.ArgumentParser) -> None:
    def count(text: str) -> int:
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
        return value

    parser.add_argument("--per-group", type=count, default=PER_GROUP, help=f"queries per group original (default {PER_GROUP})")


def main(argv=None) -> int:
    return unseen_edits.seeded_bench(
        argv, __doc__.splitlines()[1], "chained_edits", lambda seed, work, args: run_seed(seed, work, args.per_group),
        markdown, per_group_argument,
    )


if __name__ == "__main__":
    sys.exit(main())
