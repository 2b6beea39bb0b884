"""Stripes laid over a query at any opacity (AugLy's ``overlay_stripes``: solid, dotted or dashed, 50-100 % opaque in
DISC21-style edits), found and taken off. uint8 RGB in, uint8 out; numpy and OpenCV.

Under a stripe of colour c and opacity a the picture shows as ``s * picture + t``, with ``s = 1 - a`` and ``t = a * c``
the same over the whole pattern, so where ``s`` is not too small the picture can be had back exactly:
``(pixel - t) / s``. ``descriptors.occlusion`` only finds opaque stripes of one flat colour; through translucent
ones the picture shows, so they are not flat, and their edges took a striped copy's strongest keypoints and its CNN
descriptor (of the 43 striped AugLy queries of bench/augly_edits.py none was found as stripes, 11 were not first;
with this module 7).

How they are found (at ``DETECT_SIDE`` px):

* **Lines.** Stripes' edges are straight lines across the whole picture, in one direction, at two phases of one period
  (AugLy's mask is ``cos(2 pi u / period) > cos(pi width)`` along a direction u). Edge pixels (colour gradient over
  ``EDGE_LEVEL``) whose gradient is within ``ALIGNMENT`` of a direction are counted along every line across it: the
  share of a line's length on such edges (``_line_profile``) is near 1 on a solid stripe's edge and its width share on
  a dotted one's, and rarely over ``LINE_LEVEL`` elsewhere. The directions tried are the strongest of the gradients'
  orientation histogram, refined to half a degree.
* **Period.** The lines are explained by a period and two phases (``_periodic_fit``): at least ``MIN_LINES`` predicted
  lines on an edge, and ``MIN_RECALL`` of the strong lines found explained (a screenshot's frame, a padded copy's
  bars, a picture's own straight edges are lines, but not a periodic pattern of them).
* **Dots and dashes.** AugLy's dotted and dashed stripes are the bands cut by a second pattern across them, of the same
  period; it is looked for inside and outside the bands.
* **Which side is the stripe, and its blend.** Each hypothesis (the bands or the gaps between them; cut or not by the
  second pattern) is a mask; the mask's outline must lie on edges (``MIN_SUPPORT`` of it), and the pixels just inside
  it must be ``s * (the pixels just outside) + t`` for one s and t (``_blend_fit``, least squares with the worst pairs
  left out, residual under ``MAX_RESIDUAL`` of the picture's spread): the side where ``s`` is under
  ``MAX_TRANSMISSION`` is the stripes'.

``unblended`` then computes the picture under the stripes, or, where they let through less than ``MIN_TRANSMISSION``
of it (nearly opaque: the division would magnify JPEG's errors), fills them in as ``occlusion.unveiled`` does; their
blurred edges are inpainted. On bench/augly_edits.py's queries it finds 25 of the 43 striped ones (the others mostly
have stripes covering a few % of the picture, or a scaling, skew or crop after them) and none of the 437 others; of
60 pictures striped by AugLy with the bench's parameters it finds 39, the opacity to within 0.05 for 34. On a fine
texture (a brick wall, a star field) the pixels 7 px apart across an edge differ and the stripes read as opaque
(then filled in). It also finds checkerboards, pictures enlarged from a few dozen pixels (periodic flat squares: 9
of the 1,120 references of the copy-detection sets) and pictures in a thick border seen in perspective (2 of the
chained edits' 850 queries without stripes), which is why the query is searched with the picture it gives *beside*
the query itself (``RetrievalEngine.query_features``), never instead of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .occlusion import DETECT_SIDE, at_detect_side, unveiled

EDGE_LEVEL = 24.0  # colour gradient (Sobel / 8, the largest eigenvalue's root of the channels' structure tensor)
ALIGNMENT = np.deg2rad(5.0)  # an edge pixel's gradient this close to a direction counts for lines across it
LINE_LEVEL = 0.3  # share of a line's length on aligned edges (within 1 px) for it to be a stripe's edge
MIN_PERIOD = 8.0  # px at DETECT_SIDE
MIN_LINES = 3
MIN_RECALL = 0.95
MIN_SUPPORT = 0.85
SUPPORT_MARGIN = 0.08  # hypotheses whose outline is this much less on edges than the best one's are not fitted
MIN_COVER, MAX_COVER = 0.03, 0.8  # share of the picture a hypothesis' stripes cover
CROSS_LEVEL = 0.2  # the fit's score of a second pattern, across the bands (its lines are dots' or dashes' edges)
MAX_RESIDUAL = 0.35
MAX_TRANSMISSION = 0.7  # s = 1 - opacity: stripes that let more of the picture through are left alone
MIN_TRANSMISSION = 0.2  # under this the picture is filled in rather than unblended
TOP_DIRECTIONS = 3
MAX_LINES = 12  # the strongest lines whose spacings are tried as periods
MIN_PAIRS = 50
RING = (3.0, 4.0)  # px at DETECT_SIDE (Euclidean): how far inside and outside the outline a pair's pixels lie
EDGE_WIDTH = 1.5  # px at DETECT_SIDE each side of a stripe's edge that is inpainted


@dataclass(frozen=True)
class Lines:
    """A periodic pattern of bands across a direction at ``DETECT_SIDE`` px: along u = x cos(normal) + y sin(normal)
    - origin, a band runs from ``start`` to ``end`` (mod ``period``)."""

    normal: float
    origin: float
    period: float
    start: float
    end: float

    def coordinate(self, shape: tuple[int, int], scale: float = 1.0) -> np.ndarray:
        """float32 (H, W): u of each pixel of a picture of ``shape`` whose pixels are ``scale`` detection pixels."""
        height, width = shape
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        return (xs * np.float32(np.cos(self.normal) * scale) + ys * np.float32(np.sin(self.normal) * scale)
                - np.float32(self.origin))

    def inside(self, u: np.ndarray) -> np.ndarray:
        """bool: which u lie in a band."""
        return (u - self.start) % self.period < (self.end - self.start) % self.period

    def flipped(self) -> "Lines":
        """The gaps between the bands as bands."""
        return Lines(self.normal, self.origin, self.period, self.end, self.start)


@dataclass(frozen=True)
class Stripes:
    """Stripes found on a picture: bands ``across`` (cut into dots or dashes by ``along``, when not None) that show
    the picture as ``transmission * picture + offset`` (offset: float32 (3,), RGB); ``scale``: detection px per
    picture px."""

    across: Lines
    along: Lines | None
    transmission: float
    offset: np.ndarray
    scale: float

    def mask(self, shape: tuple[int, int]) -> np.ndarray:
        """bool (H, W): the pixels under the stripes, for a picture of ``shape``."""
        inside = self.across.inside(self.across.coordinate(shape, self.scale))
        if self.along is not None:
            inside &= self.along.inside(self.along.coordinate(shape, self.scale))
        return inside


def _colour_gradient(small: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (h, w, 3) -> (magnitude, direction mod pi) float32 (h, w) of the colour gradient (Di Zenzo's structure
    tensor of the three channels after a slight blur)."""
    import cv2

    smooth = cv2.GaussianBlur(small.astype(np.float32), (0, 0), 0.8)
    gx = cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3) / 8
    gy = cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3) / 8
    jxx, jyy, jxy = (gx * gx).sum(axis=2), (gy * gy).sum(axis=2), (gx * gy).sum(axis=2)
    largest = 0.5 * (jxx + jyy + np.sqrt((jxx - jyy) ** 2 + 4 * jxy * jxy))
    return np.sqrt(largest), 0.5 * np.arctan2(2 * jxy, jxx - jyy)


@dataclass(frozen=True)
class _EdgePixels:
    """The picture's edge pixels (colour gradient over ``EDGE_LEVEL``) at ``DETECT_SIDE`` px: where and which way."""

    shape: tuple[int, int]
    xs: np.ndarray
    ys: np.ndarray
    direction: np.ndarray  # of the gradient, mod pi


def _directions(magnitude: np.ndarray, direction: np.ndarray) -> list[float]:
    """The ``TOP_DIRECTIONS`` strongest gradient directions (radians, 8 degrees apart at least)."""
    strong = magnitude > EDGE_LEVEL
    degrees = np.minimum((direction[strong] % np.pi) * (180 / np.pi), 179.999).astype(int)
    histogram = np.bincount(degrees, weights=magnitude[strong], minlength=180)
    kernel = np.exp(-0.5 * (np.arange(-4, 5) / 1.5) ** 2)
    smooth = np.convolve(np.concatenate([histogram[-4:], histogram, histogram[:4]]), kernel, "valid")
    chosen: list[int] = []
    for i in np.argsort(-smooth):
        if len(chosen) == TOP_DIRECTIONS or smooth[i] <= 0:
            break
        if all(min(abs(i - j), 180 - abs(i - j)) > 8 for j in chosen):
            chosen.append(int(i))
    return [np.deg2rad(i + 0.5) for i in chosen]


def _chords(shape: tuple[int, int], normal: float, origin: float, count: int) -> np.ndarray:
    """float (count,): the length inside the picture of each line u = origin + i across ``normal``."""
    height, width = shape
    cos, sin = np.cos(normal), np.sin(normal)
    u = origin + np.arange(count)
    low, high = np.full(count, -np.inf), np.full(count, np.inf)
    # the point u * (cos, sin) + t * (-sin, cos) is inside while -0.5 <= x <= width - 0.5 and -0.5 <= y <= height - 0.5
    for slope, base, top in ((-sin, u * cos, width - 0.5), (cos, u * sin, height - 0.5)):
        if abs(slope) < 1e-9:
            high = np.where((base < -0.5) | (base > top), -np.inf, high)
            continue
        first, second = (-0.5 - base) / slope, (top - base) / slope
        low, high = np.maximum(low, np.minimum(first, second)), np.minimum(high, np.maximum(first, second))
    return np.maximum(high - low, 0.0)


def _line_profile(edges: _EdgePixels, normal: float, region: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """(share of each line's length on edges aligned with ``normal``, within 1 px; 0 for lines shorter than a quarter
    of the longest), origin: the u of line 0. ``region`` (bool (h, w)): count only its pixels."""
    height, width = edges.shape
    cos, sin = np.cos(normal), np.sin(normal)
    corners = np.array([0.0, (width - 1) * cos, (height - 1) * sin, (width - 1) * cos + (height - 1) * sin])
    origin = float(corners.min())
    count = int(np.ceil(corners.max() - origin)) + 1
    off = np.abs((edges.direction - normal + np.pi / 2) % np.pi - np.pi / 2)
    xs, ys = edges.xs[off < ALIGNMENT], edges.ys[off < ALIGNMENT]
    if region is not None:
        keep = region[ys, xs]
        xs, ys = xs[keep], ys[keep]
        region_ys, region_xs = np.nonzero(region)
        region_u = np.rint(region_xs * cos + region_ys * sin - origin).astype(np.int64)
        chords = np.bincount(region_u, minlength=count)[:count]
    else:
        chords = _chords(edges.shape, normal, origin, count)
    hits = np.bincount(np.rint(xs * cos + ys * sin - origin).astype(np.int64), minlength=count)[:count].astype(float)
    profile = np.convolve(hits, np.ones(3), "same") / np.maximum(chords, 1.0)
    profile[chords < 0.25 * chords.max()] = 0.0
    return profile, origin


def _peaks(profile: np.ndarray, level: float) -> np.ndarray:
    """Positions of the profile's local maxima over ``level``, 5 px apart at least, in increasing order."""
    chosen: list[int] = []
    for i in np.argsort(-profile):
        if profile[i] < level:
            break
        if all(abs(i - j) > 4 for j in chosen):
            chosen.append(int(i))
    return np.array(sorted(chosen), dtype=np.float64)


@dataclass(frozen=True)
class _Fit:
    score: float
    period: float
    start: float
    end: float
    recall: float
    lines: int  # predicted lines on an edge


def _periodic_fit(profile: np.ndarray, periods: np.ndarray | None = None) -> _Fit | None:
    """The period and two phases that best explain the profile's lines (precision: the mean profile at the lines
    predicted inside the picture; recall: the share of the strong lines' strength within 2 px of one), the periods
    tried being ``periods`` or the spacings of the strongest lines (+-1 px)."""
    peaks = _peaks(profile, LINE_LEVEL)
    valid = np.flatnonzero(profile > 0)
    if len(peaks) < 2 or len(valid) < 10:
        return None
    strength = np.minimum(profile[peaks.astype(int)], 1.0)
    near = np.minimum(np.maximum.reduce([profile, np.roll(profile, 1), np.roll(profile, -1)]), 1.0)
    low, high = valid[0], valid[-1] + 1
    if periods is None:
        top = peaks[np.argsort(-strength)[:MAX_LINES]]
        spacings = np.abs(top[:, None] - top[None, :])[np.triu_indices(len(top), 1)]
        periods = np.unique(np.concatenate([spacings + step for step in (-1.0, -0.5, 0.0, 0.5, 1.0)]))
    periods = periods[(periods >= MIN_PERIOD) & (periods <= high - low)]
    best = None
    for period in periods:
        phases = np.arange(0.0, period, 1.0)
        positions = low + phases[:, None] + np.arange(int((high - low) / period) + 2)[None, :] * period
        inside = positions < high - 0.5
        values = np.where(inside, near[np.minimum(np.rint(positions).astype(int), len(profile) - 1)], 0.0)
        counts = inside.sum(axis=1)
        mean = values.sum(axis=1) / np.maximum(counts, 1)
        first = int(np.argmax(mean))
        apart = np.minimum(np.abs(phases - phases[first]), period - np.abs(phases - phases[first]))
        # a band's other edge: not the same line again (AugLy's narrowest stripes are a tenth of the period)
        second = int(np.argmax(np.where(apart >= max(4.0, 0.08 * period), mean, -1.0)))
        start, end = low + phases[first], low + phases[second]
        distance = np.minimum(np.abs((peaks - start + period / 2) % period - period / 2),
                              np.abs((peaks - end + period / 2) % period - period / 2))
        recall = float(strength[distance <= 2.0].sum() / strength.sum())
        precision = float((values[first].sum() + values[second].sum()) / max(counts[first] + counts[second], 1))
        score = precision * recall
        if best is None or score > best.score * 1.05:
            lines = int((values[first] >= LINE_LEVEL).sum() + (values[second] >= LINE_LEVEL).sum())
            best = _Fit(score, float(period), float(start), float(end), recall, lines)
    return best


def _peakiness(profile: np.ndarray) -> float:
    """The strength of the profile's 4 strongest lines (each at most 1.5; weak ones, 0.2 and up, count while the
    direction is being refined)."""
    return float(np.sort(np.minimum(profile[_peaks(profile, 0.2).astype(int)], 1.5))[::-1][:4].sum())


def _refined(edges: _EdgePixels, normal: float) -> float:
    """``normal`` turned by up to 3.5 degrees to where its lines are sharpest (1 degree steps, then half a degree)."""
    best = (_peakiness(_line_profile(edges, normal)[0]), normal)
    for step, turns in ((1.0, (-3, -2, -1, 1, 2, 3)), (0.5, (-1, 1))):
        centre = best[1]
        for turn in turns:
            candidate = centre + np.deg2rad(step * turn)
            score = _peakiness(_line_profile(edges, candidate)[0])
            if score > best[0]:
                best = (score, candidate)
    return best[1]


def _support(mask: np.ndarray, near_edges: np.ndarray) -> float:
    """The share of the mask's outline (inside the picture) that lies on an edge."""
    import cv2

    mask = mask.astype(np.uint8)
    square = np.ones((2, 2), np.uint8)
    outline = cv2.dilate(mask, square) != cv2.erode(mask, square)
    outline[[0, -1], :] = False
    outline[:, [0, -1]] = False
    return float(near_edges[outline].mean()) if outline.sum() >= 20 else 0.0


def _blend_fit(values: np.ndarray, mask: np.ndarray, keep: float = 0.7) -> tuple[float, np.ndarray, float] | None:
    """(s, t, relative residual) of ``inside = s * outside + t`` over pairs of pixels ``RING`` px inside and outside
    the mask's outline (each inside pixel with the nearest outside one; beyond the edge's blur, in any direction),
    least squares over the ``keep`` best-fitting pairs (three rounds); the residual relative to the outside pixels'
    spread. None without ``MIN_PAIRS`` pairs."""
    import cv2

    mask = mask.astype(np.uint8)
    inside_depth = cv2.distanceTransform(mask, cv2.DIST_L2, 5)
    outside_depth = cv2.distanceTransform(1 - mask, cv2.DIST_L2, 5)
    inner = ((inside_depth > RING[0]) & (inside_depth <= RING[1])).astype(np.uint8)
    outer = ((outside_depth > RING[0]) & (outside_depth <= RING[1])).astype(np.uint8)
    if inner.sum() < MIN_PAIRS or outer.sum() < MIN_PAIRS:
        return None
    distance, labels = cv2.distanceTransformWithLabels(1 - outer, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL)
    outer_ys, outer_xs = np.nonzero(outer)
    index_of = np.zeros(labels.max() + 1, np.int64)
    index_of[labels[outer_ys, outer_xs]] = np.arange(len(outer_ys))
    inner_ys, inner_xs = np.nonzero(inner)
    close = distance[inner_ys, inner_xs] <= 2 * RING[1] + 1
    partner = index_of[labels[inner_ys[close], inner_xs[close]]]
    inside = values[inner_ys[close], inner_xs[close]]
    outside = values[outer_ys[partner], outer_xs[partner]]
    if len(inside) < MIN_PAIRS:
        return None
    chosen = np.ones(len(inside), bool)
    for _ in range(3):
        inside_mean, outside_mean = inside[chosen].mean(axis=0), outside[chosen].mean(axis=0)
        spread = ((outside[chosen] - outside_mean) ** 2).sum()
        if spread <= 1e-6:
            return None
        s = float(((inside[chosen] - inside_mean) * (outside[chosen] - outside_mean)).sum() / spread)
        t = inside_mean - s * outside_mean
        residual = np.sqrt(((inside - s * outside - t) ** 2).sum(axis=1))
        chosen = residual <= np.quantile(residual, keep)
    scatter = np.sqrt(((outside[chosen] - outside[chosen].mean(axis=0)) ** 2).sum(axis=1).mean())
    return s, t.astype(np.float32), float(np.sqrt((residual[chosen] ** 2).mean()) / max(scatter, 1e-6))


def find_stripes(pixels: np.ndarray) -> Stripes | None:
    """uint8 RGB (H, W, 3) -> the translucent (or opaque) stripes over it, or None (see the module docstring)."""
    import cv2

    pixels = np.asarray(pixels)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or min(pixels.shape[:2]) < 32:
        return None
    small, scale = at_detect_side(pixels), min(1.0, DETECT_SIDE / max(pixels.shape[:2]))
    magnitude, direction = _colour_gradient(small)
    ys, xs = np.nonzero(magnitude > EDGE_LEVEL)
    if len(ys) < 0.002 * magnitude.size:
        return None
    edges = _EdgePixels(magnitude.shape, xs, ys, direction[ys, xs] % np.pi)
    found = []
    for normal in _directions(magnitude, direction):
        normal = _refined(edges, normal)
        profile, origin = _line_profile(edges, normal)
        fit = _periodic_fit(profile)
        if fit is not None and fit.score >= LINE_LEVEL and fit.lines >= MIN_LINES and fit.recall >= MIN_RECALL:
            found.append((fit, normal, origin))
    if not found:
        return None
    fit, normal, origin = max(found, key=lambda item: item[0].score)
    first = Lines(normal, origin, fit.period, fit.start, fit.end)
    refits, along = _cross_lines(edges, first, first.inside(first.coordinate(magnitude.shape)))
    hypotheses = []
    u = first.coordinate(magnitude.shape)  # a refit has the same direction and origin
    v = {id(cut): cut.coordinate(magnitude.shape) for cut in along}
    for first in [first, *refits]:
        cuts = [None] + [cut for cut in along if abs(cut.period / first.period - 1) < 0.05]
        for lines in (first, first.flipped()):
            bands = lines.inside(u)
            for cut in cuts:
                for pieces in ((None,) if cut is None else (cut, cut.flipped())):
                    mask = bands if pieces is None else bands & pieces.inside(v[id(cut)])
                    if MIN_COVER <= mask.mean() <= MAX_COVER:
                        hypotheses.append((mask, lines, pieces))
    if not hypotheses:
        return None
    near_edges = cv2.dilate((magnitude > EDGE_LEVEL / 2).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    supports = [_support(mask, near_edges) for mask, _, _ in hypotheses]
    if max(supports) < MIN_SUPPORT:
        return None
    values = small.astype(np.float32)
    best = None
    for (mask, lines, pieces), support in zip(hypotheses, supports):
        if support < max(supports) - SUPPORT_MARGIN:
            continue
        blend = _blend_fit(values, mask)
        if blend is None or not -0.1 <= blend[0] <= MAX_TRANSMISSION or blend[2] > MAX_RESIDUAL:  # -0.1: opaque, noisy
            continue
        if best is None or blend[2] < best[0][2]:
            best = (blend, lines, pieces)
    if best is None:
        return None
    (s, t, _), lines, pieces = best
    return Stripes(lines, pieces, max(s, 0.0), t, scale)


def _cross_lines(edges: _EdgePixels, first: Lines, bands: np.ndarray) -> tuple[list[Lines], list[Lines]]:
    """(refits of ``first``, cuts): the patterns that cut the bands of ``first`` (bool (h, w): ``bands``) into dots
    or dashes, lines across them of the same period, found over the whole picture, inside the bands or between them;
    and where the cut's own lines give a longer period (``first`` fitted two lines only), ``first`` fitted again at
    that period, with that cut."""
    normal = _refined(edges, (first.normal + np.pi / 2) % np.pi)
    near_period = np.arange(0.96 * first.period, 1.04 * first.period + 0.01, 0.5)
    refits, cuts = [], []
    for region in (None, bands, ~bands):
        profile, origin = _line_profile(edges, normal, region)
        fit = _periodic_fit(profile, near_period)
        if fit is not None and fit.score >= CROSS_LEVEL:
            cuts.append(Lines(normal, origin, fit.period, fit.start, fit.end))
        own = _periodic_fit(profile)
        if own is not None and own.score >= LINE_LEVEL and own.period > 1.04 * first.period:
            own_period = np.arange(0.96 * own.period, 1.04 * own.period + 0.01, 0.5)
            again = _periodic_fit(_line_profile(edges, first.normal)[0], own_period)
            if again is not None and again.score >= CROSS_LEVEL:
                refits.append(Lines(first.normal, first.origin, again.period, again.start, again.end))
                cuts.append(Lines(normal, origin, own.period, own.start, own.end))
    return refits, cuts


def unblended(pixels: np.ndarray, stripes: Stripes) -> np.ndarray:
    """uint8 RGB (H, W, 3) with the picture under ``stripes`` computed back (``(pixel - offset) / transmission``), or,
    for nearly opaque stripes, filled in (``occlusion.unveiled``); their edges (``EDGE_WIDTH``) inpainted."""
    import cv2

    pixels = np.asarray(pixels)
    height, width = pixels.shape[:2]
    mask = stripes.mask((height, width)).astype(np.uint8)
    reach = max(1, round(EDGE_WIDTH / stripes.scale))
    square = np.ones((2 * reach + 1, 2 * reach + 1), np.uint8)
    edge = (cv2.dilate(mask, square) != cv2.erode(mask, square)).astype(np.uint8)
    if stripes.transmission < MIN_TRANSMISSION:
        return unveiled(pixels, mask | edge)
    out = pixels.astype(np.float32)
    under = mask.astype(bool)
    out[under] = (out[under] - stripes.offset) / np.float32(stripes.transmission)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return cv2.inpaint(out, edge, 3, cv2.INPAINT_TELEA)
