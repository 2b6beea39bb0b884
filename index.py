#!/usr/bin/env python3
"""Build or update the HDF5 feature database of every image under a folder.

    python index.py --database database --index index/demo.h5
"""

from __future__ import annotations

import argparse
import sys


def pooling_param(text: str) -> tuple[str, float]:
    """argparse type for NAME=VALUE."""
    name, sep, value = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=NUMBER, got {text!r}") from None


def scale_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1,0.707,0.5, got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    from retrieval.backbones import BACKBONE_CHOICES
    from retrieval.cli import positive_int
    from retrieval.extractor import DEFAULT_BATCH_SIZE, PRECISIONS
    from retrieval.images import RESIZE_RULES
    from retrieval.indexing import CHECKPOINT_EVERY
    from retrieval.pooling import POOLING_DEFAULTS, POOLINGS
    from retrieval.presets import PRESETS, preset_help
    from retrieval.store import VECTOR_DTYPES
    from retrieval.vector_index import ANN_CHOICES, ANN_THRESHOLD

    parser = argparse.ArgumentParser(
        description="Index every image under a folder into an HDF5 feature database (incremental; atomic writes)."
    )
    parser.add_argument("--database", "-database", required=True, metavar="DIR", help="folder of images (searched recursively)")
    parser.add_argument("--index", "-index", required=True, metavar="FILE.h5", help="feature database to create or update")
    parser.add_argument("--preset", choices=sorted(PRESETS), help=f"named settings ({preset_help()}); explicit options override it")
    encoder = parser.add_argument_group("descriptor (fixed when the database is created; change with --rebuild)")
    encoder.add_argument("--backbone", choices=BACKBONE_CHOICES, default=None,
                         help="CNN: auto = VGG16 if its ImageNet weights can be had, else EfficientNet-Lite0 (default: auto)")
    encoder.add_argument("--weights", metavar="FILE", help="VGG16 weights file (.h5 or .weights.h5) instead of the Keras cache")
    encoder.add_argument("--pooling", choices=list(POOLINGS), default=None,
                         help="how conv activations become one vector (default: max, or the existing index's)")
    encoder.add_argument("--pooling-param", type=pooling_param, action="append", metavar="NAME=VALUE",
                         help="pooling parameter, repeatable: " + ", ".join(f"{k}: {v}" for k, v in POOLING_DEFAULTS.items() if v))
    encoder.add_argument("--scales", type=scale_list, metavar="S1,S2,...",
                         help="multi-scale extraction: factors of the input size in [0.1, 1], e.g. 1,0.707,0.5 (default: 1)")
    encoder.add_argument("--resize", choices=RESIZE_RULES, default=None,
                         help="squash to a square (default) or keep the aspect ratio with the longest side = input size")
    encoder.add_argument("--input-size", type=positive_int, metavar="PX", help="input side, or longest side for aspect (default: 224)")
    encoder.add_argument("--precision", choices=PRECISIONS, default=None,
                         help="compute precision; auto = bfloat16 for VGG16 on CPUs with bf16 units or a GPU (default: auto)")
    whitening = parser.add_argument_group("whitening (applied to database and queries alike)")
    whitening.add_argument("--whiten", action="store_true", help="learn PCA-whitening on this database (re-learned at updates)")
    whitening.add_argument("--whiten-from", metavar="OTHER.h5", help="learn PCA-whitening on another index built with the same settings")
    whitening.add_argument("--whiten-dim", type=positive_int, metavar="D", help="keep D dimensions after whitening")
    store = parser.add_argument_group("storage and search")
    store.add_argument("--storage", choices=VECTOR_DTYPES, default=None, help="vector storage type (default: float32, or the existing index's)")
    store.add_argument("--ann", choices=ANN_CHOICES, default="auto",
                       help=f"HNSW graph for fast approximate search: auto = from {ANN_THRESHOLD:,} images (default: auto)")
    run = parser.add_argument_group("run")
    run.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, help=f"images per forward pass (default: {DEFAULT_BATCH_SIZE})")
    run.add_argument("--checkpoint-every", type=positive_int, default=CHECKPOINT_EVERY, metavar="N",
                     help=f"save finished descriptors every N images so a killed run resumes (default: {CHECKPOINT_EVERY})")
    run.add_argument("--rebuild", action="store_true", help="ignore the existing index and extract everything again")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from retrieval.cli import run
    from retrieval.indexing import WhiteningRequest, build_index
    from retrieval.presets import PRESETS

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
    whitening = WhiteningRequest(learn=args.whiten or preset["whiten"], source=args.whiten_from, dim=args.whiten_dim)

    def job() -> int:
        report = build_index(
            args.database,
            args.index,
            whitening=whitening,
            storage=args.storage,
            ann=args.ann,
            rebuild=args.rebuild,
            batch_size=args.batch_size,
            checkpoint_every=args.checkpoint_every,
            progress=not args.quiet,
            notice=lambda line: print(f"note: {line}", file=sys.stderr),
            **encoder_options,
        )
        for rel, reason in report.skipped:
            print(f"skipped: {rel}: {reason}", file=sys.stderr)
        encoder = report.encoder
        extras = "".join(f" {part}" for part in (
            f"scales {','.join(f'{s:g}' for s in encoder.scales)}" if encoder.scales != [1.0] else "",
            "hnsw" if report.ann == "hnsw" else "",
        ) if part)
        print(f"{report.summary()} -> {args.index} [{encoder.backbone} {encoder.pooling} {encoder.dim}-d {encoder.precision}{extras}]")
        return 0

    return run(job)


if __name__ == "__main__":
    sys.exit(main())
