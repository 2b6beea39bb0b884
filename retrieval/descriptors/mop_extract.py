"""The material MOP encodes (``retrieval.descriptors.mop.Material``), made with an extractor's forward pass.

``mop`` (Gong et al. 2014, adapted to a fully convolutional backbone at a 224 input):

* level 1: the whole image (as the database's resize rule gives it, 224 x 224 by default), max-pooled (MAC) conv map;
* level 2: windows of half the image's height and width at a stride of 1/8 of them: 5 x 5 = 25 windows (the paper:
  128-pixel patches of a 256-pixel image at stride 32, the same 25);
* level 3: windows of a quarter of the sides at the same stride: 7 x 7 = 49 windows (the paper: 64 pixels, 49);
* every window is fed to the backbone at its own size (112 and 56 pixels) and max-pooled. The paper resizes every
  patch to the network's fixed 227-pixel input because its fc7 layer needs that size; our backbone is fully
  convolutional, and upsampling 74 patches to 224 would cost 75 forward passes at 224 per image (about 5 s per image
  on this project's 2-core reference machine, against about 0.6 s at native size).

``mop-fast``: level 1 is the MAC of the image at the input size; level 2 VLAD-encodes the columns of that same conv map
(7 x 7 = 49 local descriptors at 224), level 3 the columns of the conv map of the image upscaled by ``fast_scale``
(2: 448 pixels, 14 x 14 = 196); two forward passes per image in all.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .mop import Material

FULL_GRID = ((2, 8), (4, 8))  # (window = side / a, stride = side / b) for levels 2 and 3: 5 x 5 and 7 x 7 windows
PATCH_BATCH = 64  # windows per forward pass

FeatureMaps = Callable[[np.ndarray], np.ndarray]  # uint8 (N, H, W, 3) -> float32 (N, h, w, C)


def window_boxes(height: int, width: int, fraction: int, stride_fraction: int) -> list[tuple[int, int, int, int]]:
    """(y, x, h, w) windows of ``height / fraction`` x ``width / fraction`` at a stride of ``1 / stride_fraction`` of
    the sides, covering the image edge to edge (the last window touches the far edge). Rows outer, columns inner."""
    h, w = max(1, height // fraction), max(1, width // fraction)
    count = stride_fraction - stride_fraction // fraction + 1  # 8 - 4 + 1 = 5 for halves, 8 - 2 + 1 = 7 for quarters

    def corners(size: int, side: int) -> list[int]:
        return [round(i * (size - side) / (count - 1)) for i in range(count)] if count > 1 else [0]

    return [(y, x, h, w) for y in corners(height, h) for x in corners(width, w)]


def _mac_of(forward: FeatureMaps, crops: list[np.ndarray]) -> np.ndarray:
    """MAC of every crop (all of one shape), in batches of PATCH_BATCH. -> float32 (n, C)."""
    out = []
    for start in range(0, len(crops), PATCH_BATCH):
        maps = forward(np.stack(crops[start : start + PATCH_BATCH]))
        out.append(maps.max(axis=(1, 2)))
    return np.concatenate(out).astype(np.float32)


def full_material(forward: FeatureMaps, images: Sequence[np.ndarray]) -> Material:
    """``mop`` material of uint8 (H, W, 3) images of one shape: MAC of the image and of every window of levels 2, 3."""
    batch = np.stack(images)
    count, height, width = batch.shape[:3]
    global_ = _mac_of(forward, list(batch))
    local = []
    for fraction, stride_fraction in FULL_GRID:
        boxes = window_boxes(height, width, fraction, stride_fraction)
        crops = [image[y : y + h, x : x + w] for image in batch for (y, x, h, w) in boxes]
        local.append(list(_mac_of(forward, crops).reshape(count, len(boxes), -1)))
    return Material(global_, local)


def fast_material(forward: FeatureMaps, images: Sequence[np.ndarray], rescale, fast_scale: float) -> Material:
    """``mop-fast`` material of uint8 images of one shape: the conv map at the input size gives level 1 (MAC) and level 2
    (its columns), the map of the image scaled by ``fast_scale`` gives level 3 (its columns)."""
    batch = np.stack(images)
    maps = forward(batch)
    count, channels = maps.shape[0], maps.shape[3]
    fine = forward(np.stack([rescale(image, fast_scale) for image in batch]))
    return Material(maps.max(axis=(1, 2)), [list(maps.reshape(count, -1, channels)), list(fine.reshape(count, -1, channels))])


def material(method: str, forward: FeatureMaps, images: Sequence[np.ndarray], rescale, params: dict) -> Material:
    """The material of ``method`` ("mop" or "mop-fast") for uint8 images of any shapes, in input order (images of
    one shape share forward passes)."""
    if method not in ("mop", "mop-fast"):
        raise ValueError(f"no MOP material for pooling {method!r}")
    groups: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(image.shape, []).append(i)
    parts, order = [], []
    for rows in groups.values():
        chosen = [images[i] for i in rows]
        if method == "mop":
            parts.append(full_material(forward, chosen))
        else:
            parts.append(fast_material(forward, chosen, rescale, float(params["fast_scale"])))
        order += rows
    merged = parts[0] if len(parts) == 1 else Material.concatenate(parts)
    return merged.take(list(np.argsort(order))) if len(parts) > 1 else merged
