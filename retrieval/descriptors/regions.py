"""Regional descriptors for copy detection: several vectors per image besides its global one. Pure numpy, no Keras.

Two kinds, one per side (the search is asymmetric, ``retrieval.search.regions``):

* **database regions** (stored): the MAC of every R-MAC region of level 2 of the image's own conv map (the map the
  global descriptor is pooled from, so they cost no extra forward pass): 4 boxes of 4 x 4 cells on EfficientNet-
  Lite0's 7 x 7 map at 224 px (a third of the picture each, overlapping), up to 6 on an aspect-preserving map,
  bounded by ``MAX_DATABASE_REGIONS`` (8); 10 KB per image in float16 at 1280-d. A small crop of a database image (the query) meets the region it was cut from.
* **query windows** (computed per query, never stored): ``QUERY_WINDOWS`` boxes of the query picture, each resized and
  encoded like a whole image (one batched forward pass). The photo pasted into a screenshot, or the original inside
  a padded and rotated copy, meets the database image's global descriptor.

Both are L2-normalised like every descriptor; whitening, when the database has one, applies to them too.
"""

from __future__ import annotations

import numpy as np

from ..vectors import l2_normalize
from . import pooling

DATABASE_REGION_LEVELS = (2,)
MAX_DATABASE_REGIONS = 8

# query windows as (x0, y0, width, height), fractions of the picture's width and height: a 2 x 2 grid of windows
# 0.6 wide and a 3 x 3 grid of windows 0.45 wide (neighbours overlap), as in the multi-scale grids of regional search
QUERY_WINDOWS: tuple[tuple[float, float, float, float], ...] = tuple(
    [(x, y, 0.6, 0.6) for y in (0.0, 0.4) for x in (0.0, 0.4)]
    + [(x, y, 0.45, 0.45) for y in (0.0, 0.275, 0.55) for x in (0.0, 0.275, 0.55)]
)


def database_region_boxes(height: int, width: int) -> list[tuple[int, int, int, int]]:
    """(y, x, h, w) boxes on an ``height`` x ``width`` conv map: R-MAC levels ``DATABASE_REGION_LEVELS``, at most
    ``MAX_DATABASE_REGIONS``; none when the map is too small for regions smaller than itself."""
    top = max(DATABASE_REGION_LEVELS)
    boxes = []
    for level, box in _levelled(height, width, top):
        if level in DATABASE_REGION_LEVELS and (box[2] < height or box[3] < width):
            boxes.append(box)
    return boxes[:MAX_DATABASE_REGIONS]


def _levelled(height: int, width: int, levels: int):
    """``pooling.rmac_regions`` with each box's level."""
    boxes = pooling.rmac_regions(height, width, levels)
    sides = sorted({box[2] for box in boxes}, reverse=True)
    level_of_side = {side: i + 1 for i, side in enumerate(sides)}
    return [(level_of_side[box[2]], box) for box in boxes]


def region_vectors(feature_maps: np.ndarray) -> list[np.ndarray]:
    """Conv maps (N, H, W, C) -> per image float32 (R, C) L2-normalised region MACs (R may be 0 for tiny maps)."""
    maps = np.asarray(feature_maps, dtype=np.float32)
    boxes = database_region_boxes(maps.shape[1], maps.shape[2])
    if not boxes:
        return [np.zeros((0, maps.shape[3]), np.float32) for _ in range(maps.shape[0])]
    stacked = np.stack([maps[:, y : y + h, x : x + w, :].max(axis=(1, 2)) for y, x, h, w in boxes], axis=1)  # (N, R, C)
    return [l2_normalize(per_image) for per_image in stacked]


def window_boxes(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """The query windows of a ``width`` x ``height`` picture as PIL crop boxes (left, top, right, bottom)."""
    boxes = []
    for x0, y0, w, h in QUERY_WINDOWS:
        left, top = round(x0 * width), round(y0 * height)
        right, bottom = min(width, round((x0 + w) * width)), min(height, round((y0 + h) * height))
        if right - left >= 8 and bottom - top >= 8:
            boxes.append((left, top, right, bottom))
    return boxes
