#!/usr/bin/env python3
"""Retrieval quality of every pooling, with and without whitening and query expansion, on two sets labelled by
construction. Offline; real backbone weights.

    .venv/bin/python bench/quality.py            # full run (a few minutes on 2 cores)
    .venv/bin/python bench/quality.py --quick    # smaller sets (about a minute)

Sets
* near-duplicate (UKBench-style): every scikit-image bundled photo (``testsets.BUNDLED_PHOTOS``) as one group of
  ``original + 7`` seeded views (``testsets.make_view_groups``, seed 7; the demo database uses 2026). Relevant = the
  other members of the group. N-S is the real UKBench protocol on the groups-of-4 subset (original + views 1-3).
* categories: a balanced subset of the Fashion-MNIST test split (28x28 grey, squashed to 224x224 like any input).
  Relevant = same class.

Protocol: every image is a query, removed from its own ranking (``retrieval.evaluation``); AP is non-interpolated.

Whitening ("disjoint"): PCA-whitening (``retrieval.whitening``, power 0.5, all ``min(D, N - 1)`` components) learned on
a set of the same kind that shares no image with the evaluated one: for near-duplicates, views of the same photos made
with another seed (8) *without* the originals (the scenes are shared, the images are not: mildly optimistic); for
Fashion-MNIST, a balanced subset of the *train* split. ``index.py --whiten`` instead learns on the database itself;
the preset rows measure exactly that ("self").

Efficiency: the backbone runs once per image and scale; every pooling is computed from the same feature maps
(``Extractor.feature_maps`` then ``pooling.pool``); multi-scale descriptors reuse the single-scale maps at scale 1.
``ms/img`` = resize + rescale + forward (+ the pooling) per image, summed over the scales a row uses; measured on a
shared machine, so expect noise. Output: one Markdown table per set (sorted by mAP), a decision table, and
``bench/out/quality.md`` + ``bench/out/quality.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from retrieval import backbones, pooling, testsets  # noqa: E402
from retrieval.evaluation import PreparedQuery, evaluate_queries, prepare_queries  # noqa: E402
from retrieval.extractor import Extractor, _rescale, new_encoder_config  # noqa: E402  (_rescale: exactly the product's)
from retrieval.groundtruth import folders_from_paths  # noqa: E402
from retrieval.images import resize_for_backbone  # noqa: E402
from retrieval.presets import PRESETS  # noqa: E402
from retrieval.whitening import Whitening, learn_pca_whitening  # noqa: E402

OUT_DIR = REPO / "bench" / "out"
POOLING_NAMES = ("max", "avg", "sum", "gem", "rmac", "crow")
MULTI_SCALES = (1.0, 0.707, 0.5)
SINGLE_SCALE = (1.0,)
EVAL_SEED = 7  # near-duplicate evaluation views (the demo database uses 2026)
WHITEN_SEED = 8  # near-duplicate whitening views: another seed, originals dropped
FASHION_SEED = 0
QE_ALPHA = 3.0
BATCH = 32
SELF_WHITEN_DIMS = (None, 256, 128, 64)  # for the chosen config: index.py --whiten [--whiten-dim D]
FASHION_TOLERANCE = 0.01  # the chosen config may lose at most this much category mAP against the default


@dataclass(frozen=True)
class Sizes:
    views_per_group: int  # evaluated group: the original + views
    whiten_views: int  # per photo, for the whitening set (its original is dropped)
    fashion_per_class: int  # test split, evaluated
    fashion_whiten_per_class: int  # train split, whitening


FULL = Sizes(views_per_group=8, whiten_views=64, fashion_per_class=100, fashion_whiten_per_class=200)
QUICK = Sizes(views_per_group=8, whiten_views=16, fashion_per_class=30, fashion_whiten_per_class=60)


@dataclass(frozen=True)
class Variant:
    """A pooling with its parameters (resolved, so equal settings compare equal)."""

    name: str
    params: tuple = ()

    @classmethod
    def of(cls, name: str, params: dict | None = None) -> "Variant":
        return cls(name, tuple(sorted(pooling.resolve_pooling_params(name, params).items())))

    @property
    def label(self) -> str:
        return self.name + (f" ({', '.join(f'{k}={v:g}' for k, v in self.params)})" if self.params else "")


@dataclass(frozen=True)
class Config:
    """Everything index-time: pooling, scales, resize rule (input size is the backbone's)."""

    variant: Variant
    scales: tuple[float, ...] = SINGLE_SCALE
    rule: str = "squash-bicubic"

    @property
    def label(self) -> str:
        return f"{self.variant.label} | {scales_label(self.scales)} | {self.rule.split('-')[0]}"


DEFAULT = Config(Variant.of("max"))


def scales_label(scales) -> str:
    return ", ".join(f"{s:g}" for s in scales)


# --------------------------------------------------------------------------- extraction


@dataclass
class Extraction:
    """Raw (un-normalised) pooled vectors of one image list per (rule, scale, variant), and where the time went."""

    count: int
    raw: dict = field(default_factory=dict)  # (rule, scale) -> {Variant: (N, C)}
    seconds: dict = field(default_factory=lambda: defaultdict(float))

    def descriptors(self, config: Config) -> np.ndarray:
        """Exactly what ``Extractor.encode_arrays`` returns for ``config``: (N, C) unit rows."""
        per_scale = [self.raw[(config.rule, s)][config.variant] for s in config.scales]
        combined = per_scale[0] if len(per_scale) == 1 else pooling.combine_scales(per_scale)
        return pooling.l2_normalize(combined)

    def ms_per_image(self, config: Config) -> dict[str, float]:
        sec = self.seconds
        parts = {"resize": sec[("resize", config.rule)], "rescale": 0.0, "forward": 0.0, "pool": 0.0}
        for s in config.scales:
            parts["rescale"] += sec[("rescale", config.rule, s)]
            parts["forward"] += sec[("forward", config.rule, s)]
            parts["pool"] += sec[("pool", config.rule, s, config.variant)]
        out = {name: 1000.0 * value / self.count for name, value in parts.items()}
        out["total"] = sum(out.values())
        return out


def extract(extractor: Extractor, images, rules, scales, variants, size: int) -> Extraction:
    """Run the backbone once per image, rule and scale (batches of equal shape); pool every variant from the maps."""
    result = Extraction(count=len(images))
    sec = result.seconds
    for rule in rules:
        start = time.perf_counter()
        base = [resize_for_backbone(image, size, rule) for image in images]
        sec[("resize", rule)] += time.perf_counter() - start
        for scale in scales:
            start = time.perf_counter()
            arrays = [_rescale(array, scale) for array in base]
            sec[("rescale", rule, scale)] += time.perf_counter() - start
            out = {v: np.empty((len(images), extractor.dim), np.float32) for v in variants}
            by_shape: dict[tuple, list[int]] = defaultdict(list)
            for i, array in enumerate(arrays):
                by_shape[array.shape].append(i)
            for rows in by_shape.values():
                for first in range(0, len(rows), BATCH):
                    chunk = rows[first : first + BATCH]
                    start = time.perf_counter()
                    maps = extractor.feature_maps(np.stack([arrays[i] for i in chunk]))
                    sec[("forward", rule, scale)] += time.perf_counter() - start
                    for v in variants:
                        start = time.perf_counter()
                        out[v][chunk] = pooling.pool(v.name, maps, **dict(v.params))
                        sec[("pool", rule, scale, v)] += time.perf_counter() - start
            result.raw[(rule, scale)] = out
    return result


# --------------------------------------------------------------------------- sets


@dataclass
class BenchSet:
    key: str  # "near-duplicate" | "categories"
    title: str
    images: list  # PIL RGB, evaluated
    labels: list[str]
    whiten_images: list  # PIL RGB, disjoint set of the same kind
    rules: tuple[str, ...]
    k: int  # P@k
    qe_top_n: int
    whiten_note: str
    ns_rows: list[int] | None = None  # groups-of-4 subset for the UKBench N-S score
    queries: list[PreparedQuery] = field(default_factory=list)
    ns_queries: list[PreparedQuery] = field(default_factory=list)

    def __post_init__(self):
        self.queries = labelled_queries(self.labels)
        if self.ns_rows is not None:
            self.ns_queries = labelled_queries([self.labels[i] for i in self.ns_rows])


def labelled_queries(labels: list[str]) -> list[PreparedQuery]:
    """Every image a query; relevant = the other images with its label (the ``folders`` ground truth of label/row)."""
    paths = [f"{label}/{row:05d}" for row, label in enumerate(labels)]
    return prepare_queries(folders_from_paths(paths), paths, np.zeros((len(paths), 1), np.float32)).queries


def near_duplicate_set(sizes: Sizes) -> BenchSet:
    groups = testsets.make_view_groups(testsets.BUNDLED_PHOTOS, sizes.views_per_group, seed=EVAL_SEED)
    images = [image for _, members in groups for image in members]
    labels = [name for name, members in groups for _ in members]
    ns_rows = [g * sizes.views_per_group + i for g in range(len(groups)) for i in range(4)]
    training = testsets.make_view_groups(testsets.BUNDLED_PHOTOS, sizes.whiten_views + 1, seed=WHITEN_SEED)
    whiten_images = [image for _, members in training for image in members[1:]]  # originals dropped
    return BenchSet(
        key="near-duplicate",
        title=f"Near-duplicate: {len(groups)} scikit-image photos x {sizes.views_per_group} (original + seeded views, "
        f"seed {EVAL_SEED}) = {len(images)} images",
        images=images,
        labels=labels,
        whiten_images=whiten_images,
        rules=("squash-bicubic", "aspect-bicubic"),
        k=4,
        qe_top_n=3,
        whiten_note=f"learned on {len(whiten_images)} other views of the same photos (seed {WHITEN_SEED}, originals "
        "dropped): no shared image, shared scenes",
        ns_rows=ns_rows,
    )


def categories_set(sizes: Sizes) -> BenchSet:
    from PIL import Image

    def to_pil(arrays):
        return [Image.fromarray(a, mode="L").convert("RGB") for a in arrays]

    images, labels = testsets.load_fashion_mnist("test", per_class=sizes.fashion_per_class, seed=FASHION_SEED)
    train, _ = testsets.load_fashion_mnist("train", per_class=sizes.fashion_whiten_per_class, seed=FASHION_SEED)
    return BenchSet(
        key="categories",
        title=f"Categories: Fashion-MNIST test split, {sizes.fashion_per_class} per class x 10 = {len(images)} images "
        "(28x28, squashed to 224)",
        images=to_pil(images),
        labels=[f"class{int(label)}" for label in labels],
        whiten_images=to_pil(train),
        rules=("squash-bicubic",),  # square images: aspect-bicubic gives the same input
        k=10,
        qe_top_n=10,
        whiten_note=f"learned on {len(train)} Fashion-MNIST train-split images ({sizes.fashion_whiten_per_class} per class)",
    )


# --------------------------------------------------------------------------- evaluation


def evaluate(bench: BenchSet, vectors: np.ndarray, qe: str, whitening: Whitening | None) -> dict[str, float]:
    queries = [replace(q, vector=vectors[q.own_row]) for q in bench.queries]
    kwargs = {"qe": qe, "qe_top_n": bench.qe_top_n, "qe_alpha": QE_ALPHA, "whitening": whitening}
    result = evaluate_queries(vectors, queries, ks=(bench.k,), **kwargs)
    out = {"mAP": result.mean_average_precision, f"P@{bench.k}": result.mean_precision_at(bench.k)}
    if bench.ns_rows is not None:
        subset = vectors[bench.ns_rows]
        ns_queries = [replace(q, vector=subset[q.own_row]) for q in bench.ns_queries]
        out["N-S"] = evaluate_queries(subset, ns_queries, ks=(4,), ns_score=True, **kwargs).ns_score
    return out


def qe_label(qe: str, bench: BenchSet) -> str:
    return {"none": "-", "avg": f"AQE n={bench.qe_top_n}", "alpha": f"αQE n={bench.qe_top_n} α={QE_ALPHA:g}"}[qe]


def configs_for(bench: BenchSet, variants) -> list[Config]:
    return [Config(v, scales, rule) for rule in bench.rules for scales in (SINGLE_SCALE, MULTI_SCALES) for v in variants]


def run_set(bench: BenchSet, extractor: Extractor, backbone: str, variants, size: int, log) -> dict:
    started = time.perf_counter()
    scales = sorted({s for c in configs_for(bench, variants) for s in c.scales}, reverse=True)
    evaluated = extract(extractor, bench.images, bench.rules, scales, variants, size)
    training = extract(extractor, bench.whiten_images, bench.rules, scales, variants, size)
    log(f"  {bench.key}: features of {len(bench.images)} + {len(bench.whiten_images)} images in "
        f"{time.perf_counter() - started:.0f} s")
    rows = []
    whitenings = {}
    for config in configs_for(bench, variants):
        vectors = evaluated.descriptors(config)
        whitenings[config] = learn_pca_whitening(training.descriptors(config))
        for whiten in ("none", "disjoint"):
            whitening = whitenings[config] if whiten == "disjoint" else None
            for qe in ("none", "avg", "alpha"):
                rows.append(row_of(bench, backbone, config, whiten, qe, whitening, vectors, evaluated))
    log(f"  {bench.key}: {len(rows)} rows in {time.perf_counter() - started:.0f} s")
    return {"rows": rows, "evaluated": evaluated, "training": training}


def row_of(bench, backbone, config, whiten, qe, whitening, vectors, extraction) -> dict:
    timing = extraction.ms_per_image(config)
    return {
        "set": bench.key,
        "backbone": backbone,
        "config": config,
        "pooling": config.variant.name,
        "pooling_params": dict(config.variant.params),
        "scales": list(config.scales),
        "resize_rule": config.rule,
        "whitening": whiten,
        "qe": qe,
        "qe_label": qe_label(qe, bench),
        "dim": whitening.dim if whitening is not None else vectors.shape[1],
        "metrics": evaluate(bench, vectors, qe, whitening),
        "ms_per_image": timing,
    }


# --------------------------------------------------------------------------- reporting


def fmt_row(row: dict, bench: BenchSet, rank: int, default_map: float) -> str:
    m = row["metrics"]
    config = row["config"]
    is_default = config == DEFAULT and row["whitening"] == "none" and row["qe"] == "none"
    label = f"**{config.variant.label}** (default)" if is_default else config.variant.label
    cells = [
        str(rank),
        label,
        scales_label(config.scales),
        config.rule.split("-")[0],
        row["whitening"],
        row["qe_label"],
        str(row["dim"]),
        f"{m['mAP']:.4f}",
        f"{m['mAP'] - default_map:+.4f}",
        f"{m[f'P@{bench.k}']:.4f}",
    ]
    if bench.ns_rows is not None:
        cells.append(f"{m['N-S']:.3f}")
    cells.append(f"{row['ms_per_image']['total']:.1f}")
    return "| " + " | ".join(cells) + " |"


def set_table(bench: BenchSet, rows: list[dict]) -> str:
    default_map = default_row(rows)["metrics"]["mAP"]
    header = ["#", "pooling", "scales", "resize", "whitening", "QE", "dim", "mAP", "Δ mAP", f"P@{bench.k}"]
    if bench.ns_rows is not None:
        header.append("N-S (/4)")
    header.append("ms/img")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ordered = sorted(rows, key=lambda r: -r["metrics"]["mAP"])
    lines += [fmt_row(row, bench, i, default_map) for i, row in enumerate(ordered, 1)]
    return "\n".join(lines)


def default_row(rows):
    return next(r for r in rows if r["config"] == DEFAULT and r["whitening"] == "none" and r["qe"] == "none")


def lookup(rows, config: Config, whiten: str, qe: str = "none"):
    for r in rows:
        if r["config"] == config and r["whitening"] == whiten and r["qe"] == qe:
            return r
    return None


def as_square(config: Config) -> Config:
    """The categories set is square: an aspect-preserving resize gives the squash input, so reuse its numbers."""
    return replace(config, rule="squash-bicubic")


def decision(near_rows, cat_rows) -> tuple[list[dict], dict]:
    """Index-time candidates (no QE): near-duplicate and category mAP side by side, and the chosen one.

    Rule: the best near-duplicate mAP among candidates whose category mAP is at most FASHION_TOLERANCE below the
    default's (whitening here is the disjoint one; see the self-learned check for what the product does)."""
    base_near = default_row(near_rows)["metrics"]["mAP"]
    base_cat = default_row(cat_rows)["metrics"]["mAP"]
    candidates = []
    for r in near_rows:
        if r["qe"] != "none":
            continue
        cat = lookup(cat_rows, as_square(r["config"]), r["whitening"])
        candidates.append({
            "config": r["config"],
            "whitening": r["whitening"],
            "near": r["metrics"]["mAP"],
            "cat": cat["metrics"]["mAP"],
            "d_near": r["metrics"]["mAP"] - base_near,
            "d_cat": cat["metrics"]["mAP"] - base_cat,
            "ms": r["ms_per_image"]["total"],
        })
    candidates.sort(key=lambda c: -(c["d_near"] + c["d_cat"]))
    allowed = [c for c in candidates if c["d_cat"] >= -FASHION_TOLERANCE]
    chosen = max(allowed, key=lambda c: c["near"])
    return candidates, chosen


def decision_table(candidates, chosen, limit: int) -> str:
    lines = [
        "| # | pooling | scales | resize | whitening | near-dup mAP | Δ | categories mAP | Δ | mean Δ | ms/img (near-dup) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    shown = candidates[:limit]
    if chosen not in shown:
        shown.append(chosen)
    for i, c in enumerate(shown, 1):
        config = c["config"]
        mark = " ← chosen" if c is chosen else (" (default)" if config == DEFAULT and c["whitening"] == "none" else "")
        lines.append(
            f"| {i} | {config.variant.label}{mark} | {scales_label(config.scales)} | {config.rule.split('-')[0]} | "
            f"{c['whitening']} | {c['near']:.4f} | {c['d_near']:+.4f} | {c['cat']:.4f} | {c['d_cat']:+.4f} | "
            f"{(c['d_near'] + c['d_cat']) / 2:+.4f} | {c['ms']:.1f} |"
        )
    return "\n".join(lines)


def preset_config(spec: dict, size: int) -> Config | None:
    encoder = spec["encoder"]
    if int(encoder.get("input_size") or size) != size:
        return None
    return Config(
        Variant.of(encoder.get("pooling", "max"), encoder.get("pooling_params")),
        tuple(float(s) for s in encoder.get("scales", SINGLE_SCALE)),
        encoder.get("resize_rule", "squash-bicubic"),
    )


def self_whitened(bench, config, extraction, dim, backbone) -> dict:
    """Whitening learned on the evaluated set itself, as ``index.py --whiten [--whiten-dim D]`` does."""
    vectors = extraction.descriptors(config)
    limit = min(vectors.shape[1], vectors.shape[0] - 1)
    whitening = learn_pca_whitening(vectors, None if dim is None or dim > limit else dim)
    label = "self" if dim is None else f"self d={whitening.dim}"
    return row_of(bench, backbone, config, label, "none", whitening, vectors, extraction)


def product_check(weights, config: Config, bench: BenchSet, extraction: Extraction, size: int, count: int = 6) -> float:
    """Encode a few images with a real Extractor built for ``config``; the smallest cosine to the benchmark's vectors."""
    encoder = new_encoder_config(
        weights, config.variant.name, "float32", pooling_params=dict(config.variant.params),
        scales=config.scales, resize_rule=config.rule, input_size=size,
    )
    product = Extractor(encoder, weights).encode_pil(bench.images[:count])
    ours = extraction.descriptors(config)[:count]
    return float(np.min(np.sum(product * ours, axis=1)))


def jsonable(row: dict) -> dict:
    out = {k: v for k, v in row.items() if k != "config"}
    out["metrics"] = {k: round(v, 6) for k, v in row["metrics"].items()}
    out["ms_per_image"] = {k: round(v, 3) for k, v in row["ms_per_image"].items()}
    return out


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Retrieval quality of poolings x whitening x query expansion on two "
                                                 "offline labelled sets (near-duplicates, Fashion-MNIST categories).")
    parser.add_argument("--quick", action="store_true", help="smaller sets (about a minute)")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"folder for quality.md and quality.json (default: {OUT_DIR.relative_to(REPO)})")
    parser.add_argument("--decision-rows", type=int, default=15, help="rows of the decision table (default: 15)")
    args = parser.parse_args(argv)
    os.environ.setdefault(backbones.OFFLINE_ENV, "1")
    started = time.perf_counter()
    sizes = QUICK if args.quick else FULL
    report: list[str] = []

    def log(line: str = "") -> None:
        print(line, flush=True)

    def say(line: str = "") -> None:  # printed and kept for quality.md
        log(line)
        report.append(line)

    say(f"# Retrieval quality ({'quick' if args.quick else 'full'} run)")
    say()
    say(f"Machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, Python {platform.python_version()}, "
        f"numpy {np.__version__}. Every image is a query, excluded from its own ranking; AP non-interpolated.")
    weights_by_backbone = {"efficientnet-lite0": backbones.efficientnet_lite0_weights()}
    vgg16 = backbones.vgg16_imagenet_weights(allow_download=False)
    if vgg16 is not None:
        weights_by_backbone["vgg16"] = vgg16
    else:
        say(f"VGG16 rows skipped: its ImageNet weights file ({backbones.VGG16_IMAGENET_FILE}) is not in "
            f"{backbones.keras_models_dir()} and this benchmark never downloads.")
    say()

    variants = [Variant.of(name) for name in POOLING_NAMES]
    presets = {name: preset_config(spec, 224) for name, spec in PRESETS.items()}
    for name, config in presets.items():
        if config is None:
            say(f"preset {name}: not measured (input size other than 224)")
        elif config.variant not in variants:
            variants.append(config.variant)

    t = time.perf_counter()
    sets = [near_duplicate_set(sizes), categories_set(sizes)]
    log(f"sets built in {time.perf_counter() - t:.0f} s")

    results: dict = {"mode": "quick" if args.quick else "full", "sizes": sizes.__dict__, "sets": {}, "backbones": {}}
    for backbone, weights in weights_by_backbone.items():
        log(f"{backbone}: building the extractor")
        encoder = new_encoder_config(weights, "max", "float32")
        extractor = Extractor(encoder, weights)
        size = encoder.input_size
        per_set = {bench.key: run_set(bench, extractor, backbone, variants, size, log) for bench in sets}
        near, cat = sets
        near_rows, cat_rows = per_set[near.key]["rows"], per_set[cat.key]["rows"]

        for bench in sets:
            rows = per_set[bench.key]["rows"]
            base = default_row(rows)["metrics"]["mAP"]
            say(f"## {bench.title} — {backbone}")
            say()
            say(f"Whitening 'disjoint': {bench.whiten_note}. QE: AQE / αQE over the top {bench.qe_top_n} "
                f"(the query's own row never counts). Δ mAP is against the default (max, 1, squash, no whitening, "
                f"no QE: {base:.4f})." + (" N-S: UKBench score on the groups-of-4 subset (original + views 1-3 of every "
                                          "photo), the query counted, 4 = perfect." if bench.ns_rows else "")
                + " avg and sum give the same unit vectors wherever all maps have one size (squash).")
            say()
            say(set_table(bench, rows))
            say()

        candidates, chosen = decision(near_rows, cat_rows)
        say(f"## Decision — {backbone}: index-time settings (no QE), both sets")
        say()
        say(f"Sorted by the mean mAP gain over the default. Whitening 'disjoint' as above. The categories set is square, "
            f"so its 'aspect' numbers are the 'squash' ones. Chosen: the best near-duplicate mAP whose category mAP is "
            f"at most {FASHION_TOLERANCE} below the default's.")
        say()
        say(decision_table(candidates, chosen, args.decision_rows))
        say()

        # what the product does with the chosen settings and with every preset: whitening learned on the database
        checks = []
        chosen_config = chosen["config"]
        for bench in sets:
            config = chosen_config if bench.key == near.key else as_square(chosen_config)
            extraction = per_set[bench.key]["evaluated"]
            for dim in SELF_WHITEN_DIMS:
                checks.append((f"chosen ({chosen_config.label})", bench, self_whitened(bench, config, extraction, dim, backbone)))
            for name, pconfig in presets.items():
                if pconfig is None:
                    continue
                pconfig = pconfig if bench.key == near.key else as_square(pconfig)
                whiten = PRESETS[name]["whiten"]
                if whiten:
                    row = self_whitened(bench, pconfig, extraction, None, backbone)
                else:
                    row = lookup(per_set[bench.key]["rows"], pconfig, "none")
                checks.append((f"preset {name}", bench, row))
        say(f"## Whitening learned on the evaluated set itself (index.py --whiten [--whiten-dim D]) — {backbone}")
        say()
        say("'self' keeps min(D, N - 1) components, as index.py --whiten does by default. Presets are measured as "
            "index.py builds them (a preset with whitening learns it on the database).")
        say()
        say("| set | what | pooling | scales | resize | whitening | dim | mAP | Δ vs default | P@k | N-S |")
        say("|---|---|---|---|---|---|---|---|---|---|---|")
        for what, bench, row in checks:
            base = default_row(per_set[bench.key]["rows"])["metrics"]["mAP"]
            m = row["metrics"]
            c = row["config"]
            say(f"| {bench.key} | {what.split(' (')[0]} | {c.variant.label} | {scales_label(c.scales)} | "
                f"{c.rule.split('-')[0]} | {row['whitening']} | {row['dim']} | {m['mAP']:.4f} | "
                f"{m['mAP'] - base:+.4f} | {m[f'P@{bench.k}']:.4f} | {m.get('N-S', float('nan')):.3f} |")
        say()

        log("product check: a real Extractor for the chosen settings encodes like the benchmark")
        agreement = {}
        for bench in sets:
            config = chosen_config if bench.key == near.key else as_square(chosen_config)
            agreement[bench.key] = product_check(weights, config, bench, per_set[bench.key]["evaluated"], size)
        say("Product check: a real Extractor built for the chosen settings gives the benchmark's vectors "
            f"(smallest cosine over 6 images: {', '.join(f'{k} {v:.6f}' for k, v in agreement.items())}).")
        say()

        results["backbones"][backbone] = {
            "weights": {"name": weights.name, "md5": weights.hash},
            "chosen": {"config": chosen_config.label, "whitening": chosen["whitening"],
                       "near_map": chosen["near"], "categories_map": chosen["cat"],
                       "d_near": chosen["d_near"], "d_categories": chosen["d_cat"]},
            "self_whitening_checks": [{"what": w, "set": b.key, **jsonable(r)} for w, b, r in checks],
            "product_check_min_cosine": agreement,
        }
        for bench in sets:
            entry = results["sets"].setdefault(bench.key, {"title": bench.title, "whitening": bench.whiten_note,
                                                          "qe_top_n": bench.qe_top_n, "qe_alpha": QE_ALPHA,
                                                          "images": len(bench.images),
                                                          "whitening_images": len(bench.whiten_images), "rows": []})
            entry["rows"] += [jsonable(r) for r in per_set[bench.key]["rows"]]

    elapsed = time.perf_counter() - started
    say(f"Total run time: {elapsed:.0f} s.")
    results["seconds"] = round(elapsed, 1)
    if vgg16 is None:
        results["skipped"] = {"vgg16": "ImageNet weights file not present; no download"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.md").write_text("\n".join(report) + "\n", encoding="utf-8")
    (args.out / "quality.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    log(f"wrote {args.out / 'quality.md'} and {args.out / 'quality.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
