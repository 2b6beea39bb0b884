"""The retrieval engine: one feature database, the extractor that encodes queries exactly like it, and its pipeline.

Shared by ``query_online.py``, ``evaluate.py``, the web app and the Python API. Build it once; ``encode`` and
``search*`` calls are cheap and thread-safe. Every search goes through ``retrieval.search.pipeline.QueryPipeline``
(stored whitening -> the recorded backend -> query expansion through that backend), so every face ranks alike.
``close()`` lets go of the backend (a Milvus connection, faiss files).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .descriptors.extractor import Extractor
from .errors import RetrievalError
from .search.backends import open_backend, open_regions
from .search.backends.memory import MemoryBackend
from .search.expansion import NO_EXPANSION, QueryExpansion
from .search.copies import NO_LOCAL_FEATURES, NoLocalFeatures, QueryFeatures
from .search.pipeline import QueryPipeline, searched_matrix
from .storage.database import FeatureDatabase, read_database, with_legacy_weights


def at_working_size(image: Image.Image, input_size: int) -> Image.Image:
    """An RGB query reduced to what a copy search reads of it: its longest side at most twice ``QUERY_SIDE`` (the
    largest picture the query's SIFT reads), unless that would leave its shortest side under twice the model's
    ``input_size`` (a query window, 0.45 of a side or more, then goes into the model shrunk, never enlarged: a
    panorama's strips keep their detail); never enlarged itself. A phone photo (12 megapixels) was cropped, turned
    and resized at full size for every window and view: 0.8 s per query against 0.24 s at 512 px."""
    from .descriptors.local_features import QUERY_SIDE

    width, height = image.size
    scale = min(1.0, max(2 * QUERY_SIDE / max(width, height), 2 * input_size / min(width, height)))
    if scale >= 1.0:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)


def open_query(source: str | os.PathLike | bytes) -> Image.Image:
    """A query file or upload decoded for a copy search (``images.open_image``): a JPEG larger than ``at_working_size``
    keeps is scaled down by its decoder (DCT scaling, both sides kept at twice ``QUERY_SIDE`` or more), which costs
    less than decoding it whole. Raises ImageError."""
    from .descriptors.local_features import QUERY_SIDE
    from .images import open_image

    return open_image(source, draft_size=2 * QUERY_SIDE)


def _at_sift_size(image: Image.Image) -> np.ndarray:
    """An RGB picture's pixels at most as large as a query's SIFT reads (twice ``QUERY_SIDE``)."""
    from .descriptors.local_features import QUERY_SIDE

    if max(image.size) > 2 * QUERY_SIDE:
        image = image.copy()
        image.thumbnail((2 * QUERY_SIDE, 2 * QUERY_SIDE))
    return np.asarray(image)


# the picture turned a quarter, a half and three quarters: the CNN's descriptor is not invariant to rotation, and a
# rotated copy of a smooth picture has no keypoints to verify
QUARTER_TURNS = (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)


def _scaled(box: tuple[int, int, int, int], scale: float) -> tuple[int, int, int, int]:
    """A crop box (left, top, right, bottom) of a picture resized by 1 / ``scale``, in the full picture's pixels."""
    return box if scale == 1 else tuple(int(round(value * scale)) for value in box)


def without_stripes(pixels: np.ndarray) -> Image.Image | None:
    """An RGB picture's pixels (``_at_sift_size``) with opaque stripes over them filled in (``descriptors.occlusion``);
    None when it has none."""
    from .descriptors.occlusion import stripe_mask, unveiled

    stripes = stripe_mask(pixels)
    return None if stripes is None else Image.fromarray(unveiled(pixels, stripes))


def without_translucent_stripes(pixels: np.ndarray) -> Image.Image | None:
    """An RGB picture's pixels (``_at_sift_size``) with stripes laid over it at any opacity taken off
    (``descriptors.translucent_stripes``); None when it has none."""
    from .descriptors.translucent_stripes import find_stripes, unblended

    stripes = find_stripes(pixels)
    return None if stripes is None else Image.fromarray(unblended(pixels, stripes))


def without_impulses(pixels: np.ndarray) -> Image.Image | None:
    """An RGB picture's pixels (``_at_sift_size``) with impulse noise over them filtered out
    (``descriptors.impulses``); None when it has none."""
    from .descriptors.impulses import despeckled

    filtered = despeckled(pixels)
    return None if filtered is None else Image.fromarray(filtered)


@dataclass(frozen=True)
class Hit:
    """One search result: 1-based rank, cosine score, row in the database, path relative to the image folder."""

    rank: int
    score: float
    id: int
    path: str
    inliers: int = -1  # geometric verification: inliers of a verified result, 0 not verified, -1 not checked

    @property
    def verified(self) -> bool:
        return self.inliers > 0

    def as_dict(self) -> dict:
        out = {"rank": self.rank, "score": round(self.score, 6), "id": self.id, "path": self.path}
        if self.inliers >= 0:
            out.update(verified=self.verified, inliers=self.inliers)
        return out


def open_pipeline(index_path, database: FeatureDatabase, *, backend: str | None = None, uri: str | None = None) -> QueryPipeline:
    """The query pipeline of a database read from ``index_path``: its searched matrix and recorded backend."""
    matrix = searched_matrix(database.vectors, database.whitening)
    opened = open_backend(Path(index_path), database, matrix, override=backend, uri=uri)
    try:
        regions = open_regions(Path(index_path), database, override=backend, uri=uri)
    except BaseException:
        opened.close()
        raise
    return QueryPipeline(opened, matrix, database.whitening, database.copies, regions)


class RetrievalEngine:
    """A database in memory, a matching extractor (or None for vector-only use) and the query pipeline (by default
    exact search in memory). ``image_root`` overrides the folder recorded in the file.
    """

    def __init__(
        self,
        database: FeatureDatabase,
        extractor: Extractor | None,
        pipeline: QueryPipeline | None = None,
        image_root: str | os.PathLike | None = None,
    ):
        if pipeline is None:  # a database in memory only: exact search over its searched matrix
            matrix = searched_matrix(database.vectors, database.whitening)
            pipeline = QueryPipeline(MemoryBackend(matrix), matrix, database.whitening, database.copies)
        self.database = database
        self.extractor = extractor
        self.pipeline = pipeline
        root = image_root or database.image_root
        self.image_root = Path(root) if root else None

    @classmethod
    def open(
        cls,
        index_path: str | os.PathLike,
        *,
        weights_file: str | os.PathLike | None = None,
        image_root: str | os.PathLike | None = None,
        with_extractor: bool = True,
        backend: str | None = None,
        milvus_uri: str | None = None,
        previous: "RetrievalEngine | None" = None,
    ) -> "RetrievalEngine":
        """Read the database and build its extractor (skip that with ``with_extractor=False`` for vector-only use).

        Searches go through the backend recorded in the database; ``backend`` serves it with another one (``memory``
        always works), ``milvus_uri`` reaches the recorded collection at another address. ``previous`` (a server
        reloading a new version of the file): its extractor is reused when the encoder settings are unchanged, so no
        second model is built; ``previous`` itself is never modified. Raises RetrievalError.
        """
        database = with_legacy_weights(read_database(index_path), weights_file)
        pipeline = open_pipeline(index_path, database, backend=backend, uri=milvus_uri)
        try:
            extractor = None
            if with_extractor:
                same = previous is not None and previous.extractor is not None and (
                    database.encoder.identity() == previous.database.encoder.identity()
                )
                extractor = previous.extractor if same else Extractor.for_database(
                    database.encoder, weights_file, database.codebook, image_root=image_root or database.image_root)
                if pipeline.can_verify:  # the first query would load the compiled kernels: load them here
                    from .descriptors.local_features import prepare_sift
                    from .search.matching import warm_up

                    prepare_sift()
                    warm_up()
        except BaseException:
            pipeline.close()
            raise
        return cls(database, extractor, pipeline, image_root)

    def close(self) -> None:
        self.pipeline.close()

    def __len__(self) -> int:
        return len(self.database)

    @property
    def matrix(self) -> np.ndarray:
        """The searched matrix (N, d): the stored vectors, whitened when the database carries a whitening."""
        return self.pipeline.matrix

    def image_path(self, hit_or_id: Hit | int) -> Path | None:
        """Absolute path of a database image, or None when the image folder is unknown."""
        row = hit_or_id.id if isinstance(hit_or_id, Hit) else int(hit_or_id)
        if self.image_root is None:
            return None
        return self.image_root / self.database.paths[row]

    # ------------------------------------------------------------------ encoding

    def load_extractor(self, weights_file: str | os.PathLike | None = None) -> None:
        """Build the extractor of an engine opened without one (the evaluator needs it only for some queries)."""
        if self.extractor is None:
            self.extractor = Extractor.for_database(
                self.database.encoder, weights_file, self.database.codebook, image_root=self.image_root)

    def _extractor(self) -> Extractor:
        if self.extractor is None:
            raise RetrievalError("this engine was opened without an extractor (vector-only)")
        return self.extractor

    def encode(self, source: str | os.PathLike | bytes) -> np.ndarray:
        """An image file or its bytes -> descriptor (D,), encoded like the database. Raises ImageError."""
        return self._extractor().encode_source(source)

    def encode_images(self, images: Sequence, input_sizes: Sequence[int] | None = None) -> np.ndarray:
        """RGB PIL images -> descriptors (M, D), encoded like the database (``input_sizes``: see
        ``Extractor.encode_pil``)."""
        return self._extractor().encode_pil(images, input_sizes)

    def query_features(self, image, for_verification: bool = True) -> QueryFeatures:
        """An RGB PIL image (reduced first to ``at_working_size``) -> what a copy search compares
        (``retrieval.search.copies.QueryFeatures``): its descriptor,
        the descriptors of its windows (one batch with it, smaller: ``regions.window_input_side``) when the database
        has regions, and, when ``for_verification`` (a search that verifies) and the database has local features, its
        local features and its mirror image's. A query (or, for a page, its picture) under opaque stripes
        (``without_stripes``) is searched as it is and with the stripes filled in (one more window), and verified with
        the filled picture's local features. A query with a picture pasted on it (``regions.inset_box``) and no page
        around it is searched as that picture, with the whole query one more view, calibrated like the windows and
        cut into them as a plain query is; its local features are the whole query's. The query (its picture) turned
        by quarter turns (``QUARTER_TURNS``) is three more views, calibrated and weighted like the windows (SIFT is
        invariant to rotation, the CNN is not). A query with impulse noise (``without_impulses``) is looked at
        filtered for its page and inset, and, when it has no opaque stripes, its (filtered) picture is searched too
        (one more whole view) and verified with, beside the picture itself; so is the query (or its picture) with
        stripes at any opacity taken off (``without_translucent_stripes``)."""
        from .descriptors.local_features import query_local_features
        from .descriptors.regions import (
            PAGE_MIN_SIDE, PAGE_WEIGHT, WINDOW_WEIGHT, content_boxes, content_sized, detailed_windows, inset_box,
            straight_edges, window_boxes, window_input_side,
        )
        from .search.verification import QueryLocalFeatures

        input_size = self._extractor().encoder.input_size
        image = at_working_size(image if image.mode == "RGB" else image.convert("RGB"), input_size)
        crops, weights, whole_views = [image], [], 0
        window_rows = range(0)  # the crops that are windows: they go through the model smaller
        seen = image  # the picture the local features are taken from
        restored_views = []  # the picture filtered of impulse noise, or unstriped: more local features to verify with
        if self.pipeline.copies is not None and self.pipeline.copies.has_regions:
            # the whole query as SIFT reads it, shrunk once (a 12-megapixel upload takes ~0.1 s)
            whole, small = image, _at_sift_size(image)
            # impulse noise hides a page's flat background and a pasted picture's edges: look at the filtered query
            filtered = without_impulses(small)
            pixels = np.asarray(image if filtered is None else filtered)
            scale = image.width / pixels.shape[1]  # the filtered query is at most as large as SIFT reads
            shrunk = content_sized(pixels) if min(pixels.shape[:2]) >= PAGE_MIN_SIDE else None  # for both detectors
            contents = content_boxes(pixels, small=shrunk)
            if contents:  # a picture inside a page (a screenshot): its content stands for the query, the page counts less
                page = image
                image = page.crop(_scaled(contents[0], scale))
                crops = [image, page, *(page.crop(_scaled(box, scale)) for box in contents[1:])]
                weights = [PAGE_WEIGHT] + [1.0] * (len(contents) - 1)
                filtered = None if filtered is None else filtered.crop(contents[0])
            elif (edges := straight_edges(pixels, shrunk)) is not None and (inset := inset_box(pixels, edges)) is not None:
                # the pasted picture may be the copy
                crops, weights = [image.crop(_scaled(inset, scale)), image], [1.0]
            windows = detailed_windows(np.asarray(image), window_boxes(*image.size))
            window_rows = range(len(crops), len(crops) + len(windows))
            crops += [image.crop(box) for box in windows]
            weights += [1.0 if contents else WINDOW_WEIGHT] * len(windows)  # a page's picture is all evidence
            crops += [image.transpose(turn) for turn in QUARTER_TURNS]  # a copy on its side or upside down
            weights += [WINDOW_WEIGHT] * len(QUARTER_TURNS)
            seen = image
            # stripes across the whole query (a collage is taken for a page too), else across its picture: searched
            # and verified as it looks with them filled in
            pictures = [small if picture is whole else _at_sift_size(picture)
                        for picture in ([page, image] if contents else [image])]
            for picture in pictures:
                filled = without_stripes(picture)
                if filled is not None:
                    seen = filled
                    crops.append(filled)
                    weights.append(1.0)
                    whole_views = 1  # a view of the whole query, not a part: its cosines stand as they are
                    break
            else:
                despeckled = filtered
                # translucent stripes: the picture computed back from under them is one more view beside the query
                # (a checkerboard is such stripes too): searched and verified with, like the despeckled picture
                unstriped = next(filter(None, map(without_translucent_stripes, pictures)), None)
                restored_views = [view for view in (despeckled, unstriped) if view is not None]
                crops += restored_views
                weights += [1.0] * len(restored_views)
                whole_views = len(restored_views)
        window_side = window_input_side(input_size)
        sides = [window_side if i in window_rows else input_size for i in range(len(crops))]
        if for_verification and self.pipeline.can_verify:  # SIFT on a second thread beside the model (both free the GIL)
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-features") as pool:
                pending = pool.submit(query_local_features, np.asarray(seen))
                cleaned = [pool.submit(query_local_features, np.asarray(view)) for view in restored_views]
                vectors = self.encode_images(crops, sides)
                local = QueryLocalFeatures(*pending.result(), tuple(view.result()[0] for view in cleaned))
        else:
            vectors, local = self.encode_images(crops, sides), None
        if len(crops) == 1:
            return QueryFeatures(vectors[0], None, local)
        parts = np.arange(len(weights)) < len(weights) - whole_views
        return QueryFeatures(vectors[0], vectors[1:], local, np.asarray(weights, np.float32), parts)

    @property
    def copy_search(self) -> bool:
        """Whether searches use the database's copy features (regions, local features)."""
        return self.pipeline.copies is not None

    def resolve_verify(self, verify: bool | None) -> bool:
        """``verify`` as asked, or the database's default (on for ``--preset copy-detection``). Raises
        ``NoLocalFeatures`` (one line, a 400 on the server) when asked of a database without local features."""
        if verify is None:
            return self.pipeline.verifies_by_default
        if verify and not self.pipeline.can_verify:
            raise NoLocalFeatures(NO_LOCAL_FEATURES)
        return bool(verify)

    def search_features(
        self,
        queries: Sequence[QueryFeatures],
        k: int = 10,
        expansion: QueryExpansion = NO_EXPANSION,
        query_rows: Sequence[int | None] | None = None,
        verify: bool | None = None,
    ) -> list[list[Hit]]:
        """Copy search for ``QueryFeatures`` (regions, windows, verification of the top 100 when ``verify``)."""
        rows, scores, inliers = self.pipeline.search_copies(
            list(queries), k, expansion, query_rows, verify=self.resolve_verify(verify)
        )
        return [self._hits(r, s, n) for r, s, n in zip(rows, scores, inliers)]

    # ------------------------------------------------------------------ searching

    def _hits(self, rows: np.ndarray, scores: np.ndarray, inliers: np.ndarray | None = None) -> list[Hit]:
        paths = self.database.paths
        found = rows >= 0
        counts = inliers[found] if inliers is not None else np.full(int(found.sum()), -1)
        return [
            Hit(rank, float(score), int(row), paths[row], int(count))
            for rank, (row, score, count) in enumerate(zip(rows[found], scores[found], counts), 1)
        ]

    def search_many(
        self,
        descriptors: np.ndarray,
        k: int = 10,
        expansion: QueryExpansion = NO_EXPANSION,
        query_rows: Sequence[int | None] | None = None,
    ) -> list[list[Hit]]:
        """The ``k`` nearest database images to each descriptor (M, D), in one batched pipeline call (with a copy-
        detection database: its regions too, no verification: that needs the query's pixels or stored row)."""
        if self.copy_search:
            features = [QueryFeatures(np.asarray(d, np.float32)) for d in np.atleast_2d(descriptors)]
            return self.search_features(features, k, expansion, query_rows, verify=False)
        rows, scores = self.pipeline.search(np.atleast_2d(descriptors), k, expansion, query_rows)
        return [self._hits(r, s) for r, s in zip(rows, scores)]

    def search(self, descriptor: np.ndarray, k: int = 10, expansion: QueryExpansion = NO_EXPANSION) -> list[Hit]:
        """The ``k`` nearest database images to one extractor descriptor (D,)."""
        return self.search_many(np.asarray(descriptor)[None, :], k, expansion)[0]

    def search_id(
        self, row: int, k: int = 10, expansion: QueryExpansion = NO_EXPANSION, verify: bool | None = None
    ) -> list[Hit]:
        """Search with a database image's stored descriptor (no model call); it is never its own expansion
        neighbour. With copy features: its stored regions and local features too (``verify``: None = the database's
        default). Raises IndexError for a bad row."""
        if not 0 <= row < len(self.database):
            raise IndexError(f"no image with id {row}")
        if self.copy_search:
            query = self.pipeline.stored_query(self.database.vectors[row], row)
            return self.search_features([query], k, expansion, [row], verify)[0]
        self.resolve_verify(verify)
        return self.search_many(self.database.vectors[row : row + 1], k, expansion, query_rows=[row])[0]

    def search_image(
        self,
        source: str | os.PathLike | bytes,
        k: int = 10,
        expansion: QueryExpansion = NO_EXPANSION,
        verify: bool | None = None,
    ) -> list[Hit]:
        """Encode an image file or bytes and return its ``k`` nearest database images. Raises ImageError; with
        ``verify`` (None: the database's default) the top 100 are verified with local features."""
        verify = self.resolve_verify(verify)
        if self.copy_search:
            features = self.query_features(open_query(source), for_verification=verify)
            return self.search_features([features], k, expansion, verify=verify)[0]
        return self.search(self.encode(source), k, expansion)

    def find_duplicates(self, threshold: float | None = None, *, k: int | None = None, verify=None):
        """Groups of duplicate images of this database, searched through this engine's backend in batches
        (``retrieval.search.duplicates.find_duplicates``; ``verify``: an optional stage that confirms pairs)."""
        from .search.duplicates import DEFAULT_K, find_duplicates

        return find_duplicates(self, threshold, k=k or DEFAULT_K, verify=verify)
