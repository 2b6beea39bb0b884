"""Safe image decoding and resizing: file or bytes in, RGB PIL image or uint8 array out.

Every failure (missing, unreadable, zero-byte, truncated, not an image, too many pixels, too many bytes) raises
``ImageError`` with a one-line reason; nothing here ever writes to disk. Pillow reads JPEG, PNG, BMP, GIF, WebP,
TIFF and AVIF itself; HEIC / HEIF (a phone's photos: an iPhone's default) through ``pi_heif`` (libheif, decoding
only), registered with Pillow at the first decode.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import struct
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

Loaded = TypeVar("Loaded")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".avif", ".heic", ".heif"})
MAX_PIXELS = 80_000_000  # width * height accepted before decoding; larger is treated as a decompression bomb
MAX_FILE_BYTES = 200 * 1024 * 1024

MAX_DECODE_BYTES = 320 * 2**20  # memory a decode may take: pixels x (bytes per pixel of the file's mode + 3 for RGB)
LARGE_DECODE_BYTES = 48 * 2**20  # decodes above this run at most two at a time (bounded peak memory under load)
GREY_BLOCK_ROWS = 512
EXIF_ORIENTATION = 0x0112  # the EXIF tag whose values 5..8 mean the image is stored a quarter turn from upright
MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "La": 2, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2,
              "I": 4, "F": 4, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3, "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4}
_large_decodes = threading.BoundedSemaphore(2)


def decode_bytes(mode: str, width: int, height: int) -> int:
    """Memory a decode into RGB takes at its peak: the decoded pixels plus their RGB copy (none for RGB itself)."""
    per_pixel = MODE_BYTES.get(mode, 8)
    return width * height * (per_pixel + (0 if mode == "RGB" else 3))


RESIZE_RULES = ("squash-bicubic", "aspect-bicubic", "squash-nearest")
"""How an image becomes the backbone's input, for an input size S.

``squash-bicubic`` (default): S x S with a bicubic filter, ignoring the aspect ratio (the classic recipe, done
properly). ``aspect-bicubic``: the longest side becomes S and the aspect ratio is kept (inputs of varying shape).
``squash-nearest``: what the reference demo did (Keras ``load_img`` with nearest neighbour); used only to encode queries
against databases written by that demo.
"""
MIN_SIDE = 32  # the shortest side an aspect-preserving resize may produce (one cell of a stride-32 backbone)


def is_image_name(name: str | os.PathLike) -> bool:
    """True when the file name has an image extension (case-insensitive)."""
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def list_image_files(root: str | os.PathLike) -> list[str]:
    """Relative POSIX paths of every image file under ``root``, recursively, in sorted order.

    Hidden files and folders (starting with a dot) are ignored; symlinked folders are not followed.
    """
    root = Path(root)
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [s for s in subfolders if not s.startswith(".")]
        rel_folder = Path(folder).relative_to(root)
        for name in files:
            if not name.startswith(".") and is_image_name(name):
                found.append((rel_folder / name).as_posix())
    return sorted(found)


def open_image(source: str | os.PathLike | bytes, *, draft_size: int | None = None) -> Image.Image:
    """Decode an image file or bytes into an RGB PIL image with its EXIF orientation applied.

    ``draft_size`` lets the JPEG decoder scale down by DCT while keeping both sides >= draft_size (much faster for
    large photos that will be resized anyway). Animated images give their first frame. ``image.info["source_size"]``
    holds the full-resolution (width, height) as displayed (after the EXIF rotation), whatever the draft did.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label = "upload"
        if not data:
            raise ImageError("empty image data", kind="invalid")
        if len(data) > MAX_FILE_BYTES:
            raise ImageError(f"image too large: {len(data)} bytes (limit {MAX_FILE_BYTES})", kind="too_large")
        stream: io.BufferedIOBase | io.BytesIO = io.BytesIO(data)
    else:
        path = Path(source)
        label = str(path)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ImageError(f"{label}: no such file", kind="not_found") from None
        except OSError as exc:
            raise ImageError(f"{label}: cannot read ({exc.strerror or exc})") from None
        if path.is_dir():
            raise ImageError(f"{label}: is a folder, not an image")
        if size == 0:
            raise ImageError(f"{label}: empty file", kind="invalid")
        if size > MAX_FILE_BYTES:
            raise ImageError(f"{label}: file too large ({size} bytes, limit {MAX_FILE_BYTES})", kind="too_large")
        try:
            stream = io.BytesIO(path.read_bytes())
        except OSError as exc:
            raise ImageError(f"{label}: cannot read ({exc.strerror or exc})") from None
    return _decode(stream, label, draft_size)


@functools.cache
def _register_heif() -> None:
    """Let Pillow open HEIC / HEIF files (``pi_heif``, once per process); without the package they stay unreadable.
    Only the primary picture is read: a phone's depth maps, auxiliary pictures and thumbnails are left alone."""
    with contextlib.suppress(ImportError):
        import pi_heif

        pi_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)


def image_format(data: bytes) -> str:
    """The format of an image file's bytes as Pillow names it (JPEG, PNG, HEIF, ...), read from its header without
    decoding the pixels. Raises ImageError for what is no image, or one with too many pixels."""
    with _opened(io.BytesIO(data), "image") as image:
        return image.format or ""


@contextlib.contextmanager
def _opened(stream: io.BytesIO, label: str) -> Iterator[Image.Image]:
    """The image in ``stream``, opened (its header read, nothing decoded) and checked for a size, inside the one
    translation of decoder failures into one-line ``ImageError``s, which covers the caller's decoding too."""
    _register_heif()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(stream) as image:
                width, height = image.size
                if width <= 0 or height <= 0:
                    raise ImageError(f"{label}: image has no pixels")
                if width * height > MAX_PIXELS:
                    raise ImageError(
                        f"{label}: too many pixels ({width}x{height}, limit {MAX_PIXELS}): possible decompression bomb",
                        kind="too_large",
                    )
                yield image
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not an image or unsupported format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{label}: too many pixels: possible decompression bomb", kind="too_large") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"{label}: corrupt or truncated image ({reason})") from None
    except MemoryError:
        raise ImageError(f"{label}: image needs too much memory to decode", kind="too_large") from None


def _decode(stream: io.BytesIO, label: str, draft_size: int | None) -> Image.Image:
    with _opened(stream, label) as image:
        width, height = image.size
        if draft_size and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        needed = decode_bytes(image.mode, *image.size)
        if needed > MAX_DECODE_BYTES:
            raise ImageError(
                f"{label}: image needs too much memory to decode ({image.size[0]}x{image.size[1]} {image.mode}, "
                f"{needed / 2**20:.0f} MB, limit {MAX_DECODE_BYTES / 2**20:.0f} MB)",
                kind="too_large",
            )
        with _large_decodes if needed > LARGE_DECODE_BYTES else contextlib.nullcontext():
            image.load()
            turned = image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)  # a quarter turn swaps the sides
            image = _to_rgb(ImageOps.exif_transpose(image))
            image.info["source_size"] = (height, width) if turned else (width, height)
            return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on white, 16/32-bit grey is rescaled to 0..255."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(image)
        low, high = float(values.min()), float(values.max())
        grey = np.zeros(values.shape, dtype=np.uint8)
        if high > low:
            scale = np.float32(255.0 / (high - low))
            for start in range(0, values.shape[0], GREY_BLOCK_ROWS):  # float32 a block of rows at a time
                block = values[start : start + GREY_BLOCK_ROWS].astype(np.float32)
                grey[start : start + GREY_BLOCK_ROWS] = np.clip(np.rint((block - np.float32(low)) * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_for_backbone(image: Image.Image, size: int, rule: str = "squash-bicubic") -> np.ndarray:
    """RGB image -> uint8 array (H, W, 3) following one of ``RESIZE_RULES`` (S x S, or longest side S)."""
    if rule == "squash-bicubic":
        resized = image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    elif rule == "aspect-bicubic":
        scale = size / max(image.size)
        target = tuple(max(MIN_SIDE, round(side * scale)) for side in image.size)
        resized = image.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
    elif rule == "squash-nearest":
        resized = image.resize((size, size), Image.Resampling.NEAREST)
    else:
        raise ValueError(f"unknown resize rule {rule!r}; choose from {', '.join(RESIZE_RULES)}")
    return np.asarray(resized, dtype=np.uint8)


def load_for_backbone(source: str | os.PathLike | bytes, size: int, rule: str = "squash-bicubic") -> np.ndarray:
    """Decode and resize in one step: file or bytes -> uint8 array (H, W, 3)."""
    return load_sized_for_backbone(source, size, rule)[0]


def load_sized_for_backbone(
    source: str | os.PathLike | bytes, size: int, rule: str = "squash-bicubic"
) -> tuple[np.ndarray, tuple[int, int]]:
    """Like ``load_for_backbone``, with the image's full-resolution (width, height) as displayed."""
    draft = None if rule == "squash-nearest" else size
    image = open_image(source, draft_size=draft)
    return resize_for_backbone(image, size, rule), image.info["source_size"]


def prefetched_batches(
    paths: Sequence, load: Callable[[object], Loaded], batch_size: int, workers: int = 2
) -> Iterator[tuple[int, list[tuple[Loaded | None, ImageError | None]]]]:
    """(first row, [(loaded, None) or (None, ImageError)] * batch) for consecutive batches of ``paths``, in order.

    ``load`` runs on ``workers`` threads up to three batches ahead of the consumer (bounded memory, enough to keep a
    model busy); an ImageError it raises becomes that file's entry and never stops the run.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")

    def guarded(path):
        try:
            return load(path), None
        except ImageError as exc:
            return None, exc

    window = batch_size * 3
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending = [pool.submit(guarded, p) for p in paths[:window]]
        submitted = len(pending)
        for start in range(0, len(paths), batch_size):
            results = [future.result() for future in pending[:batch_size]]
            pending = pending[batch_size:]
            while submitted < len(paths) and len(pending) < window:
                pending.append(pool.submit(guarded, paths[submitted]))
                submitted += 1
            yield start, results
