"""Shared fixtures. Tests never touch the network: downloads are disabled and Keras' cache is an empty folder."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO_DATABASE = REPO / "database"

# Before anything imports the package: no downloads, no user cache, quiet TensorFlow. Subprocesses inherit these.
# The session's own folders go when it ends (a user's CBIR_MODEL_CACHE is kept).
SESSION_FOLDERS = [tempfile.mkdtemp(prefix="empty-keras-home-")]
os.environ["RETRIEVAL_OFFLINE"] = "1"
os.environ["KERAS_HOME"] = SESSION_FOLDERS[0]
if "CBIR_MODEL_CACHE" not in os.environ:  # converted models
    SESSION_FOLDERS.append(tempfile.mkdtemp(prefix="cbir-model-cache-"))
    os.environ["CBIR_MODEL_CACHE"] = SESSION_FOLDERS[-1]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MILVUS_SERVER_VENV", str(REPO / ".milvus-server"))  # scripts/setup.sh --dev makes it


def pytest_unconfigure(config):
    for folder in SESSION_FOLDERS:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def seeded_vgg16_weights(tmp_path_factory) -> Path:
    """VGG16 (no top) with seeded random weights saved to a Keras weights file: the VGG16 path without ImageNet."""
    from retrieval.models.backbones import quiet_tensorflow

    quiet_tensorflow()
    import keras

    keras.utils.set_random_seed(1234)
    model = keras.applications.VGG16(weights=None, include_top=False, input_shape=(224, 224, 3))
    path = tmp_path_factory.mktemp("weights") / "seeded_vgg16.weights.h5"
    model.save_weights(str(path))
    return path


@pytest.fixture(scope="session")
def effnet_extractor():
    """One EfficientNet-Lite0 max-pooling extractor with the real packaged ImageNet weights, shared by the session."""
    from retrieval.models.backbones import efficientnet_lite0_weights
    from retrieval.descriptors.encoder import new_encoder_config
    from retrieval.descriptors.extractor import Extractor

    weights = efficientnet_lite0_weights()
    return Extractor(new_encoder_config(weights, "max", "float32"), weights)


DEMO_NAMES = sorted(path.parent.name for path in DEMO_DATABASE.glob("*/original.jpg"))


def demo_photo(name: str, side: int = 512):
    """The demo group ``name``'s original as an RGB PIL image, its longest side at most ``side`` px."""
    from PIL import Image

    image = Image.open(DEMO_DATABASE / name / "original.jpg").convert("RGB")
    image.thumbnail((side, side))
    return image


@pytest.fixture(scope="session")
def demo_photos_copy_index(tmp_path_factory) -> Path:
    """An index of the 12 demo originals (``demo_photo``, ``<name>/photo.png``) with the copy-detection features
    (regions, local features, verification on), the model in float32 whatever ``auto`` would choose on this CPU."""
    from retrieval.indexing import build_index

    folder = tmp_path_factory.mktemp("demo-photos")
    for name in DEMO_NAMES:
        (folder / name).mkdir(parents=True)
        demo_photo(name).save(folder / name / "photo.png")
    index = folder.parent / f"{folder.name}.h5"
    build_index(
        folder, index, backbone="efficientnet-lite0", regions=True, local_features=True, verify=True, progress=False,
        precision="float32",
    )
    return index


def demo_copies_first(engine, queries: list[bytes]) -> tuple[int, int]:
    """One query per demo photo (``DEMO_NAMES`` order) searched in ``demo_photos_copy_index``: how many find their
    photo first, and how many of those are verified."""
    tops = [engine.search_image(query, k=1)[0] for query in queries]
    first = [top.path == f"{name}/photo.png" for top, name in zip(tops, DEMO_NAMES)]
    return sum(first), sum(top.verified and hit for top, hit in zip(tops, first))


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """A small image folder: six demo photos (two groups), one in a sub-folder with a non-ASCII name and a space."""
    folder = tmp_path / "images"
    (folder / "sub dir é").mkdir(parents=True)
    shutil.copy(DEMO_DATABASE / "coffee" / "original.jpg", folder / "coffee.jpg")
    shutil.copy(DEMO_DATABASE / "coffee" / "view-01.jpg", folder / "sub dir é" / "café crème.JPG")
    shutil.copy(DEMO_DATABASE / "chelsea" / "original.jpg", folder / "chelsea.jpeg")
    shutil.copy(DEMO_DATABASE / "chelsea" / "view-02.jpg", folder / "sub dir é" / "chelsea-2.jpg")
    shutil.copy(DEMO_DATABASE / "rocket" / "original.jpg", folder / "rocket.jpg")
    shutil.copy(DEMO_DATABASE / "astronaut" / "original.jpg", folder / "astronaut.jpg")
    return folder


def copy_demo_pairs(folder: Path) -> Path:
    """``folder``/<group>/{original,view-01}.jpg for every demo group (24 photos: 12 originals, 12 views)."""
    for group in sorted(p for p in DEMO_DATABASE.iterdir() if p.is_dir()):
        (folder / group.name).mkdir(parents=True)
        for name in ("original.jpg", "view-01.jpg"):
            shutil.copy2(group / name, folder / group.name / name)
    return folder


def copy_duplicate_photos(folder: Path) -> Path:
    """Two groups of copies and two unrelated photos: coffee, rocket, astronaut, camera at the top; in backup/ an
    exact copy of coffee and of rocket, and coffee at half size."""
    from PIL import Image

    (folder / "backup").mkdir(parents=True)
    for name in ("coffee", "rocket", "astronaut", "camera"):
        shutil.copy(DEMO_DATABASE / name / "original.jpg", folder / f"{name}.jpg")
    shutil.copy(DEMO_DATABASE / "coffee" / "original.jpg", folder / "backup" / "coffee copy.jpg")
    shutil.copy(DEMO_DATABASE / "rocket" / "original.jpg", folder / "backup" / "rocket.jpg")
    with Image.open(DEMO_DATABASE / "coffee" / "original.jpg") as image:
        image.resize((image.width // 2, image.height // 2)).save(folder / "backup" / "coffee small.jpg", quality=90)
    return folder


def write_rgb(path: Path, seed: int = 0, size=(64, 48), fmt: str | None = None) -> Path:
    """A small random-noise RGB image file."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def start_server(log_path: Path, *args) -> tuple[subprocess.Popen, str]:
    """server.py (waitress) on a free port; returns the process and its base URL once it listens."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(REPO / "server.py"), "--port", "0", *map(str, args)],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )
    deadline = time.monotonic() + 90
    while True:
        text = log_path.read_text(errors="replace")
        match = re.search(r"serving on (http://127\.0\.0\.1:\d+/)", text)
        if match:
            return process, match.group(1)
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            pytest.fail(f"server.py did not start (exit {process.poll()}):\n{text}", pytrace=False)
        time.sleep(0.1)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def milvus_bin_cache(tmp_path_factory) -> Path:
    """Milvus' unpacked binaries (246 MB), shared by every server the session starts."""
    return tmp_path_factory.mktemp("milvus-bin")


@pytest.fixture
def milvus_server(tmp_path_factory, milvus_bin_cache):
    """A real Milvus standalone server on free loopback ports, data in a temporary folder, stopped (children
    included) at the end. A missing server fails the test: scripts/setup.sh --dev installs it."""
    from tools.milvus_server import MilvusServer, find_server_executable

    executable = find_server_executable()
    if executable is None:
        pytest.fail("no milvus-server: run scripts/setup.sh --dev (it installs milvus==2.3.5 into .milvus-server)")
    server = MilvusServer(executable, tmp_path_factory.mktemp("milvus-data"), bin_cache=milvus_bin_cache)
    server.start()
    yield server
    server.stop()
