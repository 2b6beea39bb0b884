"""Regional descriptors for copy detection: several vectors per image besides its global one. Pure numpy, no Keras.

Two kinds, one per side (the search is asymmetric, ``retrieval.search.regions``):

* **database regions** (stored): the MAC of every R-MAC region of level 2 of the image's own conv map (the map the
  global descriptor is pooled from, so they cost no extra forward pass): 4 boxes of 4 x 4 cells on EfficientNet-
  Lite0's 7 x 7 map at 224 px (a third of the picture each, overlapping), up to 6 on an aspect-preserving map,
  bounded by ``MAX_DATABASE_REGIONS`` (8); 10 KB per image in float16 at 1280-d. A small crop of a database image (the query) meets the region it was cut from.
* **query windows** (computed per query, never stored): ``QUERY_WINDOWS`` boxes of the query picture, each resized
  and encoded like a whole image (one batched forward pass), but at ``window_input_side`` (6/7 of the model's input
  side: 192 px for 224). The original inside a padded and rotated copy, or a crop of it with an overlay, meets the
  database image's global descriptor. A window is a part of the query, so at the full input side its content is
  shown larger than the database image's descriptor shows it wherever the query is the original or a crop of it;
  at 192 px the windows cost 0.73x the model's time and found more copies on the copy-detection set (protocol mAP
  0.994 -> 0.996, chained edits 0.877 / 0.903 -> 0.884 / 0.906, µAP with unmatched queries 0.872 / 0.870 -> 0.879 /
  0.871), the held-out edits the same (0.993 / 0.995 -> 0.993 / 0.995); at 160 px insets, which a window holds
  whole, fell (0.972 -> 0.906).
* **content boxes** (``content_boxes``): a query that is a page around a picture (a screenshot of an app or a web
  page) is searched as that picture: its largest content box becomes the query and the windows are cut from it; the
  whole page stays a window with weight ``PAGE_WEIGHT``, so a page frame that unrelated screenshots share does not
  outweigh the photo inside it. An elongated query (a collage of pictures side by side) also gets windows as deep as
  its short side (``strip_boxes``), one of which holds each of its pictures.
* **insets** (``inset_box``): a picture pasted on another, with no page around it, found by its straight edges; a
  query is searched as it (the whole query one more view), a database image stores its descriptor as a region.
* **grid cells** (``grid_boxes``): the pictures of a picture made of several in a grid or one above the other, cut
  along the gaps between them (straight edges across the whole picture beside a line of one colour); a database
  image stores each one's descriptor as a region (a query's windows already hold them).

Both are L2-normalised like every descriptor; whitening, when the database has one, applies to them too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..vectors import l2_normalize
from . import pooling

DATABASE_REGION_LEVELS = (2,)
MAX_DATABASE_REGIONS = 8
MAX_STORED_REGIONS = 2 * MAX_DATABASE_REGIONS  # per database image: its conv map's and its pictures' (grid cells)
MAX_QUERY_STRIPS = 24  # strip windows of an elongated query at most (a collage of 12 pictures: half a window apart)

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


def database_strip_boxes(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """The regions of an elongated database picture as PIL crop boxes: its ``strip_boxes``, at most
    ``MAX_DATABASE_REGIONS`` of them spread evenly from one end to the other; [] for other pictures."""
    return strip_boxes(width, height, MAX_DATABASE_REGIONS)


def window_detail(grey: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Mean gradient magnitude (grey levels per pixel) of ``box`` (PIL crop box) of a uint8 grey picture (H, W),
    resized to ``DETAIL_SIDE`` x ``DETAIL_SIDE``: about 0 for a flat part, 3-10 for parts of photos."""
    import cv2

    left, top, right, bottom = box
    crop = cv2.resize(np.asarray(grey[top:bottom, left:right], np.float32), (DETAIL_SIDE, DETAIL_SIDE), interpolation=cv2.INTER_AREA)
    dy, dx = np.gradient(crop)
    return float(np.hypot(dx, dy).mean())


def detailed_windows(pixels: np.ndarray, boxes: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """The ``boxes`` of an RGB uint8 picture (H, W, 3) with visible structure (``window_detail`` >= ``WINDOW_MIN_DETAIL``).
    A flat part (padding, sky, a dark corner) is no evidence of a copy: its descriptor resembles every near-blank
    image, so it is not searched."""
    import cv2

    grey = cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_RGB2GRAY)
    return [box for box in boxes if window_detail(grey, box) >= WINDOW_MIN_DETAIL]


def window_boxes(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """The query windows of a ``width`` x ``height`` picture as PIL crop boxes (left, top, right, bottom): the
    ``QUERY_WINDOWS`` grids, then, for an elongated picture, its ``strip_boxes``."""
    boxes = []
    for x0, y0, w, h in QUERY_WINDOWS:
        left, top = round(x0 * width), round(y0 * height)
        right, bottom = min(width, round((x0 + w) * width)), min(height, round((y0 + h) * height))
        if right - left >= 8 and bottom - top >= 8:
            boxes.append((left, top, right, bottom))
    return boxes + strip_boxes(width, height, MAX_QUERY_STRIPS)


def strip_boxes(width: int, height: int, limit: int | None = None) -> list[tuple[int, int, int, int]]:
    """Windows of an elongated picture (its long side >= ``STRIP_ELONGATION`` x its short side: several pictures side
    by side or stacked, a panorama) as PIL crop boxes: as deep as the short side, ``STRIP_WINDOW_ASPECT`` x that
    along the long side, sliding by half a window from one end to the other; [] for other pictures. At most
    ``limit`` of them, spread evenly from one end to the other, where there would be more (a 20,000 x 10 picture
    would have 3,076: each is encoded by the model).

    The grid windows are fractions of both sides, so on a strip they are strips too: the photo that fills a third
    of a side-by-side collage is in none of them: copy search found one at rank 33 of 560 images. On 60
    three-picture collages of the copy-detection set's originals, AP was 0.73, 0.87 with the query's SIFT sized by
    its area (``local_features``), and 0.98 with these windows too (bench/unseen_edits.py has such collages)."""
    long_side, short_side = max(width, height), min(width, height)
    if long_side < STRIP_ELONGATION * short_side or short_side < 8:
        return []
    span = round(short_side * STRIP_WINDOW_ASPECT)
    count = int(np.ceil((long_side - span) / (span / 2))) + 1
    starts = np.linspace(0, long_side - span, count).round().astype(int)
    if limit is not None and count > limit:
        starts = starts[np.linspace(0, count - 1, limit).round().astype(int)]
    starts = starts.tolist()
    if width >= height:
        return [(start, 0, start + span, height) for start in starts]
    return [(0, start, width, start + span) for start in starts]


# a query window flatter than this (mean gradient, grey levels per pixel at DETAIL_SIDE px) is not searched: on the
# copy-detection set, 47 of the 57 windows that outranked every whole-image match with a wrong image were below it,
# none of the 65 that found the right one (their 5th percentile: 2.9)
DETAIL_SIDE = 64
WINDOW_MIN_DETAIL = 1.5
STRIP_ELONGATION = 2.0  # long side / short side from which a picture also gets ``strip_boxes``
STRIP_WINDOW_ASPECT = 4 / 3  # a strip window's long side over its short side: a landscape photo's shape

# content boxes: the picture at this many pixels on its longest side; colours in 8 levels per channel
CONTENT_SIDE = 256
PAGE_MIN_SIDE = 64  # pixels: a smaller picture (an icon, a thumbnail, a 28 px Fashion-MNIST item) is no page
CONTENT_MIN_AREA, CONTENT_MAX_AREA = 0.10, 0.85  # fractions of the picture
CONTENT_MIN_FILL = 0.6  # of its bounding box a content region covers: photos are rectangles; blobs, UI clutter are not
MAX_CONTENT_BOXES = 2
PATTERN_PARTS, PATTERN_SHARE = 3, 0.5  # this many content regions of at least this share of the largest: no page
FURNITURE_SHARE = 0.2  # a busy edge band thinner than this share of a content box, cut off by flat lines, is furniture
FURNITURE_GAP = 2  # flat lines (at CONTENT_SIDE) that cut a band off
FLAT_LEVELS, NEUTRAL_LEVELS = 3, 16  # page background: grey range over 5 x 5 pixels, spread of R, G, B (of 255)
CONTENT_MIN_BACKGROUND = 0.15  # a picture with less page background than this is all content
BAR_MIN_FILL, BAR_MIN_SIDE = 0.95, 3  # letterbox bars (``_between_bars``): solid, this many px thick at CONTENT_SIDE
BAR_SHRINK = 2  # px: how far inside a flat region its 5 x 5 flatness test ends
BAR_MIN_CONTENT = 0.1  # share of the picture between two bars that is not page background
PAGE_WEIGHT = 0.9  # a query with content boxes: the cosines of the whole page (frame included) count this much
# a plain query's windows: their cosines count this much against the whole query's, since a part of one image that
# looks like another image is weaker evidence than the whole images alike (a page's picture windows count fully)
WINDOW_WEIGHT = 0.92
# query windows go through the model at this share of its input side (192 px for a 224 px model; see the docstring)
WINDOW_INPUT_SCALE = 6 / 7


def window_input_side(input_size: int) -> int:
    """The model input side (px) of a query window, for a model whose whole images go in at ``input_size``."""
    return max(1, round(input_size * WINDOW_INPUT_SCALE))


def content_sized(pixels: np.ndarray) -> np.ndarray:
    """An RGB uint8 (H, W, 3) picture at ``CONTENT_SIDE`` px on its longest side (area filter; a smaller one is
    enlarged): what ``content_boxes`` reads, and ``straight_edges`` where the picture is larger than that."""
    import cv2

    pixels = np.asarray(pixels)
    height, width = pixels.shape[:2]
    scale = CONTENT_SIDE / max(height, width)
    return cv2.resize(pixels, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)


def content_boxes(pixels: np.ndarray, patterns: bool = False, small: np.ndarray | None = None) -> list[tuple[int, int, int, int]]:
    """Rectangles of an RGB uint8 (H, W, 3) picture that hold content rather than page background, as PIL crop boxes
    (left, top, right, bottom), largest first, at most ``MAX_CONTENT_BOXES``; [] for a picture that is all content.

    The background of a screenshot or a web page is made of a few flat colours that reach its border (white, light
    grey); the photo shown in it is the largest rectangle of other colours. Colours covering >= 3 % of the picture and
    >= 5 % of its outer 3 % frame are background; the rest, opened with a square of 1/40 of the side (text and icons
    go), falls into connected regions; a region that fills >= 60 % of its bounding box is content when that box, its
    flat edge bars (letterboxing) trimmed, covers 10-85 % of the picture; failing that, a picture between two
    letterbox bars whose own background is the page's (``_between_bars``). None when page background covers < 15 %,
    when the picture is smaller than ``PAGE_MIN_SIDE`` on its shorter side, or, unless ``patterns``, when
    ``PATTERN_PARTS`` or more of the regions are each at least ``PATTERN_SHARE`` of the largest: a page shows one
    picture, or two side by side, while opaque stripes across a photo (DISC21's overlay_stripes) cut it into several
    alike bands, and a grid of product shots on a flat backdrop has no one picture either. A query is searched *as*
    its picture, and searched as one band such a query lost its copy (4 of 53 striped chained-edit queries); a
    database image keeps its regions and stores its picture's descriptor besides them, so the index passes
    ``patterns``: there the band helped (searched for by its original, a striped copy stored as a page was found
    by 4 more of 60 originals than stored whole). ``small``: ``content_sized(pixels)``, when known.
    """
    import cv2

    pixels = np.asarray(pixels)
    height, width = pixels.shape[:2]
    if min(height, width) < PAGE_MIN_SIDE:
        return []
    scale = CONTENT_SIDE / max(height, width)
    small = content_sized(pixels) if small is None else small
    # flat: the grey range (of R + G + B, 3x the mean) over 5 x 5 pixels; neutral: the spread of R, G, B
    red, green, blue = cv2.split(small)  # per-channel planes: numpy's reductions over a last axis of 3 are slow
    total = cv2.add(cv2.add(red, green, dtype=cv2.CV_16S), blue, dtype=cv2.CV_16S)
    square = np.ones((5, 5), np.uint8)
    flat = cv2.subtract(cv2.dilate(total, square), cv2.erode(total, square)) <= 3 * FLAT_LEVELS
    neutral = cv2.subtract(cv2.max(cv2.max(red, green), blue), cv2.min(cv2.min(red, green), blue)) <= NEUTRAL_LEVELS
    candidates = flat & neutral
    if candidates.mean() < CONTENT_MIN_BACKGROUND:  # background is a part of these: a photo ends here
        return []
    codes = ((red >> 5).astype(np.int32) << 6) | ((green >> 5).astype(np.int32) << 3) | (blue >> 5)
    counts = np.bincount(codes.ravel(), minlength=512)
    edge = max(1, round(min(codes.shape) * 0.03))
    border = np.concatenate([codes[:edge].ravel(), codes[-edge:].ravel(), codes[:, :edge].ravel(), codes[:, -edge:].ravel()])
    shares = np.bincount(border, minlength=512) / len(border)
    background_colours = (counts >= 0.03 * codes.size) & (shares >= 0.05)
    background = background_colours[codes] & candidates
    if background.mean() < CONTENT_MIN_BACKGROUND:
        return []
    side = max(3, round(CONTENT_SIDE / 40))
    content = cv2.morphologyEx((~background).astype(np.uint8), cv2.MORPH_OPEN, np.ones((side, side), np.uint8))
    count, _, stats, _ = cv2.connectedComponentsWithStats(content, connectivity=4)
    areas = stats[1:, cv2.CC_STAT_AREA]
    if not patterns and count > 1 and np.count_nonzero(areas >= PATTERN_SHARE * areas.max()) >= PATTERN_PARTS:
        return []
    rows, cols = codes.shape

    def in_picture(y: int, x: int, h: int, w: int) -> tuple[int, int, int, int]:  # a box at CONTENT_SIDE, as a crop box
        return round(x / scale), round(y / scale), min(width, round((x + w) / scale)), min(height, round((y + h) / scale))

    boxes = []
    for label in np.argsort(-stats[1:, cv2.CC_STAT_AREA]) + 1 if count > 1 else []:
        x, y, w, h, area = (int(v) for v in stats[label])
        if area < CONTENT_MIN_FILL * w * h or w * h < CONTENT_MIN_AREA * rows * cols:  # trimming only shrinks a box
            continue
        y, x, h, w = _trimmed(small, y, x, h, w)
        if not CONTENT_MIN_AREA <= w * h / (rows * cols) <= CONTENT_MAX_AREA:
            continue
        boxes.append(in_picture(y, x, h, w))
        if len(boxes) == MAX_CONTENT_BOXES:
            break
    if not boxes and (between := _between_bars(candidates & ~background, background)) is not None:
        boxes.append(in_picture(*between))
    return boxes


def _between_bars(bars: np.ndarray, background: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y, x, h, w) of the largest picture between two letterbox bars at ``CONTENT_SIDE``, or None. ``bars`` bool
    (h, w): the flat, neutral samples that are not page background (a 5 x 5 window of one grey: a bar's sides are
    ``BAR_SHRINK`` px inside it); ``background`` bool (h, w): the page background.

    A picture fitted into a page's slot gets black bars at its sides (or above and below). Where the picture's own
    background is the page's colour (a product shot on white), the bars, the object and the page are three
    unconnected regions, none of them a picture: the page is taken for all content, its frame stored as the
    picture's keypoints, and every screenshot of that template matched it (bench/augly_edits.py: all four false
    copies above the original, 12-24 inliers). Two solid bars (``BAR_MIN_FILL``) at least ``BAR_MIN_SIDE`` thick,
    beginning and ending within ``INSET_TOLERANCE`` px of each other, with a gap of at least ``INSET_MIN_SIDE`` of
    the picture between them and more than ``BAR_MIN_CONTENT`` of it other than page background, frame a picture;
    the bars and the gap cover ``CONTENT_MIN_AREA``-``CONTENT_MAX_AREA`` of the page."""
    import cv2

    _, _, stats, _ = cv2.connectedComponentsWithStats(bars.astype(np.uint8), connectivity=4)
    rows, cols = bars.shape
    solid = [tuple(int(v) for v in s) for s in stats[1:] if s[4] >= BAR_MIN_FILL * s[2] * s[3]]
    found = []
    grow = BAR_SHRINK  # each flat region ends this much inside its bar: the picture starts that much further out
    for ax, ay, aw, ah, _ in solid:
        for bx, by, bw, bh, _ in solid:
            if min(aw, bw) >= BAR_MIN_SIDE and abs(ay - by) <= INSET_TOLERANCE and abs(ah - bh) <= INSET_TOLERANCE:
                top, bottom = min(ay, by) - grow, max(ay + ah, by + bh) + grow  # bars left and right of it
                left, right = ax + aw + grow, bx - grow
                outer = (bx + bw - ax) * (bottom - top)
            elif min(ah, bh) >= BAR_MIN_SIDE and abs(ax - bx) <= INSET_TOLERANCE and abs(aw - bw) <= INSET_TOLERANCE:
                top, bottom = ay + ah + grow, by - grow  # bars above and below it
                left, right = min(ax, bx) - grow, max(ax + aw, bx + bw) + grow
                outer = (right - left) * (by + bh - ay)
            else:
                continue
            top, bottom, left, right = max(0, top), min(rows, bottom), max(0, left), min(cols, right)
            if (right - left >= INSET_MIN_SIDE * cols and bottom - top >= INSET_MIN_SIDE * rows
                    and CONTENT_MIN_AREA <= outer / (rows * cols) <= CONTENT_MAX_AREA
                    and (~background[top:bottom, left:right]).mean() > BAR_MIN_CONTENT):
                found.append((outer, top, left, bottom - top, right - left))
    return max(found)[1:] if found else None


def _trimmed(small: np.ndarray, y: int, x: int, h: int, w: int) -> tuple[int, int, int, int]:
    """(y, x, h, w) without the flat rows and columns at its edges (>= 95 % of their pixels within 8 grey levels of
    their median: letterbox bars) and, where that still leaves half of it, without page furniture at its edges: a
    band of busy rows thinner than ``FURNITURE_SHARE`` of it, cut off from the rest by flat rows (a post's header,
    an app's navigation bar), then the same for the columns of the rows kept, then the rows of the columns kept. A
    column cut that would keep less than half (a narrow picture between wide letterbox bars) keeps every column, and
    a second row cut that would keep less than half (a dark picture's quiet rows) keeps the first: a post's header
    above such a picture is cut off all the same (it was kept, and its avatar and name matched every screenshot of
    the template). Unchanged when even the flat edges take more than half of it."""
    grey = small[y : y + h, x : x + w].astype(np.float32).mean(axis=2)

    def busy(lines: np.ndarray) -> np.ndarray:
        off = np.abs(lines - np.median(lines, axis=1, keepdims=True)) > 8
        return np.flatnonzero(off.mean(axis=1) > 0.05)

    def span(indices: np.ndarray, length: int, furniture: bool) -> tuple[int, int]:
        runs = np.split(indices, np.flatnonzero(np.diff(indices) > FURNITURE_GAP) + 1) if furniture else [indices]
        while len(runs) > 1 and len(runs[0]) < FURNITURE_SHARE * length:
            runs = runs[1:]
        while len(runs) > 1 and len(runs[-1]) < FURNITURE_SHARE * length:
            runs = runs[:-1]
        return int(runs[0][0]), int(runs[-1][-1]) + 1

    def box(furniture: bool) -> tuple[int, int, int, int] | None:
        rows = busy(grey)
        if len(rows) == 0:
            return None
        top, bottom = span(rows, h, furniture)
        cols = busy(grey[top:bottom].T) if furniture else busy(grey.T)
        if len(cols) == 0:
            return None
        left, right = span(cols, w, furniture)
        if furniture and (right - left) * 2 < w:  # a narrow picture between letterbox bars: the header cut stands
            left, right = 0, w
        if furniture:  # the rows again, within the columns kept: bars that side margins made look busy
            rows = top + busy(grey[top:bottom, left:right])
            if len(rows) == 0:
                return None
            again = span(rows, h, furniture)
            if (again[1] - again[0]) * 2 >= h:  # not when a dark picture's quiet rows would take half of it
                top, bottom = again
        if (bottom - top) * 2 < h or (right - left) * 2 < w:
            return None
        return y + top, x + left, bottom - top, right - left

    return box(furniture=True) or box(furniture=False) or (y, x, h, w)


# insets (``inset_box``), found at CONTENT_SIDE px on the longest side (a smaller picture at its own size)
INSET_EDGE_LEVEL = 30  # an edge: R, G, B steps summed (of 255 each), 2 px apart after a 5 x 5 blur (sigma 1 px)
INSET_BLUR = 1.0
INSET_MIN_SIDE = 0.2  # an inset side is at least this share of the picture's side along it
INSET_MIN_AREA, INSET_MAX_AREA = 0.1, 0.8  # fractions of the picture: a smaller pasted picture is a sticker, an icon
INSET_SUPPORT = 0.9  # share of each side's length that lies on an edge (within 1 px)
INSET_WEAK_SUPPORT = 0.5  # ... but one of four sides inside the picture, where a translucent picture meets its like
INSET_TOLERANCE = 3  # px: parallel sides whose ends are this close pair up; a side this close to the border is on it
INSET_MAX_EDGES = 0.35  # a picture with edges at more than this share of its pixels has none to trust (insets: <= 0.25)
INSET_MIN_PIXELS = 32  # the picture's shorter side at the detector's scale: a thinner strip has no inset
GRID_LINE_SUPPORT = 0.95  # share of a line's samples on an edge for it to cut a picture into cells (``grid_boxes``)
GRID_GAP_FLATNESS = 2.0  # grey levels: the spread (std) along a gap between pictures; a horizon's, a joint's: 5-67
GRID_GAP_REACH = 2  # px at the detector's scale: how near the cut's edges the gap's flat line lies
GRID_MAX_EDGES = 0.5  # a grid of small busy pictures has more edges than an inset's picture: noise has more still
GRID_MAX_CELLS = 9  # a 3 x 3 grid; with more, a picture is no grid of pictures to store


def inset_box(pixels: np.ndarray, edges: StraightEdges | None = None) -> tuple[int, int, int, int] | None:
    """The largest picture pasted on another in an RGB uint8 (H, W, 3) picture, as a PIL crop box (left, top, right,
    bottom), or None: a rectangle whose sides (three at least: one may lie on the picture's border) run along straight
    edges for ``INSET_SUPPORT`` of their length (one of four inside the picture for ``INSET_WEAK_SUPPORT``), each
    side ``INSET_MIN_SIDE`` of the picture's or longer, covering
    ``INSET_MIN_AREA``-``INSET_MAX_AREA`` of it, with visible structure inside (``window_detail``).

    A picture in a picture (a photo pasted on a poster or another photo, a picture-in-picture frame, a thick border)
    has no flat page around it, so ``content_boxes`` cannot see it; what it always has is four straight edges where the
    pasted picture ends. Straight edges are runs of edge pixels along rows and columns (gaps of 1 px closed); two
    parallel runs whose ends match within ``INSET_TOLERANCE`` px are two sides of a candidate, kept when the other two
    sides lie on edges too. Flat drawn rectangles fail the structure test. A picture with edges almost everywhere
    (noise, a dense texture: more than ``INSET_MAX_EDGES`` of its pixels; the insets' pictures have at most a
    quarter) has none: there straight runs are chance. A picture is analysed at its own size when it is smaller
    than ``CONTENT_SIDE`` (enlarged, its pixels would be blocks with straight edges).
    Not found: a picture in a corner (two sides on the border: no different from a picture split by two lines) and
    one whose colours along two sides are the background's. Along one side they may be: a picture pasted 80-100 %
    opaque (AugLy's ``overlay_onto_background_image``) over a dark shape that meets its own dark edge showed 56 % of
    that side, and the other three whole (with one weak side of four allowed, 2 more of 480 AugLy queries and 3 of
    480 chained edits have an inset, and 4 of 1,120 references and distractors). Nor is a pasted picture under a
    tenth of the picture: a sticker, an emoji tile (the same tiles are pasted on unrelated images, and a stored one
    matched them: a copy lost on the copy-detection protocol at 6 %). On bench/unseen_edits.py's 120 insets it finds
    111 (110 with every side at ``INSET_SUPPORT``); it also finds the picture inside a thick border (116 of 120;
    113) and the drawing laid over a photo (89 of 120; 79), as queries, and a rectangle in 30 of
    560 references and distractors (a poster, a window, a screen: such a query is searched as that rectangle too,
    the whole query one more view: ``RetrievalEngine.query_features``). ``edges``: ``straight_edges(pixels)``, when
    known.
    """
    edges = straight_edges(pixels) if edges is None else edges
    if edges is None or edges.density > INSET_MAX_EDGES:
        return None
    small, scale, across_rows, across_cols = edges.small, edges.scale, edges.across_rows, edges.across_cols
    (width, height), (rows, cols) = edges.size, small.shape[:2]
    horizontal = _edge_runs(across_rows, round(INSET_MIN_SIDE * cols))
    vertical = _edge_runs(across_cols.T, round(INSET_MIN_SIDE * rows))
    near, far, first, last = _spans(vertical)  # left and right sides: the rows both span are top to bottom
    by_columns = (first, last, near, far)
    near, far, first, last = _spans(horizontal)  # top and bottom sides: the columns both span are left to right
    by_rows = (near, far, first, last)
    top, bottom, left, right = (np.concatenate(pair) for pair in zip(by_columns, by_rows))
    top = np.where(top <= INSET_TOLERANCE, 0, top)
    bottom = np.where(bottom >= rows - 1 - INSET_TOLERANCE, rows - 1, bottom)
    left = np.where(left <= INSET_TOLERANCE, 0, left)
    right = np.where(right >= cols - 1 - INSET_TOLERANCE, cols - 1, right)
    area = (bottom - top) * (right - left) / (rows * cols)
    sized = ((bottom - top >= INSET_MIN_SIDE * rows) & (right - left >= INSET_MIN_SIDE * cols)
             & (area >= INSET_MIN_AREA) & (area <= INSET_MAX_AREA))
    if not sized.any():  # most pictures: no two matching straight edges
        return None
    top, bottom, left, right, area = top[sized], bottom[sized], left[sized], right[sized], area[sized]
    on_rows, on_cols = _cumulative_near(across_rows), _cumulative_near(across_cols.T)
    sides = np.stack([  # each side's share on an edge; inf for a side on the border
        np.where(top > 0, _share(on_rows, top, left, right), np.inf),
        np.where(bottom < rows - 1, _share(on_rows, bottom, left, right), np.inf),
        np.where(left > 0, _share(on_cols, left, top, bottom), np.inf),
        np.where(right < cols - 1, _share(on_cols, right, top, bottom), np.inf),
    ])
    inside, ordered = np.isfinite(sides).sum(axis=0), np.sort(sides, axis=0)  # inf (on the border) last
    one_weak = (inside == 4) & (ordered[1] >= INSET_SUPPORT) & (ordered[0] >= INSET_WEAK_SUPPORT)
    edged = ((inside >= 3) & (ordered[0] >= INSET_SUPPORT)) | one_weak
    for k in np.flatnonzero(edged)[np.argsort(-area[edged], kind="stable")]:
        if window_detail(edges.grey, (left[k] + 2, top[k] + 2, right[k] - 1, bottom[k] - 1)) >= WINDOW_MIN_DETAIL:
            return (round(left[k] / scale), round(top[k] / scale), min(width, round(right[k] / scale)),
                    min(height, round(bottom[k] / scale)))
    return None


def grid_boxes(pixels: np.ndarray, edges: StraightEdges | None = None) -> list[tuple[int, int, int, int]]:
    """The cells of an RGB uint8 (H, W, 3) picture made of pictures side by side or one above the other (a 2 x 2
    grid, two pictures stacked), as PIL crop boxes (left, top, right, bottom) in reading order, those with visible
    structure (``window_detail``); [] for a picture that is one picture. Cells are what the gaps between pictures cut
    it into: full-length straight edges (along ``GRID_LINE_SUPPORT`` of the picture's width or height, with the
    ``inset_box`` detector's edges) beside a line of one colour (``GRID_GAP_FLATNESS``) that runs the whole picture,
    each cell at least ``INSET_MIN_SIDE`` of the picture's side, at most ``GRID_MAX_CELLS`` of them. A straight line
    of a picture's own (a horizon, a shoreline, a brick wall's joint: edges along the whole picture without a gap)
    does not cut it: its halves, stored as regions, met other pictures' (a blurred micrograph's striped copy found
    the brick wall first). Not cut either: pictures that touch with no gap between them, and a picture with edges
    almost everywhere (``GRID_MAX_EDGES``). Cut: a padded picture's flat bars (the picture is then a cell).
    ``edges``: ``straight_edges(pixels)``, when known."""
    edges = straight_edges(pixels) if edges is None else edges
    if edges is None or edges.density > GRID_MAX_EDGES:
        return []
    grey = edges.grey
    row_spans, col_spans = _cells(edges.across_rows, grey), _cells(edges.across_cols.T, grey.T)
    if not 2 <= len(row_spans) * len(col_spans) <= GRID_MAX_CELLS:
        return []
    (width, height), scale = edges.size, edges.scale
    return [(round(left / scale), round(top / scale), min(width, round(right / scale)),
             min(height, round(bottom / scale)))
            for top, bottom in row_spans for left, right in col_spans
            if window_detail(grey, (left + 2, top + 2, right - 1, bottom - 1)) >= WINDOW_MIN_DETAIL]


def _cells(edges: np.ndarray, grey: np.ndarray) -> list[tuple[int, int]]:
    """The spans (first, last + 1) of lines of a bool (L, N) between gaps: full-length edges (``GRID_LINE_SUPPORT``
    of a line's samples; neighbours within ``INSET_TOLERANCE`` are one cut, the border's too) with a flat line of the
    uint8 grey (L, N) within ``GRID_GAP_REACH``; each span at least ``INSET_MIN_SIDE`` of L; one span when nothing
    cuts it."""
    length = edges.shape[0]
    full = np.flatnonzero(edges.mean(axis=1) >= GRID_LINE_SUPPORT)
    full = full[(full > INSET_TOLERANCE) & (full < length - 1 - INSET_TOLERANCE)]
    spread = grey.std(axis=1)
    bounds = [0]
    for cut in np.split(full, np.flatnonzero(np.diff(full) > INSET_TOLERANCE) + 1) if len(full) else []:
        if spread[max(0, cut[0] - GRID_GAP_REACH) : cut[-1] + 1 + GRID_GAP_REACH].min() > GRID_GAP_FLATNESS:
            continue  # a straight line of the picture's own, no gap
        bounds += [int(cut[0]), int(cut[-1]) + 1]
    bounds.append(length)
    spans = zip(bounds[0::2], bounds[1::2])
    return [(first, last) for first, last in spans if last - first >= INSET_MIN_SIDE * length]


@dataclass(frozen=True)
class StraightEdges:
    """Where ``inset_box`` and ``grid_boxes`` look for straight lines: the picture (``size`` (width, height)) at
    ``CONTENT_SIDE`` px on its longest side, never enlarged (``small`` uint8 (h, w, 3), ``grey`` uint8 (h, w) of it,
    ``scale`` small / picture), its edges (bool (h, w)) between the rows above and below a sample (``across_rows``)
    and between the columns left and right (``across_cols``), and the share of samples on an edge (``density``:
    noise and textures are all edges, where straight runs are chance)."""

    small: np.ndarray
    grey: np.ndarray
    scale: float
    size: tuple[int, int]
    across_rows: np.ndarray
    across_cols: np.ndarray
    density: float


def straight_edges(pixels: np.ndarray, small: np.ndarray | None = None) -> StraightEdges | None:
    """An RGB uint8 (H, W, 3) picture's ``StraightEdges``; None for a picture under ``PAGE_MIN_SIDE`` and a strip
    (fewer than ``INSET_MIN_PIXELS`` px across at that scale). ``small``: ``content_sized(pixels)``, when known (the
    same pixels where the picture is larger than ``CONTENT_SIDE``)."""
    import cv2

    pixels = np.asarray(pixels)
    height, width = pixels.shape[:2]
    if min(height, width) < PAGE_MIN_SIDE:
        return None
    scale = min(1.0, CONTENT_SIDE / max(height, width))  # never enlarged: an enlarged picture's pixels are blocks
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if small is None or scale == 1.0:
        small = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
    rows, cols = small.shape[:2]
    if min(rows, cols) < INSET_MIN_PIXELS:  # a strip (20,000 x 100 px: 256 x 1 here)
        return None
    smooth = cv2.GaussianBlur(small, (5, 5), INSET_BLUR)
    across_rows = np.zeros((rows, cols), bool)
    across_rows[1:-1] = _steps(smooth[2:], smooth[:-2]) > INSET_EDGE_LEVEL
    across_cols = np.zeros((rows, cols), bool)
    across_cols[:, 1:-1] = _steps(smooth[:, 2:], smooth[:, :-2]) > INSET_EDGE_LEVEL
    density = float(across_rows.mean() + across_cols.mean()) / 2
    grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    return StraightEdges(small, grey, scale, (width, height), across_rows, across_cols, density)


def _steps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """uint16 (H, W): |a - b| summed over R, G, B, for two uint8 (H, W, 3) pictures."""
    import cv2

    red, green, blue = cv2.split(cv2.absdiff(np.ascontiguousarray(a), np.ascontiguousarray(b)))
    return cv2.add(cv2.add(red, green, dtype=cv2.CV_16U), blue, dtype=cv2.CV_16U)


def _edge_runs(edges: np.ndarray, min_length: int) -> np.ndarray:
    """int (n, 3): line, first, last + 1 of each run of True along the lines (axis 1) of a bool (L, N), gaps of one
    closed, at least ``min_length`` long."""
    import cv2

    closed = cv2.morphologyEx(edges.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((1, 3), np.uint8))
    padded = np.zeros((closed.shape[0], closed.shape[1] + 2), np.int8)
    padded[:, 1:-1] = closed
    lines, ends = np.nonzero(np.diff(padded, axis=1))  # along each line a run's start, then its end, then the next
    lines, starts, stops = lines[0::2], ends[0::2], ends[1::2]
    long_enough = stops - starts >= max(1, min_length)
    return np.stack([lines[long_enough], starts[long_enough], stops[long_enough]], axis=1)


def _spans(runs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each pair of ``_edge_runs`` rows whose ends both match within ``INSET_TOLERANCE``, on lines further apart
    than that: the nearer line, the farther one, and the first and last sample both runs cover (int arrays)."""
    def close(values: np.ndarray) -> np.ndarray:
        return np.abs(values[:, None] - values[None]) <= INSET_TOLERANCE

    line, start, stop = runs.T
    i, j = np.nonzero(np.triu(close(start) & close(stop) & ~close(line), 1))
    return (np.minimum(line[i], line[j]), np.maximum(line[i], line[j]), np.maximum(start[i], start[j]),
            np.minimum(stop[i], stop[j]) - 1)


def _cumulative_near(edges: np.ndarray) -> np.ndarray:
    """int32 (L, N + 1): along each line of a bool (L, N), the running count of samples with an edge on that line or
    on a line next to it."""
    near = edges.copy()
    near[1:] |= edges[:-1]
    near[:-1] |= edges[1:]
    return np.concatenate([np.zeros((near.shape[0], 1), np.int32), np.cumsum(near, axis=1, dtype=np.int32)], axis=1)


def _share(cumulative: np.ndarray, line: np.ndarray, first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """The share of samples first..last - 1 of each ``line`` that lie on an edge (``_cumulative_near``)."""
    return (cumulative[line, last] - cumulative[line, first]) / np.maximum(1, last - first)
