"""Pooling: conv feature maps -> one descriptor per image. Pure numpy, no Keras.

Feature maps are float arrays of shape (N, H, W, C) (channels last, as Keras produces them); every pooling returns
float32 (N, C) and is *not* normalised (the extractor L2-normalises). ``combine_scales`` sums the per-scale descriptors of
multi-scale extraction.

The registry ``POOLINGS`` maps the name stored in the database to the function; ``POOLING_DEFAULTS`` gives, for every
name, the keyword parameters the function takes and their defaults. What a database must record to reproduce its
descriptors is ``pooling`` (the name) plus ``resolve_pooling_params(name, overrides)`` (a JSON-safe dict with every
parameter filled in), and the extractor calls ``pool(name, maps, **params)``.

==========  =====================================================  ==========================
name        method                                                 parameters (default)
==========  =====================================================  ==========================
``max``     MAC, per-channel maximum (Tolias et al. 2016)           -
``sum``     SPoC without centre prior (Babenko & Lempitsky 2015)   -
``avg``     per-channel mean                                       -
``gem``     generalised mean (Radenović, Tolias, Chum 2018)         ``p`` (3.0)
``rmac``    regional MAC (Tolias, Sicre, Jégou, ICLR 2016)          ``levels`` (3)
``crow``    cross-dimensional weighting (Kalantidis et al. 2016)   ``a`` (2.0), ``b`` (2.0)
``mop``     multi-scale orderless pooling (Gong et al. 2014)        ``k`` (100), ``local_dim`` (64),
            of patches: needs a codebook, see ``descriptors.mop``   ``level_dim`` (256), ``power`` (0.5)
``mop-fast`` MOP of conv-map columns at two input scales            the same + ``fast_scale`` (2.0)
==========  =====================================================  ==========================

``mop`` and ``mop-fast`` (``CODEBOOK_POOLINGS``) are in the vocabulary (``POOLING_DEFAULTS``) but not in ``POOLINGS``:
they are not a function of one feature map; the extractor encodes them against the database's codebook.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..vectors import NORM_EPSILON, l2_normalize
GEM_EPSILON = 1e-6  # activations are clamped to at least this before the power (as in cnnimageretrieval-pytorch)
RMAC_OVERLAP = 0.4  # desired overlap of neighbouring R-MAC regions
RMAC_STEPS = (2, 3, 4, 5, 6, 7)  # possible numbers of regions along the long side at the first level


def _check_maps(feature_maps: np.ndarray) -> np.ndarray:
    maps = np.asarray(feature_maps, dtype=np.float32)
    if maps.ndim != 4:
        raise ValueError(f"feature maps must have shape (N, H, W, C), got {maps.shape}")
    if maps.shape[1] == 0 or maps.shape[2] == 0:
        raise ValueError(f"feature maps have no spatial extent: {maps.shape}")
    return maps


def max_pool(feature_maps: np.ndarray) -> np.ndarray:
    """MAX / MAC (Tolias et al. 2016): per-channel maximum over all positions. (N, H, W, C) -> (N, C)."""
    return _check_maps(feature_maps).max(axis=(1, 2))


def sum_pool(feature_maps: np.ndarray) -> np.ndarray:
    """SUM / SPoC (Babenko & Lempitsky 2015, without the centre prior): per-channel sum. (N, H, W, C) -> (N, C)."""
    return _check_maps(feature_maps).sum(axis=(1, 2), dtype=np.float64).astype(np.float32)


def avg_pool(feature_maps: np.ndarray) -> np.ndarray:
    """AVE: per-channel mean over all positions. (N, H, W, C) -> (N, C)."""
    return _check_maps(feature_maps).mean(axis=(1, 2), dtype=np.float64).astype(np.float32)


def gem_pool(feature_maps: np.ndarray, *, p: float = 3.0) -> np.ndarray:
    """GeM (Radenović, Tolias, Chum, TPAMI 2018): ``(mean over positions of max(x, 1e-6) ** p) ** (1 / p)``.

    (N, H, W, C) -> (N, C). ``p = 1`` is average pooling of the clamped maps, ``p -> inf`` tends to max pooling.
    Computed in float64 and scaled by the per-channel maximum first, so large ``p`` neither overflows nor underflows.
    """
    p = float(p)
    if not math.isfinite(p) or p <= 0:
        raise ValueError(f"GeM power p must be a positive finite number, got {p}")
    maps = np.maximum(_check_maps(feature_maps).astype(np.float64), GEM_EPSILON)
    peak = maps.max(axis=(1, 2))  # (N, C), >= eps > 0
    mean = ((maps / peak[:, None, None, :]) ** p).mean(axis=(1, 2))
    return (peak * mean ** (1.0 / p)).astype(np.float32)


def rmac_regions(height: int, width: int, levels: int = 3) -> list[tuple[int, int, int, int]]:
    """The R-MAC region grid of an ``height`` x ``width`` feature map, as (y, x, h, w) boxes (0-based, h == w).

    Tolias, Sicre & Jégou, ICLR 2016, exactly as their code and cnnimageretrieval-pytorch ``rmac``/``roipool``: at level
    ``l = 1..levels`` the regions are squares of side ``floor(2 * min(H, W) / (l + 1))``, ``l`` of them along the short
    side and ``l + extra`` along the long side, where ``extra`` (0 for a square map) is chosen so that neighbouring
    first-level regions overlap by about 40%; corners are ``floor(i * (size - side) / (count - 1))``, so the first
    region touches the near edge and the last the far one (corners may repeat on tiny maps, as in the reference).
    Regions of side 0 (tiny maps, high levels) are left out. Order: level by level, rows (y) outer, columns (x) inner.
    The full map is *not* in the list (``rmac_pool`` adds it).
    """
    height, width, levels = int(height), int(width), int(levels)
    if height < 1 or width < 1:
        raise ValueError(f"feature map has no spatial extent: {height}x{width}")
    if levels < 1:
        raise ValueError(f"R-MAC needs at least one level, got {levels}")
    short = min(height, width)
    steps = np.asarray(RMAC_STEPS, dtype=np.float64)
    gap = (max(height, width) - short) / (steps - 1)
    best = int(np.argmin(np.abs((short**2 - short * gap) / short**2 - RMAC_OVERLAP)))
    extra_w = best + 1 if height < width else 0
    extra_h = best + 1 if height > width else 0

    def corners(size: int, side: int, count: int) -> list[int]:
        # the reference computes floor(c + i * (size - side) / (count - 1)) - c with an integer c; in exact integer
        # arithmetic that is the floor division below (its float32 version can land one cell short, rarely)
        return [0 if count == 1 else i * (size - side) // (count - 1) for i in range(count)]

    regions = []
    for level in range(1, levels + 1):
        side = math.floor(2 * short / (level + 1))
        if side == 0:
            continue
        for y in corners(height, side, level + extra_h):
            for x in corners(width, side, level + extra_w):
                regions.append((y, x, side, side))
    return regions


def rmac_pool(feature_maps: np.ndarray, *, levels: int = 3) -> np.ndarray:
    """R-MAC: sum of L2-normalised MAC vectors of the full map and of every ``rmac_regions`` box. (N, H, W, C) -> (N, C).

    Follows cnnimageretrieval-pytorch ``rmac`` (full-map MAC included; no per-region PCA-whitening, which the paper
    learns separately; use ``retrieval.whitening`` on the final vectors instead).
    """
    maps = _check_maps(feature_maps)
    _, height, width, _ = maps.shape
    boxes = [(0, 0, height, width)] + rmac_regions(height, width, levels)
    total = np.zeros((maps.shape[0], maps.shape[3]), dtype=np.float64)
    for y, x, h, w in boxes:
        region = maps[:, y : y + h, x : x + w, :].max(axis=(1, 2)).astype(np.float64)
        total += region / np.maximum(np.linalg.norm(region, axis=1, keepdims=True), NORM_EPSILON)
    return total.astype(np.float32)


def crow_pool(feature_maps: np.ndarray, *, a: float = 2.0, b: float = 2.0) -> np.ndarray:
    """CroW (Kalantidis, Mellina, Osindero, ECCV-W 2016): spatially and channel-weighted sum pooling. (N, H, W, C) -> (N, C).

    Per image, with activations clamped at 0 (CroW assumes post-ReLU maps):

    * spatial weights ``S = (A / ||A||_a) ** (1 / b)`` where ``A[y, x]`` is the sum over channels;
    * channel weights ``w_k = log(sum_j Q_j / Q_k)`` where ``Q_k`` is the fraction of positions where channel k is
      non-zero (``w_k = 0`` for a channel that is zero everywhere), as in the authors' code;
    * output ``w_k * sum_{y,x} S[y, x] * X[y, x, k]``.

    An all-zero map gives an all-zero vector.
    """
    a, b = float(a), float(b)
    if not (math.isfinite(a) and a > 0 and math.isfinite(b) and b > 0):
        raise ValueError(f"CroW parameters a and b must be positive finite numbers, got a={a}, b={b}")
    maps = np.maximum(_check_maps(feature_maps).astype(np.float64), 0.0)
    aggregate = maps.sum(axis=3)  # (N, H, W)
    norm = (aggregate**a).sum(axis=(1, 2)) ** (1.0 / a)  # (N,)
    spatial = (aggregate / np.maximum(norm, NORM_EPSILON)[:, None, None]) ** (1.0 / b)
    weighted = np.einsum("nyx,nyxc->nc", spatial, maps)
    nonzero = (maps > 0).mean(axis=(1, 2))  # (N, C)
    total = nonzero.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        channel = np.where(nonzero > 0, np.log(total / np.where(nonzero > 0, nonzero, 1.0)), 0.0)
    return (weighted * channel).astype(np.float32)


POOLINGS = {"max": max_pool, "avg": avg_pool, "sum": sum_pool, "gem": gem_pool, "rmac": rmac_pool, "crow": crow_pool}
"""Pooling name (as stored in the database and given on the command line) -> function."""

POOLING_DEFAULTS: dict[str, dict] = {
    "max": {},
    "avg": {},
    "sum": {},
    "gem": {"p": 3.0},
    "rmac": {"levels": 3},
    "crow": {"a": 2.0, "b": 2.0},
    # MOP (retrieval.descriptors.mop): codebook size, local PCA dim, per-level PCA dim, VLAD power; fast: the scale
    # of the finest level's input
    "mop": {"k": 100, "local_dim": 64, "level_dim": 256, "power": 0.5},
    "mop-fast": {"k": 100, "local_dim": 64, "level_dim": 256, "power": 0.5, "fast_scale": 2.0},
}
"""Pooling name -> its keyword parameters and their defaults (JSON-safe: store them with the database)."""

CODEBOOK_POOLINGS = ("mop", "mop-fast")
"""Poolings that are not a function of one feature map: they encode patches or several maps against a codebook
learned on the database (``retrieval.descriptors.mop``); the extractor runs them, ``pool`` does not."""


def resolve_pooling_params(name: str, params: dict | None = None) -> dict:
    """Every parameter of pooling ``name``, defaults filled in and types fixed, ready to be stored as JSON.

    ``resolve_pooling_params("gem", {"p": 4})`` -> ``{"p": 4.0}``; ``resolve_pooling_params("max")`` -> ``{}``.
    Raises ValueError for an unknown pooling, a parameter the pooling does not take, or a value that is not a
    positive finite number (an integer where the default is one).
    """
    if name not in POOLING_DEFAULTS:
        raise ValueError(f"unknown pooling {name!r}; choose from {', '.join(POOLING_DEFAULTS)}")
    defaults = POOLING_DEFAULTS[name]
    params = dict(params or {})
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        accepted = ", ".join(defaults) if defaults else "none"
        raise ValueError(f"pooling {name!r} takes no parameter {', '.join(unknown)} (accepted: {accepted})")
    resolved = {}
    for key, default in defaults.items():
        value = params.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"pooling {name!r} parameter {key} must be a number, got {value!r}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"pooling {name!r} parameter {key} must be positive and finite, got {value!r}")
        if isinstance(default, int):
            if value != int(value):
                raise ValueError(f"pooling {name!r} parameter {key} must be an integer, got {value!r}")
            resolved[key] = int(value)
        else:
            resolved[key] = float(value)
    if name in CODEBOOK_POOLINGS and not (resolved["power"] <= 1.0 and resolved.get("fast_scale", 2.0) <= 4.0):
        raise ValueError(f"pooling {name!r}: power must be at most 1 and fast_scale at most 4, got {resolved}")
    return resolved


def pool(name: str, feature_maps: np.ndarray, **params) -> np.ndarray:
    """Apply the pooling called ``name`` with keyword ``params`` (defaults from ``POOLING_DEFAULTS``).

    (N, H, W, C) -> float32 (N, C). Unknown names or parameters raise ValueError listing the choices.
    """
    resolved = resolve_pooling_params(name, params)
    if name in CODEBOOK_POOLINGS:
        raise ValueError(f"pooling {name!r} needs a codebook and the image itself: the extractor encodes it")
    return POOLINGS[name](feature_maps, **resolved)


def combine_scales(descriptors_per_scale: Sequence[np.ndarray]) -> np.ndarray:
    """Multi-scale descriptor: L2-normalise each scale's (N, C) descriptors, then sum them. -> float32 (N, C).

    Multi-scale orderless pooling in the style of Gong et al. 2014 (MOP) / Radenović et al. multi-scale testing: the
    extractor pools the maps of the image at each input scale, calls this, then L2-normalises the sum.
    """
    if len(descriptors_per_scale) == 0:
        raise ValueError("combine_scales needs at least one scale")
    arrays = [np.asarray(d, dtype=np.float32) for d in descriptors_per_scale]
    shape = arrays[0].shape
    if len(shape) != 2 or any(a.shape != shape for a in arrays):
        raise ValueError(f"every scale must give descriptors of one shape (N, C), got {[a.shape for a in arrays]}")
    total = np.zeros(shape, dtype=np.float64)
    for array in arrays:
        total += l2_normalize(array)
    return total.astype(np.float32)
