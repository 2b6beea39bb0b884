"""Labelled image sets built by construction, for tests, the demo database and benchmarks.

Two kinds of set:

* **View groups** (near-duplicate / UKBench-style): each scikit-image bundled photo is one
  group; its members are the (downscaled) original and seeded transformed views of it
  (crop, rotation, flip, scale, colour jitter, blur, JPEG re-encoding). Every view of a
  group is relevant to every other member of the same group and to nothing else.
* **Fashion-MNIST** (class-level retrieval): 28x28 grey clothing images in 10 classes,
  read from the Debian package ``dataset-fashion-mnist``.

Nothing here needs the network. scikit-image is imported lazily (only by
``load_bundled_photo``), so importing this module is cheap.
"""

from __future__ import annotations

import gzip
import io
import math
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from retrieval.errors import RetrievalError

__all__ = [
    "BUNDLED_PHOTOS",
    "PHOTO_LICENCES",
    "FASHION_MNIST_DIRS",
    "FASHION_MNIST_PACKAGE",
    "FASHION_MNIST_CLASSES",
    "load_bundled_photo",
    "random_view",
    "make_view_groups",
    "write_view_groups",
    "load_fashion_mnist",
]

# --------------------------------------------------------------------------- bundled photos

#: scikit-image sample images that ship inside the wheel (``skimage/data/``) and so load
#: offline. Excluded: ``microaneurysms`` (102x102, too small), the right image of the
#: motorcycle stereo pair (a near-copy of the left), ``chessboard``/``checkerboard``/
#: ``binary_blobs`` (synthetic patterns) and everything that ``skimage.data`` downloads.
BUNDLED_PHOTOS: tuple[str, ...] = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
    "coins",
    "clock",
    "brick",
    "cell",
    "grass",
    "gravel",
    "moon",
    "page",
    "text",
    "horse",
    "colorwheel",
    "logo",
    "stereo_motorcycle",
)

#: Licence and source of each photo, as stated in its ``skimage.data`` docstring
#: (scikit-image 0.26). "none stated" means the docstring gives no licence; the file is
#: distributed with scikit-image (BSD-3-Clause) but its own licence is not documented.
PHOTO_LICENCES: dict[str, str] = {
    "astronaut": "Public domain (no known copyright restrictions); NASA Great Images, "
    "photo of astronaut Eileen Collins, https://flic.kr/p/r9qvLn",
    "chelsea": "CC0 by the photographer (Stefan van der Walt); Chelsea the cat",
    "coffee": "CC0 by the photographer (Rachel Michetti); coffee cup, courtesy of Pikolo Espresso Bar",
    "rocket": "Public domain (released by SpaceX); DSCOVR launch on Falcon 9, "
    "https://www.flickr.com/photos/spacexphotos/16511594820/",
    "hubble_deep_field": "Public domain (NASA, may be freely used); Hubble eXtreme Deep Field, "
    "http://hubblesite.org/newscenter/archive/releases/2012/37/image/a/",
    "immunohistochemistry": "No known copyright restrictions; IHC-stained colonic glands, "
    "Center for Microscopy And Molecular Imaging (CMMI)",
    "retina": "CC0 1.0 (public domain dedication); fundus photograph by Mikael Häggström, "
    "https://commons.wikimedia.org/wiki/File:Fundus_photograph_of_normal_left_eye.jpg",
    "camera": "CC0 by the photographer (Lav Varshney); grey-level camera image",
    "coins": "No known copyright restrictions; Greek coins from Pompeii, Brooklyn Museum Collection, "
    "https://www.brooklynmuseum.org/opencollection/archives/image/51611",
    "clock": "Public domain (released by the photographer, Stefan van der Walt); motion-blurred wall clock",
    "brick": "CC0; brick wall texture from CC0Textures (Bricks25), perspective-corrected and cropped",
    "cell": "CC0 (public domain dedication); quantitative phase image of a cell, "
    "Müller et al., Optics Express 26(8), 2018",
    "grass": "CC0; grass texture from DeviantArt (linolafett, Grass-01), cropped and greyed",
    "gravel": "CC0; gravel texture from CC0Textures (Gravel04), rescaled, cropped and greyed",
    "moon": "None stated in the docstring (distributed with scikit-image); surface of the moon",
    "page": "None stated in the docstring (distributed with scikit-image); scanned page of text",
    "text": "Public domain (no known copyright restrictions); https://en.wikipedia.org/wiki/File:Corner.png",
    "horse": "CC0 by the owner (Andreas Preuss, marauder); horse silhouette from openclipart, "
    "http://openclipart.org/detail/158377/horse-by-marauder",
    "colorwheel": "None stated in the docstring (distributed with scikit-image); colour wheel",
    "logo": "None stated in the docstring (distributed with scikit-image); scikit-image logo",
    "stereo_motorcycle": "None stated in the docstring; left image of the Middlebury 2014 stereo "
    "benchmark 'Motorcycle' pair (Scharstein et al., GCPR 2014), downsampled by 4",
}


def load_bundled_photo(name: str) -> Image.Image:
    """One bundled scikit-image photo as an 8-bit RGB PIL image at its native size.

    Grey (and the boolean ``horse``) images are replicated to RGB; the RGBA ``logo`` is
    composited on white; ``stereo_motorcycle`` is the left image of the pair.
    Raises ``RetrievalError`` for a name not in ``BUNDLED_PHOTOS``.
    """
    if name not in BUNDLED_PHOTOS:
        raise RetrievalError(f"unknown bundled photo {name!r}; choose from {', '.join(BUNDLED_PHOTOS)}")
    import skimage.data  # lazy: heavy, and only needed here

    array = getattr(skimage.data, name)()
    if isinstance(array, tuple):  # stereo_motorcycle -> (left, right, disparity)
        array = array[0]
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        raise RetrievalError(f"bundled photo {name!r} has unexpected dtype {array.dtype}")
    if array.ndim == 2:
        return Image.fromarray(array, mode="L").convert("RGB")
    if array.ndim == 3 and array.shape[2] == 4:
        rgba = Image.fromarray(array, mode="RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if array.ndim == 3 and array.shape[2] == 3:
        return Image.fromarray(array, mode="RGB")
    raise RetrievalError(f"bundled photo {name!r} has unexpected shape {array.shape}")


# --------------------------------------------------------------------------- seeded views


def _largest_inscribed(width: int, height: int, angle_deg: float) -> tuple[int, int]:
    """(width, height) in pixels of the largest axis-aligned rectangle that fits inside a
    ``width`` x ``height`` rectangle rotated by ``angle_deg`` about its centre."""
    if width <= 0 or height <= 0:
        return 0, 0
    angle = math.radians(angle_deg)
    sin_a, cos_a = abs(math.sin(angle)), abs(math.cos(angle))
    long_side, short_side = max(width, height), min(width, height)
    width_is_longer = width >= height
    if short_side <= 2.0 * sin_a * cos_a * long_side or abs(sin_a - cos_a) < 1e-10:
        # Half-constrained: two corners of the crop touch the longer side.
        x = 0.5 * short_side
        wr, hr = (x / sin_a, x / cos_a) if width_is_longer else (x / cos_a, x / sin_a)
    else:
        # Fully constrained: the crop touches all four sides.
        cos_2a = cos_a * cos_a - sin_a * sin_a
        wr = (width * cos_a - height * sin_a) / cos_2a
        hr = (height * cos_a - width * sin_a) / cos_2a
    return max(1, int(math.floor(wr))), max(1, int(math.floor(hr)))


def _centre_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    left = (image.width - width) // 2
    top = (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def random_view(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One seeded transformed view of ``image`` (returned as RGB; the input is not modified).

    A random subset (at least two) of these operations is applied, in this order:
    horizontal flip; rotation by -25..25 degrees (black corners cropped away); crop keeping
    60-95 % of each side at a random position; colour jitter (brightness, contrast and
    saturation factors 0.7-1.3, no hue change); Gaussian blur (radius 0-2 px); scale
    change (factor 0.6-1.4, LANCZOS); JPEG re-encoding at quality 30-90.
    Each side of the view is about 0.2-1.4 times the original's (at least 16 px), and the
    view shows at least ~35 % of each side of the scene, so it stays recognisably the same.
    Deterministic for a given ``rng`` state (``numpy.random.Generator``).
    """
    view = image.convert("RGB")
    ops = ("flip", "rotate", "crop", "colour", "blur", "scale", "jpeg")
    chosen = rng.random(len(ops)) < 0.5
    if chosen.sum() < 2:  # always at least two changes, so no view equals its original
        extra = rng.choice(np.flatnonzero(~chosen), size=2 - int(chosen.sum()), replace=False)
        chosen[extra] = True
    use = {op for op, on in zip(ops, chosen) if on}

    if "flip" in use:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    if "rotate" in use:
        angle = float(rng.uniform(-25.0, 25.0))
        rotated = view.rotate(angle, resample=Image.Resampling.BICUBIC, expand=False)
        w, h = _largest_inscribed(view.width, view.height, angle)
        w, h = min(w, view.width), min(h, view.height)
        view = _centre_crop(rotated, w, h)

    if "crop" in use:
        keep_w, keep_h = rng.uniform(0.60, 0.95, size=2)
        if "rotate" in use:  # rotation already removed border; crop less to keep the scene
            keep_w, keep_h = 0.5 + 0.5 * keep_w, 0.5 + 0.5 * keep_h
        w = max(16, int(round(view.width * keep_w)))
        h = max(16, int(round(view.height * keep_h)))
        w, h = min(w, view.width), min(h, view.height)
        left = int(rng.integers(0, view.width - w + 1))
        top = int(rng.integers(0, view.height - h + 1))
        view = view.crop((left, top, left + w, top + h))

    if "colour" in use:
        brightness, contrast, saturation = rng.uniform(0.7, 1.3, size=3)
        view = ImageEnhance.Brightness(view).enhance(float(brightness))
        view = ImageEnhance.Contrast(view).enhance(float(contrast))
        view = ImageEnhance.Color(view).enhance(float(saturation))

    if "blur" in use:
        view = view.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.0, 2.0))))

    if "scale" in use:
        factor = float(rng.uniform(0.6, 1.4))
        size = (max(16, int(round(view.width * factor))), max(16, int(round(view.height * factor))))
        view = view.resize(size, Image.Resampling.LANCZOS)

    if "jpeg" in use:
        buffer = io.BytesIO()
        view.save(buffer, format="JPEG", quality=int(rng.integers(30, 91)))
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            view = decoded.convert("RGB")

    return view


def _fit(image: Image.Image, max_side: int) -> Image.Image:
    """``image`` as RGB, downscaled (LANCZOS, aspect kept) so its longest side is <= ``max_side`` px."""
    image = image.convert("RGB")
    longest = max(image.size)
    if longest <= max_side:
        return image
    ratio = max_side / longest
    size = (max(1, round(image.width * ratio)), max(1, round(image.height * ratio)))
    return image.resize(size, Image.Resampling.LANCZOS)


def make_view_groups(
    names: Sequence[str], views_per_group: int, seed: int, max_side: int = 512
) -> list[tuple[str, list[Image.Image]]]:
    """Near-duplicate groups: ``[(name, [original, view 1, ..., view k-1]), ...]``.

    For each bundled photo name, the original downscaled so its longest side is at most
    ``max_side`` px (LANCZOS), then ``views_per_group - 1`` views from ``random_view``;
    views are also capped at ``max_side``. All images are RGB. Each group has its own
    random stream derived from ``(seed, name)``, so a group does not depend on which other
    names are asked for, and asking for more views only appends to a group.
    """
    if views_per_group < 1:
        raise ValueError(f"views_per_group must be >= 1, got {views_per_group}")
    if max_side < 16:
        raise ValueError(f"max_side must be >= 16 px, got {max_side}")
    groups: list[tuple[str, list[Image.Image]]] = []
    for name in names:
        original = _fit(load_bundled_photo(name), max_side)
        rng = np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8"))])
        images = [original]
        for _ in range(views_per_group - 1):
            images.append(_fit(random_view(original, rng), max_side))
        groups.append((name, images))
    return groups


def write_view_groups(
    groups: Sequence[tuple[str, Sequence[Image.Image]]], out_dir: str | Path, quality: int = 90
) -> list[Path]:
    """Write groups as JPEG files ``out_dir/<name>/original.jpg``, ``view-01.jpg``, ...

    The first image of each group is the original. ``quality`` is the JPEG quality (1-95).
    Folders are created as needed; existing files of the same name are replaced.
    Returns the written paths in order.
    """
    out_dir = Path(out_dir)
    paths: list[Path] = []
    for name, images in groups:
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise ValueError(f"group name must be a single path component, got {name!r}")
        group_dir = out_dir / name
        group_dir.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            path = group_dir / ("original.jpg" if index == 0 else f"view-{index:02d}.jpg")
            image.convert("RGB").save(path, format="JPEG", quality=int(quality))
            paths.append(path)
    return paths


# --------------------------------------------------------------------------- Fashion-MNIST

#: Debian package that ships the Fashion-MNIST idx files.
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"

#: Folders searched, in order, for the Fashion-MNIST idx files (``.gz`` or uncompressed).
FASHION_MNIST_DIRS: tuple[Path, ...] = (
    Path("/usr/share/datasets/fashion-mnist"),
    Path("/usr/share/dataset-fashion-mnist"),
    Path("/usr/local/share/datasets/fashion-mnist"),
)

#: Class names of labels 0-9.
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def _find_idx(stem: str) -> Path:
    """Path of ``<stem>`` or ``<stem>.gz`` in the first folder of ``FASHION_MNIST_DIRS`` holding it."""
    for folder in FASHION_MNIST_DIRS:
        for candidate in (Path(folder) / f"{stem}.gz", Path(folder) / stem):
            if candidate.is_file():
                return candidate
    searched = ", ".join(str(folder) for folder in FASHION_MNIST_DIRS)
    raise RetrievalError(
        f"Fashion-MNIST file {stem}[.gz] not found (searched {searched}); "
        f"install the Debian package {FASHION_MNIST_PACKAGE}: apt-get install -y {FASHION_MNIST_PACKAGE}"
    )


def _read_idx(path: Path) -> np.ndarray:
    """Array stored in an idx file (gzip or not): header magic ``0 0 <type> <ndim>``, then
    ``ndim`` big-endian uint32 sizes, then the data. Only unsigned bytes (type 0x08) are used
    by Fashion-MNIST and accepted here."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise RetrievalError(f"cannot read Fashion-MNIST file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise RetrievalError(f"{path} is not an idx file (bad magic number)")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != 0x08:
        raise RetrievalError(f"{path}: idx data type 0x{dtype_code:02x} is not unsigned byte (0x08)")
    header_len = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header_len:
        raise RetrievalError(f"{path}: truncated idx header")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = math.prod(shape)
    if len(raw) - header_len != count:
        raise RetrievalError(
            f"{path}: idx header promises {count} values of shape {shape} but {len(raw) - header_len} bytes follow"
        )
    return np.frombuffer(raw, dtype=np.uint8, count=count, offset=header_len).reshape(shape)


def load_fashion_mnist(
    split: str = "test", per_class: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST as ``(images, labels)``: uint8 ``[N, 28, 28]`` (0 = background) and int64 ``[N]`` in 0-9.

    ``split`` is ``"test"`` (10 000 images) or ``"train"`` (60 000). With ``per_class``,
    a balanced random subset of exactly ``per_class`` images per class, drawn with
    ``seed`` and returned in the dataset's original order. Class names are in
    ``FASHION_MNIST_CLASSES``. Files are searched in ``FASHION_MNIST_DIRS``; a missing
    file raises ``RetrievalError`` naming the Debian package ``dataset-fashion-mnist``.
    """
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prefix = _SPLIT_PREFIX[split]
    images = _read_idx(_find_idx(f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find_idx(f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise RetrievalError(
            f"Fashion-MNIST {split} files disagree: images {images.shape}, labels {labels.shape}"
        )
    labels = labels.astype(np.int64)
    if per_class is not None:
        if per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {per_class}")
        rng = np.random.default_rng(seed)
        picked = []
        for label in range(len(FASHION_MNIST_CLASSES)):
            members = np.flatnonzero(labels == label)
            if members.size < per_class:
                raise ValueError(f"class {label} has only {members.size} images in {split}, asked for {per_class}")
            picked.append(rng.choice(members, size=per_class, replace=False))
        index = np.sort(np.concatenate(picked))
        images, labels = images[index], labels[index]
    return np.ascontiguousarray(images), labels
