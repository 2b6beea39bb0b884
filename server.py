#!/usr/bin/env python3
"""Serve the search page and the JSON API for one feature database.

    python server.py --index index/demo.h5                # http://127.0.0.1:5000/
    python server.py --index index/demo.h5 --host 0.0.0.0 --port 8080

Production server: waitress. ``--debug`` runs Flask's development server with the debugger instead (loopback only).
An index file that does not exist yet is not fatal: the page says "no index loaded" and searches answer 503 until
index.py writes the file, which is then picked up without a restart. An index that cannot be read stops the start
with one ``error:`` line and exit status 1.
"""

import sys

from retrieval.cli.server import main

if __name__ == "__main__":
    sys.exit(main())
