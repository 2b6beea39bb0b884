#!/usr/bin/env python3
"""Retrieval quality of every pooling, with and without whitening and query expansion, on offline sets labelled by
construction, with the real backbone weights, beside peers (perceptual hashes, a colour histogram, the reference
demo's recipe) on a copy-detection set. Chooses the best index-time settings for ``retrieval.presets``.

    .venv/bin/python -m bench.quality                                  # everything (about 10 minutes, 2 cores)
    .venv/bin/python -m bench.quality --quick                          # smaller sets (about 3 minutes)
    .venv/bin/python -m bench.quality --sets copy-detection,speed      # some of the parts

Sets (see bench/README.md; ``--sets`` picks any of them)
* ``near-duplicate``: every scikit-image bundled photo (``testsets.BUNDLED_PHOTOS``) is a group of its original and 7
  seeded views (``testsets.make_view_groups``, seed 7; the demo database uses 2026). Relevant: the rest of the group.
* ``near-duplicate-hard``: the same photos cut into 2 x 2 tiles; every tile is a group of the tile and 5 seeded views
  (``testsets.random_view``). Tiles of one photo share texture and colour, so they are hard negatives for each other;
  the first set is nearly saturated and cannot separate the methods.
* ``categories``: a balanced subset of the Fashion-MNIST test split (28x28 grey, squashed to 224 like any input).
  Relevant: the same class.
* ``copy-detection``: the DISC21-style set of ``bench/copy_detection.py`` (60 groups of an original and 7 AugLy
  edits, 500 distractors; ``--quick``: 12 and 100), written under ``OUT/copy-detection`` and run both ways: all-vs-all
  (``evaluate.py --ground-truth folders`` on ``all/``) and copy detection (``evaluate.py --queries`` semantics: the
  edits against the originals + distractors). mAP, hit@1, DISC21's µAP and the AP per edit type, for pHash and dHash
  (PyPI imagehash), an 8x8x8 colour histogram, the reference demo's recipe (``--preset classic --resize
  squash-nearest``) and every pooling at one and three scales, squash and aspect resize.
* ``speed``: a 10,000-query evaluation of generated vectors through the pipeline (2,000 with ``--quick``), timed.

Protocol: every ranking goes through ``retrieval.search.pipeline.QueryPipeline`` (exact search in memory, the stored
whitening, query expansion through the same backend) and is scored by ``retrieval.evaluation.protocol``, as
``evaluate.py`` scores; AP is the trapezoid AP of the official benchmark code. Classic sets: every image is a query,
removed from its own ranking; the near-duplicate sets also get the UKBench N-S score, on their groups-of-4 subset
(first 4 members of every group, the query counted, 4 = perfect).

Whitening ``PCAw``: ``retrieval.whitening`` as index.py uses it (power 0.5, all ``min(D, N - 1)`` components), learned
on a disjoint set of the same kind (``index.py --whiten-from``): for the near-duplicate sets, views of the same photos
or tiles made with another seed (8), originals dropped, so no image is shared (the scenes are); for Fashion-MNIST, a
balanced subset of the *train* split. ``index.py --whiten`` learns on the database itself: the whitening study and the
preset rows measure that ("self").

Efficiency: the backbone runs once per image, resize rule and scale; every pooling comes from the same feature maps
(``Extractor.feature_maps`` then ``pooling.pool``), multi-scale reuses the scale-1 maps. ``ms/img`` = resize + rescale +
forward + that pooling, per image, summed over the scales a row uses; the machine is shared, so expect noise.
Output: one Markdown table per set (sorted by mAP), the decision and whitening tables, the copy-detection tables,
``bench/out/quality.md`` and ``bench/out/quality.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

# Before numpy loads: one BLAS thread. The matrices here are small, and on a shared 2-core machine a multi-threaded
# OpenBLAS spins against the other load: measured 10 s instead of 0.25 s for one whitening, 4 s instead of 0.08 s
# for one evaluation. TensorFlow has its own thread pool and keeps both cores for the forward passes.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

from PIL import Image  # noqa: E402

from bench import copy_detection, testsets  # noqa: E402
from retrieval.descriptors import pooling  # noqa: E402
from retrieval.descriptors.encoder import new_encoder_config  # noqa: E402
from retrieval.descriptors.extractor import Extractor, rescale_image  # noqa: E402
from retrieval.descriptors.whitening import Whitening, learn_pca_whitening  # noqa: E402
from retrieval.evaluation.groundtruth import folders_from_paths, folders_with_queries  # noqa: E402
from retrieval.evaluation.protocol import PreparedQuery, evaluate_queries, prepare_queries  # noqa: E402
from retrieval.images import list_image_files, open_image, resize_for_backbone  # noqa: E402
from retrieval.indexing.presets import PRESETS  # noqa: E402
from retrieval.models import backbones  # noqa: E402
from retrieval.search.backends.memory import MemoryBackend  # noqa: E402
from retrieval.search.expansion import QueryExpansion  # noqa: E402
from retrieval.search.pipeline import QueryPipeline, searched_matrix  # noqa: E402

OUT_DIR = REPO / "bench" / "out"
POOLING_NAMES = ("max", "avg", "sum", "gem", "rmac", "crow")
MULTI_SCALES = (1.0, 0.707, 0.5)
SINGLE_SCALE = (1.0,)
SQUASH, ASPECT = "squash-bicubic", "aspect-bicubic"
EVAL_SEED = 7  # evaluated views (the demo database uses 2026)
WHITEN_SEED = 8  # whitening views: another seed, originals dropped
FASHION_SEED = 0
MAX_SIDE = 512  # longest side of originals, tiles and views (as make_view_groups)
TILE_GRID = 2
QE_ALPHA = 3.0
BATCH = 32
STUDY_DIMS = (None, 256, 64)  # whitening study: all components, --whiten-dim 256, --whiten-dim 64
STUDY_POWERS = (0.5, 0.0)  # 0.5 = what index.py does; 0 = PCA rotation + centring only (not offered by index.py)
BOOTSTRAP = 2000  # resamples for the confidence interval of the chosen settings' gain
CATEGORY_TOLERANCE = 0.01  # the chosen settings may lose at most this much category mAP against the default
EASY_TOLERANCE = 0.005  # ... and this much mAP on the (saturated) near-duplicate set


@dataclass(frozen=True)
class Sizes:
    views_per_group: int  # near-duplicate: original + views
    whiten_views: int  # near-duplicate: views per photo for whitening (originals dropped)
    tile_views: int  # hard: tile + views
    tile_whiten_views: int  # hard: views per tile for whitening
    fashion_per_class: int  # test split, evaluated
    fashion_whiten_per_class: int  # train split, whitening


FULL = Sizes(8, 32, 6, 8, 100, 150)
QUICK = Sizes(6, 8, 4, 2, 20, 40)


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
    """The index-time settings measured here: pooling, scales, resize rule (input size: the backbone's)."""

    variant: Variant
    scales: tuple[float, ...] = SINGLE_SCALE
    rule: str = SQUASH

    @property
    def label(self) -> str:
        return f"{self.variant.label}, scales {scales_label(self.scales)}, {short(self.rule)}"


DEFAULT = Config(Variant.of("max"))


def scales_label(scales) -> str:
    return ", ".join(f"{s:g}" for s in scales)


def short(rule: str) -> str:
    return rule.split("-")[0]


# --------------------------------------------------------------------------- extraction


@dataclass
class Extraction:
    """Raw (not normalised) pooled vectors of one image list per (rule, scale, variant), and where the time went."""

    count: int
    raw: dict = field(default_factory=dict)  # (rule, scale) -> {Variant: float32 (N, C)}
    seconds: dict = field(default_factory=lambda: defaultdict(float))

    def descriptors(self, config: Config) -> np.ndarray:
        """What ``Extractor.encode_arrays`` returns for ``config``: float32 (N, C) unit rows."""
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
    """One forward pass per image, rule and scale (batches of equal shape); every variant pooled from those maps."""
    result = Extraction(count=len(images))
    sec = result.seconds
    for rule in rules:
        start = time.perf_counter()
        base = [resize_for_backbone(image, size, rule) for image in images]
        sec[("resize", rule)] += time.perf_counter() - start
        for scale in scales:
            start = time.perf_counter()
            arrays = [rescale_image(array, scale) for array in base]
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
    key: str
    title: str
    images: list  # PIL RGB, evaluated
    labels: list[str]
    whiten_images: list  # PIL RGB, disjoint set of the same kind
    whiten_note: str
    rules: tuple[str, ...]
    k: int  # P@k
    qe_top_n: int
    group_size: int | None = None  # near-duplicate sets: members per group, in order (N-S on the first 4)
    clusters: list[str] | None = None  # bootstrap unit of every query (the photo); None: every query its own
    queries: list[PreparedQuery] = field(default_factory=list)
    ns_rows: list[int] | None = None
    ns_queries: list[PreparedQuery] = field(default_factory=list)

    def __post_init__(self):
        self.queries = labelled_queries(self.labels)
        if self.group_size is not None:
            self.ns_rows = [row for row in range(len(self.labels)) if row % self.group_size < 4]
            self.ns_queries = labelled_queries([self.labels[row] for row in self.ns_rows])


def labelled_queries(labels: list[str]) -> list[PreparedQuery]:
    """Every image a query; relevant = the other images with its label (the ``folders`` ground truth of label/row)."""
    paths = [f"{label}/{row:05d}" for row, label in enumerate(labels)]
    return prepare_queries(folders_from_paths(paths), paths, np.zeros((len(paths), 1), np.float32)).queries


def fit(image: Image.Image, max_side: int = MAX_SIDE) -> Image.Image:
    """RGB, downscaled (LANCZOS, aspect kept) so the longest side is at most ``max_side`` (as make_view_groups)."""
    image = image.convert("RGB")
    if max(image.size) <= max_side:
        return image
    ratio = max_side / max(image.size)
    return image.resize((max(1, round(image.width * ratio)), max(1, round(image.height * ratio))), Image.Resampling.LANCZOS)


def flatten(groups, skip_first: bool = False):
    images = [image for _, members in groups for image in members[1 if skip_first else 0 :]]
    labels = [name for name, members in groups for _ in members[1 if skip_first else 0 :]]
    return images, labels


def near_duplicate_set(sizes: Sizes) -> BenchSet:
    groups = testsets.make_view_groups(testsets.BUNDLED_PHOTOS, sizes.views_per_group, seed=EVAL_SEED, max_side=MAX_SIDE)
    training = testsets.make_view_groups(testsets.BUNDLED_PHOTOS, sizes.whiten_views + 1, seed=WHITEN_SEED, max_side=MAX_SIDE)
    images, labels = flatten(groups)
    whiten_images, _ = flatten(training, skip_first=True)
    return BenchSet(
        key="near-duplicate",
        title=f"Near-duplicate: {len(groups)} scikit-image photos x {sizes.views_per_group} (original + seeded views, "
        f"seed {EVAL_SEED}) = {len(images)} images",
        images=images,
        labels=labels,
        whiten_images=whiten_images,
        whiten_note=f"{len(whiten_images)} other views of the same photos (seed {WHITEN_SEED}, originals dropped)",
        rules=(SQUASH, ASPECT),
        k=4,
        qe_top_n=3,
        group_size=sizes.views_per_group,
        clusters=labels,
    )


def tile_groups(seed: int, members: int, keep_tile: bool) -> list[tuple[str, list[Image.Image]]]:
    """Every bundled photo cut into TILE_GRID x TILE_GRID tiles; each tile a group of [tile +] seeded views of it."""
    groups = []
    for name in testsets.BUNDLED_PHOTOS:
        photo = testsets.load_bundled_photo(name)
        width, height = photo.size
        for row in range(TILE_GRID):
            for col in range(TILE_GRID):
                box = (col * width // TILE_GRID, row * height // TILE_GRID,
                       (col + 1) * width // TILE_GRID, (row + 1) * height // TILE_GRID)
                tile = fit(photo.crop(box))
                label = f"{name}-{row}{col}"
                rng = np.random.default_rng([seed, zlib.crc32(label.encode("utf-8"))])
                views = [fit(testsets.random_view(tile, rng)) for _ in range(members - (1 if keep_tile else 0))]
                groups.append((label, [tile, *views] if keep_tile else views))
    return groups


def hard_near_duplicate_set(sizes: Sizes) -> BenchSet:
    groups = tile_groups(EVAL_SEED, sizes.tile_views, keep_tile=True)
    training = tile_groups(WHITEN_SEED, sizes.tile_whiten_views, keep_tile=False)
    images, labels = flatten(groups)
    whiten_images, _ = flatten(training)
    return BenchSet(
        key="near-duplicate-hard",
        title=f"Near-duplicate, hard: {len(testsets.BUNDLED_PHOTOS)} photos x {TILE_GRID}x{TILE_GRID} tiles = "
        f"{len(groups)} groups x {sizes.tile_views} (tile + seeded views, seed {EVAL_SEED}) = {len(images)} images",
        images=images,
        labels=labels,
        whiten_images=whiten_images,
        whiten_note=f"{len(whiten_images)} other views of the same tiles (seed {WHITEN_SEED}, tiles dropped)",
        rules=(SQUASH, ASPECT),
        k=4,
        qe_top_n=3,
        group_size=sizes.tile_views,
        clusters=[label.rsplit("-", 1)[0] for label in labels],
    )


def categories_set(sizes: Sizes) -> BenchSet:
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
        whiten_note=f"{len(train)} Fashion-MNIST train-split images ({sizes.fashion_whiten_per_class} per class)",
        rules=(SQUASH,),  # square images: aspect-bicubic gives exactly the squash input
        k=10,
        qe_top_n=10,
    )


# --------------------------------------------------------------------------- evaluation


def exact_pipeline(vectors: np.ndarray, whitening: Whitening | None = None) -> QueryPipeline:
    """The query pipeline the server would serve for a database of ``vectors`` (exact search in memory, the
    whitening stored with it applied to database and queries)."""
    matrix = searched_matrix(vectors, whitening)
    return QueryPipeline(MemoryBackend(matrix), matrix, whitening)


def evaluate(bench: BenchSet, vectors: np.ndarray, qe: str, whitening: Whitening | None) -> tuple[dict, np.ndarray]:
    """(metrics, per-query AP): every image a query (its stored descriptor, left out of its own ranking), ranked
    through the query pipeline as evaluate.py and the server rank (whitening, then QE through the same backend)."""
    expansion = QueryExpansion(qe, bench.qe_top_n, QE_ALPHA)
    queries = [replace(q, vector=vectors[q.own_row]) for q in bench.queries]
    result = evaluate_queries(exact_pipeline(vectors, whitening), queries, ks=(bench.k,), expansion=expansion)
    out = {"mAP": result.mean_average_precision, f"P@{bench.k}": result.mean_precision_at(bench.k)}
    if bench.ns_rows is not None:
        subset = vectors[bench.ns_rows]
        ns_queries = [replace(q, vector=subset[q.own_row]) for q in bench.ns_queries]
        out["N-S"] = evaluate_queries(exact_pipeline(subset, whitening), ns_queries, ks=(4,), expansion=expansion,
                                      ns_score=True).ns_score
    return out, np.array([score.average_precision for score in result.queries])


def gain_interval(bench: BenchSet, ap_new: np.ndarray, ap_old: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of mean(ap_new - ap_old), resampling photos (near-duplicates: their views and tiles
    are not independent) or queries (categories)."""
    diff = ap_new - ap_old
    units = bench.clusters if bench.clusters is not None else list(range(len(diff)))
    rows = [q.own_row for q in bench.queries]
    index = {unit: i for i, unit in enumerate(dict.fromkeys(units))}
    sums, counts = np.zeros(len(index)), np.zeros(len(index))
    for d, row in zip(diff, rows):
        sums[index[units[row]]] += d
        counts[index[units[row]]] += 1
    draws = np.random.default_rng(seed).integers(0, len(index), size=(BOOTSTRAP, len(index)))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def qe_label(qe: str, bench: BenchSet) -> str:
    return {"none": "-", "avg": f"AQE n={bench.qe_top_n}", "alpha": f"αQE n={bench.qe_top_n} α={QE_ALPHA:g}"}[qe]


def configs_for(bench: BenchSet, variants) -> list[Config]:
    return [Config(v, scales, rule) for rule in bench.rules for scales in (SINGLE_SCALE, MULTI_SCALES) for v in variants]


def row_of(bench, backbone, config, whiten, qe, whitening, vectors, extraction) -> dict:
    metrics, aps = evaluate(bench, vectors, qe, whitening)
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
        "dim": whitening.dim if whitening is not None else int(vectors.shape[1]),
        "metrics": metrics,
        "ms_per_image": extraction.ms_per_image(config),
        "ap": aps,  # per query, for the confidence interval; not written to JSON
    }


def run_set(bench: BenchSet, extractor: Extractor, backbone: str, variants, size: int, log) -> dict:
    started = time.perf_counter()
    scales = sorted({s for c in configs_for(bench, variants) for s in c.scales}, reverse=True)
    evaluated = extract(extractor, bench.images, bench.rules, scales, variants, size)
    training = extract(extractor, bench.whiten_images, bench.rules, scales, variants, size)
    features_s = time.perf_counter() - started
    log(f"  {bench.key}: features of {len(bench.images)} + {len(bench.whiten_images)} images in {features_s:.0f} s")
    rows = []
    for config in configs_for(bench, variants):
        vectors = evaluated.descriptors(config)
        learned = learn_pca_whitening(training.descriptors(config))
        for whiten, whitening in (("none", None), ("PCAw", learned)):
            for qe in ("none", "avg", "alpha"):
                rows.append(row_of(bench, backbone, config, whiten, qe, whitening, vectors, evaluated))
    seconds = time.perf_counter() - started
    log(f"  {bench.key}: {len(rows)} rows in {seconds:.0f} s")
    return {"rows": rows, "evaluated": evaluated, "training": training, "seconds": seconds, "features_seconds": features_s}


def study_whitening(bench, backbone, config, run) -> list[dict]:
    """The chosen settings with whitening learned on the disjoint set or on the evaluated set itself, by dim and power."""
    evaluated, training = run["evaluated"], run["training"]
    vectors = evaluated.descriptors(config)
    rows = [row_of(bench, backbone, config, "none", "none", None, vectors, evaluated)]
    for source, learn_on in (("disjoint", training.descriptors(config)), ("self", vectors)):
        limit = min(learn_on.shape[1], learn_on.shape[0] - 1)
        for power in STUDY_POWERS:
            for dim in STUDY_DIMS:
                if dim is not None and dim >= limit:
                    continue
                whitening = learn_pca_whitening(learn_on, dim, power=power)
                label = f"{source}, power {power:g}, d={whitening.dim}" + (" (all)" if dim is None else "")
                rows.append(row_of(bench, backbone, config, label, "none", whitening, vectors, evaluated))
    return rows


# --------------------------------------------------------------------------- copy detection

COPY_SEED = 0  # the copy-detection set's seed (bench/copy_detection.py)
PROTOCOLS = ("all", "copy_detection")
PROTOCOL_TITLES = {"all": "all-vs-all", "copy_detection": "copy detection"}


@dataclass
class CopyDetectionSet:
    """The copy-detection set built by ``bench/copy_detection.py`` and its two protocols, ground truth read from the
    folder layout exactly as ``evaluate.py`` reads it. ``paths`` / ``images``: every image of ``all/`` (the all-vs-all
    database; ``references/`` and ``queries/`` hold the same files), so each image is described once."""

    root: Path
    paths: list[str]
    images: list
    manifest: dict
    references: list[str] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        counts = self.manifest["counts"]
        return (f"Copy detection (DISC21-style, bench/copy_detection.py seed {COPY_SEED}): {counts['groups']} groups "
                f"(original + {copy_detection.EDITS_PER_GROUP} AugLy edits), {counts['distractors']} distractors")

    def decoded_for(self, rule: str, size: int) -> list:
        """The images decoded as index.py decodes them for ``rule`` (JPEG DCT scaling down to ``size`` for the
        bicubic rules, a full decode for squash-nearest), so the benchmark's vectors are the ones index.py stores."""
        draft = None if rule == "squash-nearest" else size
        return [open_image(self.root / "all" / path, draft_size=draft) for path in self.paths]

    def prepared(self, vectors: np.ndarray) -> dict[str, tuple[np.ndarray, list[PreparedQuery]]]:
        """Per protocol: (database descriptors, prepared queries) for descriptors (N, D) of ``paths``.

        ``all``: ``folders`` ground truth of ``all/`` (``_distractors/`` in the database, never a query); every group
        member a query left out of its own ranking. ``copy_detection``: ``evaluate.py --queries``: the files of
        ``queries/`` against the database ``references/``, each query encoded from its file (here: its descriptor)."""
        row = {path: i for i, path in enumerate(self.paths)}
        everything = prepare_queries(folders_from_paths(self.paths), self.paths, vectors).queries
        database = vectors[[row[p] for p in self.references]]
        truth = folders_with_queries(self.queries, self.references)
        copies = prepare_queries(truth, self.references, database, lambda query, _: vectors[row[query.image]]).queries
        return {"all": (vectors, everything), "copy_detection": (database, copies)}


def copy_detection_set(out: Path, quick: bool, log) -> CopyDetectionSet:
    """Build the set afresh under ``out/copy-detection`` and decode its images in full with the project's decoder
    (the peers' input; the CNN rows decode as index.py does, ``CopyDetectionSet.decoded_for``)."""
    root = out / "copy-detection"
    if root.exists():
        import shutil

        shutil.rmtree(root)
    manifest = copy_detection.build(root, quick=quick, seed=COPY_SEED)
    paths = list_image_files(root / "all")
    log(f"copy-detection set: {len(paths)} images built under {root}")
    return CopyDetectionSet(root, paths, [open_image(root / "all" / p) for p in paths], manifest,
                            list_image_files(root / "references"), list_image_files(root / "queries"))


def copy_detection_scores(cd: CopyDetectionSet, vectors: np.ndarray) -> dict[str, dict]:
    """Both protocols through the query pipeline: mAP (trapezoid), hit@1 (the first result is relevant: mean P@1),
    DISC21's µAP over every (query, database image) pair, and the mean AP per edit type (the query's file stem;
    ``original`` = the originals as all-vs-all queries)."""
    out = {}
    for protocol, (database, queries) in cd.prepared(vectors).items():
        result = evaluate_queries(exact_pipeline(database), queries, ks=(1,), micro_ap=len(database))
        per_edit: dict[str, list[float]] = defaultdict(list)
        for score in result.queries:
            per_edit[Path(score.name).stem].append(score.average_precision)
        out[protocol] = {
            "mAP": result.mean_average_precision, "hit@1": result.mean_precision_at(1), "µAP": result.micro_ap,
            "per_edit_AP": {edit: float(np.mean(aps)) for edit, aps in sorted(per_edit.items())},
            "per_edit_n": {edit: len(aps) for edit, aps in sorted(per_edit.items())},
            "queries": len(queries), "database": len(database),
        }
    return out


def hash_vectors(images, hash_function) -> np.ndarray:
    """64-bit perceptual hashes as +-1/8 unit vectors: their cosine is 1 - 2 * hamming / 64, so the cosine ranking
    of the pipeline is the Hamming ranking."""
    bits = np.stack([np.asarray(hash_function(image).hash, dtype=np.float32).ravel() for image in images])
    return (2.0 * bits - 1.0) / np.sqrt(bits.shape[1])


def colour_histograms(images, bins: int = 8) -> np.ndarray:
    """RGB histograms, ``bins`` per channel (512 cells), L2-normalised (compared by cosine)."""
    shift = 8 - int(np.log2(bins))
    out = np.zeros((len(images), bins**3), np.float32)
    for i, image in enumerate(images):
        cells = np.asarray(image, np.uint8) >> shift
        index = (cells[..., 0].astype(np.int32) * bins + cells[..., 1]) * bins + cells[..., 2]
        out[i] = np.bincount(index.ravel(), minlength=bins**3)
    return pooling.l2_normalize(out)


def peer_rows(cd: CopyDetectionSet) -> list[dict]:
    """pHash and dHash (PyPI imagehash, the hashing behind imagededup) and a colour histogram, on the same images
    and through the same pipeline and protocols as the CNN rows."""
    import imagehash

    peers = {"pHash (imagehash, 64 bits, Hamming)": lambda images: hash_vectors(images, imagehash.phash),
             "dHash (imagehash, 64 bits, Hamming)": lambda images: hash_vectors(images, imagehash.dhash),
             "colour histogram 8x8x8 (cosine)": colour_histograms}
    rows = []
    for label, describe in peers.items():
        started = time.perf_counter()
        vectors = describe(cd.images)
        ms = 1000.0 * (time.perf_counter() - started) / len(cd.images)
        rows.append({"method": label, "kind": "peer", "ms_per_image": ms, **copy_detection_scores(cd, vectors)})
    return rows


def copy_detection_configs(variants) -> list[Config]:
    """Every pooling at one and three scales, squash and aspect resize, plus the reference demo's recipe (MAX,
    one scale, Keras-style squash with nearest neighbour: ``--preset classic --resize squash-nearest``)."""
    configs = [Config(v, scales, rule) for rule in (SQUASH, ASPECT) for scales in (SINGLE_SCALE, MULTI_SCALES)
               for v in variants]
    return configs + [Config(Variant.of("max"), SINGLE_SCALE, "squash-nearest")]


def cnn_label(config: Config, presets: dict, backbone: str) -> str:
    names = [name for name, preset in presets.items() if preset is not None and preset == config]
    if config.rule == "squash-nearest":
        return f"reference demo recipe: --preset classic --resize squash-nearest ({backbone})"
    label = f"{config.variant.label}, scales {scales_label(config.scales)}, {short(config.rule)}"
    return label + "".join(f" = --preset {name}" for name in names) + (" (default)" if config == DEFAULT else "")


def cnn_copy_detection_rows(cd: CopyDetectionSet, extractor: Extractor, backbone: str, variants, presets, size, log):
    """Every copy-detection config of the backbone: one extraction per resize rule and scale, every pooling from it,
    from the images decoded as index.py decodes them."""
    configs = copy_detection_configs(variants)
    started = time.perf_counter()
    extraction = Extraction(count=len(cd.images))
    for rule in dict.fromkeys(c.rule for c in configs):
        scales = sorted({s for c in configs if c.rule == rule for s in c.scales}, reverse=True)
        wanted = [v for v in variants if any(c.rule == rule and c.variant == v for c in configs)]
        part = extract(extractor, cd.decoded_for(rule, size), (rule,), scales, wanted, size)
        extraction.raw.update(part.raw)
        for key, seconds in part.seconds.items():
            extraction.seconds[key] += seconds
    log(f"  copy-detection: features of {len(cd.images)} images in {time.perf_counter() - started:.0f} s")
    rows = []
    for config in configs:
        rows.append({"method": cnn_label(config, presets, backbone), "kind": "cnn", "backbone": backbone,
                     "settings": config.label, "ms_per_image": extraction.ms_per_image(config)["total"],
                     **copy_detection_scores(cd, extraction.descriptors(config))})
    return rows


def copy_detection_tables(cd: CopyDetectionSet, rows: list[dict]) -> list[str]:
    """The summary table (both protocols, sorted by copy-detection mAP) and one per-edit AP table per protocol."""
    rows = sorted(rows, key=lambda r: -r["copy_detection"]["mAP"])
    head = ["#", "method"] + [f"{PROTOCOL_TITLES[p]}: {m}" for p in PROTOCOLS for m in ("mAP", "hit@1", "µAP")] + ["ms/img"]
    lines = [[str(i), r["method"], *(f"{r[p][m]:.3f}" for p in PROTOCOLS for m in ("mAP", "hit@1", "µAP")),
              f"{r['ms_per_image']:.1f}"] for i, r in enumerate(rows, 1)]
    out = [markdown(head, lines)]
    for protocol in PROTOCOLS:
        counts = rows[0][protocol]["per_edit_n"]
        edits = list(counts)
        table = [[str(i), r["method"], *(f"{r[protocol]['per_edit_AP'][e]:.3f}" for e in edits)] for i, r in enumerate(rows, 1)]
        out += [f"Per-edit AP, {PROTOCOL_TITLES[protocol]} ({rows[0][protocol]['queries']} queries against "
                f"{rows[0][protocol]['database']} images; queries per edit in brackets):",
                markdown(["#", "method", *(f"{e} ({counts[e]})" for e in edits)], table)]
    return out


# --------------------------------------------------------------------------- evaluation speed


def evaluation_speed(count: int, dim: int = 1280, group: int = 4, seed: int = 0) -> dict:
    """``count`` generated queries against a database of the same ``count`` vectors (groups of ``group`` noisy
    copies of random centres, ``dim``-d), every image a query, the whole database ranked: prepare + evaluate through
    the exact pipeline, timed."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((count // group, dim)).astype(np.float32)
    vectors = pooling.l2_normalize(np.repeat(centres, group, axis=0)
                                   + 3.0 * rng.standard_normal((count // group * group, dim)).astype(np.float32))
    paths = [f"g{i // group:06d}/{i % group}.jpg" for i in range(len(vectors))]
    started = time.perf_counter()
    prepared = prepare_queries(folders_from_paths(paths), paths, vectors).queries
    result = evaluate_queries(exact_pipeline(vectors), prepared, ns_score=True)
    seconds = time.perf_counter() - started
    return {"queries": len(prepared), "database": len(vectors), "dim": dim, "seconds": seconds,
            "ms_per_query": 1000.0 * seconds / len(prepared), "mAP": result.mean_average_precision}


# --------------------------------------------------------------------------- choosing


def default_row(rows):
    return lookup(rows, DEFAULT, "none")


def lookup(rows, config: Config, whiten: str, qe: str = "none"):
    return next((r for r in rows if r["config"] == config and r["whitening"] == whiten and r["qe"] == qe), None)


def for_set(bench: BenchSet, config: Config) -> Config:
    """A square set has no aspect rows: the aspect-preserving resize of a square image is the squash input."""
    return config if config.rule in bench.rules else replace(config, rule=SQUASH)


def decide(sets, runs) -> tuple[list[dict], dict]:
    """Index-time candidates (no QE) with every set's mAP, and the chosen one.

    Rule: the best ``near-duplicate-hard`` mAP among candidates that lose at most CATEGORY_TOLERANCE category mAP and
    EASY_TOLERANCE near-duplicate mAP against the default (max, scale 1, squash, no whitening).
    """
    key_rows = {bench.key: runs[bench.key]["rows"] for bench in sets}
    hard = next(bench for bench in sets if bench.key == "near-duplicate-hard")
    candidates = []
    for r in key_rows[hard.key]:
        if r["qe"] != "none":
            continue
        entry = {"config": r["config"], "whitening": r["whitening"], "ms": r["ms_per_image"]["total"], "map": {}, "delta": {}}
        for bench in sets:
            row = lookup(key_rows[bench.key], for_set(bench, r["config"]), r["whitening"])
            entry["map"][bench.key] = row["metrics"]["mAP"]
            entry["delta"][bench.key] = row["metrics"]["mAP"] - default_row(key_rows[bench.key])["metrics"]["mAP"]
        candidates.append(entry)
    candidates.sort(key=lambda c: -c["map"][hard.key])
    allowed = [
        c for c in candidates
        if c["delta"]["categories"] >= -CATEGORY_TOLERANCE and c["delta"]["near-duplicate"] >= -EASY_TOLERANCE
    ]
    return candidates, allowed[0]


# --------------------------------------------------------------------------- reporting


def metric_cells(bench: BenchSet, metrics: dict, base: float) -> list[str]:
    cells = [f"{metrics['mAP']:.4f}", f"{metrics['mAP'] - base:+.4f}", f"{metrics[f'P@{bench.k}']:.4f}"]
    if bench.ns_rows is not None:
        cells.append(f"{metrics['N-S']:.3f}")
    return cells


def metric_header(bench: BenchSet) -> list[str]:
    return ["mAP", "Δ mAP", f"P@{bench.k}"] + (["N-S (/4)"] if bench.ns_rows is not None else [])


def markdown(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(cells) + " |" for cells in lines])


def set_table(bench: BenchSet, rows: list[dict]) -> str:
    base = default_row(rows)["metrics"]["mAP"]
    lines = []
    for rank, row in enumerate(sorted(rows, key=lambda r: -r["metrics"]["mAP"]), 1):
        config = row["config"]
        is_default = config == DEFAULT and row["whitening"] == "none" and row["qe"] == "none"
        label = f"**{config.variant.label} (default)**" if is_default else config.variant.label
        lines.append([str(rank), label, scales_label(config.scales), short(config.rule), row["whitening"], row["qe_label"],
                      str(row["dim"]), *metric_cells(bench, row["metrics"], base), f"{row['ms_per_image']['total']:.1f}"])
    header = ["#", "pooling", "scales", "resize", "whitening", "QE", "dim", *metric_header(bench), "ms/img"]
    return markdown(header, lines)


def decision_table(sets, candidates, chosen, limit: int) -> str:
    shown = candidates[:limit]
    for extra in (chosen, next(c for c in candidates if c["config"] == DEFAULT and c["whitening"] == "none")):
        if extra not in shown:
            shown.append(extra)
    lines = []
    for rank, c in enumerate(shown, 1):
        config = c["config"]
        mark = " ← chosen" if c is chosen else (" (default)" if config == DEFAULT and c["whitening"] == "none" else "")
        cells = [str(rank), f"{config.variant.label}{mark}", scales_label(config.scales), short(config.rule), c["whitening"]]
        for bench in sets:
            cells += [f"{c['map'][bench.key]:.4f}", f"{c['delta'][bench.key]:+.4f}"]
        lines.append(cells + [f"{c['ms']:.1f}"])
    header = ["#", "pooling", "scales", "resize", "whitening"]
    for bench in sets:
        header += [f"{bench.key} mAP", "Δ"]
    return markdown(header + ["ms/img"], lines)


def preset_config(spec: dict, size: int) -> Config | None:
    encoder = spec["encoder"]
    if int(encoder.get("input_size") or size) != size:
        return None
    return Config(
        Variant.of(encoder.get("pooling", "max"), encoder.get("pooling_params")),
        tuple(float(s) for s in encoder.get("scales", SINGLE_SCALE)),
        encoder.get("resize_rule", SQUASH),
    )


def preset_rows(bench, backbone, presets, run) -> list[tuple[str, dict]]:
    """Every preset as ``index.py --preset NAME`` builds it: a whitening preset learns it on the database itself."""
    out = []
    for name, config in presets.items():
        if config is None:
            continue
        config = for_set(bench, config)
        vectors = run["evaluated"].descriptors(config)
        whitening = learn_pca_whitening(vectors) if PRESETS[name]["whiten"] else None
        label = "self (index.py --whiten)" if whitening is not None else "none"
        out.append((name, row_of(bench, backbone, config, label, "none", whitening, vectors, run["evaluated"])))
    return out


def product_check(weights, config: Config, bench: BenchSet, extraction: Extraction, size: int, count: int = 6) -> float:
    """Encode a few images with a real Extractor built for ``config``: the smallest cosine to the benchmark's vectors."""
    encoder = new_encoder_config(weights, config.variant.name, "float32", pooling_params=dict(config.variant.params),
                                 scales=config.scales, resize_rule=config.rule, input_size=size)
    product = Extractor(encoder, weights).encode_pil(bench.images[:count])
    return float(np.min(np.sum(product * extraction.descriptors(config)[:count], axis=1)))


def jsonable(row: dict) -> dict:
    out = {k: v for k, v in row.items() if k not in ("config", "ap")}
    out["metrics"] = {k: round(v, 6) for k, v in row["metrics"].items()}
    out["ms_per_image"] = {k: round(v, 3) for k, v in row["ms_per_image"].items()}
    return out


def decision_report(sets, runs, backbone: str, weights, presets: dict, size: int, say, decision_rows: int) -> dict:
    """The decision, whitening-study, preset and product-check sections of one backbone (all three classic sets
    needed); returns its JSON entry."""
    candidates, chosen = decide(sets, runs)
    chosen_config = chosen["config"]
    say(f"## Decision — {backbone}: index-time settings (no QE)")
    say()
    say(f"Sorted by near-duplicate-hard mAP. Chosen: the best near-duplicate-hard mAP that loses at most "
        f"{CATEGORY_TOLERANCE} category mAP and {EASY_TOLERANCE} near-duplicate mAP against the default. The "
        "categories set is square, so its 'aspect' numbers are the 'squash' ones. ms/img on near-duplicate-hard.")
    say()
    say(decision_table(sets, candidates, chosen, decision_rows))
    say()
    say(f"Chosen ({chosen_config.label}, whitening {chosen['whitening']}) against the default, per set; the interval "
        "is a 95% bootstrap of the mAP gain (near-duplicate sets resample whole photos):")
    say()
    margins, margin_lines = {}, []
    for bench in sets:
        rows = runs[bench.key]["rows"]
        old, new = default_row(rows), lookup(rows, for_set(bench, chosen_config), chosen["whitening"])
        low, high = gain_interval(bench, new["ap"], old["ap"])
        pk = f"P@{bench.k}"
        margins[bench.key] = {"default": old["metrics"], "chosen": new["metrics"], "map_gain_ci95": [low, high],
                              "ms_per_image": [old["ms_per_image"]["total"], new["ms_per_image"]["total"]]}
        margin_lines.append([
            bench.key, f"{old['metrics']['mAP']:.4f}", f"{new['metrics']['mAP']:.4f}",
            f"{new['metrics']['mAP'] - old['metrics']['mAP']:+.4f}", f"[{low:+.4f}, {high:+.4f}]",
            f"{old['metrics'][pk]:.4f} → {new['metrics'][pk]:.4f} ({pk})",
            f"{old['metrics']['N-S']:.3f} → {new['metrics']['N-S']:.3f}" if "N-S" in old["metrics"] else "-",
            f"{old['ms_per_image']['total']:.1f} → {new['ms_per_image']['total']:.1f}",
        ])
    say(markdown(["set", "default mAP", "chosen mAP", "Δ mAP", "95% interval", "P@k", "N-S", "ms/img"], margin_lines))
    say()

    say(f"## Whitening study — {backbone}: the chosen settings ({chosen_config.label})")
    say()
    say("'disjoint': learned on the disjoint set of each table above (index.py --whiten-from); 'self': learned on the "
        "evaluated set itself (index.py --whiten; d=... is --whiten-dim). Power 0.5 is what index.py does; "
        "power 0 (PCA rotation and centring only) is not offered by index.py.")
    say()
    study = {}
    for bench in sets:
        study[bench.key] = study_whitening(bench, backbone, for_set(bench, chosen_config), runs[bench.key])
        base = default_row(runs[bench.key]["rows"])["metrics"]["mAP"]
        say(f"{bench.key}:")
        say()
        say(markdown(["whitening", "dim", *metric_header(bench)],
                     [[r["whitening"], str(r["dim"]), *metric_cells(bench, r["metrics"], base)] for r in study[bench.key]]))
        say()

    say(f"## Presets as index.py builds them — {backbone}")
    say()
    preset_lines = []
    preset_results = []
    for bench in sets:
        base = default_row(runs[bench.key]["rows"])["metrics"]["mAP"]
        for name, row in preset_rows(bench, backbone, presets, runs[bench.key]):
            m = row["metrics"]
            preset_lines.append([name, bench.key, row["config"].label, row["whitening"], str(row["dim"]),
                                 f"{m['mAP']:.4f}", f"{m['mAP'] - base:+.4f}", f"{m[f'P@{bench.k}']:.4f} (P@{bench.k})",
                                 f"{m['N-S']:.3f}" if "N-S" in m else "-", f"{row['ms_per_image']['total']:.1f}"])
            preset_results.append({"preset": name, **jsonable(row)})
    say(markdown(["preset", "set", "settings", "whitening", "dim", "mAP", "Δ mAP", "P@k", "N-S", "ms/img"], preset_lines))
    say()

    agreement = {bench.key: product_check(weights, for_set(bench, chosen_config), bench, runs[bench.key]["evaluated"], size)
                 for bench in sets}
    say("Product check: a real Extractor built with new_encoder_config for the chosen settings gives the benchmark's "
        f"vectors (smallest cosine over 6 images: {', '.join(f'{k} {v:.6f}' for k, v in agreement.items())}).")
    say()

    return {
        "weights": {"name": weights.name, "md5": weights.hash},
        "chosen": {"settings": chosen_config.label, "pooling": chosen_config.variant.name,
                   "pooling_params": dict(chosen_config.variant.params), "scales": list(chosen_config.scales),
                   "resize_rule": chosen_config.rule, "whitening": chosen["whitening"],
                   "map": chosen["map"], "delta_vs_default": chosen["delta"], "against_default": margins},
        "whitening_study": {key: [jsonable(r) for r in rows] for key, rows in study.items()},
        "presets": preset_results,
        "product_check_min_cosine": agreement,
        "seconds_per_set": {key: round(run["seconds"], 1) for key, run in runs.items()},
    }




def jsonable_copy_row(row: dict) -> dict:
    def rounded(value):
        if isinstance(value, float):
            return round(value, 6)
        return {k: rounded(v) for k, v in value.items()} if isinstance(value, dict) else value

    return rounded(row)


CLASSIC_SETS = {"near-duplicate": near_duplicate_set, "near-duplicate-hard": hard_near_duplicate_set,
                "categories": categories_set}
SET_NAMES = (*CLASSIC_SETS, "copy-detection", "speed", "seed-article")
DEFAULT_SETS = SET_NAMES[:-1]  # seed-article (bench/seed_article.py: ~2 s per image, MOP) only when asked for


def set_list(text: str) -> list[str]:
    """argparse type: comma-separated names of SET_NAMES."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SET_NAMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(SET_NAMES)}, got {text!r}")
    return names


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Retrieval quality of poolings x whitening x query expansion on offline "
                                                 "labelled sets (near-duplicates, Fashion-MNIST categories).")
    parser.add_argument("--quick", action="store_true", help="smaller sets (about 2 minutes)")
    parser.add_argument("--sets", type=set_list, default=list(DEFAULT_SETS), metavar="NAME,...",
                        help=f"what to run, any of {', '.join(SET_NAMES)} (default: all but seed-article; "
                             "seed-article: the seed article's claims and MOP on the data sets named beside it, or all four)")
    parser.add_argument("--out", type=Path, default=OUT_DIR,
                        help="folder for quality.md, quality.json and the copy-detection set (default: bench/out)")
    parser.add_argument("--decision-rows", type=int, default=12, help="rows of the decision table (default: 12)")
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
    say(f"{os.cpu_count()} CPUs ({platform.machine()}), Python {platform.python_version()}, numpy {np.__version__}. "
        "Every ranking goes through the query pipeline (retrieval.evaluation, exact search), as evaluate.py ranks. "
        "AP: trapezoid (what the Oxford, Paris, Holidays and Revisited code computes). Classic sets: every image a "
        "query, excluded from its own ranking; Δ mAP against the default (max pooling, scale 1, squash, no whitening, "
        "no QE); PCAw: power 0.5, all components, learned on a disjoint set (below); avg and sum give the same unit "
        "vectors wherever every map has one size (squash).")
    weights_by_backbone = {"efficientnet-lite0": backbones.efficientnet_lite0_weights()}
    vgg16 = backbones.vgg16_imagenet_weights(allow_download=False)
    if vgg16 is not None:
        weights_by_backbone["vgg16"] = vgg16
    else:
        say()
        say(f"VGG16 rows skipped: its ImageNet weights file ({backbones.VGG16_IMAGENET_FILE}) is not in "
            f"{backbones.keras_models_dir()}, and this benchmark never downloads.")
    say()

    variants = [Variant.of(name) for name in POOLING_NAMES]
    presets = {name: preset_config(spec, 224) for name, spec in PRESETS.items()}
    for name, config in presets.items():
        if config is None:
            say(f"preset {name}: not measured (its input size is not 224)")
        elif config.variant not in variants:
            variants.append(config.variant)

    t = time.perf_counter()
    sets = [make(sizes) for key, make in CLASSIC_SETS.items() if key in args.sets]
    cd = copy_detection_set(args.out, args.quick, log) if "copy-detection" in args.sets else None
    log(f"sets built in {time.perf_counter() - t:.0f} s")

    results: dict = {"mode": "quick" if args.quick else "full", "sizes": sizes.__dict__, "sets": {}, "backbones": {}}
    copy_rows = peer_rows(cd) if cd is not None else []
    needs_model = bool(sets) or cd is not None  # "speed" alone needs no backbone
    for backbone, weights in (weights_by_backbone if needs_model else {}).items():
        log(f"{backbone}: building the extractor")
        encoder = new_encoder_config(weights, "max", "float32")
        extractor = Extractor(encoder, weights)
        size = encoder.input_size
        if cd is not None:
            copy_rows += cnn_copy_detection_rows(cd, extractor, backbone, variants, presets, size, log)
        runs = {bench.key: run_set(bench, extractor, backbone, variants, size, log) for bench in sets}

        for bench in sets:
            rows = runs[bench.key]["rows"]
            say(f"## {bench.title} — {backbone}")
            say()
            say(f"PCAw learned on {bench.whiten_note}. QE over the top {bench.qe_top_n} (never the query's own row). "
                f"Default mAP {default_row(rows)['metrics']['mAP']:.4f}."
                + (" N-S: UKBench score on the first 4 members of every group." if bench.ns_rows else ""))
            say()
            say(set_table(bench, rows))
            say()

        if len(sets) == len(CLASSIC_SETS):
            results["backbones"][backbone] = decision_report(sets, runs, backbone, weights, presets, size, say,
                                                             args.decision_rows)
        elif sets:
            say("Decision, whitening study and presets: skipped (they need all three classic sets).")
            say()
        for bench in sets:
            entry = results["sets"].setdefault(bench.key, {
                "title": bench.title, "whitening_learned_on": bench.whiten_note, "qe_top_n": bench.qe_top_n,
                "qe_alpha": QE_ALPHA, "images": len(bench.images), "whitening_images": len(bench.whiten_images), "rows": []})
            entry["rows"] += [jsonable(r) for r in runs[bench.key]["rows"]]

    if cd is not None:
        say(f"## {cd.title}")
        say()
        say("Both protocols read from the folder layout as evaluate.py reads it. all-vs-all: every group member a query "
            "against all/ (distractors included), left out of its own ranking, relevant = the rest of its group. Copy "
            "detection: the edits (queries/) against the originals + distractors (references/), as `evaluate.py "
            "--ground-truth folders --queries`, relevant = the group's original. mAP: trapezoid AP; hit@1: the first "
            "result is relevant; µAP: DISC21's micro-AP over every (query, database image) pair, ties pessimistic. "
            "Ties in a ranking: database order (`_distractors/` sorts first). Peers and CNN rows score the same images "
            "through the same pipeline; VGG16 rows only when its weights file is present.")
        say()
        for table in copy_detection_tables(cd, copy_rows):
            say(table)
            say()
        results["copy_detection"] = {"title": cd.title, "root": str(cd.root), "counts": cd.manifest["counts"],
                                     "rows": [jsonable_copy_row(row) for row in copy_rows]}
    if "seed-article" in args.sets:
        from bench import seed_article

        named = [name for name in seed_article.ALL_SETS if name in args.sets]
        results["seed_article"] = seed_article.run(sizes, named or list(seed_article.ALL_SETS), args.out, args.quick,
                                                   say, log)
    if "speed" in args.sets:
        speed = evaluation_speed(2_000 if args.quick else 10_000)
        results["evaluation_speed"] = speed
        say("## Evaluation speed")
        say()
        say(f"{speed['queries']:,} generated queries against {speed['database']:,} {speed['dim']}-d vectors (groups of "
            f"4, every image a query, the whole database ranked, AP + P@k + R@k + PR curve + N-S): "
            f"{speed['seconds']:.1f} s through the exact pipeline, {speed['ms_per_query']:.2f} ms per query "
            f"(mAP {speed['mAP']:.3f}).")
        say()
    elapsed = time.perf_counter() - started
    say(f"Total run time: {elapsed:.0f} s.")
    results["seconds"] = round(elapsed, 1)
    if vgg16 is None:
        results["skipped"] = {"vgg16": "ImageNet weights file not present; this benchmark never downloads"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.md").write_text("\n".join(report) + "\n", encoding="utf-8")
    (args.out / "quality.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    log(f"wrote {args.out / 'quality.md'} and {args.out / 'quality.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
