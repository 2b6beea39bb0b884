#!/usr/bin/env python3
"""Group the duplicate images of a feature database (it reports; it never deletes or moves a file).

python find_duplicates.py --index index/demo.h5
python find_duplicates.py --index photos.h5 --threshold 0.9 --html duplicates.html --csv duplicates.csv
"""

import sys

from retrieval.cli.duplicates import main

if __name__ == "__main__":
    sys.exit(main())
