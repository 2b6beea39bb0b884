"""SIFT (Lowe 2004) as OpenCV 4.x computes it, with less work for the same keypoints. Grey uint8 in, numpy arrays out.

The scale space is OpenCV's (``scale_space``): the picture upsampled 2x (OpenCV's ``INTER_LINEAR``) and blurred to
``SIGMA``, ``LAYERS`` + 3 Gaussian layers per octave, each octave's first layer its predecessor's layer ``LAYERS``
subsampled (OpenCV's ``INTER_NEAREST``), down to ~8 px, and their differences (DoG). The Gaussian blurs, most of
SIFT's time, are ``_blurred``: OpenCV's separable filter summed in OpenCV's order, the same float32 values (but in
the last W mod 8 columns, ~1e-5 grey levels apart) at about twice OpenCV's speed on AVX2. Every step after it
follows OpenCV's ``sift.simd.hpp`` (float build) in numba kernels that release the interpreter lock (indexing runs
SIFT beside the model): DoG extrema over 26 neighbours, up to 5 quadratic refinement steps, the
contrast and edge tests, a 36-bin orientation histogram (smoothed; every peak >= 0.8 of the highest is a keypoint),
and the 4 x 4 x 8 descriptor with trilinear interpolation, clipped at 0.2 and scaled to a norm of 512, rounded.

What OpenCV does and the result never uses is left out:

* OpenCV describes every keypoint it returns; here the caller describes only those it keeps (``describe``).
* OpenCV orients every extremum that passes the contrast and edge tests, then keeps the strongest ``nfeatures``
  (``retainBest``). A keypoint's response does not depend on its orientation, so ``detect`` ranks the extrema first
  and orients only the strongest, enough for the ``nfeatures`` keypoints and their ties (an extremum with two
  dominant angles is two keypoints of one response).
* The DoG is never stored: each sample is the difference of two Gaussian layers where it is read.

The result is OpenCV's: the same keypoints (position, size, angle, response) and descriptors, to float rounding
(tests/test_sift.py compares them on photos). One choice is a parameter: the extremum pre-threshold (``detect``'s
``prethreshold``). OpenCV's is ``floor(0.5 * contrast / LAYERS * 255)`` grey levels, 0 at a contrast floor of 0.01,
so every non-zero DoG extremum is refined (~98,000 per 512 px picture, of which ~550 pass the contrast and edge
tests); ``OPENCV_PRETHRESHOLD`` keeps that, and with it all 283,717 keypoints of the copy-detection set's 980
pictures are OpenCV's. Unrounded (``local_features.PRETHRESHOLD``) it refines ~1,200 and loses 17 of them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numba
import numpy as np

SIGMA = 1.6  # blur of an octave's first layer, in that octave's pixels
LAYERS = 3  # DoG layers searched per octave
INPUT_BLUR = 0.5  # the blur a picture is assumed to have
BORDER = 5  # pixels at each level's edge where no extremum is searched
MAX_REFINE_STEPS = 5
EDGE_THRESHOLD = 10.0
ORIENTATION_BINS = 36
ORIENTATION_RADIUS = 4.5  # x the keypoint's scale
ORIENTATION_SIGMA = 1.5  # x the keypoint's scale
ORIENTATION_PEAK = 0.8
DESCRIPTOR_CELLS = 4
DESCRIPTOR_BINS = 8
DESCRIPTOR_CELL_SCALE = 3.0  # a cell is this many times the keypoint's scale wide
DESCRIPTOR_CLIP = 0.2
DESCRIPTOR_NORM = 512.0
DESCRIPTOR_SIZE = DESCRIPTOR_CELLS * DESCRIPTOR_CELLS * DESCRIPTOR_BINS
OPENCV_PRETHRESHOLD = None  # ``detect``: OpenCV's rounded pre-threshold


@dataclass(frozen=True)
class ScaleSpace:
    """OpenCV's SIFT pyramid of one picture: per octave o (o = 0 is the picture upsampled 2x) ``gaussians[o]``
    float32 (LAYERS + 3, h, w), grey values on the 0..255 scale (the DoG layer i is layer i + 1 minus layer i)."""

    gaussians: tuple[np.ndarray, ...]


@dataclass(frozen=True)
class Keypoints:
    """n keypoints: ``table`` float32 (n, 4) x, y (pixels of the picture), size (diameter, px), angle (degrees, OpenCV's
    convention); ``response`` float32 (n,) |DoG contrast|; ``octave`` int32 (n,) (0: the upsampled one); ``layer``
    int32 (n,) the Gaussian layer of that octave a descriptor is sampled from."""

    table: np.ndarray
    response: np.ndarray
    octave: np.ndarray
    layer: np.ndarray

    def __len__(self) -> int:
        return int(self.table.shape[0])

    def take(self, rows: np.ndarray) -> "Keypoints":
        return Keypoints(self.table[rows], self.response[rows], self.octave[rows], self.layer[rows])

    def union(self, other: "Keypoints") -> "Keypoints":
        """These keypoints, then those of ``other`` that are not among them (the same octave, layer, position, size
        and angle: ``strongest`` computes a keypoint alike from any rows of one ``extrema`` table that hold it)."""
        both = Keypoints(np.concatenate([self.table, other.table]), np.concatenate([self.response, other.response]),
                         np.concatenate([self.octave, other.octave]), np.concatenate([self.layer, other.layer]))
        identity = np.column_stack([both.table.view(np.int32), both.octave, both.layer])
        return both.take(np.sort(np.unique(identity, axis=0, return_index=True)[1]))

    @classmethod
    def empty(cls) -> "Keypoints":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32), np.zeros(0, np.int32))


def layer_blurs() -> list[float]:
    """The blur each Gaussian layer adds to the one before it (index 0: the octave's base, ``SIGMA``), as OpenCV."""
    step = 2.0 ** (1.0 / LAYERS)
    return [SIGMA] + [math.sqrt((SIGMA * step**i) ** 2 - (SIGMA * step ** (i - 1)) ** 2) for i in range(1, LAYERS + 3)]


def gaussian_kernel(sigma: float) -> np.ndarray:
    """float32 (2 r + 1,): the Gaussian kernel ``cv2.GaussianBlur`` uses on float32 pictures for ``sigma`` (px): 2 x 4
    sigma + 1 taps, rounded up to odd, normalised in double and rounded to float32 (``cv2.getGaussianKernel``)."""
    import cv2

    size = int(np.rint(sigma * 4 * 2 + 1)) | 1
    return cv2.getGaussianKernel(size, sigma, cv2.CV_32F).ravel()


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _reflected(i, n):
    """OpenCV's ``BORDER_REFLECT_101`` index of i in 0..n - 1 (..., 2, 1 | 0, 1, ..., n - 1 | n - 2, ...)."""
    if n == 1:
        return 0
    while i < 0 or i >= n:
        i = -i if i < 0 else 2 * n - 2 - i
    return i


@numba.njit(cache=True, nogil=True, fastmath={"contract"}, error_model="numpy")  # FMAs, no reordering
def _blurred(source, kernel, out):
    """``cv2.GaussianBlur(source, (0, 0), sigma, dst=out, sigmaY=sigma)`` for a float32 (H, W) picture, with ``kernel``
    = ``gaussian_kernel(sigma)``, summed as OpenCV's AVX2 code sums: rows first, each output the taps left to right
    (fused multiply-adds), then columns, the centre tap and then the pairs from the nearest out; ``BORDER_REFLECT_101``.
    The same float32 values as OpenCV's, but in the last W mod 8 columns (OpenCV's scalar tail: ~1e-5 grey levels
    apart). Plain loops over whole rows, which LLVM vectorises: on an AVX2 machine about twice OpenCV's speed. Each
    sweep over a row adds several taps in order (8, then 4, along the rows; 4 pairs down the columns), so the sums
    are loaded and stored once per sweep (1.1x the speed of a sweep per 4 taps along and per pair down)."""
    rows, cols = source.shape
    r = len(kernel) // 2
    padded = np.empty(cols + 2 * r, np.float32)
    inner = padded[r : r + cols]
    across = np.empty((rows, cols), np.float32)
    for y in range(rows):
        line = source[y]
        for x in range(cols):
            inner[x] = line[x]
        for j in range(1, r + 1):
            padded[r - j] = line[_reflected(-j, cols)]
            padded[r + cols - 1 + j] = line[_reflected(cols - 1 + j, cols)]
        sums = across[y]
        first = kernel[0]
        for x in range(cols):
            sums[x] = padded[x] * first
        i = 1
        while i + 7 <= 2 * r:  # eight taps per sweep over the row, then four, in the same order
            w0, w1, w2, w3 = kernel[i], kernel[i + 1], kernel[i + 2], kernel[i + 3]
            w4, w5, w6, w7 = kernel[i + 4], kernel[i + 5], kernel[i + 6], kernel[i + 7]
            p0, p1 = padded[i : i + cols], padded[i + 1 : i + 1 + cols]
            p2, p3 = padded[i + 2 : i + 2 + cols], padded[i + 3 : i + 3 + cols]
            p4, p5 = padded[i + 4 : i + 4 + cols], padded[i + 5 : i + 5 + cols]
            p6, p7 = padded[i + 6 : i + 6 + cols], padded[i + 7 : i + 7 + cols]
            for x in range(cols):
                sums[x] = (((((((sums[x] + p0[x] * w0) + p1[x] * w1) + p2[x] * w2) + p3[x] * w3) + p4[x] * w4)
                           + p5[x] * w5) + p6[x] * w6) + p7[x] * w7
            i += 8
        while i + 3 <= 2 * r:
            w0, w1, w2, w3 = kernel[i], kernel[i + 1], kernel[i + 2], kernel[i + 3]
            p0, p1 = padded[i : i + cols], padded[i + 1 : i + 1 + cols]
            p2, p3 = padded[i + 2 : i + 2 + cols], padded[i + 3 : i + 3 + cols]
            for x in range(cols):
                sums[x] = (((sums[x] + p0[x] * w0) + p1[x] * w1) + p2[x] * w2) + p3[x] * w3
            i += 4
        for i in range(i, 2 * r + 1):
            weight = kernel[i]
            part = padded[i : i + cols]
            for x in range(cols):
                sums[x] += part[x] * weight
    centre = kernel[r]
    for y in range(rows):
        sums = out[y]
        middle = across[y]
        for x in range(cols):
            sums[x] = centre * middle[x]
        j = 1
        while j + 3 <= r:  # four pairs per sweep down the columns, in the same order
            w1, w2, w3, w4 = kernel[r + j], kernel[r + j + 1], kernel[r + j + 2], kernel[r + j + 3]
            a1, b1 = across[_reflected(y - j, rows)], across[_reflected(y + j, rows)]
            a2, b2 = across[_reflected(y - j - 1, rows)], across[_reflected(y + j + 1, rows)]
            a3, b3 = across[_reflected(y - j - 2, rows)], across[_reflected(y + j + 2, rows)]
            a4, b4 = across[_reflected(y - j - 3, rows)], across[_reflected(y + j + 3, rows)]
            for x in range(cols):
                sums[x] = (((sums[x] + w1 * (a1[x] + b1[x])) + w2 * (a2[x] + b2[x])) + w3 * (a3[x] + b3[x])) + w4 * (a4[x] + b4[x])
            j += 4
        for j in range(j, r + 1):
            weight = kernel[r + j]
            above = across[_reflected(y - j, rows)]
            below = across[_reflected(y + j, rows)]
            for x in range(cols):
                sums[x] += weight * (above[x] + below[x])


def scale_space(grey: np.ndarray) -> ScaleSpace:
    """uint8 grey (H, W) -> its ``ScaleSpace``, as OpenCV's ``createInitialImage`` and ``buildGaussianPyramid`` build
    it (OpenCV's resizes; its Gaussian blurs as ``_blurred``)."""
    import cv2

    grey = np.asarray(grey)
    if grey.ndim != 2 or grey.dtype != np.uint8:
        raise ValueError(f"expected a uint8 grey image (H, W), got {grey.dtype} {grey.shape}")
    height, width = grey.shape
    doubled = cv2.resize(grey.astype(np.float32), (2 * width, 2 * height), interpolation=cv2.INTER_LINEAR)
    sigma = np.float32(SIGMA)  # OpenCV computes the first blur in float
    first_blur = float(np.sqrt(max(sigma * sigma - np.float32(4 * INPUT_BLUR * INPUT_BLUR), np.float32(0.01))))
    octaves = int(np.rint(math.log(min(2 * width, 2 * height)) / math.log(2.0) - 2)) + 1
    kernels = _layer_kernels()
    gaussians = []
    for octave in range(octaves):  # each octave's first layer is written in place: no copy of it
        if octave == 0:
            layers = np.empty((LAYERS + 3,) + doubled.shape, np.float32)
            _blurred(doubled, gaussian_kernel(first_blur), layers[0])
        else:
            source = gaussians[-1][LAYERS]
            layers = np.empty((LAYERS + 3, source.shape[0] // 2, source.shape[1] // 2), np.float32)
            cv2.resize(source, (source.shape[1] // 2, source.shape[0] // 2), dst=layers[0], interpolation=cv2.INTER_NEAREST)
        for i in range(1, LAYERS + 3):
            _blurred(layers[i - 1], kernels[i], layers[i])
        gaussians.append(layers)
    return ScaleSpace(tuple(gaussians))


@functools.cache
def _layer_kernels() -> tuple[np.ndarray, ...]:
    """``gaussian_kernel`` of each of ``layer_blurs()``."""
    return tuple(gaussian_kernel(blur) for blur in layer_blurs())


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _dog(gaussians, layer, r, c):
    """The DoG sample (layer, r, c) of an octave: its Gaussian layer + 1 minus its layer (OpenCV's DoG, float32)."""
    return gaussians[layer + 1, r, c] - gaussians[layer, r, c]


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")  # inlined: a call per row cost ~0.2 µs
def _row_prefilter(below, lower, upper, above, r, threshold, maybe, start, stop):
    """For the DoG row r of the layer between Gaussian layers ``lower`` and ``upper`` (2-D arrays of one octave;
    ``below`` and ``above`` the Gaussian layers either side of them): maybe[c] = 1 for c in start..stop - 1 where the
    sample passes the threshold and is >= (or <=) its 8 neighbours in its own layer and the samples at its place in
    the DoG layers below and above, the samples that can be extrema (a fifth as many as with 4 neighbours, for twice
    the arithmetic: ~15 % less time in all); returns how many. Vectorised (plain loops over slices)."""
    n = stop - start
    a0, a1, a2 = lower[r - 1, start - 1 : stop + 1], lower[r, start - 1 : stop + 1], lower[r + 1, start - 1 : stop + 1]
    b0, b1, b2 = upper[r - 1, start - 1 : stop + 1], upper[r, start - 1 : stop + 1], upper[r + 1, start - 1 : stop + 1]
    under, over = below[r, start:stop], above[r, start:stop]
    out = maybe[start:stop]
    for c in range(n):
        v = b1[c + 1] - a1[c + 1]
        west, east = b1[c] - a1[c], b1[c + 2] - a1[c + 2]
        north_west, north, north_east = b0[c] - a0[c], b0[c + 1] - a0[c + 1], b0[c + 2] - a0[c + 2]
        south_west, south, south_east = b2[c] - a2[c], b2[c + 1] - a2[c + 1], b2[c + 2] - a2[c + 2]
        lower_dog, upper_dog = a1[c + 1] - under[c], over[c] - b1[c + 1]
        high = max(max(max(west, east), max(north_west, north)), max(max(north_east, south_west),
                   max(max(south, south_east), max(lower_dog, upper_dog))))
        low = min(min(min(west, east), min(north_west, north)), min(min(north_east, south_west),
                  min(min(south, south_east), min(lower_dog, upper_dog))))
        out[c] = ((v > threshold) & (v >= high)) | ((v < -threshold) & (v <= low))
    count = 0
    for c in range(n):
        count += out[c]
    return count


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _is_extreme(gaussians, k, r, c):
    """Whether DoG sample (k, r, c) is >= (positive) or <= (negative) all 26 neighbours in scale and space (OpenCV's
    test)."""
    v = _dog(gaussians, k, r, c)
    for layer in range(k - 1, k + 2):
        for y in range(r - 1, r + 2):
            for x in range(c - 1, c + 2):
                other = _dog(gaussians, layer, y, x)
                if (v > 0 and other > v) or (v < 0 and other < v):
                    return False
    return True


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _candidates(gaussians, threshold):
    """int64 (m, 3) layer, row, column of the DoG samples of one octave (``gaussians`` (LAYERS + 3, h, w)) at DoG
    layers 1..LAYERS, ``BORDER`` px or more from the edges, with |value| > ``threshold`` that are >= (positive) or <=
    (negative) all 26 neighbours: OpenCV's extremum test, as a vectorised first cut (``_row_prefilter``) and the full
    test on what passes it. The DoG is never stored: each sample is computed where it is read."""
    layers, rows, cols = gaussians.shape
    if rows <= 2 * BORDER or cols <= 2 * BORDER:
        return np.empty((0, 3), np.int64)
    words = (cols + 7) // 8
    maybe = np.zeros(words * 8, np.uint8)
    packed = maybe.view(np.uint64)  # eight flags at a time: most are 0
    found = []
    for r in range(BORDER, rows - BORDER):  # rows outside, layers inside: a Gaussian row is read from memory once
        for k in range(1, layers - 2):
            below, lower, upper, above = gaussians[k - 1], gaussians[k], gaussians[k + 1], gaussians[k + 2]
            if _row_prefilter(below, lower, upper, above, r, threshold, maybe, BORDER, cols - BORDER) == 0:
                continue
            for w in range(words):
                if packed[w]:
                    for c in range(w * 8, w * 8 + 8):
                        if maybe[c] and _is_extreme(gaussians, k, r, c):
                            found.append((k, r, c))
    out = np.empty((len(found), 3), np.int64)
    for i in range(len(found)):
        out[i, 0], out[i, 1], out[i, 2] = found[i]
    return out


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _solve3(a, b):
    """x with a x = b for a 3x3 float32 ``a``, as OpenCV's ``Matx::solve`` for 3x3 (Cramer's rule), as a tuple of three
    float32; zeros when singular."""
    det = (a[0, 0] * (a[1, 1] * a[2, 2] - a[2, 1] * a[1, 2]) - a[0, 1] * (a[1, 0] * a[2, 2] - a[2, 0] * a[1, 2])
           + a[0, 2] * (a[1, 0] * a[2, 1] - a[2, 0] * a[1, 1]))
    if det == 0:
        return np.float32(0.0), np.float32(0.0), np.float32(0.0)
    d = np.float32(1.0) / det
    return (d * (b[0] * (a[1, 1] * a[2, 2] - a[1, 2] * a[2, 1]) - a[0, 1] * (b[1] * a[2, 2] - a[1, 2] * b[2])
                 + a[0, 2] * (b[1] * a[2, 1] - a[1, 1] * b[2])),
            d * (a[0, 0] * (b[1] * a[2, 2] - a[1, 2] * b[2]) - b[0] * (a[1, 0] * a[2, 2] - a[1, 2] * a[2, 0])
                 + a[0, 2] * (a[1, 0] * b[2] - b[1] * a[2, 0])),
            d * (a[0, 0] * (a[1, 1] * b[2] - b[1] * a[2, 1]) - a[0, 1] * (a[1, 0] * b[2] - b[1] * a[2, 0])
                 + b[0] * (a[1, 0] * a[2, 1] - a[1, 1] * a[2, 0])))


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _refined(gaussians, candidates, contrast, edge):
    """OpenCV's ``adjustLocalExtrema`` for each candidate (layer, row, column) of one octave: up to
    ``MAX_REFINE_STEPS`` quadratic fits, each moving to the sample the offset points to; then the contrast and edge
    tests. -> float32 (m, 7): x, y (octave pixels, refined), layer offset xi, |contrast|, layer, row, column (final)."""
    layers, rows, cols = gaussians.shape
    scale = np.float32(1.0 / 255.0)
    half = np.float32(0.5)
    quarter = np.float32(0.25)
    out = np.empty((len(candidates), 7), np.float32)
    m = 0
    h = np.empty((3, 3), np.float32)
    g = np.empty(3, np.float32)
    for k in range(len(candidates)):
        layer, r, c = candidates[k, 0], candidates[k, 1], candidates[k, 2]
        xc = xr = xi = np.float32(0.0)
        converged = False
        for _ in range(MAX_REFINE_STEPS):
            centre = _dog(gaussians, layer, r, c)
            v2 = centre * np.float32(2.0)
            east, west = _dog(gaussians, layer, r, c + 1), _dog(gaussians, layer, r, c - 1)
            south, north = _dog(gaussians, layer, r + 1, c), _dog(gaussians, layer, r - 1, c)
            above, below = _dog(gaussians, layer + 1, r, c), _dog(gaussians, layer - 1, r, c)
            g[0] = (east - west) * (scale * half)
            g[1] = (south - north) * (scale * half)
            g[2] = (above - below) * (scale * half)
            h[0, 0] = (east + west - v2) * scale
            h[1, 1] = (south + north - v2) * scale
            h[2, 2] = (above + below - v2) * scale
            h[0, 1] = h[1, 0] = (_dog(gaussians, layer, r + 1, c + 1) - _dog(gaussians, layer, r + 1, c - 1)
                                 - _dog(gaussians, layer, r - 1, c + 1) + _dog(gaussians, layer, r - 1, c - 1)) * (scale * quarter)
            h[0, 2] = h[2, 0] = (_dog(gaussians, layer + 1, r, c + 1) - _dog(gaussians, layer + 1, r, c - 1)
                                 - _dog(gaussians, layer - 1, r, c + 1) + _dog(gaussians, layer - 1, r, c - 1)) * (scale * quarter)
            h[1, 2] = h[2, 1] = (_dog(gaussians, layer + 1, r + 1, c) - _dog(gaussians, layer + 1, r - 1, c)
                                 - _dog(gaussians, layer - 1, r + 1, c) + _dog(gaussians, layer - 1, r - 1, c)) * (scale * quarter)
            x0, x1, x2 = _solve3(h, g)
            xc, xr, xi = -x0, -x1, -x2
            if abs(xi) < 0.5 and abs(xr) < 0.5 and abs(xc) < 0.5:
                converged = True
                break
            if abs(xi) > 715827882.0 or abs(xr) > 715827882.0 or abs(xc) > 715827882.0:  # INT_MAX / 3
                break
            c += int(np.rint(xc))
            r += int(np.rint(xr))
            layer += int(np.rint(xi))
            if layer < 1 or layer > LAYERS or c < BORDER or c >= cols - BORDER or r < BORDER or r >= rows - BORDER:
                break
        if not converged:
            continue
        response = _dog(gaussians, layer, r, c) * scale + (g[0] * xc + g[1] * xr + g[2] * xi) * half
        if abs(response) * LAYERS < contrast:
            continue
        trace = h[0, 0] + h[1, 1]
        det = h[0, 0] * h[1, 1] - h[0, 1] * h[0, 1]
        if det <= 0 or trace * trace * edge >= (edge + 1) * (edge + 1) * det:
            continue
        out[m, 0] = c + xc
        out[m, 1] = r + xr
        out[m, 2] = xi
        out[m, 3] = abs(response)
        out[m, 4] = layer
        out[m, 5] = r
        out[m, 6] = c
        m += 1
    return out[:m]


@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy", inline="always")
def _fast_atan2(y, x):
    """OpenCV's fastAtan2: atan2 in degrees, 0..360, to ~0.3 degrees (the angle SIFT's histograms use); branch-free,
    so that the loops calling it vectorise."""
    ax = abs(x)
    ay = abs(y)
    t = min(ax, ay) / (max(ax, ay) + np.float32(2.220446049250313e-16))
    t2 = t * t
    a = (((np.float32(-2.539725) * t2 + np.float32(8.914001)) * t2 + np.float32(-18.667446)) * t2 + np.float32(57.283627)) * t
    a = np.float32(90.0) - a if ay > ax else a
    a = np.float32(180.0) - a if x < 0 else a
    return np.float32(360.0) - a if y < 0 else a


@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def _magnitudes_and_angles(gx, gy, weight, count):
    """In place over the first ``count`` samples: weight <- weight * |gradient|, gx <- its angle (degrees)."""
    for s in range(count):
        weight[s] *= np.sqrt(gx[s] * gx[s] + gy[s] * gy[s])
        gx[s] = _fast_atan2(gy[s], gx[s])


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _gaussian_weights(radius, factor, along):
    """along[: 2 radius + 1] <- exp(i^2 * factor) for i = -radius..radius (a separable 2-D Gaussian's factors)."""
    for i in range(-radius, radius + 1):
        along[i + radius] = np.float32(math.exp(np.float32(i * i) * factor))


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")  # inlined: a call per row cost ~0.2 µs
def _gradient_row(above, row, below, c, low, high, row_weight, along, radius, m, gx, gy, weight):
    """Gradients and Gaussian weights of columns c + low .. c + high of one row (inside the picture), written from
    index ``m`` on. Vectorised; returns the new ``m``."""
    for t in range(high - low + 1):
        x = c + low + t
        gx[m + t] = row[x + 1] - row[x - 1]
        gy[m + t] = above[x] - below[x]
        weight[m + t] = row_weight * along[low + t + radius]
    return m + high - low + 1


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _orientation_histogram(image, r, c, radius, sigma, hist, gx, gy, weight, along, raw):
    """OpenCV's ``calcOrientationHist``: the smoothed ORIENTATION_BINS-bin gradient histogram around (r, c) into
    ``hist``; returns its maximum. ``gx``, ``gy``, ``weight``: scratch of (2 radius + 1)^2 samples at least;
    ``along``: of 2 radius + 1; ``raw``: of ORIENTATION_BINS + 4."""
    n = ORIENTATION_BINS
    rows, cols = image.shape
    _gaussian_weights(radius, np.float32(-1.0) / (np.float32(2.0) * sigma * sigma), along)
    m = 0
    low, high = max(-radius, 1 - c), min(radius, cols - 2 - c)
    for i in range(-radius, radius + 1):
        y = r + i
        if y <= 0 or y >= rows - 1 or high < low:
            continue
        m = _gradient_row(image[y - 1], image[y], image[y + 1], c, low, high, along[i + radius], along, radius, m, gx, gy, weight)
    _magnitudes_and_angles(gx, gy, weight, m)
    raw[:] = 0.0  # raw[b + 2] is bin b; two wrapped bins on either side
    per_degree = np.float32(n / 360.0)
    for s in range(m):
        b = int(np.rint(per_degree * gx[s]))
        if b >= n:
            b -= n
        if b < 0:
            b += n
        raw[b + 2] += weight[s]
    raw[0], raw[1] = raw[n], raw[n + 1]
    raw[n + 2], raw[n + 3] = raw[2], raw[3]
    best = np.float32(0.0)
    for i in range(n):
        hist[i] = ((raw[i] + raw[i + 4]) * np.float32(1.0 / 16.0) + (raw[i + 1] + raw[i + 3]) * np.float32(4.0 / 16.0)
                   + raw[i + 2] * np.float32(6.0 / 16.0))
        best = hist[i] if i == 0 else max(best, hist[i])
    return best


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _oriented(gaussians, rows, cols, layers, scales):
    """For each keypoint of one octave (final row, column, Gaussian layer; scale in octave pixels): its dominant
    angles (degrees, OpenCV's convention) -> (keypoint index int32 (m,), angle float32 (m,)), in keypoint order."""
    n = ORIENTATION_BINS
    hist = np.empty(n, np.float32)
    owner = np.empty(len(layers) * (n // 2), np.int32)
    angles = np.empty(len(layers) * (n // 2), np.float32)
    radii = np.empty(len(layers), np.int64)
    capacity = 1
    for k in range(len(layers)):
        radii[k] = int(np.rint(np.float32(ORIENTATION_RADIUS) * scales[k]))
        capacity = max(capacity, (2 * radii[k] + 1) ** 2)
    gx = np.empty(capacity, np.float32)
    gy = np.empty(capacity, np.float32)
    weight = np.empty(capacity, np.float32)
    along = np.empty(2 * radii.max() + 1 if len(radii) else 1, np.float32)
    raw = np.empty(n + 4, np.float32)
    m = 0
    for k in range(len(layers)):
        best = _orientation_histogram(gaussians[layers[k]], rows[k], cols[k], radii[k], np.float32(ORIENTATION_SIGMA) * scales[k],
                                      hist, gx, gy, weight, along, raw)
        threshold = best * np.float32(ORIENTATION_PEAK)
        for j in range(n):
            left = hist[j - 1] if j > 0 else hist[n - 1]
            right = hist[j + 1] if j < n - 1 else hist[0]
            if hist[j] > left and hist[j] > right and hist[j] >= threshold:
                b = j + np.float32(0.5) * (left - right) / (left - np.float32(2.0) * hist[j] + right)
                if b < 0:
                    b += n
                elif b >= n:
                    b -= n
                angle = np.float32(360.0) - np.float32(360.0 / n) * b
                if abs(angle - np.float32(360.0)) < np.float32(1.1920929e-07):
                    angle = np.float32(0.0)
                owner[m] = k
                angles[m] = angle
                m += 1
    return owner[:m], angles[:m]


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _column_range(i, cos_t, sin_t, radius):
    """The columns j in -radius..radius whose rotated offsets (j cos - i sin, j sin + i cos) can lie inside the
    descriptor's grid (|offset| < cells / 2 + 0.5 in cells, with a column to spare each side)."""
    half = np.float32(DESCRIPTOR_CELLS / 2 + 0.5)
    low, high = -radius, radius
    fi = np.float32(i)
    for slope, offset in ((cos_t, -fi * sin_t), (sin_t, fi * cos_t)):
        if abs(slope) > 1e-12:
            a = (-half - offset) / slope
            b = (half - offset) / slope
            low = max(low, int(math.floor(min(a, b))) - 1)
            high = min(high, int(math.ceil(max(a, b))) + 1)
        elif abs(offset) >= half:
            return 0, -1
    return low, high


@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def _trilinear_votes(row_bin, col_bin, angle, magnitude, ori, count, index, votes):
    """For each of the first ``count`` descriptor samples (bin coordinates > -1; gradient angle and weighted
    magnitude): the histogram index of its lowest (row, column, orientation) bin and its 8 trilinear votes (OpenCV's
    order: v_rco000, 001, 010, 011, 100, 101, 110, 111). Vectorised."""
    n = DESCRIPTOR_BINS
    d = DESCRIPTOR_CELLS
    per_degree = np.float32(n / 360.0)
    for s in range(count):
        rbin = row_bin[s]
        cbin = col_bin[s]
        obin = (angle[s] - ori) * per_degree  # in (-n, n]
        r0 = np.int32(np.floor(rbin))
        c0 = np.int32(np.floor(cbin))
        o0 = np.int32(np.floor(obin))
        rbin -= np.float32(r0)
        cbin -= np.float32(c0)
        obin -= np.float32(o0)
        o0 = o0 + n if o0 < 0 else o0
        o0 = o0 - n if o0 >= n else o0
        v_r1 = magnitude[s] * rbin
        v_r0 = magnitude[s] - v_r1
        v_rc11 = v_r1 * cbin
        v_rc10 = v_r1 - v_rc11
        v_rc01 = v_r0 * cbin
        v_rc00 = v_r0 - v_rc01
        votes[7, s] = v_rc11 * obin
        votes[6, s] = v_rc11 - votes[7, s]
        votes[5, s] = v_rc10 * obin
        votes[4, s] = v_rc10 - votes[5, s]
        votes[3, s] = v_rc01 * obin
        votes[2, s] = v_rc01 - votes[3, s]
        votes[1, s] = v_rc00 * obin
        votes[0, s] = v_rc00 - votes[1, s]
        index[s] = ((r0 + 1) * (d + 2) + c0 + 1) * (n + 2) + o0


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _descriptors(gaussians, xs, ys, layers, scales, angles):
    """OpenCV's ``calcSIFTDescriptor`` for each keypoint of one octave (octave pixels x, y; Gaussian ``layers``; scale
    in octave pixels; angle in degrees, OpenCV's convention) -> float32 (n, 128), whole values 0..255. As OpenCV, three
    passes per keypoint: gather the samples inside the rotated grid, their magnitudes and angles (vectorised), and
    their trilinear votes."""
    d = DESCRIPTOR_CELLS
    n = DESCRIPTOR_BINS
    out = np.zeros((len(layers), d * d * n), np.float32)
    hist = np.zeros((d + 2) * (d + 2) * (n + 2), np.float32)
    reach = np.float32(DESCRIPTOR_CELL_SCALE * 1.4142135623730951 * (d + 1) * 0.5)
    capacity, widest = 1, 1
    for k in range(len(layers)):
        radius = int(np.rint(np.float32(DESCRIPTOR_CELL_SCALE) * scales[k] * reach / np.float32(DESCRIPTOR_CELL_SCALE)))
        capacity = max(capacity, (2 * radius + 1) ** 2)
        widest = max(widest, 2 * radius + 3)  # a keypoint's own rounding of its radius may be one more
    gx = np.empty(capacity, np.float32)
    gy = np.empty(capacity, np.float32)
    row_bin = np.empty(capacity, np.float32)
    col_bin = np.empty(capacity, np.float32)
    weight = np.empty(capacity, np.float32)
    index = np.empty(capacity, np.int32)
    votes = np.empty((8, capacity), np.float32)
    along = np.empty(widest, np.float32)
    exp_scale = np.float32(-1.0 / (d * d * 0.5))
    offset = np.float32(d / 2 - 0.5)
    for k in range(len(layers)):
        image = gaussians[layers[k]]
        rows, cols = image.shape
        pr = int(np.rint(ys[k]))
        pc = int(np.rint(xs[k]))
        ori = np.float32(360.0) - angles[k]
        if abs(ori - np.float32(360.0)) < np.float32(1.1920929e-07):
            ori = np.float32(0.0)
        width = np.float32(DESCRIPTOR_CELL_SCALE) * scales[k]
        radius = int(np.rint(width * np.float32(1.4142135623730951 * (d + 1) * 0.5)))
        radius = min(radius, int(math.sqrt(float(cols) * cols + float(rows) * rows)))
        radians = ori * np.float32(math.pi / 180.0)
        cos_t = np.float32(math.cos(radians)) / width
        sin_t = np.float32(math.sin(radians)) / width
        # exp((c_rot^2 + r_rot^2) * exp_scale) = along[i] * along[j]: a rotation keeps i^2 + j^2
        _gaussian_weights(radius, (cos_t * cos_t + sin_t * sin_t) * exp_scale, along)
        m = 0
        for i in range(-radius, radius + 1):
            r = pr + i
            if r <= 0 or r >= rows - 1:
                continue
            fi = np.float32(i)
            low, high = _column_range(i, cos_t, sin_t, radius)
            for j in range(low, high + 1):
                fj = np.float32(j)
                c_rot = fj * cos_t - fi * sin_t
                r_rot = fj * sin_t + fi * cos_t
                rbin = r_rot + offset
                cbin = c_rot + offset
                c = pc + j
                if rbin > -1 and rbin < d and cbin > -1 and cbin < d and c > 0 and c < cols - 1:
                    gx[m] = image[r, c + 1] - image[r, c - 1]
                    gy[m] = image[r - 1, c] - image[r + 1, c]
                    row_bin[m] = rbin
                    col_bin[m] = cbin
                    weight[m] = along[i + radius] * along[j + radius]
                    m += 1
        _magnitudes_and_angles(gx, gy, weight, m)
        _trilinear_votes(row_bin, col_bin, gx, weight, ori, m, index, votes)
        hist[:] = 0.0
        for s in range(m):
            idx = index[s]
            hist[idx] += votes[0, s]
            hist[idx + 1] += votes[1, s]
            hist[idx + (n + 2)] += votes[2, s]
            hist[idx + (n + 3)] += votes[3, s]
            hist[idx + (d + 2) * (n + 2)] += votes[4, s]
            hist[idx + (d + 2) * (n + 2) + 1] += votes[5, s]
            hist[idx + (d + 3) * (n + 2)] += votes[6, s]
            hist[idx + (d + 3) * (n + 2) + 1] += votes[7, s]
        for i in range(d):
            for j in range(d):
                idx = ((i + 1) * (d + 2) + (j + 1)) * (n + 2)
                hist[idx] += hist[idx + n]
                hist[idx + 1] += hist[idx + n + 1]
                for o in range(n):
                    out[k, (i * d + j) * n + o] = hist[idx + o]
        total = np.float32(0.0)
        for o in range(d * d * n):
            total += out[k, o] * out[k, o]
        clip = np.float32(math.sqrt(total)) * np.float32(DESCRIPTOR_CLIP)
        total = np.float32(0.0)
        for o in range(d * d * n):
            value = min(out[k, o], clip)
            out[k, o] = value
            total += value * value
        factor = np.float32(DESCRIPTOR_NORM) / max(np.float32(math.sqrt(total)), np.float32(1.1920929e-07))
        for o in range(d * d * n):
            out[k, o] = min(max(np.rint(out[k, o] * factor), np.float32(0.0)), np.float32(255.0))
    return out


EXTREMUM_OCTAVE = 7  # the octave's column in ``extrema``'s table


def extrema(space: ScaleSpace, contrast: float, prethreshold: float | None = OPENCV_PRETHRESHOLD) -> np.ndarray:
    """The refined DoG extrema of ``space`` (contrast floor ``contrast``), one per refined position, strongest first
    (ties by position): float32 (n, 8) x, y, xi, response, layer, row, column (octave pixels) and octave
    (``EXTREMUM_OCTAVE``). ``prethreshold``: the |DoG| (grey levels) an extremum must exceed to be refined; None for
    OpenCV's (see the module docstring)."""
    threshold = float(math.floor(0.5 * contrast / LAYERS * 255.0)) if prethreshold is None else float(prethreshold)
    per_octave = []
    for octave, gaussians in enumerate(space.gaussians):
        rows = _refined(gaussians, _candidates(gaussians, np.float32(threshold)), np.float32(contrast), np.float32(EDGE_THRESHOLD))
        if len(rows):
            per_octave.append(np.column_stack([rows, np.full(len(rows), octave, np.float32)]))
    if not per_octave:
        return np.zeros((0, EXTREMUM_OCTAVE + 1), np.float32)
    found = np.concatenate(per_octave)
    # one per refined position (two extrema may converge on the same sample), strongest first; ties by position
    position = (found[:, 7].astype(np.int64) << 56) | (found[:, 4].astype(np.int64) << 48) | (found[:, 5].astype(np.int64) << 24) | found[:, 6].astype(np.int64)
    found = found[np.sort(np.unique(position, return_index=True)[1])]
    return found[np.lexsort((found[:, 1], found[:, 0], found[:, 7], -found[:, 3]))]


def strongest(space: ScaleSpace, found: np.ndarray, max_keypoints: int) -> Keypoints:
    """OpenCV's ``retainBest`` of ``found`` (rows of ``extrema``, strongest first): only the strongest are oriented
    (each dominant angle a keypoint), and all keypoints at least as strong as the ``max_keypoints``-th are kept
    (ties at the boundary stay), strongest first."""
    if not len(found):
        return Keypoints.empty()
    octaves = found[:, 7].astype(np.int32)
    layers = found[:, 4].astype(np.int32)
    steps = np.float32(2.0) ** octaves.astype(np.float32)
    # OpenCV's size: SIGMA * 2^((layer + xi) / LAYERS) * 2^octave * 2, in the upsampled picture's pixels
    scales = (np.float32(SIGMA) * np.power(np.float32(2.0), (layers + found[:, 2]) / np.float32(LAYERS))).astype(np.float32)
    owners, angles, done, total = [], [], 0, 0
    while done < len(found):  # orient the strongest until max_keypoints keypoints and their ties are in
        batch = np.arange(done, min(done + max(max_keypoints - total, 1), len(found)))
        for octave in np.unique(octaves[batch]):
            rows = batch[octaves[batch] == octave]
            owner, angle = _oriented(space.gaussians[octave], found[rows, 5].astype(np.int64), found[rows, 6].astype(np.int64),
                                     layers[rows].astype(np.int64), scales[rows])
            owners.append(rows[owner])
            angles.append(angle)
            total += len(owner)
        done = int(batch[-1]) + 1
        if total >= max_keypoints and (done == len(found) or found[done, 3] < np.sort(found[np.concatenate(owners), 3])[-max_keypoints]):
            break
    if not total:
        return Keypoints.empty()
    owner, angle = np.concatenate(owners), np.concatenate(angles)
    order = np.lexsort((angle, owner))  # strongest first (as ``found``), then by angle
    owner, angle = owner[order], angle[order]
    if len(owner) > max_keypoints:  # responses are non-increasing along ``owner``
        keep = np.count_nonzero(found[owner, 3] >= found[owner[max_keypoints - 1], 3])
        owner, angle = owner[:keep], angle[:keep]
    half = np.float32(0.5)  # OpenCV reports positions and sizes in the picture's pixels, half the upsampled octave's
    table = np.column_stack([found[owner, 0] * steps[owner] * half, found[owner, 1] * steps[owner] * half,
                             scales[owner] * steps[owner], angle]).astype(np.float32)
    return Keypoints(table, found[owner, 3].copy(), octaves[owner], layers[owner])


def detect(space: ScaleSpace, max_keypoints: int, contrast: float, prethreshold: float | None = OPENCV_PRETHRESHOLD) -> Keypoints:
    """OpenCV's ``detectAndCompute`` keypoints with ``nfeatures = max_keypoints``, strongest first: the ``strongest``
    of the ``extrema`` (see there)."""
    return strongest(space, extrema(space, contrast, prethreshold), max_keypoints)


def describe(space: ScaleSpace, keypoints: Keypoints) -> np.ndarray:
    """SIFT descriptors float32 (n, 128) of ``keypoints`` (from ``detect`` on ``space``; whole values 0..255, OpenCV's)."""
    out = np.zeros((len(keypoints), DESCRIPTOR_SIZE), np.float32)
    for octave in np.unique(keypoints.octave):
        rows = np.flatnonzero(keypoints.octave == octave)
        step = np.float32(2.0) ** np.float32(int(octave) - 1)  # picture pixels per octave pixel
        table = keypoints.table[rows]
        out[rows] = _descriptors(space.gaussians[octave], table[:, 0] / step, table[:, 1] / step, keypoints.layer[rows].astype(np.int64),
                                 table[:, 2] * np.float32(0.5) / step, table[:, 3].astype(np.float32))
    return out


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel, on a small synthetic picture: the first call in a fresh
    install takes ~10 s, which ``scripts/setup.sh`` pays once instead of a first query."""
    y, x = np.mgrid[0:64, 0:64].astype(np.float32)
    picture = (128 + 100 * np.sin(x / 3.0) * np.cos(y / 5.0)).astype(np.uint8)
    space = scale_space(picture)
    describe(space, detect(space, 16, 0.01, prethreshold=0.4))
