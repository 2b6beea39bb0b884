#!/usr/bin/env python3
"""Build or update the HDF5 feature database of every image under a folder.

    python index.py --database database --index index/features.h5
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from retrieval.backbones import BACKBONE_CHOICES
    from retrieval.cli import positive_int
    from retrieval.extractor import DEFAULT_BATCH_SIZE, PRECISIONS
    from retrieval.indexing import CHECKPOINT_EVERY
    from retrieval.pooling import POOLINGS

    parser = argparse.ArgumentParser(
        description="Index every image under a folder into an HDF5 feature database (incremental; atomic writes)."
    )
    parser.add_argument("--database", "-database", required=True, metavar="DIR", help="folder of images (searched recursively)")
    parser.add_argument("--index", "-index", required=True, metavar="FILE.h5", help="feature database to create or update")
    parser.add_argument("--backbone", choices=BACKBONE_CHOICES, default="auto",
                        help="CNN: auto = VGG16 if its ImageNet weights can be had, else EfficientNet-Lite0 (default: auto)")
    parser.add_argument("--weights", metavar="FILE", help="VGG16 weights file (.h5 or .weights.h5) instead of the Keras cache")
    parser.add_argument("--pooling", choices=sorted(POOLINGS), default=None,
                        help="how conv activations become one vector (default: max, or the existing index's)")
    parser.add_argument("--precision", choices=PRECISIONS, default="float32", help="compute precision (default: float32)")
    parser.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, help=f"images per forward pass (default: {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--checkpoint-every", type=positive_int, default=CHECKPOINT_EVERY, metavar="N",
                        help=f"save finished descriptors every N images so a killed run resumes (default: {CHECKPOINT_EVERY})")
    parser.add_argument("--rebuild", action="store_true", help="ignore the existing index and extract everything again")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from retrieval.cli import run
    from retrieval.indexing import build_index

    def job() -> int:
        report = build_index(
            args.database,
            args.index,
            backbone=args.backbone,
            weights_file=args.weights,
            pooling_name=args.pooling,
            precision=args.precision,
            rebuild=args.rebuild,
            batch_size=args.batch_size,
            checkpoint_every=args.checkpoint_every,
            progress=not args.quiet,
            notice=lambda line: print(f"note: {line}", file=sys.stderr),
        )
        for rel, reason in report.skipped:
            print(f"skipped: {rel}: {reason}", file=sys.stderr)
        encoder = report.encoder
        print(f"{report.summary()} -> {args.index} [{encoder.backbone} {encoder.pooling} {encoder.dim}-d {encoder.precision}]")
        return 0

    return run(job)


if __name__ == "__main__":
    sys.exit(main())
