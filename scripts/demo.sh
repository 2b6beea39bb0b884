#!/usr/bin/env bash
# Quick start: install, index the bundled demo photos into index/demo.h5, then run one query.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python index.py --database database --index index/demo.h5
.venv/bin/python query_online.py --query "database/coffee/café crème.jpg" --index index/demo.h5 --top-k 5 --montage index/demo-query.png
