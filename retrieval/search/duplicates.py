"""Every copy in a collection at once: the duplicates finder over the feature database.

    database + backend  ->  k-NN graph of every image (batched backend searches, never one search per image)
    ->  pairs at or above a cosine threshold  ->  optional ``verify`` stage (a callable that confirms pairs)
    ->  connected components (union-find)  ->  groups: members with scores, and a suggested image to keep

The graph does not depend on the threshold: it is cached beside the index (``<index>.duplicates.npz``, written
atomically) together with the paths and a fingerprint of every searched vector, so another threshold costs no search,
and a re-run after ``index.py`` added, changed or removed images searches only the new or changed images (plus the
few whose cached neighbours were removed) and scores the rest against the new ones; the graph equals a full run's.

The keep rule: largest resolution (width x height, from ``FeatureDatabase.image_sizes`` or the image header), then the
oldest file (``file_mtimes_ns``), then the path. Nothing here deletes or moves a file: it reports.
"""

from __future__ import annotations

import io
import math
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import IndexFileError, RetrievalError
from ..files import atomic_replace
from ..storage.database import FeatureDatabase, paths_digest, read_database
from ..vectors import top_k
from .backends import open_backend
from .backends.base import Backend
from .backends.memory import MemoryBackend
from .pipeline import searched_matrix

# cosine; bench/duplicates.py on the copy-detection set (EfficientNet-Lite0 classic): the best F1 of the pairs inside
# the reported groups (0.44, pHash's best 0.22); lower chains groups through shared screenshot frames, higher loses the
# cropped / rotated / overlaid copies faster than it gains precision
DEFAULT_THRESHOLD = 0.76
# with verification (pairs confirmed by local features; the same set indexed with --preset copy-detection): its
# precision stays at 0.98-0.99 down to 0.5, so the lower the threshold the more copies it finds (groups F1 0.75 at 0.5,
# 0.72 at 0.6, 0.47 at 0.78); below 0.5 most images already have their k neighbours, and each pair costs ~9 ms
VERIFIED_THRESHOLD = 0.5
DEFAULT_K = 10  # neighbours per image in the graph
MAX_K = 1_000
BATCH = 1_024  # images searched per backend call
CACHE_SUFFIX = ".duplicates.npz"
CACHE_FORMAT = 1
FULL_RUN_FRACTION = 0.5  # more new/changed images than this: a full run is as cheap as an update
_HASH_BLOCK = 65_536

Verifier = Callable[[np.ndarray], np.ndarray]
"""A verification stage: candidate pairs int64 (P, 2) of database rows -> bool (P,) (confirmed) or a number per pair
(inliers; > 0 confirms). Pluggable: local-feature geometric verification, a pixel check, a test's stub."""


# ---------------------------------------------------------------------------------------------------- the graph


@dataclass
class NeighbourGraph:
    """Each image's ``k`` nearest other images: ``rows`` int64 (N, k), -1 padded; ``scores`` float32 (N, k), -inf."""

    rows: np.ndarray
    scores: np.ndarray

    @property
    def k(self) -> int:
        return self.rows.shape[1]

    def __len__(self) -> int:
        return self.rows.shape[0]

    def pairs(self, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """Unordered pairs with a score >= ``threshold``: (int64 (P, 2) with a < b, sorted; float32 (P,) scores, the
        higher of the two directions)."""
        keep = (self.rows >= 0) & (self.scores >= threshold)
        first = np.nonzero(keep)[0].astype(np.int64)
        second = self.rows[keep].astype(np.int64)
        scores = self.scores[keep].astype(np.float32)
        low, high = np.minimum(first, second), np.maximum(first, second)
        order = np.lexsort((-scores, high, low))
        low, high, scores = low[order], high[order], scores[order]
        first_of_pair = np.ones(len(low), bool)
        first_of_pair[1:] = (low[1:] != low[:-1]) | (high[1:] != high[:-1])
        return np.stack([low[first_of_pair], high[first_of_pair]], axis=1), scores[first_of_pair]

    def saturated(self, threshold: float) -> int:
        """Images whose k-th neighbour is still above the threshold: their group may reach further than k shows."""
        if self.k == 0:
            return 0
        return int(((self.rows[:, -1] >= 0) & (self.scores[:, -1] >= threshold)).sum())


def search_neighbours(
    backend: Backend, matrix: np.ndarray, rows: np.ndarray, k: int, *, batch: int = BATCH,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest other images of database ``rows`` through ``backend``, ``batch`` queries per call:
    (int64 (len(rows), k), float32 (len(rows), k)), best first, the image itself left out, -1 / -inf padded."""
    rows = np.asarray(rows, dtype=np.int64)
    out_rows = np.full((len(rows), k), -1, np.int64)
    out_scores = np.full((len(rows), k), -np.inf, np.float32)
    wanted = min(k + 1, len(backend))
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        found, scores = backend.search(np.asarray(matrix[chunk], dtype=np.float32), wanted)
        found, scores = np.asarray(found, np.int64), np.asarray(scores, np.float32)
        own = found == chunk[:, None]
        # drop the image itself; where it is missing (ANN, or many exact ties), drop the last neighbour instead
        missing = ~own.any(axis=1)
        own[missing, -1] = True
        found = found[~own].reshape(len(chunk), wanted - 1)
        scores = scores[~own].reshape(len(chunk), wanted - 1)
        scores[found < 0] = -np.inf
        out_rows[start : start + len(chunk), : wanted - 1] = found
        out_scores[start : start + len(chunk), : wanted - 1] = scores
        if progress is not None:
            progress(min(start + batch, len(rows)), len(rows))
    return out_rows, out_scores


def _merge(rows_a, scores_a, rows_b, scores_b, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Two candidate lists per image -> the best ``k``, best first, ties by the lower row (as ``top_k`` ranks)."""
    rows = np.concatenate([rows_a, rows_b], axis=1)
    scores = np.concatenate([scores_a, scores_b], axis=1)
    scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
    tie = np.where(rows >= 0, rows, np.iinfo(np.int64).max)
    order = np.lexsort((tie, -scores), axis=1)[:, :k]
    return np.take_along_axis(rows, order, axis=1), np.take_along_axis(scores, order, axis=1)


def vector_fingerprints(matrix: np.ndarray) -> np.ndarray:
    """uint64 (N,): an exact integer hash of each row's bits (a changed vector changes it), in blocks of rows."""
    matrix = np.ascontiguousarray(matrix)
    width = {2: np.uint16, 4: np.uint32, 8: np.uint64}[matrix.dtype.itemsize]
    weights = np.random.default_rng(0x16).integers(1, 2**63, size=matrix.shape[1], dtype=np.uint64) | np.uint64(1)
    out = np.empty(matrix.shape[0], np.uint64)
    with np.errstate(over="ignore"):
        for start in range(0, matrix.shape[0], _HASH_BLOCK):
            bits = matrix[start : start + _HASH_BLOCK].view(width).astype(np.uint64)
            mixed = (bits + np.uint64(0x9E3779B97F4A7C15)) * weights
            mixed ^= mixed >> np.uint64(29)
            out[start : start + len(bits)] = mixed.sum(axis=1, dtype=np.uint64)
    return out


# ---------------------------------------------------------------------------------------------------- the cache


def cache_path(index_path: str | os.PathLike) -> Path:
    return Path(f"{index_path}{CACHE_SUFFIX}")


@dataclass
class GraphCache:
    """A graph and what it was computed for: ``paths`` and ``fingerprints`` of that database version, its id, how
    it was searched (``kind``)."""

    graph: NeighbourGraph
    paths: list[str]
    fingerprints: np.ndarray
    database_id: str
    kind: str

    def write(self, path: Path) -> None:
        buffer = io.BytesIO()
        joined = "\0".join(self.paths).encode("utf-8", "surrogatepass")
        np.savez(
            buffer, format=np.int64(CACHE_FORMAT), rows=self.graph.rows.astype(np.int32), scores=self.graph.scores,
            paths=np.frombuffer(joined, np.uint8), count=np.int64(len(self.paths)), fingerprints=self.fingerprints,
            database_id=np.array(self.database_id), kind=np.array(self.kind), digest=np.array(paths_digest(self.paths)),
        )
        with atomic_replace(path) as temporary:
            temporary.write_bytes(buffer.getbuffer())

    @classmethod
    def read(cls, path: Path) -> "GraphCache | None":
        """The cache at ``path``, or None when it is missing, foreign or damaged (then it is simply recomputed)."""
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                if int(data["format"]) != CACHE_FORMAT:
                    return None
                count = int(data["count"])
                text = data["paths"].tobytes().decode("utf-8", "surrogatepass")
                paths = text.split("\0") if count else []
                rows, scores = data["rows"].astype(np.int64), data["scores"].astype(np.float32)
                fingerprints = data["fingerprints"].astype(np.uint64)
                if (
                    len(paths) != count or rows.shape != scores.shape or rows.ndim != 2 or rows.shape[0] != count
                    or fingerprints.shape != (count,) or str(data["digest"]) != paths_digest(paths)
                    or (rows.size and (rows.max() >= count or rows.min() < -1))
                ):
                    return None
                return cls(NeighbourGraph(rows, scores), paths, fingerprints, str(data["database_id"]), str(data["kind"]))
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, EOFError, zipfile.BadZipFile):
            return None


@dataclass
class GraphRun:
    """How a graph was obtained: images searched through the backend, images only scored against new ones, reused."""

    searched: int = 0
    rescored: int = 0
    reused: int = 0
    removed: int = 0
    mode: str = "full"  # full | incremental | cached
    seconds: float = 0.0


def build_graph(
    backend: Backend, matrix: np.ndarray, k: int, *, paths: Sequence[str], fingerprints: np.ndarray,
    previous: GraphCache | None = None, batch: int = BATCH, progress: Callable[[int, int], None] | None = None,
) -> tuple[NeighbourGraph, GraphRun]:
    """The k-NN graph of every row of ``matrix``; with ``previous`` (the graph of an earlier version searched the
    same way with the same ``k``) only what changed is searched. The result equals a full run's graph."""
    started = time.perf_counter()
    count = matrix.shape[0]
    usable = previous is not None and previous.graph.k == k and previous.kind == backend.kind
    if usable:
        position = {path: row for row, path in enumerate(paths)}
        old_to_new = np.array([position.get(path, -1) for path in previous.paths], dtype=np.int64)
        mapped = old_to_new >= 0
        same = np.zeros(len(previous.paths), bool)
        same[mapped] = previous.fingerprints[mapped] == fingerprints[old_to_new[mapped]]
        old_to_new[~same] = -1  # a changed image counts as removed and added again
        kept_new = old_to_new[same]
        fresh_mask = np.ones(count, bool)
        fresh_mask[kept_new] = False
        fresh = np.flatnonzero(fresh_mask)
        if len(fresh) > FULL_RUN_FRACTION * max(count, 1):
            usable = False
    if not usable:
        rows, scores = search_neighbours(backend, matrix, np.arange(count), k, batch=batch, progress=progress)
        return NeighbourGraph(rows, scores), GraphRun(searched=count, seconds=time.perf_counter() - started)
    old = previous.graph
    remapped = np.where(old.rows >= 0, old_to_new[np.maximum(old.rows, 0)], -1)
    lost = ((old.rows >= 0) & (remapped < 0)).any(axis=1)  # a neighbour was removed or changed: search again
    survivors = np.flatnonzero(same & ~lost)
    requery = np.sort(np.concatenate([fresh, old_to_new[same & lost]]))
    rows = np.full((count, k), -1, np.int64)
    scores = np.full((count, k), -np.inf, np.float32)
    if len(requery):
        rows[requery], scores[requery] = search_neighbours(backend, matrix, requery, k, batch=batch, progress=progress)
    target = old_to_new[survivors]
    base_rows, base_scores = remapped[survivors], old.scores[survivors]
    if len(fresh) and len(target):
        fresh_matrix = np.asarray(matrix[fresh], dtype=np.float32)
        step = max(1, batch)
        for start in range(0, len(target), step):
            part = slice(start, start + step)
            found, found_scores = top_k(fresh_matrix, np.asarray(matrix[target[part]], dtype=np.float32), k)
            base = (base_rows[part], base_scores[part])
            rows[target[part]], scores[target[part]] = _merge(*base, fresh[found], found_scores, k)
    else:
        rows[target], scores[target] = base_rows, base_scores
    run = GraphRun(
        searched=len(requery), rescored=len(target) if len(fresh) else 0, reused=0 if len(fresh) else len(target),
        removed=int((~same).sum()),  # images of the previous version that are gone or changed
        mode="incremental", seconds=time.perf_counter() - started,
    )
    return NeighbourGraph(rows, scores), run


# ---------------------------------------------------------------------------------------------------- groups


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving and union by size."""

    def __init__(self, n: int):
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if self.size[a] < self.size[b]:
            a, b = b, a
        self.parent[b] = a
        self.size[a] += self.size[b]


def connected_components(pairs: np.ndarray) -> list[list[int]]:
    """Pairs (P, 2) of rows -> the components with 2+ members, each sorted, ordered by their first row."""
    if len(pairs) == 0:
        return []
    nodes, inverse = np.unique(pairs.ravel(), return_inverse=True)
    inverse = inverse.reshape(pairs.shape)
    sets = UnionFind(len(nodes))
    for a, b in inverse.tolist():
        sets.union(a, b)
    groups: dict[int, list[int]] = {}
    for index, node in enumerate(nodes.tolist()):
        groups.setdefault(sets.find(index), []).append(node)
    return sorted((sorted(members) for members in groups.values()), key=lambda members: members[0])


@dataclass(frozen=True)
class Member:
    """One image of a group: its row, path, best score to another member (and which), size, file facts."""

    id: int
    path: str
    score: float
    match: int
    width: int | None
    height: int | None
    bytes: int | None
    mtime_ns: int | None
    keep: bool = False

    def as_dict(self) -> dict:
        return {
            "id": self.id, "path": self.path, "score": round(self.score, 6), "match": self.match,
            "width": self.width, "height": self.height, "bytes": self.bytes,
            "mtime": None if self.mtime_ns is None else _iso(self.mtime_ns), "keep": self.keep,
        }


@dataclass(frozen=True)
class Group:
    """A set of images that are copies of each other: ``members`` (the kept one first), ``pairs`` (a, b, score)."""

    members: list[Member]
    pairs: list[tuple[int, int, float]]

    @property
    def keep(self) -> Member:
        return self.members[0]

    @property
    def score(self) -> float:
        """The group's weakest link (lowest pair score that holds it together is at least this)."""
        return min(score for _, _, score in self.pairs) if self.pairs else 1.0

    def as_dict(self) -> dict:
        return {
            "size": len(self.members), "keep": self.keep.path, "min_score": round(self.score, 6),
            "max_score": round(max(s for _, _, s in self.pairs), 6) if self.pairs else 1.0,
            "members": [member.as_dict() for member in self.members],
            "pairs": [{"a": a, "b": b, "score": round(s, 6)} for a, b, s in self.pairs],
        }


@dataclass
class DuplicateReport:
    """What ``find_duplicates`` found, and how."""

    groups: list[Group]
    threshold: float
    k: int
    images: int
    pairs: int
    verified: str | None  # the verification stage's name, None when pairs were not verified
    rejected: int  # pairs the verification stage refused
    saturated: int  # images whose k-th neighbour passed the threshold (a larger k may find more)
    search: str  # what answered the searches (exact | hnsw | faiss-hnsw | ...)
    run: GraphRun = field(default_factory=GraphRun)
    index: str | None = None
    image_root: str | None = None

    @property
    def duplicates(self) -> int:
        """Images that are not the kept one of their group."""
        return sum(len(group.members) - 1 for group in self.groups)

    def as_dict(self) -> dict:
        return {
            "index": self.index, "images": self.images, "threshold": self.threshold, "k": self.k,
            "search": self.search, "verified": self.verified, "pairs": self.pairs, "rejected_by_verification": self.rejected,
            "saturated": self.saturated, "groups_count": len(self.groups), "duplicates": self.duplicates,
            "run": {"mode": self.run.mode, "searched": self.run.searched, "rescored": self.run.rescored,
                    "reused": self.run.reused, "removed": self.run.removed, "seconds": round(self.run.seconds, 3)},
            "groups": [group.as_dict() for group in self.groups],
        }


def _iso(ns: int) -> str:
    import datetime as _dt

    return _dt.datetime.fromtimestamp(ns / 1e9, _dt.timezone.utc).replace(microsecond=0).isoformat()


def header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) of an image file as displayed (EXIF orientation applied), from its header only; None when
    the file cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
            try:
                orientation = image.getexif().get(0x0112, 1)
            except Exception:  # a damaged EXIF block: the stored size stands
                orientation = 1
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def image_dimensions(
    database: FeatureDatabase, rows: Sequence[int], image_root: Path | None, memo: dict | None = None
) -> dict[int, tuple[int, int] | None]:
    """Width and height of ``rows``: recorded at indexing (``image_sizes``), else read from the image header (once
    per row when ``memo`` keeps them)."""
    sizes = getattr(database, "image_sizes", None)
    out: dict[int, tuple[int, int] | None] = {}
    for row in rows:
        if memo is not None and row in memo:
            out[row] = memo[row]
            continue
        size = None
        if sizes is not None and row < len(sizes) and int(sizes[row][0]) > 0 and int(sizes[row][1]) > 0:
            size = (int(sizes[row][0]), int(sizes[row][1]))
        elif image_root is not None:
            size = header_size(image_root / database.paths[row])
        out[row] = size
        if memo is not None:
            memo[row] = size
    return out


def keep_order(member: Member) -> tuple:
    """Sort key of the keep rule: largest resolution, then the oldest file, then the path."""
    pixels = member.width * member.height if member.width and member.height else -1
    mtime = member.mtime_ns if member.mtime_ns is not None else math.inf
    return (-pixels, mtime, member.path)


def make_groups(
    database: FeatureDatabase, pairs: np.ndarray, scores: np.ndarray, image_root: Path | None, memo: dict | None = None
) -> list[Group]:
    """Components of ``pairs`` as groups: members with their best score, the kept image first; groups by size,
    then by their best score."""
    components = connected_components(pairs)
    if not components:
        return []
    best_score: dict[int, float] = {}
    best_match: dict[int, int] = {}
    for (a, b), score in zip(pairs.tolist(), scores.tolist()):
        for x, y in ((a, b), (b, a)):
            if score > best_score.get(x, -math.inf):
                best_score[x], best_match[x] = score, y
    by_row: dict[int, list[tuple[int, int, float]]] = {}
    for (a, b), score in zip(pairs.tolist(), scores.tolist()):
        by_row.setdefault(a, []).append((a, b, float(score)))
    dims = image_dimensions(database, [row for members in components for row in members], image_root, memo)
    groups = []
    for rows in components:
        members = []
        for row in rows:
            size = dims.get(row)
            stat_bytes = int(database.file_sizes[row]) if row < len(database.file_sizes) else -1
            mtime = int(database.file_mtimes_ns[row]) if row < len(database.file_mtimes_ns) else -1
            members.append(Member(
                id=row, path=database.paths[row], score=float(best_score[row]), match=best_match[row],
                width=size[0] if size else None, height=size[1] if size else None,
                bytes=stat_bytes if stat_bytes >= 0 else None, mtime_ns=mtime if mtime >= 0 else None,
            ))
        members.sort(key=keep_order)
        members[0] = Member(**{**members[0].__dict__, "keep": True})
        group_pairs = [pair for row in rows for pair in by_row.get(row, [])]
        group_pairs.sort(key=lambda pair: (-pair[2], pair[0], pair[1]))
        groups.append(Group(members, group_pairs))
    groups.sort(key=lambda group: (-len(group.members), -max(s for _, _, s in group.pairs), group.keep.path))
    return groups


# ---------------------------------------------------------------------------------------------------- verification


class LocalFeatureVerifier:
    """The ``--verify`` stage: pairs confirmed by local-feature geometric verification (``retrieval.search.
    verification.verify``). Per image ``a`` of the pairs, its stored local features and their mirror image
    (``local_features.mirrored``: no pixels needed, as for a search by id) are the query side, verified against the
    stored local features of all its graph neighbours at once (and of any partner that is not one), so that evidence
    shared by many images (a screenshot frame, a caption) is discounted as the verification does for a query. The
    verdicts are kept (``verdicts``): another threshold verifies only pairs not seen yet. No image file is read:
    it works where the images have moved or are elsewhere. (Measured on the copy-detection set against a query side
    described again from each image file at query resolution: pairs precision 0.990 -> 0.999, recall 0.483 -> 0.527,
    groups F1 0.746 -> 0.785 at cosine 0.5, 5.7x faster: README, Duplicates.)"""

    name = "local features"

    def __init__(self, database: FeatureDatabase, graph: NeighbourGraph | None = None):
        copies = getattr(database, "copies", None)
        if copies is None or not getattr(copies, "has_local", False):
            from .copies import NO_LOCAL_FEATURES

            raise RetrievalError(f"--verify: {NO_LOCAL_FEATURES}")
        self.database, self.copies, self.graph = database, copies, graph
        self.verdicts: dict[tuple[int, int], bool] = {}  # (a, b) -> confirmed, with a the query side

    def __call__(self, pairs: np.ndarray) -> np.ndarray:
        from ..descriptors.local_features import mirrored
        from .verification import QueryLocalFeatures, verify

        confirmed = np.zeros(len(pairs), bool)
        order = np.argsort(pairs[:, 0], kind="stable")
        starts = np.flatnonzero(np.r_[True, pairs[order[1:], 0] != pairs[order[:-1], 0]]) if len(pairs) else []
        for start, end in zip(starts, list(starts[1:]) + [len(pairs)]):
            chosen = order[start:end]
            first = int(pairs[chosen[0], 0])
            partners = [int(b) for b in pairs[chosen, 1]]
            unknown = [b for b in partners if (first, b) not in self.verdicts]
            if unknown:  # verified against all its graph neighbours at once: the verdicts hold for every threshold
                neighbours = [] if self.graph is None else [int(r) for r in self.graph.rows[first] if r >= 0]
                others = neighbours + [b for b in unknown if b not in neighbours]
                stored = self.copies.local_of(first)
                result = verify(QueryLocalFeatures(stored, mirrored(stored)), [self.copies.local_of(row) for row in others])
                self.verdicts.update(((first, b), bool(ok)) for b, ok in zip(others, result.verified))
            confirmed[chosen] = [self.verdicts[(first, b)] for b in partners]
        return confirmed


# ---------------------------------------------------------------------------------------------------- the API


def check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not (math.isfinite(threshold) and 0.0 < threshold <= 1.0):
        raise RetrievalError(f"threshold must be a cosine similarity in (0, 1], got {threshold:g}")
    return threshold


def check_k(k: int) -> int:
    if not 1 <= int(k) <= MAX_K:
        raise RetrievalError(f"k (neighbours per image) must be between 1 and {MAX_K}, got {k}")
    return int(k)


def verifier_name(verify: Verifier | None) -> str | None:
    if verify is None:
        return None
    return getattr(verify, "name", None) or getattr(verify, "__name__", None) or type(verify).__name__


def apply_verifier(verify: Verifier, pairs: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Keep the pairs the verification stage confirms: (pairs, scores, how many it refused)."""
    if len(pairs) == 0:
        return pairs, scores, 0
    verdict = np.asarray(verify(pairs))
    if verdict.shape != (len(pairs),):
        raise ValueError(f"the verification stage answered shape {verdict.shape} for {len(pairs)} pairs")
    confirmed = verdict.astype(bool) if verdict.dtype == bool else verdict > 0
    return pairs[confirmed], scores[confirmed], int((~confirmed).sum())


class DuplicateFinder:
    """The graph of one database version, kept so that other thresholds (the web page's slider) are instant."""

    def __init__(
        self, database: FeatureDatabase, backend: Backend, matrix: np.ndarray, *, k: int = DEFAULT_K,
        cache: Path | None = None, write_cache: bool = True, image_root: str | os.PathLike | None = None,
        index_path: str | None = None, batch: int = BATCH, progress: Callable[[int, int], None] | None = None,
    ):
        if len(database) == 0:
            raise IndexFileError("the database holds no images: nothing to compare", kind="invalid")
        self.database = database
        self.backend = backend
        self.k = check_k(k)
        self.index_path = index_path
        root = image_root or database.image_root
        self.image_root = Path(root) if root else None
        self._sizes: dict[int, tuple[int, int] | None] = {}
        self._local_verifier: LocalFeatureVerifier | None = None
        fingerprints = vector_fingerprints(matrix)
        previous = GraphCache.read(cache) if cache is not None else None
        if previous is not None and previous.database_id == database.database_id and database.database_id and (
            previous.graph.k == self.k and previous.kind == backend.kind and previous.paths == list(database.paths)
            and np.array_equal(previous.fingerprints, fingerprints)
        ):
            self.graph, self.run = previous.graph, GraphRun(reused=len(database), mode="cached")
            return
        self.graph, self.run = build_graph(
            backend, matrix, self.k, paths=database.paths, fingerprints=fingerprints, previous=previous,
            batch=batch, progress=progress,
        )
        if cache is not None and write_cache:
            GraphCache(self.graph, list(database.paths), fingerprints, database.database_id, backend.kind).write(cache)

    @property
    def verifies_by_default(self) -> bool:
        """Whether the database asks for verification by default (built with ``--preset copy-detection``)."""
        copies = getattr(self.database, "copies", None)
        return bool(copies is not None and copies.has_local and copies.verify_default)

    def verifier(self, verify: Verifier | bool | None) -> Verifier | None:
        """``verify`` resolved: None -> the database's default; True -> the local-feature verifier (one per finder:
        its verdicts serve every threshold; raises RetrievalError without local features); False -> none."""
        if verify is None:
            verify = self.verifies_by_default
        if verify is True:
            if self._local_verifier is None:
                self._local_verifier = LocalFeatureVerifier(self.database, self.graph)
            return self._local_verifier
        return verify or None

    def report(self, threshold: float | None = None, verify: Verifier | bool | None = None) -> DuplicateReport:
        """Groups at ``threshold`` (None: ``default_threshold`` of the verification used); ``verify``: a ``Verifier``,
        True for local-feature verification, False for none, None for the database's default (``verifier``)."""
        verify = self.verifier(verify)
        threshold = check_threshold(default_threshold(verify) if threshold is None else threshold)
        pairs, scores = self.graph.pairs(threshold)
        rejected = 0
        if verify is not None:
            pairs, scores, rejected = apply_verifier(verify, pairs, scores)
        groups = make_groups(self.database, pairs, scores, self.image_root, self._sizes)
        return DuplicateReport(
            groups=groups, threshold=threshold, k=self.k, images=len(self.database), pairs=len(pairs),
            verified=verifier_name(verify), rejected=rejected, saturated=self.graph.saturated(threshold),
            search=self.backend.kind, run=self.run, index=self.index_path,
            image_root=str(self.image_root) if self.image_root else None,
        )


def default_threshold(verify: "Verifier | bool | None") -> float:
    """The cosine threshold chosen on the copy-detection benchmark: ``VERIFIED_THRESHOLD`` when pairs are verified,
    else ``DEFAULT_THRESHOLD``."""
    return VERIFIED_THRESHOLD if verify else DEFAULT_THRESHOLD


def find_duplicates(
    source, threshold: float | None = None, *, k: int = DEFAULT_K, verify: Verifier | bool | None = None,
    backend: str | None = None, cache: bool = True, image_root: str | os.PathLike | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DuplicateReport:
    """Groups of duplicate images in a feature database.

    ``source``: an index file path (its recorded backend, or ``backend``; the graph cached beside it), a
    ``RetrievalEngine`` (its pipeline's backend; no cache file), or a ``FeatureDatabase`` (exact search in memory).
    ``verify``: an optional stage that confirms candidate pairs (a ``Verifier``), True for local-feature geometric
    verification (databases indexed with local features), False for none, None for the database's default (on for
    ``--preset copy-detection``). ``threshold``: None for ``default_threshold`` of the verification used. Raises
    RetrievalError.
    """
    threshold = None if threshold is None else check_threshold(threshold)
    k = check_k(k)
    if isinstance(source, (str, os.PathLike)):
        database = read_database(source)
        if len(database) == 0:
            raise IndexFileError(f"{source}: the database holds no images: nothing to compare", kind="invalid")
        if verify is True:  # fail before the graph is computed
            LocalFeatureVerifier(database)
        matrix = searched_matrix(database.vectors, database.whitening)
        opened = open_backend(Path(source), database, matrix, override=backend)
        try:
            finder = DuplicateFinder(
                database, opened, matrix, k=k, cache=cache_path(source) if cache else None,
                image_root=image_root, index_path=str(source), progress=progress,
            )
            return finder.report(threshold, verify)
        finally:
            opened.close()
    if hasattr(source, "pipeline") and hasattr(source, "database"):  # a RetrievalEngine
        finder = DuplicateFinder(
            source.database, source.pipeline.backend, source.pipeline.matrix, k=k, cache=None,
            image_root=image_root or source.image_root, progress=progress,
        )
        return finder.report(threshold, verify)
    if isinstance(source, FeatureDatabase):
        matrix = searched_matrix(source.vectors, source.whitening)
        finder = DuplicateFinder(source, MemoryBackend(matrix), matrix, k=k, cache=None, image_root=image_root, progress=progress)
        return finder.report(threshold, verify)
    raise TypeError(f"find_duplicates needs an index path, a RetrievalEngine or a FeatureDatabase, not {type(source).__name__}")
