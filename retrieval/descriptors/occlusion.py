"""Overlays that hide part of a query: opaque parallel stripes of one colour (AugLy's ``overlay_stripes``, one of
DISC21's occlusion edits), found and filled in. uint8 RGB in, uint8 out; pure numpy and OpenCV.

A striped copy shows its picture through bands between the stripes. The stripes' sharp, high-contrast edges take
the query's strongest SIFT keypoints (the spread-out choice gives each grid cell's strongest to them) and dominate its
CNN descriptor, so a striped copy of a smooth or blurred picture was neither verified nor ranked near its original
(bench/chained_edits.py). ``stripe_mask`` finds such stripes and ``unveiled`` replaces them by a smooth fill from the
picture around them; the query is then verified with the filled picture's keypoints and searched with its descriptor
too (``RetrievalEngine.query_features``).

What counts as stripes (measured at ``DETECT_SIDE`` px): flat pixels (colour spread under ``FLAT_SPREAD`` grey
levels in a 5 x 5 window) of one colour covering ``MIN_COVER``..``MAX_COVER`` of the picture, whose edges run one way
(gradient coherence >= ``MIN_COHERENCE``), forming at least ``MIN_BANDS`` bands that each cross the picture (picture
on both sides: the wedges of a rotated, padded copy are not stripes), are straight and as wide all along (spread of
its width under ``MAX_WIDTH_SPREAD``), and as wide as one another (within ``MAX_WIDTH_RATIO``). Noise laid over
the stripes leaves no pixel flat: a picture whose noise (``noise_level``) exceeds ``NOISE_LEVEL`` and where none are
found is looked at again through a median and a Gaussian blur. The mask is widened by ``edge_margin``: as far as the
stripes' colour bleeds into the picture beyond the flat bands, 2 px for sharp edges (the flatness window's
half-width), up to 6 where a blur or pixel blocks came after the stripes (a rim left unfilled kept their colour, and
the filled picture's keypoints and descriptor were the rim's). Measured: it finds none in 1,967 images without
stripes (the copy-detection sets' references and distractors of both seeds, seed 0's 420 edited copies, the 427
chained-edit queries without stripes of bench/chained_edits.py; striped facades and wallpapers of curved bands among
them; nor in AugLy's 480 queries, whose stripes are mostly translucent), and finds the stripes of 37 of the 53
chained-edit queries with them (33 without the second look; the others mostly got JPEG blocks, a perspective, a crop
or a frame after the stripes, or their stripes merged with a flat area of the same colour).
"""

from __future__ import annotations

import numpy as np

DETECT_SIDE = 256
FLAT_SPREAD = 3.0  # grey levels: the largest channel's standard deviation in a 5 x 5 window of a flat pixel
COLOUR_TOLERANCE = 12.0  # grey levels (largest channel) from the stripes' colour
MIN_COVER, MAX_COVER = 0.15, 0.65
MIN_COHERENCE = 0.75
MIN_BANDS = 2
MIN_ELONGATION = 2.5  # a band's length over its width
MAX_WIDTH_SPREAD = 0.15  # of a band's width, along its length
MAX_WIDTH_RATIO = 1.35  # widest band over narrowest
EDGE_MARGIN = 2  # px at DETECT_SIDE added around the stripes at least: the flatness window's half-width
MAX_EDGE_MARGIN = 6  # ... and at most, where their soft edges (a blur, pixel blocks) bleed their colour further
RIM_LEVEL = 0.9  # the rim ends where the pixels differ from the stripes' colour this much as far beyond it do
SHARP_RIM = 3  # rings beyond EDGE_MARGIN where a sharp edge's rim ends (``edge_margin``)
NOISE_LEVEL = 4.0  # grey levels of noise (``noise_level`` at DETECT_SIDE) over which a picture is looked at denoised too
DENOISE_MEDIAN = 5  # px at DETECT_SIDE: the median, then the Gaussian (sigma, px) of that second look
DENOISE_SIGMA = 1.5
FILL_SIGMAS = (2.0, 4.0, 8.0, 16.0, 32.0)  # px at DETECT_SIDE: the fill's scales, finest first


def at_detect_side(pixels: np.ndarray) -> np.ndarray:
    """uint8 (H, W, ...) shrunk (area filter) to ``DETECT_SIDE`` px on its longest side; never enlarged."""
    import cv2

    height, width = pixels.shape[:2]
    scale = min(1.0, DETECT_SIDE / max(height, width))
    if scale >= 1.0:
        return pixels
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)


def largest_channel(values: np.ndarray) -> np.ndarray:
    """uint8 or float32 (H, W, 3) -> (H, W) the largest of the three channels (numpy's reductions over a last axis of 3
    are slow)."""
    import cv2

    first, second, third = cv2.split(np.ascontiguousarray(values))
    return cv2.max(cv2.max(first, second), third)


def _band_widths(mask: np.ndarray, normal: np.ndarray) -> list[float]:
    """The widths (px, across ``normal``) of the components of ``mask`` that are bands across the picture."""
    import cv2

    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    along = np.array([-normal[1], normal[0]])
    rest_y, rest_x = np.nonzero(mask == 0)
    rest = rest_x * normal[0] + rest_y * normal[1]
    widths = []
    for label in range(1, count):
        if stats[label, cv2.CC_STAT_AREA] < 0.01 * mask.size:
            continue
        ys, xs = np.nonzero(labels == label)
        across, lengthwise = xs * normal[0] + ys * normal[1], xs * along[0] + ys * along[1]
        low, high = np.percentile(across, 2), np.percentile(across, 98)
        width = max(high - low, 1.0)
        if np.percentile(lengthwise, 98) - np.percentile(lengthwise, 2) < MIN_ELONGATION * width:
            continue
        if not ((rest < low).any() and (rest > high).any()):  # picture on one side only: a wedge at an edge
            continue
        slices = np.floor((lengthwise - lengthwise.min()) / max(width, 2.0)).astype(np.int64)
        local = np.array([np.ptp(across[slices == s]) for s in np.unique(slices) if np.count_nonzero(slices == s) > 5])
        if len(local) > 4:
            local = local[1:-1]  # the ends, cut by the picture's edge
        if len(local) and local.std() < MAX_WIDTH_SPREAD * max(local.mean(), 1.0):
            widths.append(width)
    return widths


def noise_level(small: np.ndarray) -> float:
    """uint8 RGB (H, W, 3) -> the standard deviation of its grey version's noise (grey levels; 0.67 of the same
    noise on each channel), by Immerkær's estimate (1996: the mean absolute response of a Laplacian difference that
    cancels smooth gradients): ~0.5-1 for a clean photo, more for a fine texture (the copy-detection set's
    pictures: 10 % over 4 at ``DETECT_SIDE``), 5-15 there for one with Gaussian noise of 40 grey levels at 512 px
    (bench/unseen_edits.py's, AugLy's ``random_noise``)."""
    import cv2

    grey = cv2.cvtColor(np.ascontiguousarray(small), cv2.COLOR_RGB2GRAY).astype(np.float32)
    if min(grey.shape) < 3:
        return 0.0
    laplacian = cv2.filter2D(grey, -1, np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32))
    return float(np.sqrt(np.pi / 2) / 6 * np.abs(laplacian[1:-1, 1:-1]).mean())


def _flat_bands(small: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """uint8 RGB (h, w, 3) at ``DETECT_SIDE`` -> (uint8 mask (h, w) of its flat stripes (1), not widened; their colour
    float32 (3,)), or None."""
    import cv2

    values = small.astype(np.float32)
    mean = cv2.blur(values, (5, 5))
    spread = np.sqrt(np.maximum(largest_channel(cv2.blur(values * values, (5, 5)) - mean * mean), 0.0))
    flat = spread < FLAT_SPREAD
    if flat.mean() < MIN_COVER * 0.8:
        return None
    quantized = (small[flat] // 16).astype(np.int64)
    codes = (quantized[:, 0] << 8) | (quantized[:, 1] << 4) | quantized[:, 2]
    colour = np.median(small[flat][codes == np.bincount(codes).argmax()].astype(np.float32), axis=0)
    mask = ((largest_channel(np.abs(values - colour)) < COLOUR_TOLERANCE) & (spread < 2 * FLAT_SPREAD)).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))
    if not MIN_COVER <= mask.mean() <= MAX_COVER:
        return None
    edges = mask.astype(np.float32)
    gx, gy = cv2.Sobel(edges, cv2.CV_32F, 1, 0), cv2.Sobel(edges, cv2.CV_32F, 0, 1)
    for gradient in (gx, gy):  # a band ending at the picture's edge is no edge of it
        gradient[[0, -1], :] = 0
        gradient[:, [0, -1]] = 0
    jxx, jyy, jxy = float((gx * gx).sum()), float((gy * gy).sum()), float((gx * gy).sum())
    if jxx + jyy == 0 or np.hypot(jxx - jyy, 2 * jxy) / (jxx + jyy) < MIN_COHERENCE:
        return None
    angle = 0.5 * np.arctan2(2 * jxy, jxx - jyy)  # the direction across the stripes
    widths = _band_widths(mask, np.array([np.cos(angle), np.sin(angle)]))
    if len(widths) < MIN_BANDS or max(widths) > MAX_WIDTH_RATIO * min(widths):
        return None
    return mask, colour


def edge_margin(small: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> int:
    """How far (px, ``EDGE_MARGIN``..``MAX_EDGE_MARGIN``) to widen ``mask`` (uint8 (h, w)) of ``small`` (uint8 RGB
    (h, w, 3)) so that it takes in the rim where the stripes' ``colour`` (float32 (3,)) bleeds into the picture. The
    rings of pixels at whole distances from the mask differ more and more from that colour; the first whose median
    reaches ``RIM_LEVEL`` of the difference further out ends the rim. A sharp edge (JPEG'd, resized) ends
    ``SHARP_RIM`` rings after ``EDGE_MARGIN``; a softened one (a blur, pixel blocks after the stripes) later, and
    the mask grows by as many rings more."""
    import cv2

    distance = cv2.distanceTransform((mask == 0).astype(np.uint8), cv2.DIST_L2, 3)
    off = largest_channel(np.abs(small.astype(np.float32) - colour))
    last = MAX_EDGE_MARGIN + SHARP_RIM
    rings = np.minimum(np.ceil(distance), last + 2).astype(np.int64)  # 0: the mask; last + 2: everything further
    beyond = off[rings == last + 1]
    if len(beyond) == 0:
        return EDGE_MARGIN
    level = RIM_LEVEL * np.median(beyond)
    for ring in range(EDGE_MARGIN + SHARP_RIM, last):
        values = off[rings == ring]
        if len(values) == 0 or np.median(values) >= level:
            return ring - SHARP_RIM
    return MAX_EDGE_MARGIN


def stripe_mask(pixels: np.ndarray) -> np.ndarray | None:
    """uint8 RGB (H, W, 3) -> uint8 mask (H, W) (1: under a stripe, widened by ``edge_margin`` for soft edges), or
    None when the picture has no stripes (see the module docstring). A noisy picture (``NOISE_LEVEL``), whose
    stripes are not flat, is looked at again denoised (a median and a Gaussian blur) when they are not found."""
    import cv2

    pixels = np.asarray(pixels)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or min(pixels.shape[:2]) < 16:
        return None
    small = np.ascontiguousarray(at_detect_side(pixels))
    found = _flat_bands(small)
    if found is None and noise_level(small) > NOISE_LEVEL:
        small = cv2.GaussianBlur(cv2.medianBlur(small, DENOISE_MEDIAN), (0, 0), DENOISE_SIGMA)
        found = _flat_bands(small)
    if found is None:
        return None
    mask, colour = found
    margin = edge_margin(small, mask, colour)
    mask = cv2.dilate(mask, np.ones((2 * margin + 1,) * 2, np.uint8))  # their soft, JPEG-rung edges too
    height, width = pixels.shape[:2]
    if mask.shape != (height, width):  # every pixel a stripe pixel touches
        mask = (cv2.resize(mask.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR) > 0).astype(np.uint8)
    return mask


def unveiled(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3) with the pixels under ``mask`` (uint8 (H, W)) replaced by a smooth fill from the others:
    normalised convolution at ``FILL_SIGMAS``, each masked pixel from the finest scale that reaches it, computed at
    ``DETECT_SIDE`` px and resized (a fill has no detail to lose)."""
    import cv2

    pixels = np.asarray(pixels)
    height, width = pixels.shape[:2]
    small, small_mask = at_detect_side(pixels).astype(np.float32), at_detect_side(mask)
    keep = (small_mask == 0).astype(np.float32)
    if not keep.any():
        return pixels.copy()
    fill = np.zeros_like(small)
    todo = np.ones(keep.shape, bool)
    for sigma in FILL_SIGMAS:
        weight = cv2.GaussianBlur(keep, (0, 0), sigma)
        total = cv2.GaussianBlur(small * keep[..., None], (0, 0), sigma)
        reached = todo & (weight > 0.05)
        fill[reached] = total[reached] / weight[reached][:, None]
        todo &= ~reached
    fill[todo] = small[keep > 0].mean(axis=0)
    if fill.shape[:2] != (height, width):
        fill = cv2.resize(fill, (width, height), interpolation=cv2.INTER_LINEAR)
    out = pixels.copy()
    hidden = mask > 0
    out[hidden] = np.clip(np.rint(fill[hidden]), 0, 255).astype(np.uint8)
    return out
