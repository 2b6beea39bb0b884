"""Index-time encoding for copy detection: the global descriptor plus region vectors and local features per file.

``CopyEncoder`` wraps an ``Extractor`` and yields the same ``EncodedItem`` batches as ``Extractor.encode_files`` (the
global vector is the one a plain index stores, but for a JPEG large enough that the plain index's decoder scales it
down further: it is resized from a decode at >= ``DATABASE_SIDE`` px, closer to the full decode a query gets), with
``regions`` (R, D) and ``local`` (``LocalFeatures``) added.
For a single-scale encoder with one of the plain poolings the regions come from the same conv maps as the global
descriptor (one forward pass); otherwise the global descriptor is the extractor's and the regions need a second
pass at scale 1. One decode of each file (JPEG's DCT scaling down to ``DATABASE_SIDE`` pixels at most) serves the
model's input, the page detector and the local features, computed at up to ``DATABASE_SIDE`` pixels. An image
that is a page around a picture (a screenshot: ``regions.content_boxes``) gets that picture's descriptor as one more
region, its last, and is marked ``page``; its local features are that picture's keypoints, with its colour
thumbnail beside the page's (a query that is a page is searched and verified as its picture; the page's template
is shared by unrelated screenshots). An elongated image (a collage of pictures side by side:
``regions.database_strip_boxes``) has its strips, encoded in the same forward pass, as its regions instead of its
conv map's (a squashed map, where no region holds one of its pictures). Any other image made of pictures in a grid
or one above the other (``regions.grid_boxes``) gets each picture's descriptor as one more region; failing that, an
image with a picture pasted on it (``regions.inset_box``) gets that picture's, as a page does. Both keep their own
local features (the pictures' keypoints are among them): searched for by its original, the cell or inset is found.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from ..images import open_image, prefetched_batches, resize_for_backbone
from ..vectors import l2_normalize
from . import pooling
from .extractor import DEFAULT_BATCH_SIZE, EncodedItem, Extractor
from .local_features import DATABASE_KEYPOINTS, DATABASE_SIDE, LocalFeatures, extract_local_features
from .regions import (
    PAGE_MIN_SIDE, content_boxes, content_sized, database_strip_boxes, grid_boxes, inset_box, region_vectors, straight_edges,
)

SHARED_MAP_POOLINGS = ("max", "avg", "sum", "gem", "rmac", "crow")


@dataclass
class CopyItem(EncodedItem):
    """An ``EncodedItem`` with the image's region vectors and local features (None when not asked for)."""

    regions: np.ndarray | None = None
    local: LocalFeatures | None = None
    page: bool = False  # a page around a picture (``regions.content_boxes``): its last region is that picture


# what an image's crops (encoded beside it) are to its regions: a page's picture, the cells of a grid or a pasted
# picture, appended; or an elongated picture's strips, instead of its conv map's regions
PAGE, GRID, INSET, STRIPS = "page", "grid", "inset", "strips"


class CopyEncoder:
    """Global descriptors + regions + local features of files, in batches (see the module docstring)."""

    def __init__(self, extractor: Extractor, *, regions: bool = True, local: bool = True):
        self.extractor = extractor
        self.regions = regions
        self.local = local
        encoder = extractor.encoder
        self.shared_maps = list(encoder.scales) == [1.0] and encoder.pooling in SHARED_MAP_POOLINGS

    def encode_arrays(self, arrays: list[np.ndarray], region_count: int | None = None) -> tuple[np.ndarray, list[np.ndarray | None]]:
        """uint8 arrays resized by the database's rule -> (global descriptors (N, D), per image regions (R, D) or None).

        Only the first ``region_count`` arrays (default: all) get regions; the others (the pictures inside pages) are
        encoded in the same forward pass as whole images, their regions None."""
        extractor = self.extractor
        encoder = extractor.encoder
        count = len(arrays) if region_count is None else region_count
        if not self.regions:
            return extractor.encode_arrays(arrays), [None] * len(arrays)
        vectors = None if self.shared_maps else extractor.encode_arrays(arrays)
        out = np.empty((len(arrays), extractor.dim), np.float32) if vectors is None else vectors
        regions: list[np.ndarray | None] = [None] * len(arrays)
        groups: dict[tuple, list[int]] = {}
        for i, array in enumerate(arrays):
            if vectors is None or i < count:
                groups.setdefault(array.shape, []).append(i)
        for rows in groups.values():
            maps = extractor.feature_maps(np.stack([arrays[i] for i in rows]))
            if vectors is None:
                out[rows] = l2_normalize(pooling.pool(encoder.pooling, maps, **encoder.pooling_params))
            with_regions = [row for row, i in enumerate(rows) if i < count]
            for i, per_image in zip([rows[row] for row in with_regions], region_vectors(maps[with_regions])):
                regions[i] = per_image
        return out, regions

    def encode_files(
        self, paths: Iterable[str | os.PathLike], batch_size: int = DEFAULT_BATCH_SIZE, workers: int = 2
    ) -> Iterator[list[CopyItem]]:
        """Like ``Extractor.encode_files``: one list of ``CopyItem`` per batch, in input order; unusable files are items
        with ``error`` set."""
        encoder = self.extractor.encoder
        size, rule = encoder.input_size, encoder.resize_rule

        def load(path):  # one decode serves the model, the page detector and SIFT
            picture = open_image(path, draft_size=None if rule == "squash-nearest" else max(size, DATABASE_SIDE))
            array, dimensions = resize_for_backbone(picture, size, rule), picture.info["source_size"]
            pixels = np.asarray(picture)
            small = content_sized(pixels) if self.regions and min(pixels.shape[:2]) >= PAGE_MIN_SIDE else None
            boxes = content_boxes(pixels, patterns=True, small=small) if self.regions else []  # a page's picture is stored besides
            inside, crops, kind = None, [], None
            if boxes:
                left, top, right, bottom = boxes[0]
                inside, crops, kind = pixels[top:bottom, left:right], [picture.crop(boxes[0])], PAGE
            elif self.regions:
                crops, kind = [picture.crop(box) for box in database_strip_boxes(*picture.size)], STRIPS
                edges = None if crops else straight_edges(pixels, small)  # both look for straight lines in the same edges
                if edges is not None:
                    crops, kind = [picture.crop(box) for box in grid_boxes(pixels, edges)], GRID
                if edges is not None and not crops and (inset := inset_box(pixels, edges)) is not None:
                    crops, kind = [picture.crop(inset)], INSET
            local = extract_local_features(pixels, DATABASE_SIDE, DATABASE_KEYPOINTS, picture=inside) if self.local else None
            return array, dimensions, local, [resize_for_backbone(crop, size, rule) for crop in crops], kind

        import cv2

        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)  # the loader threads are the parallelism: OpenCV's own threads only oversubscribe the cores
        try:
            yield from self._batches(paths, load, batch_size, workers)
        finally:
            cv2.setNumThreads(threads)

    def _batches(self, paths, load, batch_size: int, workers: int) -> Iterator[list[CopyItem]]:
        """``encode_files``' loop: ``load`` on each file (on ``workers`` threads), each batch through the model."""
        for start, results in prefetched_batches(list(paths), load, batch_size, workers):
            good = [i for i, (loaded, _) in enumerate(results) if loaded is not None]
            arrays = [results[i][0][0] for i in good] + [crop for i in good for crop in results[i][0][3]]
            vectors, regions = self.encode_arrays(arrays, region_count=len(good)) if good else (None, [])
            items = [CopyItem(start + i, None, error) for i, (_, error) in enumerate(results)]
            next_crop = len(good)  # the crops' vectors follow the images', in the same order
            for row, i in enumerate(good):
                _, dimensions, local, crops, kind = results[i][0]
                if crops:  # a page, a grid or an inset adds its pictures' to its regions; a strip's are its strips
                    mine = vectors[next_crop : next_crop + len(crops)].astype(regions[row].dtype)
                    next_crop += len(crops)
                    regions[row] = mine if kind == STRIPS else np.concatenate([regions[row], mine])
                items[i].vector = vectors[row]
                items[i].size = tuple(int(side) for side in dimensions)
                items[i].regions = regions[row]
                items[i].local = local
                items[i].page = kind == PAGE
            yield items
