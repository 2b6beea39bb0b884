#!/usr/bin/env python3
"""The seed article's claims, measured on every set of bench/quality.py (near-duplicate, near-duplicate-hard,
categories, copy-detection), with the real EfficientNet-Lite0 weights, side by side in one run:

1. **MAX vs SUM vs AVE** pooling of the last conv layer (224 squash, one scale): the article found MAX slightly better
   for retrieval.
2. **AVE vs SUM at input 448** (the article guessed AVE would beat SUM once an image is resized 224 -> 448, because a
   sum grows with the map): after L2 normalisation they give *identical* cosines (AVE = SUM / (h * w), a positive
   factor per image that the normalisation removes), and so identical rankings, also with PCA-whitening learned on
   the normalised vectors (what ``index.py --whiten`` does). The table prints the largest difference between the two
   cosine matrices. They differ only where vectors are mixed *before* the normalisation, so the factor ``h * w`` no
   longer cancels: the 224 and 448 descriptors summed before L2 (SUM weights the 448 map 4x, AVE weighs both alike),
   and centring (subtracting the database mean) of the raw pooled vectors when maps differ in size (aspect resize).
3. **MOP vs single scale**: ``--pooling mop`` and ``--pooling mop-fast`` (Gong et al. 2014, ``retrieval.descriptors.mop``)
   against MAX at one scale (the default) and MAX at three scales (``--scales 1,0.707,0.5``). The codebook is learned
   on the evaluated set itself, as ``index.py`` learns it on the database (a sample of at most 500 images).

Protocols and sets are those of bench/quality.py (every ranking through the query pipeline, trapezoid AP).
``ms/img``: forward passes + pooling (+ MOP's encoding) per image, measured in this run; the machine is shared, so
compare ratios. Run it as a part of the quality benchmark (``--sets seed-article``) or alone::

    .venv/bin/python -m bench.seed_article --quick            # ~15 minutes on 2 cores
    .venv/bin/python -m bench.quality --sets seed-article     # the same inside quality.md / quality.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from bench import quality as q  # noqa: E402
from retrieval.descriptors import mop, mop_extract, pooling  # noqa: E402
from retrieval.descriptors.encoder import new_encoder_config  # noqa: E402
from retrieval.descriptors.extractor import Extractor, rescale_image  # noqa: E402
from retrieval.descriptors.whitening import apply_whitening  # noqa: E402
from retrieval.images import resize_for_backbone  # noqa: E402
from retrieval.indexing.codebook import CODEBOOK_IMAGES  # noqa: E402
from retrieval.models import backbones  # noqa: E402

BIG = 448
SMALL = 224
MULTI = (1.0, 0.707, 0.5)
BATCH = 32


class Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    def add(self, key: str, seconds: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds


def forward_pooled(extractor: Extractor, arrays: list[np.ndarray], names, timer: Timer, key: str) -> dict[str, np.ndarray]:
    """Raw (not normalised) pooled vectors of uint8 arrays, one forward pass per batch of equal shape, every pooling
    of ``names`` from the same maps. The forward time goes to ``key``, each pooling's to ``key/name``."""
    out = {name: np.empty((len(arrays), extractor.dim), np.float32) for name in names}
    groups: dict[tuple, list[int]] = {}
    for i, array in enumerate(arrays):
        groups.setdefault(array.shape, []).append(i)
    for rows in groups.values():
        for first in range(0, len(rows), BATCH):
            chunk = rows[first : first + BATCH]
            start = time.perf_counter()
            maps = extractor.feature_maps(np.stack([arrays[i] for i in chunk]))
            timer.add(key, time.perf_counter() - start)
            for name in names:
                start = time.perf_counter()
                out[name][chunk] = pooling.pool(name, maps)
                timer.add(f"{key}/{name}", time.perf_counter() - start)
    return out


MOP_VARIANTS = {"": {}, " paper k=100 uncapped": {"images_per_centroid": 1}}
"""MOP rows: index.py's defaults (k capped at images / 16, ``mop.IMAGES_PER_CENTROID``), and the paper's k=100."""


def mop_vectors(extractor: Extractor, arrays: list[np.ndarray], method: str, timer: Timer) -> dict:
    """MOP descriptors as index.py makes them: the material of every image (``Extractor.mop_material``'s code), the
    codebook learned on at most CODEBOOK_IMAGES of them (evenly spaced), every image encoded with it; one
    (vectors, codebook) per ``MOP_VARIANTS`` entry, keyed by the row's name."""
    params = pooling.resolve_pooling_params(method)
    parts = []
    start = time.perf_counter()
    for first in range(0, len(arrays), 16):
        parts.append(mop_extract.material(method, extractor.feature_maps, arrays[first : first + 16], rescale_image, params))
    timer.add(f"{method}/material", time.perf_counter() - start)
    material = mop.Material.concatenate(parts)
    rows = [i * len(arrays) // min(len(arrays), CODEBOOK_IMAGES) for i in range(min(len(arrays), CODEBOOK_IMAGES))]
    out = {}
    for suffix, extra in MOP_VARIANTS.items():
        name = method + suffix
        start = time.perf_counter()
        codebook = mop.learn_codebook(material.take(rows), method,
                                      **{k: v for k, v in params.items() if k != "fast_scale"}, **extra)
        timer.add(f"{name}/learn", time.perf_counter() - start)
        start = time.perf_counter()
        vectors = mop.encode(material, codebook)
        timer.add(f"{name}/encode", time.perf_counter() - start)
        out[name] = (vectors, codebook)
    return out


def centred(raw: np.ndarray) -> np.ndarray:
    """Raw pooled vectors minus their database mean, then L2-normalised (centring *before* the normalisation)."""
    raw = np.asarray(raw, np.float64)
    return pooling.l2_normalize(raw - raw.mean(axis=0))


def self_whitening(vectors: np.ndarray):
    """PCA-whitening as ``index.py --whiten`` learns it on the database: power 0.5, at most N / 4 dimensions."""
    return q.learn_pca_whitening(vectors, max(1, min(vectors.shape[1], len(vectors) // 4)))


def max_cos_gap(a: np.ndarray, b: np.ndarray, whitening_a=None, whitening_b=None) -> float:
    """The largest |cos_a - cos_b| over every pair of images (both through their whitening when given)."""
    if whitening_a is not None:
        a, b = apply_whitening(a, whitening_a), apply_whitening(b, whitening_b)
    return float(np.abs(a @ a.T - b @ b.T).max())


def describe_set(extractor: Extractor, images, big_images, aspect: bool, log) -> dict:
    """Every vector the claims need for one image list (PIL RGB; ``big_images``: the same decoded for 448), and the
    time per part."""
    timer = Timer()
    small = [resize_for_backbone(image, SMALL, q.SQUASH) for image in images]
    big = [resize_for_backbone(image, BIG, q.SQUASH) for image in big_images]
    raw = {SMALL: forward_pooled(extractor, small, ("max", "sum", "avg"), timer, "224")}
    raw[BIG] = forward_pooled(extractor, big, ("max", "sum", "avg"), timer, "448")
    multi = [raw[SMALL]["max"]]
    for scale in MULTI[1:]:
        multi.append(forward_pooled(extractor, [rescale_image(a, scale) for a in small], ("max",), timer, f"224x{scale}")["max"])
    out = {"raw": raw, "multi_max": pooling.l2_normalize(pooling.combine_scales(multi)), "timer": timer}
    if aspect:
        arrays = [resize_for_backbone(image, SMALL, q.ASPECT) for image in images]
        out["aspect"] = forward_pooled(extractor, arrays, ("sum", "avg"), timer, "aspect224")
    log(f"    maps and pooled vectors of {len(images)} images: {sum(timer.seconds.values()):.0f} s")
    out["mop"] = {}
    for method in pooling.CODEBOOK_POOLINGS:
        started = time.perf_counter()
        out["mop"].update(mop_vectors(extractor, small, method, timer))
        log(f"    {method} of {len(images)} images: {time.perf_counter() - started:.0f} s")
    return out


def method_rows(described: dict, count: int) -> list[tuple[str, str, np.ndarray, object, float]]:
    """(claim, method, vectors (N, D) unit rows, whitening or None, ms/img) for every row of the claims."""
    raw, sec = described["raw"], described["timer"].seconds

    def ms(*keys) -> float:
        return 1000.0 * sum(sec.get(k, 0.0) for k in keys) / count

    n = pooling.l2_normalize
    rows = [
        ("1 MAX vs SUM vs AVE", "MAX (MAC), 224, one scale (the default)", n(raw[SMALL]["max"]), None, ms("224", "224/max")),
        ("1 MAX vs SUM vs AVE", "SUM (SPoC), 224", n(raw[SMALL]["sum"]), None, ms("224", "224/sum")),
        ("1 MAX vs SUM vs AVE", "AVE, 224", n(raw[SMALL]["avg"]), None, ms("224", "224/avg")),
        ("2 AVE vs SUM at 448", "MAX, 448", n(raw[BIG]["max"]), None, ms("448", "448/max")),
        ("2 AVE vs SUM at 448", "SUM, 448", n(raw[BIG]["sum"]), None, ms("448", "448/sum")),
        ("2 AVE vs SUM at 448", "AVE, 448", n(raw[BIG]["avg"]), None, ms("448", "448/avg")),
        ("2 AVE vs SUM at 448", "SUM, 448, PCAw learned on it (index.py --whiten)", n(raw[BIG]["sum"]),
         self_whitening(n(raw[BIG]["sum"])), ms("448", "448/sum")),
        ("2 AVE vs SUM at 448", "AVE, 448, PCAw learned on it (index.py --whiten)", n(raw[BIG]["avg"]),
         self_whitening(n(raw[BIG]["avg"])), ms("448", "448/avg")),
        ("2 where they differ", "SUM, 224 + 448 summed before L2", n(raw[SMALL]["sum"] + raw[BIG]["sum"]), None,
         ms("224", "448", "224/sum", "448/sum")),
        ("2 where they differ", "AVE, 224 + 448 summed before L2", n(raw[SMALL]["avg"] + raw[BIG]["avg"]), None,
         ms("224", "448", "224/avg", "448/avg")),
        ("2 where they differ", "SUM, 448, centred before L2", centred(raw[BIG]["sum"]), None, ms("448", "448/sum")),
        ("2 where they differ", "AVE, 448, centred before L2", centred(raw[BIG]["avg"]), None, ms("448", "448/avg")),
    ]
    if "aspect" in described:
        aspect = described["aspect"]
        rows += [
            ("2 where they differ", "SUM, aspect 224 (maps of several sizes), centred before L2", centred(aspect["sum"]),
             None, ms("aspect224", "aspect224/sum")),
            ("2 where they differ", "AVE, aspect 224 (maps of several sizes), centred before L2", centred(aspect["avg"]),
             None, ms("aspect224", "aspect224/avg")),
        ]
    scales = [f"224x{s}" for s in MULTI[1:]]
    rows.append(("3 MOP vs single scale", "MAX, scales 1, 0.707, 0.5 (--scales)", described["multi_max"], None,
                 ms("224", "224/max", *scales, *(f"{s}/max" for s in scales))))
    for name, (vectors, codebook) in described["mop"].items():
        method = name.split()[0]
        label = f"--pooling {name}" + ("" if "paper" in name else " (index.py defaults)")
        rows.append(("3 MOP vs single scale", label, vectors, None, ms(f"{method}/material", f"{name}/encode")))
    return rows


def gaps(described: dict) -> dict[str, float]:
    """Largest cosine differences between AVE and SUM (the identity claim)."""
    raw, n = described["raw"], pooling.l2_normalize
    s224, a224, s448, a448 = n(raw[SMALL]["sum"]), n(raw[SMALL]["avg"]), n(raw[BIG]["sum"]), n(raw[BIG]["avg"])
    out = {
        "224": max_cos_gap(s224, a224),
        "448": max_cos_gap(s448, a448),
        "448 + PCAw": max_cos_gap(s448, a448, self_whitening(s448), self_whitening(a448)),
        "224 + 448 summed before L2": max_cos_gap(n(raw[SMALL]["sum"] + raw[BIG]["sum"]), n(raw[SMALL]["avg"] + raw[BIG]["avg"])),
        "448 centred before L2": max_cos_gap(centred(raw[BIG]["sum"]), centred(raw[BIG]["avg"])),
    }
    if "aspect" in described:
        out["aspect 224 centred before L2"] = max_cos_gap(centred(described["aspect"]["sum"]), centred(described["aspect"]["avg"]))
    return out


def run(sizes: q.Sizes, sets: list[str], out: Path, quick: bool, say, log) -> dict:
    """Build the sets, describe them, score every row; print (``say``) the tables. Returns the JSON entry."""
    weights = backbones.efficientnet_lite0_weights()
    extractor = Extractor(new_encoder_config(weights, "max", "float32"), weights)
    results: dict = {"backbone": "efficientnet-lite0", "sets": {}}
    table: dict[str, dict[str, dict]] = {}  # method -> set -> metrics
    claims: dict[str, str] = {}
    speed: dict[str, list[float]] = {}
    for key in sets:
        started = time.perf_counter()
        if key == "copy-detection":
            cd = q.copy_detection_set(out, quick, log)
            # decoded as index.py decodes them for each input size (JPEG DCT scaling down to the size)
            images, big_images, aspect = cd.decoded_for(q.SQUASH, SMALL), cd.decoded_for(q.SQUASH, BIG), True
            log(f"  copy-detection: {len(images)} images")
        else:
            bench = q.CLASSIC_SETS[key](sizes)
            images, aspect = bench.images, q.ASPECT in bench.rules
            big_images = images
            log(f"  {key}: {len(images)} images")
        described = describe_set(extractor, images, big_images, aspect, log)
        entry = {"images": len(images), "max_cosine_gap_avg_vs_sum": gaps(described), "rows": []}
        for claim, method, vectors, whitening, ms in method_rows(described, len(images)):
            if key == "copy-detection":
                matrix = apply_whitening(vectors, whitening) if whitening is not None else vectors
                scores = q.copy_detection_scores(cd, matrix)
                metrics = {"mAP": scores["copy_detection"]["mAP"], "hit@1": scores["copy_detection"]["hit@1"],
                           "all-vs-all mAP": scores["all"]["mAP"],
                           "screenshot AP": scores["copy_detection"]["per_edit_AP"].get("screenshot", float("nan"))}
            else:
                found, _ = q.evaluate(bench, vectors, "none", whitening)
                metrics = {"mAP": found["mAP"], f"P@{bench.k}": found[f"P@{bench.k}"]}
            claims[method] = claim
            table.setdefault(method, {})[key] = metrics
            speed.setdefault(method, []).append(ms)
            entry["rows"].append({"claim": claim, "method": method, "metrics": metrics, "ms_per_image": ms,
                                  "dim": int(vectors.shape[1])})
        entry["codebooks"] = {m: {"images": cb.images, "k": [lv.k for lv in cb.levels], "level_dims": cb.level_dims,
                                  "learn_seconds": described["timer"].seconds.get(f"{m}/learn", 0.0)}
                              for m, (_, cb) in described["mop"].items()}
        entry["seconds"] = time.perf_counter() - started
        results["sets"][key] = entry
        log(f"  {key}: done in {entry['seconds']:.0f} s")

    say("## The seed article's claims, measured (EfficientNet-Lite0, bench/seed_article.py)")
    say()
    say("Every set of this benchmark; mAP (trapezoid AP) through the query pipeline; copy-detection: the edits against "
        "originals + distractors (copy-detection protocol), and all-vs-all. Rows within a claim are measured side by side "
        "in one run; ms/img = forward passes + pooling (+ MOP's encoding) per image, the mean over the sets. MOP's "
        f"codebook is learned on each evaluated set (at most {CODEBOOK_IMAGES} images, as index.py learns it on the "
        "database); its learning time is listed below, not in ms/img.")
    say()
    header = ["claim", "method"]
    for key in sets:
        header += ([f"{key} mAP", "hit@1", "all-vs-all mAP", "screenshot AP"] if key == "copy-detection" else [f"{key} mAP"])
    lines = []
    for method, per_set in table.items():
        cells = [claims[method], method]
        for key in sets:
            m = per_set.get(key)  # the aspect rows exist only for sets with non-square images
            if m is None:
                cells += ["-"] * (4 if key == "copy-detection" else 1)
                continue
            cells += ([f"{m['mAP']:.3f}", f"{m['hit@1']:.3f}", f"{m['all-vs-all mAP']:.3f}", f"{m['screenshot AP']:.3f}"]
                      if key == "copy-detection" else [f"{m['mAP']:.3f}"])
        lines.append(cells + [f"{np.mean(speed[method]):.0f}"])
    say(q.markdown(header + ["ms/img"], lines))
    say()
    say("AVE vs SUM: the largest |cos(AVE) - cos(SUM)| over every pair of images of each set (float32 rounding is "
        "~1e-7; a difference above that means the rankings can differ):")
    say()
    kinds = list(dict.fromkeys(k for key in sets for k in results["sets"][key]["max_cosine_gap_avg_vs_sum"]))
    say(q.markdown(["set", *kinds], [[key, *(f"{results['sets'][key]['max_cosine_gap_avg_vs_sum'].get(k, float('nan')):.1e}"
                                            for k in kinds)] for key in sets]))
    say()
    say("MOP codebooks (learned on the evaluated set): images, k per level, level dims, learning time:")
    say()
    say(q.markdown(["set", "method", "images", "k", "level dims", "learn s"],
                   [[key, m, str(c["images"]), str(c["k"]), "+".join(map(str, c["level_dims"])), f"{c['learn_seconds']:.1f}"]
                    for key in sets for m, c in results["sets"][key]["codebooks"].items()]))
    say()
    return results


ALL_SETS = ("near-duplicate", "near-duplicate-hard", "categories", "copy-detection")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="The seed article's claims (MAX/SUM/AVE, AVE vs SUM at 448, MOP) on "
                                                 "the quality benchmark's sets.")
    parser.add_argument("--quick", action="store_true", help="the quality benchmark's smaller sets")
    parser.add_argument("--sets", default=",".join(ALL_SETS), help=f"comma-separated, any of {', '.join(ALL_SETS)}")
    parser.add_argument("--out", type=Path, default=q.OUT_DIR, help="folder for seed_article.md / .json (default: bench/out)")
    args = parser.parse_args(argv)
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [s for s in sets if s not in ALL_SETS]
    if unknown or not sets:
        parser.error(f"choose sets from {', '.join(ALL_SETS)}, got {args.sets!r}")
    os.environ.setdefault(backbones.OFFLINE_ENV, "1")
    report: list[str] = []

    def log(line: str = "") -> None:
        print(line, flush=True)

    def say(line: str = "") -> None:
        log(line)
        report.append(line)

    started = time.perf_counter()
    results = run(q.QUICK if args.quick else q.FULL, sets, args.out, args.quick, say, log)
    say(f"Run time: {time.perf_counter() - started:.0f} s ({'quick' if args.quick else 'full'} sets, {os.cpu_count()} CPUs).")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seed_article.md").write_text("\n".join(report) + "\n", encoding="utf-8")
    (args.out / "seed_article.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    log(f"wrote {args.out / 'seed_article.md'} and {args.out / 'seed_article.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
