"""Impulse noise over a query: pixels swapped for others at random (AugLy's ``shuffle_pixels``, one of DISC21's
edits; salt-and-pepper noise), found and filtered out. uint8 RGB in, uint8 out; numpy and OpenCV.

Each swapped pixel is a dot of a colour unrelated to its neighbours. Thousands of them give the query's SIFT
thousands of tiny blobs (the strongest keypoints at the finest scale, none of them in the original) and move its CNN
descriptor, so a shuffled copy of a smooth picture was neither verified nor ranked near its original
(bench/augly_edits.py), and over a screenshot they hide the page's flat background from the page detector. A 3 x 3
median removes such dots and keeps edges; the page and inset detectors then read the filtered query, which is
searched as one more whole view and verified with too (``RetrievalEngine.query_features``).

What counts as an impulse: a pixel more than ``IMPULSE_CONTRAST`` grey levels (largest channel) from its 3 x 3 median,
where the median picture is flat (its 3 x 3 range under ``FLAT_RANGE``): a dot on a smooth area, not the texture of
grass, stars or a sharpened photo. A picture with ``MIN_SHARE`` of its pixels such dots has impulse noise.
Measured at the size a query's SIFT reads (at most 1,280 px): 6 of the copy-detection sets' 1,120 database images
(seeds 0 and 1; 99 % under 0.53 %, the most 2.8 %: textures) and none of their 840 protocol queries or of the 49 demo
pictures reach it; 42 of the 55 shuffled queries of bench/augly_edits.py do (5-25 % of the pixels shuffled, often
with other edits; up to 9.3 %), and so do dithered palettes and heavy Gaussian noise (48 of its 425 other queries,
35 of bench/chained_edits.py's 480, all with noise, and 112 of bench/unseen_edits.py's 2,640: 110 noisy, 2 tiny
thumbnails), which is why the filtered picture is searched beside the query, never instead of it.
"""

from __future__ import annotations

import numpy as np

from .occlusion import largest_channel

IMPULSE_CONTRAST = 40  # grey levels (largest channel): a dot is further than this from its 3 x 3 median
FLAT_RANGE = 24  # grey levels: the median picture's largest 3 x 3 range (largest channel) around a dot
MIN_SHARE = 0.008  # of the pixels: a picture with at least this many dots has impulse noise
MIN_SIDE = 8


def impulse_share(pixels: np.ndarray) -> float:
    """uint8 RGB (H, W, 3) -> the share of its pixels that are impulses (see the module docstring), 0..1."""
    import cv2

    pixels = np.ascontiguousarray(pixels)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or min(pixels.shape[:2]) < MIN_SIDE:
        return 0.0
    median = cv2.medianBlur(pixels, 3)
    square = np.ones((3, 3), np.uint8)
    contrast = largest_channel(cv2.absdiff(pixels, median))
    spread = largest_channel(cv2.subtract(cv2.dilate(median, square), cv2.erode(median, square)))
    dots = cv2.bitwise_and(cv2.compare(contrast, IMPULSE_CONTRAST, cv2.CMP_GT), cv2.compare(spread, FLAT_RANGE, cv2.CMP_LT))
    return cv2.countNonZero(dots) / contrast.size


def despeckled(pixels: np.ndarray) -> np.ndarray | None:
    """uint8 RGB (H, W, 3) -> its 3 x 3 median (uint8 RGB, the same shape) when it has impulse noise, else None."""
    import cv2

    if impulse_share(pixels) < MIN_SHARE:
        return None
    return cv2.medianBlur(np.ascontiguousarray(pixels), 3)
