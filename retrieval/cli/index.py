#!/usr/bin/env python3
"""Build or update the HDF5 feature database of every image under a folder.

    python index.py --database database --index index/demo.h5
    python index.py --database photos --index photos.h5 --backend faiss           # HNSW/IVF index file beside it
    python index.py --database photos --index photos.h5 --backend milvus --milvus-uri http://milvus:19530
    python index.py --database /shared/photos --index photos.h5 --ray auto        # extraction on a Ray cluster
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from ..descriptors.encoder import PRECISIONS
    from ..descriptors.extractor import DEFAULT_BATCH_SIZE
    from ..descriptors.pooling import POOLING_DEFAULTS
    from ..images import RESIZE_RULES
    from ..indexing import CHECKPOINT_EVERY
    from ..indexing.presets import PRESETS, preset_help
    from ..models.backbones import BACKBONE_CHOICES
    from ..search.backends import BACKENDS
    from ..search.backends.faiss import IVF_THRESHOLD as FAISS_IVF_THRESHOLD
    from ..search.backends.faiss import KINDS as FAISS_KINDS
    from ..search.backends.memory import ANN_CHOICES, ANN_THRESHOLD
    from ..search.backends.milvus import INDEX_TYPES as MILVUS_INDEX_TYPES
    from ..storage.database import VECTOR_DTYPES
    from . import finite_float, name_value, nonempty_path, number_list, positive_int

    parser = argparse.ArgumentParser(
        description="Index every image under a folder into an HDF5 feature database (incremental; atomic writes)."
    )
    parser.add_argument("--database", "-database", required=True, type=nonempty_path, metavar="DIR", help="folder of images (searched recursively)")
    parser.add_argument("--index", "-index", required=True, type=nonempty_path, metavar="FILE.h5", help="feature database to create or update")
    parser.add_argument("--preset", choices=sorted(PRESETS), help=f"named settings ({preset_help()}); explicit options override it")
    encoder = parser.add_argument_group("descriptor (fixed when the database is created; change with --rebuild)")
    encoder.add_argument("--backbone", choices=BACKBONE_CHOICES, default=None,
                         help="CNN: auto = VGG16 if its ImageNet weights can be had, else EfficientNet-Lite0 (default: auto)")
    encoder.add_argument("--weights", metavar="FILE", help="VGG16 weights file (.h5 or .weights.h5) instead of the Keras cache")
    encoder.add_argument("--pooling", choices=list(POOLING_DEFAULTS), default=None,
                         help="how conv activations become one vector; mop / mop-fast: multi-scale orderless pooling "
                              "(Gong et al. 2014) with a codebook learned on this database (default: max, or the "
                              "existing index's)")
    encoder.add_argument("--codebook-from", metavar="OTHER.h5",
                         help="mop / mop-fast: encode with the codebook of another index built with the same settings "
                              "instead of learning one on a sample of these images (kept at updates; --rebuild re-learns)")
    encoder.add_argument("--pooling-param", type=name_value, action="append", metavar="NAME=VALUE",
                         help="pooling parameter, repeatable: " + ", ".join(f"{k}: {v}" for k, v in POOLING_DEFAULTS.items() if v))
    encoder.add_argument("--scales", type=number_list, metavar="S1,S2,...",
                         help="multi-scale extraction: factors of the input size in [0.1, 1], e.g. 1,0.707,0.5 (default: 1)")
    encoder.add_argument("--resize", choices=RESIZE_RULES, default=None,
                         help="squash to a square (default) or keep the aspect ratio with the longest side = input size")
    encoder.add_argument("--input-size", type=positive_int, metavar="PX", help="input side, or longest side for aspect (default: 224)")
    encoder.add_argument("--precision", choices=PRECISIONS, default=None,
                         help="compute precision; int8 = post-training quantization calibrated on a seeded sample of these "
                              "images (OpenVINO + NNCF); auto = the fastest precision whose quality gate passed for the "
                              "backbone on this machine (default: auto)")
    copies = parser.add_argument_group("copy detection (stored per image; see --preset copy-detection)")
    copies.add_argument("--regions", action=argparse.BooleanOptionalAction, default=None,
                        help="also store region vectors, searched beside the global one (finds crops; default: off, "
                             "or the existing index's)")
    copies.add_argument("--local-features", action=argparse.BooleanOptionalAction, default=None,
                        help="also store SIFT local features for geometric verification (query_online.py --verify; "
                             "about 34 KB per image; default: off, or the existing index's)")
    whitening = parser.add_argument_group("whitening (applied to database and queries alike)")
    whitening.add_argument("--whiten", action="store_true", help="learn PCA-whitening on this database (re-learned at updates)")
    whitening.add_argument("--whiten-from", metavar="OTHER.h5", help="learn PCA-whitening on another index built with the same settings")
    whitening.add_argument("--whiten-dim", type=positive_int, metavar="D",
                           help="keep D dimensions (default: as many as the images support, at most one per 4 images)")
    whitening.add_argument("--whiten-power", type=finite_float, metavar="P",
                           help="0.5: full whitening (default); 0: centring + PCA rotation only; in between: softened")
    store = parser.add_argument_group("storage and search")
    store.add_argument("--storage", choices=VECTOR_DTYPES, default=None, help="vector storage type (default: float32, or the existing index's)")
    store.add_argument("--ann", choices=ANN_CHOICES, default=None,
                       help=f"memory backend: HNSW graph for fast approximate search: auto = from {ANN_THRESHOLD:,} images (default: auto)")
    store.add_argument("--backend", choices=BACKENDS, default=None,
                       help="search backend: memory = the HDF5 vectors in RAM, faiss = an HNSW/IVF index file beside it, "
                            "milvus = a Milvus collection (default: memory, or the existing index's)")
    store.add_argument("--faiss-index", choices=FAISS_KINDS, default=None,
                       help=f"faiss backend: index kind; auto = HNSW, IVF-Flat from {FAISS_IVF_THRESHOLD:,} images (default: auto)")
    store.add_argument("--milvus-uri", metavar="URI",
                       help="milvus backend: http://host:19530 for a Milvus server, or a local path ending in .db for "
                            "the embedded Milvus Lite (default: FILE.h5.milvus.db)")
    store.add_argument("--milvus-collection", metavar="NAME", help="milvus backend: collection name (default: cbir_<index name>)")
    store.add_argument("--milvus-index", choices=MILVUS_INDEX_TYPES, default=None,
                       help="milvus backend: index type (default: HNSW)")
    run = parser.add_argument_group("run")
    run.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, help=f"images per forward pass (default: {DEFAULT_BATCH_SIZE})")
    run.add_argument("--checkpoint-every", type=positive_int, default=CHECKPOINT_EVERY, metavar="N",
                     help=f"save finished descriptors every N images so a killed run resumes (default: {CHECKPOINT_EVERY})")
    run.add_argument("--rebuild", action="store_true", help="ignore the existing index and extract everything again")
    run.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="extract as a Ray Data job: without ADDRESS on a local Ray instance started for the run; "
                          "auto, HOST:PORT or ray://HOST:10001 for a cluster (images at the same paths on every node)")
    run.add_argument("--ray-actors", type=positive_int, metavar="N",
                     help="Ray model actors (default: one per GPU, else one per 4 CPUs of the cluster)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def copy_options(preset: dict, args) -> dict:
    """regions / local_features / verify for ``IndexRequest.create``: the preset's, overridden by explicit flags."""
    options = dict(preset.get("copies", {}))
    for name in ("regions", "local_features"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if options.get("local_features") is False:
        options.pop("verify", None)
    return options


def main(argv=None) -> int:
    args = parse_args(argv)
    from ..indexing import IndexRequest, WhiteningRequest, run_index
    from ..indexing.presets import PRESETS
    from . import run

    preset = PRESETS[args.preset] if args.preset else {"encoder": {}, "whiten": False}
    encoder_options = dict(preset["encoder"])
    explicit = {
        "backbone": args.backbone,
        "weights_file": args.weights,
        "pooling": args.pooling,
        "pooling_params": dict(args.pooling_param) if args.pooling_param else None,
        "scales": args.scales,
        "resize_rule": args.resize,
        "input_size": args.input_size,
        "precision": args.precision,
    }
    encoder_options.update({name: value for name, value in explicit.items() if value is not None})
    encoder_options.setdefault("backbone", "auto")
    whitening = WhiteningRequest(
        learn=args.whiten or preset["whiten"], source=args.whiten_from, dim=args.whiten_dim, power=args.whiten_power
    )

    request = IndexRequest.create(
        args.database,
        args.index,
        whitening=whitening,
        storage=args.storage,
        backend=args.backend,
        ann=args.ann,
        faiss_index=args.faiss_index,
        milvus_uri=args.milvus_uri,
        milvus_collection=args.milvus_collection,
        milvus_index=args.milvus_index,
        ray=args.ray,
        ray_actors=args.ray_actors,
        rebuild=args.rebuild,
        codebook_from=args.codebook_from,
        **copy_options(preset, args),
        batch_size=args.batch_size,
        checkpoint_every=args.checkpoint_every,
        progress=not args.quiet,
        **encoder_options,
    )

    def job() -> int:
        report = run_index(request, notice=lambda line: print(f"note: {line}", file=sys.stderr))
        for rel, reason in report.skipped:
            print(f"skipped: {rel}: {reason}", file=sys.stderr)
        encoder = report.encoder
        extras = "".join(f" {part}" for part in (
            f"scales {','.join(f'{s:g}' for s in encoder.scales)}" if encoder.scales != [1.0] else "",
            report.ann if report.ann != "exact" else "",
            "ray" if report.extraction == "ray" else "",
        ) if part)
        print(f"{report.summary()} -> {args.index} [{encoder.backbone} {encoder.pooling} {encoder.dim}-d {encoder.precision}{extras}]")
        return 0

    return run(job)

