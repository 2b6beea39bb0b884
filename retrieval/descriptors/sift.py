"""SIFT (Lowe 2004) keypoints and descriptors, with the finest octave computed at the picture's own resolution.
Grey uint8 in, numpy arrays out.

OpenCV's SIFT finds its finest keypoints (sigma 0.8-1.6 px) in an octave of the picture upsampled 2x: four times its
pixels, about three quarters of its time. Copies of smooth pictures are matched by exactly those keypoints, so
leaving them out lost copies (emoji + crop AP 0.952 -> 0.916 on the copy-detection set). Here that octave is sampled
at the picture's own resolution: one chain of ``CHAIN_LAYERS`` Gaussian layers at sigma 0.8 * 2^(i/3) px holds it
and octave 0 (extrema at the chain's DoG layers 1..6), then the coarser octaves follow as in OpenCV (a layer of
twice the base sigma subsampled by 2, ``LAYERS`` + 3 layers each): ~3.3x fewer samples.

Sampled at the picture's own pixels, the finest layers alias: their DoG extrema are less repeatable than those
OpenCV finds on its upsampled grid, whose bilinear interpolation also blurs the picture (a variance of 0.1875 px^2:
each new sample is 3/4 and 1/4 of two pixels). The chain adds ``ANTI_ALIAS_VARIANCE`` (0.5 px^2) before its first
layer, and a keypoint's size is the blur its layer really has, sqrt(nominal^2 + 0.5). Chosen on bench/sift.py
(correct matches of transformed copies of 40 photos and 40 wallpapers; not the copy-detection protocol): 0 lost the
cat of tests/test_verification.py pasted into a screenshot frame at half its size (0 inliers); 0.1875 (what OpenCV's
upsampling adds) gave 87-93 % of OpenCV's correct matches on rotated and 0.7x copies; 0.5 gives 94-99 %, and more
than OpenCV on cropped JPEG-25 copies; 1.0 lost half-size copies of photos (71 % of OpenCV's).

Every step after it follows OpenCV's ``sift.simd.hpp`` / ``sift.dispatch.cpp`` (4.x), in numba kernels that release
the interpreter lock (indexing runs SIFT beside the model): DoG extrema over 26 neighbours, up to 5 quadratic
refinement steps, the contrast and edge tests, a 36-bin orientation histogram (smoothed, peaks >= 0.8 of the
highest, each a keypoint), and the 4 x 4 x 8 descriptor with trilinear interpolation, clipped at 0.2 and scaled to a
norm of 512 (OpenCV's fastAtan2 for the angles). Two differences in order: keypoints are ranked by response and
cut to the requested count *before* orientations are computed (OpenCV orients every candidate first; at a contrast
floor of 0.01 most of them are then dropped), and the extremum pre-threshold is half the contrast floor unrounded
(OpenCV rounds it down to 0 at 0.01, refining every faint plateau of a smooth picture). So the cost does not grow
with the weak candidates a low contrast floor admits.

A descriptor of the mirror image needs no second scale space: ``describe(..., mirror=True)`` samples the patch
mirrored (x -> -x, the x gradient negated) around the same point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

SIGMA = 1.6  # sigma of an octave's first layer, in that octave's pixels (OpenCV's default)
LAYERS = 3  # DoG layers searched per octave
INPUT_BLUR = 0.5  # the blur a picture is assumed to have
FINE_SIGMA = SIGMA / 2  # the chain's first layer: OpenCV's upsampled octave, sigma 0.8 px of the picture
CHAIN_LAYERS = 2 * LAYERS + 3  # the native chain: the finest octave and octave 0, sharing 3 layers
ANTI_ALIAS_VARIANCE = 0.5  # px^2 of blur added before the chain's first layer (see above)
BORDER = 5  # pixels of each level's edge where no extremum is searched
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
MIN_LEVEL_SIDE = 2 * BORDER + 3  # a level smaller than this has no searchable pixel


@dataclass(frozen=True)
class ScaleSpace:
    """The Gaussian and DoG layers of one picture. ``gaussians[0]`` is the native chain (float32 (CHAIN_LAYERS, H, W),
    nominal sigma ``FINE_SIGMA`` * 2^(i/3) px), ``gaussians[o]`` for o >= 1 the octave subsampled 2^o times
    ((LAYERS + 3, h, w), sigma ``SIGMA`` * 2^(i/3) in its own pixels); ``dogs[o]`` their differences; grey values on
    the 0..255 scale."""

    gaussians: tuple[np.ndarray, ...]
    dogs: tuple[np.ndarray, ...]
    size: tuple[int, int]  # (width, height) of the picture


@dataclass(frozen=True)
class Keypoints:
    """n keypoints: ``table`` float32 (n, 4) x, y (pixels of the picture), size (diameter, px), angle (degrees, OpenCV's
    convention); ``response`` float32 (n,) |DoG contrast|; ``level`` int32 (n,) scale-space level; ``layer`` int32 (n,)
    the Gaussian layer of that level the descriptor is sampled from."""

    table: np.ndarray
    response: np.ndarray
    level: np.ndarray
    layer: np.ndarray

    def __len__(self) -> int:
        return int(self.table.shape[0])

    def take(self, rows: np.ndarray) -> "Keypoints":
        return Keypoints(self.table[rows], self.response[rows], self.level[rows], self.layer[rows])

    @classmethod
    def empty(cls) -> "Keypoints":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32), np.zeros(0, np.int32))


def _blur(image: np.ndarray, sigma: float, out: np.ndarray | None = None) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma, dst=out)


def _chain(first: np.ndarray, count: int, base: float) -> np.ndarray:
    """``count`` layers from ``first`` (blur ``base``), layer i at blur base * 2^(i/LAYERS), each blurred from the last."""
    layers = np.empty((count,) + first.shape, np.float32)
    layers[0] = first
    step = 2.0 ** (1.0 / LAYERS)
    for i in range(1, count):
        previous = base * step ** (i - 1)
        _blur(layers[i - 1], math.sqrt((previous * step) ** 2 - previous**2), out=layers[i])
    return layers


def scale_space(grey: np.ndarray) -> ScaleSpace:
    """uint8 grey (H, W) -> its ``ScaleSpace`` (octaves down to ~8 px on the shorter side, as OpenCV)."""
    grey = np.asarray(grey)
    if grey.ndim != 2 or grey.dtype != np.uint8:
        raise ValueError(f"expected a uint8 grey image (H, W), got {grey.dtype} {grey.shape}")
    height, width = grey.shape
    first = _blur(grey.astype(np.float32), math.sqrt(FINE_SIGMA**2 + ANTI_ALIAS_VARIANCE - INPUT_BLUR**2))
    gaussians = [_chain(first, CHAIN_LAYERS, FINE_SIGMA)]
    # OpenCV's octaves go from -1 (upsampled) to round(log2(shorter side)) - 2; the chain holds octaves -1 and 0
    last_octave = int(round(math.log2(max(min(height, width), 1)))) - 2
    source = gaussians[0][2 * LAYERS]  # blur 2 * SIGMA px: SIGMA in the next octave's pixels
    for _ in range(1, last_octave + 1):
        first = np.ascontiguousarray(source[::2, ::2])
        if min(first.shape) < MIN_LEVEL_SIDE:
            break
        gaussians.append(_chain(first, LAYERS + 3, SIGMA))
        source = gaussians[-1][LAYERS]
    dogs = tuple(np.subtract(g[1:], g[:-1]) for g in gaussians)  # C-contiguous, as the kernels index them
    return ScaleSpace(tuple(gaussians), dogs, (int(width), int(height)))


@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def _solve3(h, b):
    """x with h x = b for a symmetric 3x3 ``h`` (zeros when singular), by cofactors."""
    a00, a01, a02 = h[0, 0], h[0, 1], h[0, 2]
    a11, a12, a22 = h[1, 1], h[1, 2], h[2, 2]
    c00 = a11 * a22 - a12 * a12
    c01 = a02 * a12 - a01 * a22
    c02 = a01 * a12 - a02 * a11
    det = a00 * c00 + a01 * c01 + a02 * c02
    out = np.zeros(3, np.float32)
    if abs(det) < 1e-12:
        return out
    c11 = a00 * a22 - a02 * a02
    c12 = a01 * a02 - a00 * a12
    c22 = a00 * a11 - a01 * a01
    out[0] = (c00 * b[0] + c01 * b[1] + c02 * b[2]) / det
    out[1] = (c01 * b[0] + c11 * b[1] + c12 * b[2]) / det
    out[2] = (c02 * b[0] + c12 * b[1] + c22 * b[2]) / det
    return out


@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def _row_extremes(row, high, low):
    """high[c] / low[c]: the largest / smallest of row[c - 1], row[c], row[c + 1] (the ends left as they were)."""
    n = row.shape[0]
    for c in range(n - 2):  # indexed from 0 and one output per loop: the compiler vectorises these
        high[c + 1] = max(max(row[c], row[c + 1]), row[c + 2])
    for c in range(n - 2):
        low[c + 1] = min(min(row[c], row[c + 1]), row[c + 2])


@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def _candidates(dog, first_layer, last_layer, threshold):
    """int64 (m, 3) layer, row, column of the DoG samples beyond ``threshold`` that are the largest (positive) or
    smallest (negative) of their 3 x 3 x 3 neighbourhood, at layers first_layer..last_layer away from the border.

    One pass down the rows: each layer's 3-sample row extremes are kept for the last three rows (a ring), their
    column extremes give every sample's 3 x 3 extremes, and three neighbouring layers' of those its 3 x 3 x 3 ones.
    Everything it touches per row stays in cache, and the loops are branch-free."""
    layers, rows, cols = dog.shape
    base = first_layer - 1
    span = last_layer - first_layer + 3  # the searched layers and one on either side
    ring_high = np.zeros((span, 3, cols), np.float32)
    ring_low = np.zeros((span, 3, cols), np.float32)
    square_high = np.zeros((span, cols), np.float32)
    square_low = np.zeros((span, cols), np.float32)
    top = np.empty(cols, np.float32)
    bottom = np.empty(cols, np.float32)
    hit = np.zeros(cols, np.uint8)
    found = []
    for k in range(span):
        for r in (BORDER - 1, BORDER):
            _row_extremes(dog[base + k, r], ring_high[k, r % 3], ring_low[k, r % 3])
    for r in range(BORDER, rows - BORDER):
        for k in range(span):
            _row_extremes(dog[base + k, r + 1], ring_high[k, (r + 1) % 3], ring_low[k, (r + 1) % 3])
            a, b, c3, out = ring_high[k, 0], ring_high[k, 1], ring_high[k, 2], square_high[k]
            for c in range(cols):
                out[c] = max(max(a[c], b[c]), c3[c])
            a, b, c3, out = ring_low[k, 0], ring_low[k, 1], ring_low[k, 2], square_low[k]
            for c in range(cols):
                out[c] = min(min(a[c], b[c]), c3[c])
        for k in range(1, span - 1):
            a, b, c3 = square_high[k - 1], square_high[k], square_high[k + 1]
            for c in range(cols):
                top[c] = max(max(a[c], b[c]), c3[c])
            a, b, c3 = square_low[k - 1], square_low[k], square_low[k + 1]
            for c in range(cols):
                bottom[c] = min(min(a[c], b[c]), c3[c])
            v = dog[base + k, r]
            for c in range(cols):
                value = v[c]
                hit[c] = ((value > threshold) & (value >= top[c])) | ((value < -threshold) & (value <= bottom[c]))
            for c in range(BORDER, cols - BORDER):
                if hit[c]:
                    found.append((base + k, r, c))
    out = np.empty((len(found), 3), np.int64)
    for i in range(len(found)):
        out[i, 0], out[i, 1], out[i, 2] = found[i]
    return out


@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def _refined(dog, candidates, first_layer, last_layer, contrast, edge):
    """OpenCV's adjustLocalExtrema for each candidate (layer, row, column) of one level: up to ``MAX_REFINE_STEPS``
    quadratic fits, each moving to the neighbour the offset points to; then the contrast and edge tests. -> float32
    (m, 7) rows x, y (level pixels, refined), scale index (layer + offset), |contrast|, layer, row, column (final)."""
    layers, rows, cols = dog.shape
    scale = 1.0 / 255.0
    out = np.empty((len(candidates), 7), np.float32)
    m = 0
    h = np.empty((3, 3), np.float32)
    g = np.empty(3, np.float32)
    for k in range(len(candidates)):
        layer, r, c = candidates[k, 0], candidates[k, 1], candidates[k, 2]
        xc = xr = xi = 0.0
        converged = False
        for _ in range(MAX_REFINE_STEPS):
            img = dog[layer]
            prev = dog[layer - 1]
            nxt = dog[layer + 1]
            centre = img[r, c]
            g[0] = (img[r, c + 1] - img[r, c - 1]) * 0.5 * scale
            g[1] = (img[r + 1, c] - img[r - 1, c]) * 0.5 * scale
            g[2] = (nxt[r, c] - prev[r, c]) * 0.5 * scale
            h[0, 0] = (img[r, c + 1] + img[r, c - 1] - 2 * centre) * scale
            h[1, 1] = (img[r + 1, c] + img[r - 1, c] - 2 * centre) * scale
            h[2, 2] = (nxt[r, c] + prev[r, c] - 2 * centre) * scale
            h[0, 1] = h[1, 0] = (img[r + 1, c + 1] - img[r + 1, c - 1] - img[r - 1, c + 1] + img[r - 1, c - 1]) * 0.25 * scale
            h[0, 2] = h[2, 0] = (nxt[r, c + 1] - nxt[r, c - 1] - prev[r, c + 1] + prev[r, c - 1]) * 0.25 * scale
            h[1, 2] = h[2, 1] = (nxt[r + 1, c] - nxt[r - 1, c] - prev[r + 1, c] + prev[r - 1, c]) * 0.25 * scale
            x = _solve3(h, g)
            xc, xr, xi = -x[0], -x[1], -x[2]
            if abs(xi) < 0.5 and abs(xr) < 0.5 and abs(xc) < 0.5:
                converged = True
                break
            if abs(xi) > 1e6 or abs(xr) > 1e6 or abs(xc) > 1e6:
                break
            c += int(round(xc))
            r += int(round(xr))
            layer += int(round(xi))
            if layer < first_layer or layer > last_layer or c < BORDER or c >= cols - BORDER or r < BORDER or r >= rows - BORDER:
                break
        if not converged:
            continue
        response = dog[layer, r, c] * scale + 0.5 * (g[0] * xc + g[1] * xr + g[2] * xi)
        if abs(response) * LAYERS < contrast:
            continue
        trace = h[0, 0] + h[1, 1]
        det = h[0, 0] * h[1, 1] - h[0, 1] * h[0, 1]
        if det <= 0 or trace * trace * edge >= (edge + 1) ** 2 * det:
            continue
        out[m, 0] = c + xc
        out[m, 1] = r + xr
        out[m, 2] = layer + xi
        out[m, 3] = abs(response)
        out[m, 4] = layer
        out[m, 5] = r
        out[m, 6] = c
        m += 1
    return out[:m]


@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy", inline="always")
def _fast_atan2(y, x):
    """OpenCV's fastAtan2: atan2 in degrees, 0..360, to ~0.3 degrees (the angle SIFT's histograms use); branch-free."""
    ax = abs(x)
    ay = abs(y)
    t = min(ax, ay) / (max(ax, ay) + np.float32(2.220446049250313e-16))
    t2 = t * t
    a = (((np.float32(-2.5397431947995093) * t2 + np.float32(8.914001034592505)) * t2 - np.float32(18.667446610748135)) * t2
         + np.float32(57.28357738696519)) * t
    a = np.float32(90.0) - a if ay > ax else a
    a = np.float32(180.0) - a if x < 0 else a
    return np.float32(360.0) - a if y < 0 else a


@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def _orientations(image, r, c, radius, sigma, hist):
    """OpenCV's calcOrientationHist: the smoothed ORIENTATION_BINS-bin gradient histogram around (r, c); its maximum."""
    n = ORIENTATION_BINS
    raw = np.zeros(n + 4, np.float32)
    rows, cols = image.shape
    factor = -1.0 / (2.0 * sigma * sigma)
    along = np.empty(2 * radius + 1, np.float32)  # exp(-(i^2 + j^2) / 2 sigma^2) = along[i] * along[j]
    for i in range(-radius, radius + 1):
        along[i + radius] = math.exp(i * i * factor)
    for i in range(-radius, radius + 1):
        y = r + i
        if y <= 0 or y >= rows - 1:
            continue
        for j in range(-radius, radius + 1):
            x = c + j
            if x <= 0 or x >= cols - 1:
                continue
            dx = image[y, x + 1] - image[y, x - 1]
            dy = image[y - 1, x] - image[y + 1, x]
            weight = along[i + radius] * along[j + radius]
            angle = _fast_atan2(dy, dx)
            b = int(round(n / 360.0 * angle))
            if b >= n:
                b -= n
            if b < 0:
                b += n
            raw[b + 2] += weight * math.sqrt(dx * dx + dy * dy)
    raw[0], raw[1] = raw[n], raw[n + 1]
    raw[n + 2], raw[n + 3] = raw[2], raw[3]
    best = 0.0
    for i in range(n):
        hist[i] = (raw[i] + raw[i + 4]) * (1.0 / 16.0) + (raw[i + 1] + raw[i + 3]) * (4.0 / 16.0) + raw[i + 2] * (6.0 / 16.0)
        best = max(best, hist[i])
    return best


@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def _oriented(images, rows_r, rows_c, layers, scales, max_angles):
    """For each keypoint (level pixels r, c; Gaussian ``layers``; scale in level pixels): its dominant angles (degrees,
    OpenCV's convention), at most ``max_angles`` each -> (keypoint index int32 (m,), angle float32 (m,))."""
    n = ORIENTATION_BINS
    hist = np.empty(n, np.float32)
    owner = np.empty(len(layers) * max_angles, np.int32)
    angles = np.empty(len(layers) * max_angles, np.float32)
    m = 0
    for k in range(len(layers)):
        scale = scales[k]
        best = _orientations(images[layers[k]], rows_r[k], rows_c[k], int(round(ORIENTATION_RADIUS * scale)),
                             ORIENTATION_SIGMA * scale, hist)
        threshold = best * ORIENTATION_PEAK
        kept = 0
        for j in range(n):
            left = hist[j - 1] if j > 0 else hist[n - 1]
            right = hist[j + 1] if j < n - 1 else hist[0]
            if hist[j] > left and hist[j] > right and hist[j] >= threshold and kept < max_angles:
                b = j + 0.5 * (left - right) / (left - 2 * hist[j] + right)
                if b < 0:
                    b += n
                elif b >= n:
                    b -= n
                angle = 360.0 - 360.0 / n * b
                if abs(angle - 360.0) < 1e-6:
                    angle = 0.0
                owner[m] = k
                angles[m] = angle
                m += 1
                kept += 1
    return owner[:m], angles[:m]


@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def _descriptors(images, xs, ys, layers, scales, angles, mirror):
    """OpenCV's calcSIFTDescriptor for each keypoint (level pixels x, y; Gaussian ``layers``; scale in level pixels;
    angle in degrees, OpenCV's convention) -> float32 (n, 128), values 0..255. ``mirror``: the descriptor of the mirror
    image (the patch sampled at x - j instead of x + j, the x gradient negated; ``angles`` are the mirrored
    keypoints'). As OpenCV, three passes per keypoint: gather the samples inside the rotated grid, compute their
    weights, angles and magnitudes (vectorised), and accumulate them into the histograms with trilinear weights."""
    d = DESCRIPTOR_CELLS
    n = DESCRIPTOR_BINS
    out = np.zeros((len(layers), d * d * n), np.float32)
    hist = np.zeros((d + 2) * (d + 2) * (n + 2), np.float32)
    sign = -1 if mirror else 1
    capacity = 0
    for k in range(len(layers)):
        radius = int(round(DESCRIPTOR_CELL_SCALE * scales[k] * 1.4142135623730951 * (d + 1) * 0.5))
        capacity = max(capacity, (2 * radius + 1) ** 2)
    gx = np.empty(capacity, np.float32)
    gy = np.empty(capacity, np.float32)
    row_bin = np.empty(capacity, np.float32)
    col_bin = np.empty(capacity, np.float32)
    weight = np.empty(capacity, np.float32)
    angle = np.empty(capacity, np.float32)
    bins_per_degree = np.float32(n / 360.0)
    for k in range(len(layers)):
        image = images[layers[k]]
        rows, cols = image.shape
        pr = int(round(ys[k]))
        pc = int(round(xs[k]))
        ori = np.float32(360.0) - angles[k]
        if abs(ori - 360.0) < 1e-6:
            ori = np.float32(0.0)
        width = np.float32(DESCRIPTOR_CELL_SCALE) * scales[k]
        radius = int(round(width * 1.4142135623730951 * (d + 1) * 0.5))
        radius = min(radius, int(math.sqrt(float(cols) * cols + float(rows) * rows)))
        cos_t = np.float32(math.cos(math.radians(ori))) / width
        sin_t = np.float32(math.sin(math.radians(ori))) / width
        exp_scale = np.float32(-1.0 / (d * d * 0.5))
        along = np.empty(2 * radius + 1, np.float32)  # the Gaussian weight is separable: rotation keeps i^2 + j^2
        for i in range(-radius, radius + 1):
            along[i + radius] = math.exp(i * i * (cos_t * cos_t + sin_t * sin_t) * exp_scale)
        m = 0
        half = np.float32(d / 2 + 0.5)  # |rotated offset| < half (in cells) inside the grid
        for i in range(-radius, radius + 1):
            r = pr + i
            if r <= 0 or r >= rows - 1:
                continue
            # the columns j whose rotated offsets can lie inside the grid: |j sin + i cos| < half, |j cos - i sin| < half
            low, high = -radius, radius
            for slope, offset in ((sin_t, i * cos_t), (cos_t, -i * sin_t)):
                if abs(slope) > 1e-12:
                    a = (-half - offset) / slope
                    b = (half - offset) / slope
                    low = max(low, int(math.floor(min(a, b))))
                    high = min(high, int(math.ceil(max(a, b))))
                elif abs(offset) >= half:
                    high = low - 1
            for j in range(low, high + 1):
                c = pc + sign * j
                c_rot = j * cos_t - i * sin_t
                r_rot = j * sin_t + i * cos_t
                rbin = r_rot + np.float32(d / 2 - 0.5)
                cbin = c_rot + np.float32(d / 2 - 0.5)
                if rbin > -1 and rbin < d and cbin > -1 and cbin < d and c > 0 and c < cols - 1:
                    gx[m] = sign * (image[r, c + 1] - image[r, c - 1])
                    gy[m] = image[r - 1, c] - image[r + 1, c]
                    row_bin[m] = rbin
                    col_bin[m] = cbin
                    weight[m] = along[i + radius] * along[j + radius]
                    m += 1
        for s in range(m):
            weight[s] *= math.sqrt(gx[s] * gx[s] + gy[s] * gy[s])
            angle[s] = (_fast_atan2(gy[s], gx[s]) - ori) * bins_per_degree
        hist[:] = 0.0
        for s in range(m):
            rbin = row_bin[s]
            cbin = col_bin[s]
            obin = angle[s]
            r0 = int(rbin + 1) - 1  # floor: rbin, cbin > -1 and |obin| < n + 1
            c0 = int(cbin + 1) - 1
            o0 = int(obin + (n + 1)) - (n + 1)
            rbin -= r0
            cbin -= c0
            obin -= o0
            o0 += n * (o0 < 0) - n * (o0 >= n)
            magnitude = weight[s]
            v_r1 = magnitude * rbin
            v_r0 = magnitude - v_r1
            v_rc11 = v_r1 * cbin
            v_rc10 = v_r1 - v_rc11
            v_rc01 = v_r0 * cbin
            v_rc00 = v_r0 - v_rc01
            v_rco111 = v_rc11 * obin
            v_rco110 = v_rc11 - v_rco111
            v_rco101 = v_rc10 * obin
            v_rco100 = v_rc10 - v_rco101
            v_rco011 = v_rc01 * obin
            v_rco010 = v_rc01 - v_rco011
            v_rco001 = v_rc00 * obin
            v_rco000 = v_rc00 - v_rco001
            idx = ((r0 + 1) * (d + 2) + c0 + 1) * (n + 2) + o0
            hist[idx] += v_rco000
            hist[idx + 1] += v_rco001
            hist[idx + (n + 2)] += v_rco010
            hist[idx + (n + 3)] += v_rco011
            hist[idx + (d + 2) * (n + 2)] += v_rco100
            hist[idx + (d + 2) * (n + 2) + 1] += v_rco101
            hist[idx + (d + 3) * (n + 2)] += v_rco110
            hist[idx + (d + 3) * (n + 2) + 1] += v_rco111
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
        clip = math.sqrt(total) * DESCRIPTOR_CLIP
        total = np.float32(0.0)
        for o in range(d * d * n):
            value = min(out[k, o], clip)
            out[k, o] = value
            total += value * value
        factor = DESCRIPTOR_NORM / max(math.sqrt(total), 1.1920929e-07)
        for o in range(d * d * n):
            out[k, o] = min(max(round(out[k, o] * factor), 0.0), 255.0)
    return out


def detect(space: ScaleSpace, max_keypoints: int, contrast: float) -> Keypoints:
    """The ``max_keypoints`` strongest keypoints of ``space`` (by DoG response; ties by position) with their angles
    (a keypoint with two or three dominant angles counts once per angle), strongest first."""
    per_level = []
    # the pre-threshold: half the contrast a refined extremum must reach (OpenCV floors it to an integer, 0 at a floor
    # of 0.01, which sends every faint plateau of a smooth picture to refinement)
    threshold = 0.5 * contrast / LAYERS * 255.0
    for level, dog in enumerate(space.dogs):
        if min(dog.shape[1:]) < MIN_LEVEL_SIDE:
            continue
        last = dog.shape[0] - 2  # the native chain: layers 1..2 * LAYERS; an octave: 1..LAYERS
        rows = _refined(dog, _candidates(dog, 1, last, threshold), 1, last, float(contrast), EDGE_THRESHOLD)
        if len(rows):
            per_level.append(np.column_stack([rows, np.full(len(rows), level, np.float32)]))
    if not per_level:
        return Keypoints.empty()
    found = np.concatenate(per_level)
    # one keypoint per refined position (two extrema may converge on the same sample): level, layer, row, column
    position = ((found[:, 7].astype(np.int64) * 64 + found[:, 4].astype(np.int64)) << 32) + found[:, 5].astype(np.int64) * 65536 + found[:, 6].astype(np.int64)
    found = found[np.sort(np.unique(position, return_index=True)[1])]
    found = found[np.lexsort((found[:, 1], found[:, 0], -found[:, 3]))][:max_keypoints]
    levels = found[:, 7].astype(np.int32)
    layers = found[:, 4].astype(np.int32)
    steps = (2.0 ** levels).astype(np.float32)
    nominal = np.where(levels == 0, FINE_SIGMA, SIGMA) * 2.0 ** (found[:, 2] / LAYERS) * steps  # px of the picture
    sigmas = (np.sqrt(nominal**2 + ANTI_ALIAS_VARIANCE) / steps).astype(np.float32)  # the actual blur, level pixels
    owners, angles = [], []
    for level in np.unique(levels):
        rows = np.flatnonzero(levels == level)
        owner, angle = _oriented(space.gaussians[level], found[rows, 5].astype(np.int64), found[rows, 6].astype(np.int64),
                                 layers[rows].astype(np.int64), sigmas[rows], 3)
        owners.append(rows[owner])
        angles.append(angle)
    owner = np.concatenate(owners)
    angle = np.concatenate(angles)
    kept = np.lexsort((angle, owner))[:max_keypoints]  # ``found`` is strongest first
    owner, angle = owner[kept], angle[kept]
    table = np.column_stack([found[owner, 0] * steps[owner], found[owner, 1] * steps[owner],
                             2.0 * sigmas[owner] * steps[owner], angle]).astype(np.float32)
    return Keypoints(table, found[owner, 3].copy(), levels[owner], layers[owner])


def describe(space: ScaleSpace, keypoints: Keypoints, mirror: bool = False) -> np.ndarray:
    """SIFT descriptors float32 (n, 128) of ``keypoints`` (values 0..255, OpenCV's scaling); ``mirror``: of the mirrored
    keypoints in the mirror image (``mirrored``), computed on this, unmirrored, scale space."""
    out = np.zeros((len(keypoints), DESCRIPTOR_SIZE), np.float32)
    if not len(keypoints):
        return out
    angles = keypoints.table[:, 3]
    if mirror:
        angles = (180.0 - angles) % 360.0
    for level in np.unique(keypoints.level):
        rows = np.flatnonzero(keypoints.level == level)
        step = np.float32(2.0**level)
        table = keypoints.table[rows]
        out[rows] = _descriptors(space.gaussians[level], table[:, 0] / step, table[:, 1] / step,
                                 keypoints.layer[rows].astype(np.int64), table[:, 2] * 0.5 / step,
                                 angles[rows].astype(np.float32), mirror)
    return out


def mirrored(keypoints: Keypoints, width: int) -> Keypoints:
    """The keypoints of the picture flipped left-right (``width`` its width): x -> width - 1 - x, angle -> 180 - angle."""
    table = keypoints.table.copy()
    table[:, 0] = width - 1 - table[:, 0]
    table[:, 3] = (180.0 - table[:, 3]) % 360.0
    return Keypoints(table, keypoints.response, keypoints.level, keypoints.layer)
