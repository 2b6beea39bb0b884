"""Colour thumbnails for the photometric check of copy search: a picture's layout of colours at ``THUMBNAIL_SIDE``
pixels on its longest side. Numpy in, numpy out.

SIFT finds nothing to match in a smooth or blurred picture (a misty wallpaper, a motion-blurred photo): its copies
(a caption over a JPEG re-save, a pixelized or cropped version) keep no keypoints, and their global descriptors rank
a few look-alikes above them. What such a copy does keep is its layout of colours, which a 32 px thumbnail holds in
3 KB at most (``retrieval.search.photometric`` compares two of them).
"""

from __future__ import annotations

import numpy as np

THUMBNAIL_SIDE = 32  # pixels on the longest side


def colour_thumbnail(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> uint8 RGB (h, w, 3) with max(h, w) = ``THUMBNAIL_SIDE`` (area filter; each side >= 1)."""
    import cv2

    pixels = np.asarray(pixels)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image (H, W, 3), got {pixels.dtype} {pixels.shape}")
    height, width = pixels.shape[:2]
    scale = THUMBNAIL_SIDE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(pixels), size, interpolation=interpolation)
