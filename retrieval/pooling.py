"""Pooling: conv feature maps -> one descriptor per image. Pure numpy, no Keras.

Feature maps are float arrays of shape (N, H, W, C) (channels last, as Keras produces them); every pooling returns
float32 (N, C). ``l2_normalize`` makes rows unit length so that cosine similarity is a dot product.
"""

from __future__ import annotations

import numpy as np

NORM_EPSILON = 1e-12


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


POOLINGS = {"max": max_pool, "avg": avg_pool, "sum": sum_pool}
"""Pooling name (as stored in the database and given on the command line) -> function."""


def pool(name: str, feature_maps: np.ndarray) -> np.ndarray:
    """Apply the pooling called ``name``; unknown names raise ValueError listing the choices."""
    try:
        function = POOLINGS[name]
    except KeyError:
        raise ValueError(f"unknown pooling {name!r}; choose from {', '.join(POOLINGS)}") from None
    return function(feature_maps)


def l2_normalize(vectors: np.ndarray, epsilon: float = NORM_EPSILON) -> np.ndarray:
    """Rows scaled to unit L2 norm; an all-zero row stays zero instead of becoming NaN. (N, D) -> float32 (N, D)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, epsilon)
