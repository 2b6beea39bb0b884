"""index.py --ray: extraction as a Ray Data job on a local Ray instance, written into the HDF5 database and Milvus.

Same descriptors as one process (cosine >= 0.9999 per image), same skip report, same incremental behaviour."""

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO
from retrieval.engine import RetrievalEngine
from retrieval.errors import RetrievalError
from retrieval.indexing import build_index
from retrieval.storage.database import read_database

import ray  # noqa: E402,F401  (requirements.txt: a missing package must fail the suite, not skip it)

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def build(folder, path, **options):
    return build_index(folder, path, backbone="efficientnet-lite0", progress=False, notice=lambda line: None, **options)


def test_ray_extraction_matches_one_process_and_updates_incrementally(image_folder, tmp_path):
    (image_folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (image_folder / "empty.png").write_bytes(b"")
    reference = build(image_folder, tmp_path / "one-process.h5")

    # half of the folder indexed by one process, the rest added by Ray: only the new files are extracted there
    later = tmp_path / "later"
    later.mkdir()
    for name in ("rocket.jpg", "astronaut.jpg", "broken.jpg", "empty.png"):
        shutil.move(image_folder / name, later / name)
    path = tmp_path / "ray.h5"
    build(image_folder, path, backend="milvus")
    for name in ("rocket.jpg", "astronaut.jpg", "broken.jpg", "empty.png"):
        shutil.move(later / name, image_folder / name)
    started = time.monotonic()
    report = build(image_folder, path, ray="local", batch_size=2, ray_actors=1)
    print(f"ray run: {report.summary()} in {time.monotonic() - started:.1f} s")

    assert report.extraction == "ray" and (report.extracted, report.reused) == (2, 4)
    assert report.skipped == reference.skipped and [rel for rel, _ in report.skipped] == ["broken.jpg", "empty.png"]
    assert not (tmp_path / "ray.h5.partial").exists()  # the run's checkpoint is gone once the database is written
    ours, theirs = read_database(path), read_database(tmp_path / "one-process.h5")
    assert ours.paths == theirs.paths
    cosines = np.sum(ours.vectors * theirs.vectors, axis=1)
    assert cosines.min() >= 0.9999, dict(zip(ours.paths, cosines))

    # the descriptors reached the Milvus collection too, and it answers like exact search
    assert report.backend == "milvus" and report.backend_detail.startswith("updated: 2 upserted, 0 deleted")
    engine = RetrievalEngine.open(path, with_extractor=False)
    try:
        row = ours.paths.index("rocket.jpg")
        hits = engine.search(ours.vectors[row], 3)
        assert hits[0].path == "rocket.jpg" and hits[0].score > 0.9999
    finally:
        engine.close()


def test_unreachable_ray_address_fails_fast(image_folder, tmp_path):
    for address in ("127.0.0.1:1", "not-an-address", "ray://127.0.0.1:1"):
        started = time.monotonic()
        with pytest.raises(RetrievalError, match="Ray address"):
            build(image_folder, tmp_path / "x.h5", ray=address)
        assert time.monotonic() - started < 15
    assert not (tmp_path / "x.h5").exists()
    result = subprocess.run(
        [sys.executable, str(REPO / "index.py"), "--database", image_folder, "--index", tmp_path / "x.h5",
         "--ray", "127.0.0.1:1", "--backbone", "efficientnet-lite0", "--quiet"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: Ray address 127.0.0.1:1: cannot connect")
