#!/usr/bin/env python3
"""Measure retrieval quality of a feature database against ground truth: mAP, P@k, R@k (and N-S for UKBench).

    python evaluate.py --index index/features.h5 --ground-truth folders
    python evaluate.py --index oxford.h5 --ground-truth oxford --gt-path gt_files/ --qe alpha --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys

GT_HELP = (
    "folders: each sub-folder is a group; holidays: INRIA Holidays names; ukbench: groups of 4; "
    "oxford: Oxford/Paris *_query/_good/_ok/_junk.txt folder; csv: a query,relevant file"
)


def parse_args(argv=None) -> argparse.Namespace:
    from ..evaluation.groundtruth import GROUND_TRUTH_KINDS
    from ..evaluation.metrics import AP_METHODS
    from ..search.expansion import QUERY_EXPANSIONS
    from . import cutoff_list, non_negative_float, nonempty_path, positive_int

    parser = argparse.ArgumentParser(
        description="Evaluate a feature database against ground truth (mAP, precision and recall at k, N-S for UKBench)."
    )
    parser.add_argument("--index", required=True, type=nonempty_path, metavar="FILE.h5", help="feature database built by index.py")
    parser.add_argument("--ground-truth", required=True, choices=GROUND_TRUTH_KINDS, help=GT_HELP)
    parser.add_argument("--gt-path", metavar="PATH",
                        help="image folder (folders/holidays/ukbench; default: the paths stored in the index), "
                             "ground-truth folder (oxford) or CSV file (csv)")
    parser.add_argument("--k", type=cutoff_list, default=[1, 5, 10], metavar="1,5,10", help="cut-offs for P@k and R@k (default: 1,5,10)")
    parser.add_argument("--qe", choices=QUERY_EXPANSIONS, default="none",
                        help="query expansion: avg = average QE, alpha = alpha-QE (default: none)")
    parser.add_argument("--qe-top-n", type=positive_int, default=3, metavar="N", help="neighbours used by query expansion (default: 3)")
    parser.add_argument("--qe-alpha", type=non_negative_float, default=3.0, metavar="A", help="alpha-QE exponent (default: 3)")
    parser.add_argument("--ap", choices=AP_METHODS, default="non-interpolated",
                        help="AP definition: non-interpolated, or trapezoid as the original Oxford compute_ap (default: non-interpolated)")
    parser.add_argument("--whiten-from", metavar="FILE.h5", help="learn PCA-whitening on this index's vectors and apply it")
    parser.add_argument("--whiten-dim", type=positive_int, metavar="D", help="dimensions kept by the whitening (default: all it can)")
    parser.add_argument("--database", metavar="DIR", help="image folder the index paths are relative to (default: the one recorded)")
    parser.add_argument("--weights", metavar="FILE", help="the weights file the index was built with, if not where it was")
    parser.add_argument("--json", metavar="OUT.json", help="also write the metrics, settings, PR curve and per-query scores")
    parser.add_argument("--pr-plot", metavar="OUT.png", help="also draw the mean precision-recall curve (needs matplotlib)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from . import run

    def job() -> int:
        from pathlib import Path

        from ..engine import RetrievalEngine
        from ..errors import RetrievalError
        from ..evaluation import groundtruth
        from ..evaluation.protocol import encode_query, evaluate_queries, prepare_queries, relearned_pipeline, write_pr_plot
        from ..files import atomic_write_bytes, check_writable_target
        from ..search.expansion import QueryExpansion
        from ..storage.database import read_database

        expansion = QueryExpansion(args.qe, args.qe_top_n, args.qe_alpha)
        for output in (args.json, args.pr_plot):
            if output:
                check_writable_target(output, "output file")  # fail before the work, not after
        if args.pr_plot:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise RetrievalError("--pr-plot needs matplotlib (pip install matplotlib)") from None
        engine = RetrievalEngine.open(args.index, weights_file=args.weights, image_root=args.database, with_extractor=False)
        try:
            database = engine.database
            kind = args.ground_truth
            if args.gt_path:
                truth = groundtruth.read_ground_truth(kind, args.gt_path)
            elif kind in groundtruth.FROM_PATHS:
                truth = groundtruth.FROM_PATHS[kind](database.paths)
            else:
                raise RetrievalError(f"--ground-truth {kind} needs --gt-path")
            pipeline = engine.pipeline
            if args.whiten_from:
                pipeline = relearned_pipeline(database, read_database(args.whiten_from), args.whiten_from, args.whiten_dim)

            def encode(query, row):
                """Crop (Oxford box) or whole image -> vector, with the index's own encoder (built on first use)."""
                engine.load_extractor(args.weights)
                return encode_query(engine, query, row)

            prepared = prepare_queries(truth, database.paths, database.vectors, encode)
            for name, reason in prepared.skipped:
                print(f"skipped query: {name}: {reason}", file=sys.stderr)
            if prepared.missing_relevant:
                shown = ", ".join(prepared.missing_relevant[:3]) + (", ..." if len(prepared.missing_relevant) > 3 else "")
                print(f"note: {len(prepared.missing_relevant)} relevant images of the ground truth are not in the index "
                      f"and count as missed ({shown})", file=sys.stderr)
            result = evaluate_queries(
                pipeline, prepared.queries, ks=args.k, expansion=expansion, ap_method=args.ap, ns_score=kind == "ukbench"
            )
        finally:
            engine.close()
        encoder = database.encoder
        print(f"{args.index}: {len(database)} images [{encoder.backbone} {encoder.pooling} {encoder.dim}-d, "
              f"{result.settings['search']} search]; {kind} ground truth: {len(result.queries)} queries evaluated, "
              f"{len(prepared.skipped)} skipped; query expansion: {args.qe}; AP: {args.ap}")
        print(result.table())
        if args.json:
            report = {
                "index": str(args.index),
                "ground_truth": kind,
                "gt_path": args.gt_path,
                "encoder": encoder.identity(),
                "images": len(database),
                **result.as_dict(),
                "skipped": [{"query": name, "reason": reason} for name, reason in prepared.skipped],
                "missing_relevant": prepared.missing_relevant,
            }
            try:
                atomic_write_bytes(Path(args.json), (json.dumps(report, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))
            except OSError as exc:
                raise RetrievalError(f"{args.json}: cannot write ({exc.strerror or exc})") from None
            print(f"metrics written to {args.json}", file=sys.stderr)
        if args.pr_plot:
            written = write_pr_plot(args.pr_plot, result, f"{kind}: {encoder.backbone} {encoder.pooling}, QE {args.qe}")
            print(f"precision-recall plot written to {written}", file=sys.stderr)
        return 0

    return run(job)
