#!/usr/bin/env python3
"""Find every group of duplicate images in a feature database, from the terminal. It reports; it never deletes or
moves a file.

    python find_duplicates.py --index index/demo.h5
    python find_duplicates.py --index photos.h5 --threshold 0.9 --html dups.html --csv dups.csv --json dups.json
"""

from __future__ import annotations

import argparse
import sys


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``error:`` line (exit 2), like every other failure of this face."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def cosine_threshold(text: str) -> float:
    """argparse type: a cosine similarity in (0, 1]."""
    from . import finite_float

    value = finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a cosine similarity in (0, 1], got {text!r}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    from ..search.backends import BACKENDS
    from ..search.duplicates import DEFAULT_K, DEFAULT_THRESHOLD, MAX_K, VERIFIED_THRESHOLD
    from . import nonempty_path, positive_int

    parser = OneLineParser(
        description="Group the duplicate images of a feature database (cosine similarity of their descriptors); "
                    "suggests one image to keep per group and never deletes or moves anything."
    )
    parser.add_argument("--index", "-index", required=True, type=nonempty_path, metavar="FILE.h5", help="feature database built by index.py")
    parser.add_argument("--threshold", "-t", type=cosine_threshold, default=None, metavar="T",
                        help=f"cosine similarity from which two images are duplicates, in (0, 1] (default: {DEFAULT_THRESHOLD}, "
                             f"{VERIFIED_THRESHOLD} with verification; both chosen on the copy-detection benchmark)")
    parser.add_argument("--k", type=positive_int, default=DEFAULT_K, metavar="NEIGHBOURS",
                        help=f"neighbours searched per image (default: {DEFAULT_K}, at most {MAX_K}); raise it for very large groups")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                        help="confirm each pair by local-feature geometric verification (indexes with local features; "
                             "default: on for indexes built with --preset copy-detection, --no-verify turns it off)")
    parser.add_argument("--json", type=nonempty_path, metavar="OUT", help="write the groups as JSON ('-': standard output)")
    parser.add_argument("--csv", type=nonempty_path, metavar="OUT", help="write one CSV row per group member")
    parser.add_argument("--html", type=nonempty_path, metavar="OUT", help="write a self-contained HTML report with thumbnails")
    parser.add_argument("--database", "-result", metavar="DIR",
                        help="image folder the index paths are relative to (default: the folder recorded at indexing)")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="search with this backend instead of the one the index records (memory always works)")
    parser.add_argument("--no-cache", action="store_true",
                        help="neither read nor write the neighbour graph cached beside the index (FILE.h5.duplicates.npz)")
    parser.add_argument("--show", type=positive_int, default=20, metavar="N", help="groups printed on the terminal (default: 20)")
    parser.add_argument("--quiet", action="store_true", help="print only the totals line")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pathlib import Path

    from ..files import atomic_write_bytes, check_writable_target
    from . import run

    def job() -> int:
        from ..search.duplicates import find_duplicates
        from .duplicates_report import csv_bytes, html_bytes, json_bytes, summary_lines

        outputs = [(name, path) for name, path in (("json", args.json), ("csv", args.csv), ("html", args.html)) if path]
        for name, path in outputs:
            if path != "-":
                check_writable_target(path, f"{name.upper()} report")
        report = find_duplicates(
            args.index, args.threshold, k=args.k, verify=args.verify, backend=args.backend, cache=not args.no_cache,
            image_root=args.database,
        )
        root = Path(report.image_root) if report.image_root else None
        writers = {"json": json_bytes, "csv": csv_bytes, "html": lambda r: html_bytes(r, root)}
        lines = summary_lines(report, args.show)
        to_stdout = any(path == "-" for _, path in outputs)
        print("\n".join(lines[:1] if args.quiet else lines), file=sys.stderr if to_stdout else sys.stdout)
        for name, path in outputs:
            data = writers[name](report)
            if path == "-":
                sys.stdout.write(data.decode("utf-8"))
            else:
                atomic_write_bytes(path, data)
                print(f"{name.upper()} report written to {path}", file=sys.stderr)
        return 0

    return run(job)
