"""Local features for geometric verification: SIFT keypoints in a compact, bounded form. Images in, arrays out.

The SIFT is OpenCV's, computed by ``sift`` with less work for the same keypoints and descriptors: OpenCV's scale
space (its own calls), only the strongest extrema oriented, only the kept keypoints described, and the extremum
pre-threshold at ``PRETHRESHOLD`` (half the contrast floor, unrounded; OpenCV rounds it down to 0 at this floor and
refines ~98,000 faint extrema per 512 px picture to keep ~550). On the 980 pictures of the copy-detection set the
keypoints are OpenCV's but 17 of 283,717 (27 of 503,249 as queries), each descriptor equal to OpenCV's or one
rounding apart (tests/test_sift.py); it takes 0.61x OpenCV's time as a database picture (17 against 28 ms on one
core) and 0.60x as a query (21 against 35 ms; ``python -m bench.sift`` on an Intel Xeon without AMX).

One image gives ``LocalFeatures``: at most ``max_keypoints`` keypoints, each with

* ``keypoints`` float16 (n, 4): x, y (pixels of the image resized to ``max_side`` on its longest side), size, angle;
* ``descriptors`` uint8 (n, 128): RootSIFT (Arandjelović & Zisserman 2012: OpenCV's SIFT descriptor L1-normalised
  and square-rooted, which compares better than raw SIFT), a unit vector stored as ``round(255 * value)``.

Detection keeps DoG extrema down to a quarter of OpenCV's default contrast (``CONTRAST_THRESHOLD``): only the
strongest are kept either way, so a textured picture keeps its strong keypoints, while a low-contrast one (a smooth
wallpaper, a dim photo) gets keypoints at all. At the default, 20 of the 60 originals of the copy-detection set
had fewer than 60 keypoints (three had none), and every copy the preset missed was one of theirs.

Keypoints are kept spread over the picture: of the strongest (``QUERY_DETECT_FACTOR`` x the kept count for a query,
``DATABASE_DETECT_FACTOR`` x for a database image), the strongest of each cell of a ``GRID`` x ``GRID`` grid in
turn, so the frame of a screenshot or a caption cannot take them all. A database image asks for 2x, not 4x: when
OpenCV described every keypoint it returned, 4x cost 11 % more indexing time on photo-sized files for the same
scores on the copy-detection set (mAP 0.985, all-vs-all 0.892 / P@1 0.935); with 1x (SIFT's strongest 256, no
choice) all-vs-all fell to 0.887 / 0.921. Only the kept keypoints are described.

A database image keeps keypoints at every scale: at least ``COARSE_KEYPOINTS`` (64) of SIFT's coarse octaves
(``COARSE_OCTAVE`` and up: the picture at half its size and smaller, keypoints of ~7 px and more at
``DATABASE_SIDE``), where it has them, the strongest of them spread over the grid as above; then the rest as above.
The strongest keypoints of a picture are mostly fine ones (of the 85,300 stored for the 560 references of the
copy-detection set's seed 1 before, 61 % were under 4 px and 8.5 % 11 px or more; a wallpaper of long strings kept 5
of its 256 at 11 px or more), and a copy shown at a sixth of the size can only show keypoints of six times the finest
size (11 px): such a copy of a photo found nothing to match. The coarse ones are the strongest of those octaves'
extrema, oriented apart (the extrema are found once). Measured on 12 photos of the demo database, each searched at 64
px wide against their 512 px originals: 5 verified before, 10 with 64 coarse keypoints (at 96 px: 9 and 11); on the
chained edits of ``bench/`` (seed 0) mAP 0.898 -> 0.905, on AugLy's (seed 1, copies scaled to 15-35 % among them)
0.891 -> 0.900. With 128 of the 256 coarse, copies matched by their fine keypoints were lost (see the README).

A database image stores ``DATABASE_KEYPOINTS`` (256) of them: 256 x (128 + 8) bytes = 34.8 KB per image. A query is
not stored and keeps up to ``QUERY_KEYPOINTS`` (512) at a larger ``QUERY_SIDE`` (640), so the photo inside a
screenshot still gets keypoints of its own. An elongated query (several pictures side by side: at least
``regions.STRIP_ELONGATION`` times as long as it is deep) is sized by its area instead, to ``QUERY_PIXELS`` (a 4:3
picture's at ``QUERY_SIDE``) with its longest side at most twice ``QUERY_SIDE``: at 640 px wide, each picture of a
1524 x 360 three-picture collage was 151 px high against the database's 341, and its copy got 44 inliers that
covered too little of its keypoints to count (hull density 0.20); at 1140 x 269, 101 inliers (density 0.58). The
mirrored query is the same image flipped left-right: the keypoints found once, mirrored (x -> W - 1 - x, angle ->
180 - angle), their descriptors mirrored too (``mirrored``). A SIFT descriptor is not mirror-invariant, but in the
mirrored keypoint's frame the flip turns the patch upside down: its 4 x 4 cells swap rows and each cell's 8
gradient orientations o -> -o, a fixed permutation of the 128 bins (``MIRROR_ORDER``). Describing the flipped
pixels again gives the same vectors to a cosine of 0.997 (median; 0.989 at the 5th percentile, on the copy-detection
set's queries: OpenCV's orientation estimate is not exactly symmetric), for a third of the query's SIFT time.

A page around a picture (a screenshot: ``regions.content_boxes``) gets its picture's keypoints, in the database as
in a query: the template around the picture (menus, a post's header, icons) is the same in unrelated screenshots.
Stored with the whole page's, a screenshot searched by its id matched every screenshot of its template (all-vs-all
screenshot AP 0.41; with its picture's, and the post header cut from its box, 0.87).

A database image's and a query's features also carry colour thumbnails (``thumbnails``: 32 px, at most 3 KB each),
for the photometric check of the copies SIFT finds nothing in (``retrieval.search.photometric``): a database image's
whole picture and, for a page around a picture (a screenshot), that picture's too; a query's picture as it is
searched (a screenshot's picture).

OpenCV and numba are imported on first use, so a database without local features never needs them.

SIFT's scale space of one 512 px image is ~30 MB of float32 layers (the doubled first octave). glibc hands such
blocks back to the system when they are freed, and every image then page-faults them in again: with two extraction
threads that cost more system time than SIFT's own arithmetic (measured: 560 images, 16.3 s -> 6.6 s wall, 2.7 M ->
0.04 M minor faults). So on first use the process keeps freed memory up to ``KEEP_FREED_BYTES`` for reuse
(``mallopt``; nothing happens where the C library is not glibc).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading
from dataclasses import dataclass, replace

import numpy as np

from .regions import STRIP_ELONGATION
from .thumbnails import colour_thumbnail

DATABASE_SIDE = 512
DATABASE_KEYPOINTS = 256
QUERY_SIDE = 640
QUERY_PIXELS = 640 * 480  # ... or this many pixels where QUERY_SIDE leaves fewer (an elongated query: see the docstring)
QUERY_KEYPOINTS = 512
GRID = 4  # keypoints are chosen round-robin over GRID x GRID cells, strongest first in each
QUERY_DETECT_FACTOR = 4  # a query asks SIFT for this many times the kept count, before the spread-out choice
DATABASE_DETECT_FACTOR = 2  # and a database image (see the module docstring)
COARSE_OCTAVE = 2  # SIFT's octave of the picture at half its size (0: upsampled 2x): keypoints of ~7 px and more
COARSE_KEYPOINTS = 64  # a database image keeps at least this many of that octave and coarser, where it has them
CONTRAST_THRESHOLD = 0.01  # SIFT's DoG contrast floor: a quarter of OpenCV's 0.04, so smooth wallpapers get keypoints
PRETHRESHOLD = 0.5 * CONTRAST_THRESHOLD / 3 * 255  # grey levels of DoG an extremum needs to be refined (see the docstring)
MIN_SIDE = 16  # a picture narrower than this has no keypoints
DESCRIPTOR_BYTES = 128
KEYPOINT_FIELDS = 4  # x, y, size, angle
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest: blocks below it come from the heap, not from a fresh mapping
KEEP_FREED_BYTES = 256 << 20  # freed heap kept for reuse before it is returned to the system
# OpenCV's descriptor bin (row * 4 + column) * 8 + orientation -> the bin it moves to when the picture is mirrored
MIRROR_ORDER = np.array([((3 - row) * 4 + column) * 8 + (8 - orientation) % 8
                         for row in range(4) for column in range(4) for orientation in range(8)])


@dataclass(frozen=True)
class LocalFeatures:
    """The local features of one image (see the module docstring); ``size`` is (width, height) of the resized image
    the coordinates refer to; ``thumbnails`` the colour thumbnails of the image, each uint8 (h, w, 3) with
    max(h, w) = ``thumbnails.THUMBNAIL_SIDE`` (empty: not made, as in older files)."""

    keypoints: np.ndarray  # float16 (n, 4)
    descriptors: np.ndarray  # uint8 (n, 128)
    size: tuple[int, int]
    thumbnails: tuple[np.ndarray, ...] = ()

    def __len__(self) -> int:
        return int(self.descriptors.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.keypoints.nbytes + self.descriptors.nbytes + sum(t.nbytes for t in self.thumbnails))

    @classmethod
    def empty(cls, size: tuple[int, int] = (0, 0)) -> "LocalFeatures":
        return cls(np.zeros((0, KEYPOINT_FIELDS), np.float16), np.zeros((0, DESCRIPTOR_BYTES), np.uint8), size)


def _grey(image: np.ndarray, max_side: int, min_pixels: int = 0) -> tuple[np.ndarray, float]:
    """uint8 RGB (H, W, 3) -> uint8 grey resized (area filter) so its longest side is at most ``max_side``, or, for
    an elongated picture (``STRIP_ELONGATION``) where that leaves fewer than ``min_pixels`` pixels, to about
    ``min_pixels`` with its longest side at most twice ``max_side``; never enlarged. Returns it and the scale."""
    import cv2

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
    grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    height, width = grey.shape
    longest = max(height, width)
    scale = min(1.0, max_side / longest)
    if longest >= STRIP_ELONGATION * min(height, width):
        scale = min(1.0, max(scale, min(np.sqrt(min_pixels / (height * width)), 2 * max_side / longest)))
    if scale < 1.0:
        grey = cv2.resize(grey, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)
    return grey, scale


def spread_choice(points: np.ndarray, responses: np.ndarray, size: tuple[int, int], count: int, grid: int = GRID) -> np.ndarray:
    """Indices of ``count`` keypoints spread over a ``grid`` x ``grid`` cell grid: the strongest of every non-empty
    cell, then the second strongest of each, and so on. ``points`` (n, 2) x, y; ``responses`` (n,)."""
    n = len(points)
    if n <= count:
        return np.argsort(-responses, kind="stable")
    width, height = size
    cx = np.minimum((points[:, 0] * grid / max(width, 1)).astype(int), grid - 1)
    cy = np.minimum((points[:, 1] * grid / max(height, 1)).astype(int), grid - 1)
    cell = cy * grid + cx
    order = np.lexsort((-responses, cell))  # by cell, strongest first inside each cell
    sorted_cells = cell[order]
    starts = np.searchsorted(sorted_cells, sorted_cells, side="left")
    rank_in_cell = np.arange(n) - starts
    chosen = order[np.lexsort((-responses[order], rank_in_cell))][:count]
    return chosen


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks for reuse instead of returning them (see the module docstring), once per process;
    whether it could (False: not glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        set_option = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(set_option(m_mmap_threshold, MMAP_THRESHOLD_BYTES)) and bool(set_option(m_trim_threshold, KEEP_FREED_BYTES))


def scale_balanced_choice(points: np.ndarray, responses: np.ndarray, coarse: np.ndarray, size: tuple[int, int],
                          count: int, coarse_count: int) -> np.ndarray:
    """Indices of ``count`` keypoints: ``spread_choice`` of up to ``coarse_count`` of those ``coarse`` (bool (n,))
    marks, then of the others. ``points`` (n, 2) x, y; ``responses`` (n,)."""
    coarse_count = min(coarse_count, count)
    first = np.flatnonzero(coarse)
    first = first[spread_choice(points[first], responses[first], size, coarse_count)[:coarse_count]]
    rest = np.setdiff1d(np.arange(len(points)), first)
    rest = rest[spread_choice(points[rest], responses[rest], size, count - len(first))[: count - len(first)]]
    return np.concatenate([first, rest])


def _detect_described(grey: np.ndarray, max_keypoints: int, detect_factor: int, coarse: int = 0) -> LocalFeatures:
    """The ``detect_factor`` x ``max_keypoints`` strongest SIFT keypoints (``sift.detect``: OpenCV's), and the
    ``coarse`` strongest of the octaves from ``COARSE_OCTAVE`` on (of the same extrema), of which
    ``scale_balanced_choice`` keeps ``max_keypoints``, ``coarse`` of them coarse where it can; only those are
    described."""
    from . import sift

    keep_freed_memory()
    size = (int(grey.shape[1]), int(grey.shape[0]))
    if min(size) < MIN_SIDE:
        return LocalFeatures.empty(size)
    space = sift.scale_space(grey)
    extrema = sift.extrema(space, CONTRAST_THRESHOLD, PRETHRESHOLD)
    found = sift.strongest(space, extrema, max_keypoints * detect_factor)
    if coarse:
        found = found.union(sift.strongest(space, extrema[extrema[:, sift.EXTREMUM_OCTAVE] >= COARSE_OCTAVE], coarse))
    if not len(found):
        return LocalFeatures.empty(size)
    chosen = scale_balanced_choice(found.table[:, :2], found.response, found.octave >= COARSE_OCTAVE, size, max_keypoints, coarse)
    kept = found.take(chosen)
    quantized = np.clip(np.rint(root_sift(sift.describe(space, kept)) * 255.0), 0, 255).astype(np.uint8)
    return LocalFeatures(kept.table.astype(np.float16), quantized, size)


def mirrored(features: LocalFeatures) -> LocalFeatures:
    """The local features of the picture flipped left-right (no thumbnails): x -> W - 1 - x, angle -> 180 - angle
    (degrees), each descriptor's bins permuted by ``MIRROR_ORDER`` (see the module docstring)."""
    table = features.keypoints.astype(np.float32)
    table[:, 0] = features.size[0] - 1 - table[:, 0]
    table[:, 3] = (180.0 - table[:, 3]) % 360.0
    return LocalFeatures(table.astype(np.float16), np.ascontiguousarray(features.descriptors[:, MIRROR_ORDER]), features.size)


def prepare_sift(background: bool = False) -> None:
    """Import numba and load (or, the first time, compile) the SIFT kernels now (~0.7 s from numba's cache) rather
    than in the first picture's SIFT; ``background``: on a daemon thread, beside the model's loading."""
    if background:
        threading.Thread(target=prepare_sift, name="sift-warm-up", daemon=True).start()
        return
    from .sift import warm_up  # imports numba

    warm_up()


def extract_local_features(
    image: np.ndarray, max_side: int = DATABASE_SIDE, max_keypoints: int = DATABASE_KEYPOINTS, picture: np.ndarray | None = None,
) -> LocalFeatures:
    """uint8 RGB (H, W, 3) -> ``LocalFeatures`` with at most ``max_keypoints`` SIFT keypoints (none for a flat image)
    and the colour thumbnails of the image and of ``picture`` (the picture inside a page, when it is one). The
    keypoints are the picture's when there is one, as a query that is a page is verified with its picture's: the
    frame of a screenshot template is shared by unrelated screenshots, so its keypoints are no evidence of a copy."""
    grey, _ = _grey(image if picture is None else picture, max_side)
    features = _detect_described(grey, max_keypoints, DATABASE_DETECT_FACTOR, COARSE_KEYPOINTS)
    pictures = (image,) if picture is None else (image, picture)
    return replace(features, thumbnails=tuple(colour_thumbnail(p) for p in pictures))


def query_local_features(image: np.ndarray) -> tuple[LocalFeatures, LocalFeatures]:
    """A query's local features (with its colour thumbnail) and those of its mirror image (``mirrored``; no
    thumbnail: the photometric check compares the picture as it is), at the query resolution."""
    grey, _ = _grey(image, QUERY_SIDE, QUERY_PIXELS)
    direct = _detect_described(grey, QUERY_KEYPOINTS, QUERY_DETECT_FACTOR)
    return replace(direct, thumbnails=(colour_thumbnail(image),)), mirrored(direct)


def as_root_sift(descriptors: np.ndarray) -> np.ndarray:
    """Stored uint8 RootSIFT (..., 128) -> float32 unit rows (approximately: quantised)."""
    return np.asarray(descriptors, np.float32) * np.float32(1.0 / 255.0)


def root_sift(descriptors: np.ndarray) -> np.ndarray:
    """uint8 / float SIFT (n, 128) -> float32 RootSIFT: L1-normalised, square-rooted (unit L2 rows; zero rows stay 0)."""
    values = np.asarray(descriptors, np.float32)
    total = values.sum(axis=1, keepdims=True)
    return np.sqrt(values / np.maximum(total, 1e-12))
