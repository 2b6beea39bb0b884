"""The optional copy-detection part of a feature database: region vectors and local features, stored per image.

Two optional HDF5 groups (a file without them is an ordinary database; readers that do not know them ignore them)::

    /regions          vectors  float16 (M, D)   L2-normalised region descriptors (retrieval.descriptors.regions)
                      image    int32 (M,)       the database row each region belongs to, non-decreasing
                      page     uint8 (N,)       1: the image is a page around a picture (a screenshot), its last
                                                region is that picture (optional: absent in older files, all 0)
    /local            keypoints   float16 (K, 4)   x, y, size, angle (retrieval.descriptors.local_features)
                      descriptors uint8 (K, 128)   RootSIFT, quantised
                      image       int32 (K,)       the database row of each keypoint, non-decreasing
                      frame       int32 (N, 2)     width, height of the resized image the coordinates refer to
                      thumbnail   uint8 (M, T, T, 3) colour thumbnails (retrieval.descriptors.thumbnails): an
                                                image's, then for a page the picture's; each in the top-left
                                                corner, zero-padded (optional, with the next two: absent in older files)
                      thumbnail_size  int32 (M, 2)  width, height of each thumbnail
                      thumbnail_image int32 (M,)    the database row of each thumbnail, non-decreasing
                      word        uint16 (K,)      the visual word of each keypoint (retrieval.search.visual_words),
                                                in a vocabulary tree of word_top float32 (B, 128) and word_children
                                                float32 (B, B, 128) centres (optional, the three together: absent in
                                                older files and in databases below visual_words.STORED_FROM_IMAGES)
                      attributes  method ("sift"), max_keypoints, max_side, verify_default (1: queries verify
                                  unless told not to, the ``copy-detection`` preset)

Every dataset has fletcher32 checksums like the rest of the file; rows out of range, a decreasing image column, too
many regions or keypoints for one image, or non-finite values are refused as a corrupt file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..descriptors.local_features import DATABASE_KEYPOINTS, DATABASE_SIDE, DESCRIPTOR_BYTES, KEYPOINT_FIELDS, LocalFeatures
from ..descriptors.regions import MAX_STORED_REGIONS
from ..descriptors.thumbnails import THUMBNAIL_SIDE
from ..errors import IndexFileError


@dataclass
class CopyFeatures:
    """Regions and/or local features of every image of a database (row order = the database's)."""

    count: int  # images
    region_vectors: np.ndarray | None = None  # float16 (M, D)
    region_image: np.ndarray | None = None  # int32 (M,)
    region_page: np.ndarray | None = None  # bool (N,): a page around a picture, whose last region is the picture
    keypoints: np.ndarray | None = None  # float16 (K, 4)
    descriptors: np.ndarray | None = None  # uint8 (K, 128)
    keypoint_image: np.ndarray | None = None  # int32 (K,)
    frames: np.ndarray | None = None  # int32 (N, 2)
    thumbnails: np.ndarray | None = None  # uint8 (M, T, T, 3), zero-padded
    thumbnail_sizes: np.ndarray | None = None  # int32 (M, 2): width, height
    thumbnail_image: np.ndarray | None = None  # int32 (M,)
    words: np.ndarray | None = None  # uint16 (K,): each keypoint's visual word, or None (learned when loaded)
    word_top: np.ndarray | None = None  # float32 (B, 128): the vocabulary tree's first level
    word_children: np.ndarray | None = None  # float32 (B, B, 128): its second level
    verify_default: bool = False
    max_keypoints: int = DATABASE_KEYPOINTS
    max_side: int = DATABASE_SIDE

    @property
    def has_regions(self) -> bool:
        return self.region_vectors is not None

    @property
    def has_local(self) -> bool:
        return self.descriptors is not None

    def __post_init__(self):
        self._local_starts = None
        self._region_starts = None
        self._thumbnail_starts = None

    # ------------------------------------------------------------------ per image

    def _starts(self, image: np.ndarray) -> np.ndarray:
        return np.searchsorted(image, np.arange(self.count + 1), side="left")

    def regions_of(self, row: int) -> np.ndarray:
        """float16 (R, D) regions of image ``row`` (possibly none)."""
        if self._region_starts is None:
            self._region_starts = self._starts(self.region_image)
        return self.region_vectors[self._region_starts[row] : self._region_starts[row + 1]]

    def is_page(self, row: int) -> bool:
        """Whether image ``row`` is a page around a picture (its last region is that picture's descriptor)."""
        return bool(self.region_page is not None and self.region_page[row])

    def local_of(self, row: int) -> LocalFeatures:
        """The stored local features of image ``row``."""
        if self._local_starts is None:
            self._local_starts = self._starts(self.keypoint_image)
        start, end = self._local_starts[row], self._local_starts[row + 1]
        width, height = (int(v) for v in self.frames[row])
        thumbnails = ()
        if self.thumbnails is not None:
            if self._thumbnail_starts is None:
                self._thumbnail_starts = self._starts(self.thumbnail_image)
            rows = range(self._thumbnail_starts[row], self._thumbnail_starts[row + 1])
            thumbnails = tuple(self.thumbnails[i, : self.thumbnail_sizes[i, 1], : self.thumbnail_sizes[i, 0]] for i in rows)
        return LocalFeatures(self.keypoints[start:end], self.descriptors[start:end], (width, height), thumbnails)

    def local_bytes_per_image(self) -> float:
        if not self.has_local or not self.count:
            return 0.0
        thumbnails = 0 if self.thumbnails is None else self.thumbnails.nbytes + self.thumbnail_sizes.nbytes + self.thumbnail_image.nbytes
        return (self.keypoints.nbytes + self.descriptors.nbytes + self.keypoint_image.nbytes + self.frames.nbytes + thumbnails) / self.count

    def region_bytes_per_image(self) -> float:
        if not self.has_regions or not self.count:
            return 0.0
        return (self.region_vectors.nbytes + self.region_image.nbytes) / self.count

    # ------------------------------------------------------------------ building

    @classmethod
    def assemble(
        cls,
        regions: Sequence[np.ndarray] | None,
        local: Sequence[LocalFeatures] | None,
        dim: int,
        *,
        verify_default: bool = False,
        pages: Sequence[bool] | None = None,
    ) -> "CopyFeatures":
        """From per-image parts, in database row order (``regions[i]`` (R_i, D), ``local[i]``, ``pages[i]``: see
        ``region_page``)."""
        count = len(regions) if regions is not None else len(local)
        features = cls(count=count, verify_default=verify_default)
        if regions is not None:
            parts = [np.asarray(r, np.float16).reshape(-1, dim) for r in regions]
            features.region_vectors = np.concatenate(parts) if parts else np.zeros((0, dim), np.float16)
            features.region_image = np.concatenate([np.full(len(p), i, np.int32) for i, p in enumerate(parts)]) if parts else np.zeros(0, np.int32)
            page = np.zeros(count, bool) if pages is None else np.asarray(pages, bool).reshape(count)
            features.region_page = page & np.array([len(p) > 0 for p in parts], bool).reshape(count)
        if local is not None:
            features.keypoints = np.concatenate([f.keypoints for f in local]) if local else np.zeros((0, KEYPOINT_FIELDS), np.float16)
            features.descriptors = np.concatenate([f.descriptors for f in local]) if local else np.zeros((0, DESCRIPTOR_BYTES), np.uint8)
            features.keypoint_image = (
                np.concatenate([np.full(len(f), i, np.int32) for i, f in enumerate(local)]) if local else np.zeros(0, np.int32)
            )
            features.frames = np.array([f.size for f in local], np.int32).reshape(-1, 2)
            if local and all(f.thumbnails for f in local):  # rows carried over from an older file may have none
                every = [(row, t) for row, f in enumerate(local) for t in f.thumbnails]
                features.thumbnails = np.zeros((len(every), THUMBNAIL_SIDE, THUMBNAIL_SIDE, 3), np.uint8)
                for i, (_, t) in enumerate(every):
                    features.thumbnails[i, : t.shape[0], : t.shape[1]] = t
                features.thumbnail_sizes = np.array([(t.shape[1], t.shape[0]) for _, t in every], np.int32)
                features.thumbnail_image = np.array([row for row, _ in every], np.int32)
        return features

    def settings(self) -> dict:
        """What a rebuild must reproduce: which parts there are, and the query default."""
        return {"regions": self.has_regions, "local_features": self.has_local, "verify": self.verify_default}


# ---------------------------------------------------------------------- file


def write_copy_features(h5, features: CopyFeatures | None, count: int) -> None:
    """Add the optional groups to an open ``h5py.File`` being written (nothing when ``features`` is None)."""
    if features is None:
        return
    if features.count != count:
        raise ValueError(f"copy features describe {features.count} images, the database has {count}")
    if features.has_regions:
        group = h5.create_group("regions")
        page = features.region_page if features.region_page is not None else np.zeros(count, bool)
        for name, data in (("vectors", features.region_vectors), ("image", features.region_image), ("page", page.astype(np.uint8))):
            group.create_dataset(name, data=data, chunks=True if len(data) else None, fletcher32=bool(len(data)))
        group.attrs["max_per_image"] = MAX_STORED_REGIONS
    if features.has_local:
        group = h5.create_group("local")
        for name, data in (
            ("keypoints", features.keypoints), ("descriptors", features.descriptors),
            ("image", features.keypoint_image), ("frame", features.frames),
            *((
                ("thumbnail", features.thumbnails), ("thumbnail_size", features.thumbnail_sizes),
                ("thumbnail_image", features.thumbnail_image),
            ) if features.thumbnails is not None else ()),
        ):
            group.create_dataset(name, data=data, chunks=True if len(data) else None, fletcher32=bool(len(data)))
        if features.words is not None:
            for name, data in (("word", features.words), ("word_top", features.word_top), ("word_children", features.word_children)):
                group.create_dataset(name, data=data, chunks=True if len(data) else None, fletcher32=bool(len(data)))
        group.attrs["method"] = "sift"
        group.attrs["max_keypoints"] = features.max_keypoints
        group.attrs["max_side"] = features.max_side
    h5.attrs["copy_detection"] = int(features.verify_default)


def _image_column(data: np.ndarray, count: int, path: Path, what: str, limit: int) -> np.ndarray:
    image = np.asarray(data, np.int64)
    if image.ndim != 1 or (len(image) and (image.min() < 0 or image.max() >= count or np.any(np.diff(image) < 0))):
        raise IndexFileError(f"{path}: the index file is corrupt ({what} rows out of order or range); rebuild it with index.py --rebuild", kind="corrupt")
    if len(image) and np.bincount(image, minlength=count).max() > limit:
        raise IndexFileError(f"{path}: the index file is corrupt (more than {limit} {what} for one image); rebuild it with index.py --rebuild", kind="corrupt")
    return image.astype(np.int32)


def read_copy_features(h5, path: Path, count: int, dim: int) -> CopyFeatures | None:
    """The optional groups of an open database file, checked; None when it has neither."""
    if "regions" not in h5 and "local" not in h5:
        return None
    features = CopyFeatures(count=count, verify_default=bool(int(h5.attrs.get("copy_detection", 0))))
    if "regions" in h5:
        group = h5["regions"]
        vectors = np.asarray(group["vectors"][...])
        if vectors.dtype != np.float16 or vectors.ndim != 2 or vectors.shape[1] != dim:
            raise IndexFileError(f"{path}: regions have shape {vectors.shape} {vectors.dtype}, expected float16 (M, {dim})")
        if not np.isfinite(vectors).all():
            raise IndexFileError(f"{path}: the index file is corrupt (region vectors hold NaN or infinite values); rebuild it with index.py --rebuild", kind="corrupt")
        image = _image_column(group["image"][...], count, path, "regions", MAX_STORED_REGIONS)
        if len(image) != len(vectors):
            raise IndexFileError(f"{path}: {len(vectors)} region vectors but {len(image)} region image ids")
        page = np.asarray(group["page"][...]) if "page" in group else np.zeros(count, np.uint8)
        if page.shape != (count,) or (len(page) and page.max() > 1):
            raise IndexFileError(f"{path}: the index file is corrupt (region page flags of shape {page.shape}); rebuild it with index.py --rebuild", kind="corrupt")
        page = page.astype(bool)
        if page.any() and np.bincount(image, minlength=count)[page].min() < 1:
            raise IndexFileError(f"{path}: the index file is corrupt (a page without regions); rebuild it with index.py --rebuild", kind="corrupt")
        features.region_vectors, features.region_image, features.region_page = vectors, image, page
    if "local" in h5:
        group = h5["local"]
        keypoints = np.asarray(group["keypoints"][...])
        descriptors = np.asarray(group["descriptors"][...])
        frames = np.asarray(group["frame"][...])
        limit = int(group.attrs.get("max_keypoints", DATABASE_KEYPOINTS))
        image = _image_column(group["image"][...], count, path, "keypoints", max(limit, 1))
        if (
            keypoints.dtype != np.float16 or keypoints.shape != (len(image), KEYPOINT_FIELDS)
            or descriptors.dtype != np.uint8 or descriptors.shape != (len(image), DESCRIPTOR_BYTES)
            or frames.shape != (count, 2)
        ):
            raise IndexFileError(
                f"{path}: local features have shapes {keypoints.shape} {descriptors.shape} {frames.shape}, "
                f"expected ({len(image)}, {KEYPOINT_FIELDS}) float16, ({len(image)}, {DESCRIPTOR_BYTES}) uint8, ({count}, 2)"
            )
        if not np.isfinite(keypoints).all():
            raise IndexFileError(f"{path}: the index file is corrupt (keypoints hold NaN or infinite values); rebuild it with index.py --rebuild", kind="corrupt")
        features.keypoints, features.descriptors, features.keypoint_image = keypoints, descriptors, image
        features.frames = frames.astype(np.int32)
        if "thumbnail" in group:
            features.thumbnails, features.thumbnail_sizes, features.thumbnail_image = _thumbnails(group, count, path)
        if "word" in group:
            features.words, features.word_top, features.word_children = _words(group, len(image), path)
        features.max_keypoints = limit
        features.max_side = int(group.attrs.get("max_side", DATABASE_SIDE))
    return features


def _thumbnails(group, count: int, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The checked colour thumbnails (M, T, T, 3), their sizes (M, 2) and rows (M,) of an open ``local`` group."""
    thumbnails = np.asarray(group["thumbnail"][...])
    sizes = np.asarray(group["thumbnail_size"][...]) if "thumbnail_size" in group else np.zeros((0,), np.int32)
    image = _image_column(group["thumbnail_image"][...] if "thumbnail_image" in group else np.zeros(0), count, path, "thumbnails", 2)
    side = thumbnails.shape[1] if thumbnails.ndim == 4 else 0
    total = len(image)
    if (
        thumbnails.dtype != np.uint8 or thumbnails.shape != (total, side, side, 3) or sizes.shape != (total, 2)
        or (total and (sizes.min() < 1 or sizes.max() > side))
    ):
        raise IndexFileError(
            f"{path}: the index file is corrupt (thumbnails of shape {thumbnails.shape}, sizes of shape {sizes.shape}); "
            "rebuild it with index.py --rebuild", kind="corrupt",
        )
    return thumbnails, sizes.astype(np.int32), image


def _words(group, keypoints: int, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The checked visual words (K,) uint16 of an open ``local`` group and their vocabulary tree's two levels."""
    words = np.asarray(group["word"][...])
    top = np.asarray(group["word_top"][...]) if "word_top" in group else np.zeros(0, np.float32)
    children = np.asarray(group["word_children"][...]) if "word_children" in group else np.zeros(0, np.float32)
    branch = top.shape[0] if top.ndim == 2 else 0
    if (
        words.dtype != np.uint16 or words.shape != (keypoints,) or top.dtype != np.float32 or top.shape != (branch, DESCRIPTOR_BYTES)
        or children.dtype != np.float32 or children.shape != (branch, branch, DESCRIPTOR_BYTES) or not branch
        or (keypoints and int(words.max()) >= branch * branch) or not (np.isfinite(top).all() and np.isfinite(children).all())
    ):
        raise IndexFileError(
            f"{path}: the index file is corrupt (visual words of shape {words.shape} {words.dtype}, vocabulary of shapes "
            f"{top.shape} and {children.shape}); rebuild it with index.py --rebuild", kind="corrupt",
        )
    return words, top, children
