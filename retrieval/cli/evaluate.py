#!/usr/bin/env python3
"""Measure retrieval quality of a feature database against ground truth: mAP, P@k, R@k (N-S for UKBench, E/M/H for
Revisited Oxford/Paris, µAP for queries outside the database).

    python evaluate.py --index index/features.h5 --ground-truth folders
    python evaluate.py --index refs.h5 --ground-truth folders --queries copies/        # copy detection
    python evaluate.py --index roxford5k.h5 --ground-truth revisited --gt-path gnd_roxford5k.pkl
    python evaluate.py --index oxford.h5 --ground-truth oxford --gt-path gt_files/ --qe alpha --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys

GT_HELP = (
    "folders: each sub-folder is a group (top-level folders starting with _ hold distractors); holidays: INRIA "
    "Holidays (names, or the official list with --gt-path); ukbench: groups of 4; oxford: Oxford/Paris "
    "*_query/_good/_ok/_junk.txt folder; revisited: Revisited Oxford/Paris gnd_*.pkl; csv: a query,relevant file"
)
PROTOCOL_CHOICES = ("easy", "medium", "hard", "all")
MICRO_AP_DEPTH = 100  # results of each query pooled for µAP (DISC21 pools each query's predictions)


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
                        help="image folder (folders/holidays/ukbench; default: the paths stored in the index), the "
                             "Holidays list file (holidays_images.dat), ground-truth folder (oxford), gnd_*.pkl "
                             "(revisited) or CSV file (csv)")
    parser.add_argument("--queries", metavar="DIR",
                        help="folders: every image under DIR/<group>/ is a query encoded from its file, relevant to the "
                             "database images under <group>/ (copy detection), and every image under DIR/_<name>/ a query "
                             "with no copy in the database (counted in µAP only); revisited: the folder of the query "
                             "images (default: the index's image folder)")
    parser.add_argument("--protocol", choices=PROTOCOL_CHOICES, default="all",
                        help="revisited: Easy, Medium, Hard or all three (default: all)")
    parser.add_argument("--k", type=cutoff_list, default=[1, 5, 10], metavar="1,5,10", help="cut-offs for P@k and R@k (default: 1,5,10)")
    parser.add_argument("--qe", choices=QUERY_EXPANSIONS, default="none",
                        help="query expansion: avg = average QE, alpha = alpha-QE (default: none)")
    parser.add_argument("--qe-top-n", type=positive_int, default=3, metavar="N", help="neighbours used by query expansion (default: 3)")
    parser.add_argument("--qe-alpha", type=non_negative_float, default=3.0, metavar="A", help="alpha-QE exponent (default: 3)")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                        help="verify the top 100 of each query with local features (default: on for an index built "
                             "with --preset copy-detection, else off; needs an index with local features)")
    parser.add_argument("--ap", choices=AP_METHODS, default=None,
                        help="AP definition (default: trapezoid, what the official Oxford, Paris, Holidays and "
                             "Revisited code computes, used for every kind; non-interpolated: the TREC AP)")
    parser.add_argument("--whiten-from", metavar="FILE.h5", help="learn PCA-whitening on this index's vectors and apply it")
    parser.add_argument("--whiten-dim", type=positive_int, metavar="D", help="dimensions kept by the whitening (default: all it can)")
    parser.add_argument("--database", metavar="DIR", help="image folder the index paths are relative to (default: the one recorded)")
    parser.add_argument("--weights", metavar="FILE", help="the weights file the index was built with, if not where it was")
    parser.add_argument("--json", metavar="OUT.json", help="also write the metrics, settings, PR curve and per-query scores")
    parser.add_argument("--pr-plot", metavar="OUT.png", help="also draw the mean precision-recall curve (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.queries and args.ground_truth not in ("folders", "revisited"):
        parser.error("--queries goes with --ground-truth folders (or revisited: the query images' folder)")
    if args.protocol != "all" and args.ground_truth != "revisited":
        parser.error("--protocol goes with --ground-truth revisited")
    return args


def ground_truths(args, paths) -> tuple[dict, list[str]]:
    """{label: GroundTruth} to evaluate (one, or one per Revisited protocol) and lines that describe them."""
    from ..errors import RetrievalError
    from ..evaluation import groundtruth, revisited
    from ..evaluation.protocol import PathResolver
    from ..images import list_image_files

    kind, notes = args.ground_truth, []
    if kind == "revisited":
        if not args.gt_path:
            raise RetrievalError("--ground-truth revisited needs --gt-path gnd_roxford5k.pkl (or gnd_rparis6k.pkl)")
        gnd = revisited.load_revisited_gnd(args.gt_path)
        resolver = PathResolver(paths)
        in_index = sum(resolver.row(name) is not None for name in gnd.images)
        queries_in_index = sum(resolver.row(q.name) is not None for q in gnd.queries)
        notes.append(f"revisited: {len(gnd.queries)} queries; {in_index} of the {len(gnd.images)} database images "
                     f"(imlist) are in the index, {queries_in_index} query images in it are left out as junk, "
                     f"{len(paths) - in_index - queries_in_index} other images count as negatives")
        names = revisited.PROTOCOLS if args.protocol == "all" else (args.protocol,)
        return {name: gnd.protocol(name) for name in names}, notes
    if args.queries:
        from pathlib import Path

        if not Path(args.queries).is_dir():
            raise RetrievalError(f"{args.queries}: no such query folder")
        query_paths = list_image_files(args.queries)
        truth = groundtruth.folders_with_queries(query_paths, paths)
        outside = len(query_paths) - len(truth)
        unmatched = sum(query.unmatched for query in truth.queries)
        notes.append(f"queries: {len(truth) - unmatched} images under {args.queries}/<group>/"
                     + (f" and {unmatched} with no copy in the database under {args.queries}/_*/" if unmatched else "")
                     + ", encoded from their files" + (f" ({outside} outside a group folder not used)" if outside else ""))
        return {kind: truth}, notes
    if args.gt_path:
        return {kind: groundtruth.read_ground_truth(kind, args.gt_path)}, notes
    if kind in groundtruth.FROM_PATHS:
        return {kind: groundtruth.FROM_PATHS[kind](paths)}, notes
    raise RetrievalError(f"--ground-truth {kind} needs --gt-path")


def revisited_table(results: dict) -> str:
    """mAP and mP@k of each protocol side by side, as revisitop prints them."""
    names = list(results)
    first = results[names[0]]
    rows = [("mAP", {n: r.mean_average_precision for n, r in results.items()})]
    rows += [(f"mP@{k}", {n: r.mean_precision_at(k) for n, r in results.items()}) for k in first.ks]
    rows += [("queries", {n: len(r.queries) for n, r in results.items()})]
    lines = [f"{'metric':<8}" + "".join(f"{n:>9}" for n in names)]
    for label, values in rows:
        lines.append(f"{label:<8}" + "".join(f"{values[n]:>9}" if label == "queries" else f"{values[n]:>9.4f}" for n in names))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from . import run

    def job() -> int:
        from pathlib import Path

        from ..engine import RetrievalEngine
        from ..errors import RetrievalError
        from ..evaluation.protocol import (
            OFFICIAL_AP, describe_ap, encode_query, encode_query_files, evaluate_queries, prepare_queries,
            relearned_pipeline, write_pr_plot,
        )
        from ..files import atomic_write_bytes, check_writable_target
        from ..search.expansion import QueryExpansion
        from ..storage.database import read_database

        kind = args.ground_truth
        ap_method = args.ap or OFFICIAL_AP[kind][0]
        precision = "revisitop" if kind == "revisited" else "plain"
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
            truths, notes = ground_truths(args, database.paths)
            pipeline = engine.pipeline
            if args.whiten_from:
                pipeline = relearned_pipeline(database, read_database(args.whiten_from), args.whiten_from, args.whiten_dim)
            encoded: dict = {}
            files: dict = {}
            verify = engine.resolve_verify(args.verify)  # the database's default unless told; one line if impossible
            if engine.copy_search:
                notes.append(f"copy search: {'regions + query windows' if database.copies.has_regions else 'global'}, "
                             f"geometric verification of the top 100 {'on' if verify else 'off'}")
            if not engine.copy_search and any(
                q.image is not None and q.bbox is None for truth in truths.values() for q in truth.queries
            ):
                engine.load_extractor(args.weights)  # query files (--queries): encoded in batches up front
                files = encode_query_files(engine, [q for truth in truths.values() for q in truth.queries], args.queries)

            def encode(query, row):
                """Crop (query box) or whole image -> vector with the index's own encoder (built on first use); each
                query image is encoded once, however many protocols use it."""
                if query.image in files and query.bbox is None:
                    if isinstance(files[query.image], Exception):
                        raise files[query.image]
                    return files[query.image]
                key = (query.image, query.path, query.bbox, row)
                if key not in encoded:
                    engine.load_extractor(args.weights)
                    encoded[key] = encode_query(engine, query, row, args.queries, verify)
                return encoded[key]

            results, preparations = {}, {}
            for label, truth in truths.items():
                prepared = preparations[label] = prepare_queries(truth, database.paths, database.vectors, encode)
                results[label] = evaluate_queries(
                    pipeline, prepared.queries, ks=args.k, expansion=expansion, ap_method=ap_method,
                    precision=precision, ns_score=kind == "ukbench",
                    micro_ap=MICRO_AP_DEPTH if args.queries and kind == "folders" else None, verify=verify,
                )
        finally:
            engine.close()
        first = next(iter(preparations.values()))
        for label, prepared in preparations.items():
            for name, reason in prepared.skipped:
                print(f"skipped query{f' ({label})' if len(truths) > 1 else ''}: {name}: {reason}", file=sys.stderr)
        encoder = database.encoder
        result = results.get("medium") or next(iter(results.values()))  # the one plotted (Revisited: Medium)
        evaluated = ", ".join(f"{label} {len(r.queries)}" for label, r in results.items()) if len(results) > 1 else str(len(result.queries))
        if result.unmatched:
            evaluated += f" queries evaluated (+{result.unmatched} with no copy in the database, counted in µAP only),"
        else:
            evaluated += " queries evaluated,"
        skipped = sum(len(p.skipped) for p in preparations.values())
        print(f"{args.index}: {len(database)} images [{encoder.backbone} {encoder.pooling} {encoder.dim}-d, "
              f"{result.settings['search']} search]; {kind} ground truth: {evaluated} "
              f"{skipped} skipped; query expansion: {args.qe}")
        print(f"database: {first.database_size} images, {first.unreferenced} of them named by no query "
              f"(distractors, irrelevant to every query); {len(first.missing_relevant)} relevant images of the "
              "ground truth are not in the index (counted as misses)")
        for note in notes:
            print(note)
        rule = "revisitop mP@k (divides by min(k, rank of the last relevant))" if precision == "revisitop" else "relevant in the first k / k"
        print(f"AP: {describe_ap(kind, ap_method)}; P@k: {rule}"
              + (f"; µAP: DISC21, each query's first {MICRO_AP_DEPTH} results pooled" if result.micro_ap is not None else ""))
        print(revisited_table(results) if kind == "revisited" else result.table())
        if first.missing_relevant:
            shown = ", ".join(first.missing_relevant[:3]) + (", ..." if len(first.missing_relevant) > 3 else "")
            print(f"note: not in the index: {shown}", file=sys.stderr)
        if args.json:
            report = {
                "index": str(args.index),
                "ground_truth": kind,
                "gt_path": args.gt_path,
                "queries_folder": args.queries,
                "encoder": encoder.identity(),
                "images": len(database),
                "distractors": first.unreferenced,
                "missing_relevant": first.missing_relevant,
            }
            if kind == "revisited":
                report["protocols"] = {label: r.as_dict() for label, r in results.items()}
                report["skipped"] = {label: [{"query": n, "reason": why} for n, why in p.skipped] for label, p in preparations.items()}
            else:
                report.update(result.as_dict())
                report["skipped"] = [{"query": name, "reason": reason} for name, reason in first.skipped]
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
