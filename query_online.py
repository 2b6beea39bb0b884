#!/usr/bin/env python3
"""Rank the feature database against a query image, from the terminal.

python query_online.py --query database/coffee/view-01.jpg --index index/features.h5
"""

import sys

from retrieval.cli.query import main

if __name__ == "__main__":
    sys.exit(main())
