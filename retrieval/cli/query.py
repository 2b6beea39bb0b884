#!/usr/bin/env python3
"""Rank the feature database against a query image, from the terminal.

    python query_online.py --query database/coffee/view-01.jpg --index index/features.h5
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from ..search.expansion import QUERY_EXPANSIONS
    from . import non_negative_float, nonempty_path, positive_int

    parser = argparse.ArgumentParser(description="Find the database images most similar to a query image (cosine similarity).")
    parser.add_argument("--query", "-query", required=True, type=nonempty_path, metavar="IMG", help="query image file")
    parser.add_argument("--index", "-index", required=True, type=nonempty_path, metavar="FILE.h5", help="feature database built by index.py")
    parser.add_argument("--top-k", "-k", type=positive_int, default=10, help="number of results (default: 10)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--montage", metavar="OUT.png", help="also write a picture of the query and its results")
    parser.add_argument("--database", "-result", metavar="DIR",
                        help="image folder the index paths are relative to (default: the folder recorded at indexing)")
    parser.add_argument("--weights", metavar="FILE", help="the weights file the index was built with, if not where it was")
    parser.add_argument("--qe", choices=QUERY_EXPANSIONS, default="none",
                        help="query expansion: avg (average QE) or alpha (alpha-QE) over the first --qe-top-n results (default: none)")
    parser.add_argument("--qe-top-n", type=positive_int, default=3, metavar="N", help="neighbours used by query expansion (default: 3)")
    parser.add_argument("--qe-alpha", type=non_negative_float, default=3.0, metavar="A", help="alpha-QE exponent (default: 3)")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                        help="verify the top 100 with local features and rank verified copies first (default: on for an "
                             "index built with --preset copy-detection, else off; needs an index with local features)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from ..engine import RetrievalEngine, open_query
    from ..errors import RetrievalError
    from ..search.expansion import QueryExpansion
    from . import run

    def job() -> int:
        try:
            expansion = QueryExpansion(args.qe, args.qe_top_n, args.qe_alpha)
        except ValueError as exc:
            raise RetrievalError(str(exc)) from None
        query_image = open_query(args.query)  # fail fast on a bad query, before the model is built
        engine = RetrievalEngine.open(args.index, weights_file=args.weights, image_root=args.database)
        try:
            verify = engine.resolve_verify(args.verify)  # one error line for an index without local features
            if engine.copy_search:
                features = engine.query_features(query_image, for_verification=verify)
                hits = engine.search_features([features], args.top_k, expansion, verify=verify)[0]
            else:
                hits = engine.search(engine.encode_images([query_image])[0], args.top_k, expansion)
        finally:
            engine.close()
        if args.json:
            encoder = engine.database.encoder
            print(json.dumps({
                "query": args.query,
                "index": args.index,
                "backbone": encoder.backbone,
                "pooling": encoder.pooling,
                "query_expansion": args.qe,
                "verify": verify,
                "results": [hit.as_dict() for hit in hits],
            }, ensure_ascii=False, indent=2))
        else:
            print(f"{'rank':>4}  {'score':>7}  {'verified':>8}  path" if verify else f"{'rank':>4}  {'score':>7}  path")
            for hit in hits:
                mark = f"  {hit.inliers:>8}" if hit.verified else f"  {'-':>8}"
                print(f"{hit.rank:>4}  {hit.score:7.4f}{mark if verify else ''}  {hit.path}")
        if args.montage:
            from .montage import write_montage

            rows = [(hit.path, hit.score, engine.image_path(hit)) for hit in hits]
            written = write_montage(args.montage, query_image, rows)
            print(f"montage written to {written}", file=sys.stderr)
        return 0

    return run(job)

