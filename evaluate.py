#!/usr/bin/env python3
"""Measure retrieval quality of a feature database against ground truth: mAP, P@k, R@k (and N-S for UKBench).

python evaluate.py --index index/features.h5 --ground-truth folders
python evaluate.py --index oxford.h5 --ground-truth oxford --gt-path gt_files/ --qe alpha --json out.json
"""

import sys

from retrieval.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
