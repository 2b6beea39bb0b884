#!/usr/bin/env python3
"""Serve the search page and the JSON API for one feature database.

    python server.py --index index/demo.h5                # http://127.0.0.1:5000/
    python server.py --index index/demo.h5 --host 0.0.0.0 --port 8080

Production server: waitress. ``--debug`` runs Flask's development server with the debugger instead (loopback only).
An index file that does not exist yet is not fatal: the page says "no index loaded" and searches answer 503 until
index.py writes the file, which is then picked up without a restart. An index that cannot be read stops the start
with one ``error:`` line and exit status 1.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys

DEFAULT_INDEX = "index/demo.h5"


def parse_args(argv=None) -> argparse.Namespace:
    from . import positive_int

    parser = argparse.ArgumentParser(description="Serve the image search page and JSON API for a feature database.")
    parser.add_argument("--index", "-index", default=DEFAULT_INDEX, metavar="FILE.h5",
                        help=f"feature database built by index.py (default: {DEFAULT_INDEX}); reloaded when it changes")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=5000, help="port to listen on; 0 picks a free one (default: 5000)")
    parser.add_argument("--database", "-database", metavar="DIR",
                        help="image folder the index paths are relative to (default: the folder recorded at indexing)")
    parser.add_argument("--weights", metavar="FILE", help="the weights file the index was built with, if not where it was")
    parser.add_argument("--threads", type=positive_int, default=4, help="request threads (default: 4)")
    parser.add_argument("--max-upload-mb", type=positive_int, default=20, help="largest upload in MB (default: 20)")
    parser.add_argument("--require-index", action="store_true",
                        help="exit with an error when the index file does not exist, instead of waiting for it")
    parser.add_argument("--debug", action="store_true", help="Flask development server with debugger (never expose it)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")
    return args


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv=None) -> int:
    args = parse_args(argv)
    import logging
    from pathlib import Path

    from ..errors import IndexFileError, RetrievalError
    from . import run

    def job() -> int:
        if args.debug and not _is_loopback(args.host):
            raise RetrievalError(f"--debug runs an interactive debugger: only with a loopback --host, not {args.host}")
        index = Path(args.index)
        if not index.exists():
            if args.require_index:
                raise IndexFileError(f"{index}: no such index file (build one with index.py)")
            print(f"warning: {index}: no such index file yet; serving without an index (searches answer 503) until "
                  f"it appears. Build it with: python index.py --database DIR --index {index}", file=sys.stderr)
        elif index.is_dir():
            raise IndexFileError(f"{index}: is a folder, not an index file")
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        from ..web import create_app

        max_upload = args.max_upload_mb * 1024 * 1024
        app = create_app(index, config={"MAX_UPLOAD_BYTES": max_upload, "IMAGE_ROOT": args.database,
                                        "WEIGHTS_FILE": args.weights})
        engine, _ = app.extensions["retrieval"].current()
        if engine is not None:
            encoder = engine.database.encoder
            print(f"index {index}: {len(engine)} images [{encoder.backbone} {encoder.pooling} {encoder.dim}-d]",
                  file=sys.stderr)
        if args.debug:
            print(f"serving on http://{args.host}:{args.port}/ (Flask debug server)", file=sys.stderr, flush=True)
            app.run(host=args.host, port=args.port, debug=True, use_reloader=False)
            return 0
        from ..web.serving import make_server

        # waitress refuses bodies well over the Flask limit before buffering them (as JSON); Flask answers 413 below it
        try:
            server = make_server(app, host=args.host, port=args.port, threads=args.threads,
                                 max_request_body_size=max_upload + 1024 * 1024)
        except (OSError, ValueError) as exc:  # port in use, address not available, unknown host name
            reason = getattr(exc, "strerror", None) or str(exc)
            raise RetrievalError(f"cannot listen on {args.host}:{args.port}: {reason}") from None
        listening = getattr(server, "effective_listen", None) or [(server.effective_host, server.effective_port)]
        urls = " ".join(f"http://{f'[{h}]' if ':' in h else h}:{p}/" for h, p in listening)
        print(f"serving on {urls} (waitress, {args.threads} threads; Ctrl-C stops)", file=sys.stderr, flush=True)
        try:
            server.run()
        finally:
            server.close()
        return 0

    return run(job)

