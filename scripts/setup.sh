#!/usr/bin/env bash
# Create .venv and install the runtime requirements; with --dev also what the tests and benchmarks need
# (pytest, scikit-image, playwright, augly, imagehash, and Debian's chromium, dataset-fashion-mnist and the wallpaper
# packages whose photos make the copy-detection set: mate-backgrounds gnome-backgrounds ukui-wallpapers
# plasma-workspace-wallpapers; libmagic1 for augly's python-magic).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
.venv/bin/python -m pip install --quiet --disable-pip-version-check setuptools==80.9.0 wheel==0.45.1
# the package itself, editable: the scripts, bench/ and tests/ import it without any sys.path edits
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
# compile copy detection's kernels (SIFT, matching) once (numba caches them beside the package; ~10 s the first time)
.venv/bin/python -c "from retrieval.descriptors import sift; from retrieval.search import matching; sift.warm_up(); matching.warm_up()"
if [ "${1:-}" = "--dev" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
  # a real Milvus standalone server for the backend tests (PyPI's milvus wheel bundles it), in a venv of its own
  [ -x .milvus-server/bin/python ] || "$PYTHON" -m venv .milvus-server
  .milvus-server/bin/python -m pip install --quiet --disable-pip-version-check milvus==2.3.5
  missing=()
  for package in chromium dataset-fashion-mnist libmagic1 mate-backgrounds gnome-backgrounds ukui-wallpapers \
      plasma-workspace-wallpapers; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
  done
  command -v npm >/dev/null 2>&1 || missing+=(npm)
  if [ ${#missing[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # axe-core, pinned by package-lock.json, for the accessibility checks in tests/test_browser.py
  npm ci --no-audit --no-fund --loglevel=error
fi
