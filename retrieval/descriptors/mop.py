"""MOP: multi-scale orderless pooling (Gong, Wang, Guo, Lazebnik, ECCV 2014). Pure numpy, no Keras.

The paper describes an image at three levels: the whole image (one CNN descriptor), and two finer levels of
overlapping patches, each patch described by the CNN, the patch descriptors of a level VLAD-encoded against a k-means
codebook, PCA-reduced, every level L2-normalised, and the levels concatenated and L2-normalised again::

    level 1   l2n(global descriptor)                                   (C,)
    level l   l2n(PCA_l(vlad(l2n(localPCA_l(l2n(patches_l))), centroids_l)))   (d_l,)     l = 2, 3
    MOP       l2n([level 1, level 2, level 3])                         (C + d_2 + d_3,)

What the extractor hands in per image is its *material*: the global descriptor (C,) and the local descriptors of each
finer level, (n_l, C). ``learn_codebook`` learns, per finer level, a PCA of the local descriptors (the paper reduces
4096-d fc7 activations to 500 before VLAD), a k-means codebook (k = 100 in the paper) and a PCA of the VLAD vectors
(the paper keeps 4096; every part is learned on the same sample of database images); ``encode`` applies them.

How the material is made (``retrieval.descriptors.mop_extract``): ``mop`` crops patches (the paper: 256-pixel image,
128 and 64-pixel patches at stride 32), ``mop-fast`` takes the columns of the conv map at two input scales (one forward
pass per scale) as the local descriptors. The maths below does not care which.

VLAD (Jégou et al. 2010, normalised as Arandjelović & Zisserman 2013 "All about VLAD"): residual sums to the nearest
centroid, signed power normalisation ``sign(v) |v| ** power`` (0.5: signed square root), intra-normalisation (every
centroid's block to unit length) and a final L2 normalisation.

A ``MopCodebook`` is stored in the database (``codebook_to_arrays`` / ``codebook_from_arrays``) with a SHA-256
``digest`` of its arrays, which the encoder settings record, so a query is encoded with the database's own codebook.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..vectors import NORM_EPSILON, l2_normalize
from .whitening import Whitening, apply_whitening, learn_pca_whitening

KMEANS_ITERATIONS = 30
KMEANS_SEED = 0
MAX_LOCAL_SAMPLES = 100_000  # local descriptors per level used for the local PCA and k-means (a seeded subsample)
IMAGES_PER_CENTROID = 16
"""k is capped at (training images / 16). A conv map's columns, and the patches of one image, lie close together, so
a cell of a codebook learned on few images gathers the descriptors of one image or of one group of near-duplicates;
their residuals to its centroid (the group's own mean) then point in opposite directions, and VLAD scores two views
of one photo *below* unrelated images (measured on bench/quality.py's near-duplicate set, 126 images, codebook learned
on them: the level-2 VLAD alone gives mAP 0.22 with k=100, 0.69 with k=16, 1.00 with k=4). The paper learned its
k=100 codebook on a large independent set, where every cell holds descriptors of many images."""
FINER_LEVELS = 2  # levels 2 and 3 of the paper


# --------------------------------------------------------------------------- the maths


def power_normalize(vectors: np.ndarray, power: float = 0.5) -> np.ndarray:
    """Signed power normalisation ``sign(x) * |x| ** power`` (power 0.5: the signed square root). float64 out."""
    if not (0.0 < power <= 1.0):
        raise ValueError(f"power normalisation needs 0 < power <= 1, got {power}")
    x = np.asarray(vectors, dtype=np.float64)
    return np.sign(x) * np.abs(x) ** power


def intra_normalize(vlad: np.ndarray, k: int) -> np.ndarray:
    """Each of the ``k`` centroid blocks of VLAD vectors (..., k * d) scaled to unit L2 norm (zero blocks stay zero)."""
    x = np.asarray(vlad, dtype=np.float64)
    if x.shape[-1] % k:
        raise ValueError(f"VLAD length {x.shape[-1]} is not a multiple of k={k}")
    blocks = x.reshape(*x.shape[:-1], k, x.shape[-1] // k)
    norms = np.linalg.norm(blocks, axis=-1, keepdims=True)
    return (blocks / np.maximum(norms, NORM_EPSILON)).reshape(x.shape)


def assign(descriptors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (squared Euclidean; ties: the lower index) of every row. (n, d), (k, d) -> (n,)."""
    x = np.asarray(descriptors, dtype=np.float64)
    c = np.asarray(centroids, dtype=np.float64)
    distances = (x * x).sum(axis=1)[:, None] - 2.0 * x @ c.T + (c * c).sum(axis=1)[None, :]
    return distances.argmin(axis=1)


def vlad_residuals(descriptors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Unnormalised VLAD: for every centroid, the sum of ``x - c`` over the descriptors assigned to it. -> (k * d,)."""
    x = np.asarray(descriptors, dtype=np.float64)
    c = np.asarray(centroids, dtype=np.float64)
    if x.ndim != 2 or c.ndim != 2 or x.shape[1] != c.shape[1]:
        raise ValueError(f"descriptors {x.shape} and centroids {c.shape} must be (n, d) and (k, d)")
    out = np.zeros_like(c)
    if len(x):
        nearest = assign(x, c)
        np.add.at(out, nearest, x - c[nearest])
    return out.ravel()


def vlad(descriptors: np.ndarray, centroids: np.ndarray, power: float = 0.5) -> np.ndarray:
    """Normalised VLAD of one set of local descriptors: residual sums -> signed power -> intra-norm -> L2. (k * d,)."""
    k = np.asarray(centroids).shape[0]
    v = intra_normalize(power_normalize(vlad_residuals(descriptors, centroids), power), k)
    return v / max(float(np.linalg.norm(v)), NORM_EPSILON)


def kmeans(points: np.ndarray, k: int, *, iterations: int = KMEANS_ITERATIONS, seed: int = KMEANS_SEED) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding (Arthur & Vassilvitskii 2007). (n, d) -> float64 centroids (k, d).

    Deterministic for a given ``seed``. A cluster that empties is re-seeded with the point farthest from its centroid.
    Stops when no assignment changes. ValueError when there are fewer distinct points than ``k``.
    """
    x = np.asarray(points, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"k-means needs points of shape (n, d), got {x.shape}")
    if k < 1:
        raise ValueError(f"k-means needs k >= 1, got {k}")
    if len(np.unique(x, axis=0)) < k:
        raise ValueError(f"k-means with k={k} needs at least {k} distinct points, got {len(np.unique(x, axis=0))}")
    rng = np.random.default_rng(seed)
    centroids = np.empty((k, x.shape[1]))
    centroids[0] = x[rng.integers(len(x))]
    closest = ((x - centroids[0]) ** 2).sum(axis=1)
    for j in range(1, k):
        total = closest.sum()
        # k-means++: the next centre drawn with probability proportional to the squared distance
        choice = rng.choice(len(x), p=closest / total) if total > 0 else int(rng.integers(len(x)))
        centroids[j] = x[choice]
        closest = np.minimum(closest, ((x - centroids[j]) ** 2).sum(axis=1))
    labels = None
    for _ in range(iterations):
        new = assign(x, centroids)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            if len(members):
                centroids[j] = members.mean(axis=0)
            else:
                far = ((x - centroids[labels]) ** 2).sum(axis=1).argmax()
                centroids[j] = x[far]
                labels[far] = j
    return centroids


# --------------------------------------------------------------------------- the codebook


@dataclass(frozen=True, eq=False)
class MopLevel:
    """One finer level: PCA of its local descriptors, k-means centroids in that space, PCA of its VLAD vectors."""

    local_pca: Whitening  # C -> local dim (power 0: rotation + reduction, no whitening)
    centroids: np.ndarray  # float64 (k, local dim)
    vlad_pca: Whitening  # k * local dim -> level dim

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return self.vlad_pca.dim


@dataclass(frozen=True, eq=False)
class MopCodebook:
    """What MOP learns on the database: one ``MopLevel`` per finer level, the VLAD power, and provenance."""

    method: str  # "mop" | "mop-fast"
    levels: tuple[MopLevel, ...]
    power: float
    images: int  # images it was learned on

    @property
    def input_dim(self) -> int:
        return self.levels[0].local_pca.input_dim

    @property
    def dim(self) -> int:
        """The MOP descriptor's dimension: the global descriptor plus every level."""
        return self.input_dim + sum(level.dim for level in self.levels)

    @property
    def level_dims(self) -> list[int]:
        return [self.input_dim, *(level.dim for level in self.levels)]

    def digest(self) -> str:
        """``sha256:<hex>`` of every array and setting (what the encoder settings record)."""
        arrays, attributes = codebook_to_arrays(self)
        digest = hashlib.sha256(json.dumps(attributes, sort_keys=True).encode("utf-8"))
        for name in sorted(arrays):
            digest.update(name.encode("utf-8"))
            digest.update(np.ascontiguousarray(arrays[name]).tobytes())
        return "sha256:" + digest.hexdigest()


@dataclass
class Material:
    """What the extractor gives MOP for a batch of N images: global descriptors (N, C) and, per finer level, every
    image's local descriptors, an (n_i, C) array per image (``n_i`` may differ between images)."""

    global_: np.ndarray
    local: list[list[np.ndarray]]

    def __post_init__(self):
        self.global_ = np.asarray(self.global_, dtype=np.float32)
        if self.global_.ndim != 2:
            raise ValueError(f"global descriptors must be (N, C), got {self.global_.shape}")
        count, dim = self.global_.shape
        self.local = [[np.asarray(image, dtype=np.float32) for image in level] for level in self.local]
        for level in self.local:
            if len(level) != count or any(image.ndim != 2 or image.shape[1] != dim or not len(image) for image in level):
                raise ValueError(f"every level needs {count} non-empty (n, {dim}) arrays of local descriptors")

    def __len__(self) -> int:
        return len(self.global_)

    @classmethod
    def concatenate(cls, parts: Sequence["Material"]) -> "Material":
        return cls(np.concatenate([p.global_ for p in parts]),
                   [[image for p in parts for image in p.local[i]] for i in range(len(parts[0].local))])

    def take(self, rows: Sequence[int]) -> "Material":
        return Material(self.global_[list(rows)], [[level[i] for i in rows] for level in self.local])


def _level_vlads(local: list[np.ndarray], local_pca: Whitening, centroids: np.ndarray, power: float) -> np.ndarray:
    """Every image's (n_i, C) local descriptors -> (N, k * d) normalised VLAD vectors."""
    if not local:
        return np.empty((0, centroids.size))
    return np.stack([vlad(apply_whitening(l2_normalize(image), local_pca), centroids, power) for image in local])


def learn_codebook(
    material: Material, method: str, *, k: int = 100, local_dim: int = 64, level_dim: int = 256, power: float = 0.5,
    images_per_centroid: int = IMAGES_PER_CENTROID,
) -> MopCodebook:
    """Learn MOP's per-level local PCA, k-means codebook and VLAD PCA on the material of a sample of images.

    Sizes shrink to what the sample supports (recorded in the codebook, and hence in the database's dim): at most
    ``n - 1`` local components for ``n`` local descriptors, ``k`` at most ``N / images_per_centroid`` (at least 2; see
    ``IMAGES_PER_CENTROID``) and at most the distinct reduced descriptors, at most ``N - 1`` VLAD components for ``N``
    images. ValueError with fewer than 2 images.
    """
    count = len(material)
    if count < 2:
        raise ValueError(f"MOP's codebook is learned on at least 2 images, got {count}")
    if k < 1 or local_dim < 1 or level_dim < 1:
        raise ValueError(f"MOP sizes must be positive, got k={k}, local_dim={local_dim}, level_dim={level_dim}")
    rng = np.random.default_rng(KMEANS_SEED)
    levels = []
    for local in material.local:
        flat = l2_normalize(np.concatenate(local))
        if len(flat) > MAX_LOCAL_SAMPLES:
            flat = flat[np.sort(rng.choice(len(flat), MAX_LOCAL_SAMPLES, replace=False))]
        local_pca = learn_pca_whitening(flat, min(local_dim, flat.shape[1], len(flat) - 1), power=0.0)
        reduced = apply_whitening(flat, local_pca)
        distinct = len(np.unique(np.round(reduced, 6), axis=0))
        wanted = min(k, max(2, count // max(1, int(images_per_centroid))))
        centroids = kmeans(reduced, max(1, min(wanted, distinct)))
        vlads = _level_vlads(local, local_pca, centroids, power)
        vlad_pca = learn_pca_whitening(vlads, min(level_dim, vlads.shape[1], count - 1), power=0.0)
        levels.append(MopLevel(local_pca, centroids, vlad_pca))
    learned = MopCodebook(method=method, levels=tuple(levels), power=float(power), images=count)
    return codebook_from_arrays(*codebook_to_arrays(learned))  # as stored (float32), so index and query encode alike


def encode(material: Material, codebook: MopCodebook) -> np.ndarray:
    """MOP descriptors of a batch: float32 (N, codebook.dim), unit rows."""
    if len(material.local) != len(codebook.levels):
        raise ValueError(f"material has {len(material.local)} finer levels, the codebook {len(codebook.levels)}")
    if material.global_.shape[1] != codebook.input_dim:
        raise ValueError(f"descriptors of dim {material.global_.shape[1]} do not fit a codebook for {codebook.input_dim}")
    blocks = [l2_normalize(material.global_)]
    for local, level in zip(material.local, codebook.levels):
        vlads = _level_vlads(local, level.local_pca, level.centroids, codebook.power)
        blocks.append(apply_whitening(vlads, level.vlad_pca) if len(vlads) else np.empty((0, level.dim), np.float32))
    return l2_normalize(np.concatenate(blocks, axis=1))


# --------------------------------------------------------------------------- storage


PCA_PARTS = ("mean", "projection", "eigenvalues")


def codebook_to_arrays(codebook: MopCodebook) -> tuple[dict[str, np.ndarray], dict]:
    """(float32 datasets named ``level<l>/<part>``, JSON-safe attributes) to store in the database."""
    arrays: dict[str, np.ndarray] = {}
    for number, level in enumerate(codebook.levels, start=2):
        for prefix, pca in (("local", level.local_pca), ("vlad", level.vlad_pca)):
            for part in PCA_PARTS:
                arrays[f"level{number}/{prefix}_{part}"] = np.asarray(getattr(pca, part), dtype=np.float32)
        arrays[f"level{number}/centroids"] = np.asarray(level.centroids, dtype=np.float32)
    attributes = {"method": codebook.method, "power": codebook.power, "images": codebook.images,
                  "levels": len(codebook.levels), "level_dims": codebook.level_dims,
                  "k": [level.k for level in codebook.levels]}
    return arrays, attributes


def _pca(arrays: dict, prefix: str) -> Whitening:
    mean, projection, values = (np.asarray(arrays[f"{prefix}_{part}"], dtype=np.float64) for part in PCA_PARTS)
    if mean.ndim != 1 or projection.shape != (mean.shape[0], values.shape[0]):
        raise ValueError(f"{prefix} PCA arrays disagree: mean {mean.shape}, projection {projection.shape}, "
                         f"eigenvalues {values.shape}")
    return Whitening(mean=mean, projection=projection, eigenvalues=values, power=0.0)


def codebook_from_arrays(arrays: dict, attributes: dict) -> MopCodebook:
    """Inverse of ``codebook_to_arrays`` (arrays keyed ``level<l>/<part>``); ValueError for missing or inconsistent
    pieces or values that are not finite."""
    try:
        method, power, images = str(attributes["method"]), float(attributes["power"]), int(attributes["images"])
        count = int(attributes["levels"])
        levels = []
        for number in range(2, 2 + count):
            part = {name.split("/", 1)[1]: value for name, value in arrays.items() if name.startswith(f"level{number}/")}
            local_pca, vlad_pca = _pca(part, "local"), _pca(part, "vlad")
            centroids = np.asarray(part["centroids"], dtype=np.float64)
            if centroids.ndim != 2 or centroids.shape[1] != local_pca.dim or vlad_pca.input_dim != centroids.size:
                raise ValueError(f"level {number}: centroids {centroids.shape} do not fit its PCAs")
            levels.append(MopLevel(local_pca, centroids, vlad_pca))
    except KeyError as missing:
        raise ValueError(f"the codebook is missing {missing}") from None
    if not levels:
        raise ValueError("the codebook has no levels")
    for level in levels:
        pieces = (level.local_pca.mean, level.local_pca.projection, level.centroids, level.vlad_pca.mean,
                  level.vlad_pca.projection)
        if not all(np.isfinite(piece).all() for piece in pieces):
            raise ValueError("the codebook holds NaN or infinite values")
    codebook = MopCodebook(method=method, levels=tuple(levels), power=power, images=images)
    if "level_dims" in attributes and list(attributes["level_dims"]) != codebook.level_dims:
        raise ValueError(f"codebook attribute level_dims={list(attributes['level_dims'])} does not match the arrays")
    return codebook
