"""PCA-whitening of global descriptors, learned without labels (Jégou & Chum, ECCV 2012). Pure numpy.

Learn on a set of descriptors (ideally an independent image set), then apply to database and query vectors alike::

    whitening = learn_pca_whitening(training_vectors, dim=256)
    database = apply_whitening(database_vectors, whitening)      # (N, 256), unit rows
    query = apply_whitening(query_vector, whitening)             # (256,), unit length

``apply_whitening(x) = l2n((x - mean) @ projection)`` with ``projection = U_d diag((lambda_d + eps * lambda_1) **
-power)``: the top ``d`` eigenvectors of the covariance, each scaled by its eigenvalue to the power ``-power``
(``power = 0.5``: full whitening; ``0``: PCA rotation and dimensionality reduction only; in between: the softened
whitening that Jégou & Chum recommend against over-amplified weak components). ``eps`` (relative to the largest
eigenvalue) keeps near-zero components finite.

Saving: ``whitening_to_arrays`` gives plain ndarrays and JSON-safe attributes for HDF5; ``whitening_from_arrays``
reads them back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..vectors import l2_normalize

WHITENING_METHOD = "pca-whitening"


@dataclass(frozen=True, eq=False)
class Whitening:
    """A learned whitening. ``mean`` float64 (D,), ``projection`` float64 (D, d), ``eigenvalues`` float64 (d,)."""

    mean: np.ndarray
    projection: np.ndarray
    eigenvalues: np.ndarray
    power: float = 0.5
    eps: float = 1e-6
    samples: int = 0  # how many descriptors it was learned on (provenance)

    @property
    def input_dim(self) -> int:
        return int(self.projection.shape[0])

    @property
    def dim(self) -> int:
        return int(self.projection.shape[1])


def learn_pca_whitening(
    vectors: np.ndarray, dim: int | None = None, *, power: float = 0.5, eps: float = 1e-6
) -> Whitening:
    """Learn PCA-whitening from descriptors (N, D) -> ``Whitening`` projecting to ``d`` dimensions.

    ``dim`` None keeps ``min(D, N - 1)`` components (a centred set of N vectors spans at most N - 1 directions); an
    explicit ``dim`` larger than that raises ValueError, as does N < 2. Eigenvectors get a deterministic sign (largest
    absolute coordinate positive) so relearning on the same data gives the same projection.
    """
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"whitening is learned from vectors of shape (N, D), got {x.shape}")
    count, width = x.shape
    if count < 2:
        raise ValueError(f"whitening needs at least 2 training vectors, got {count}")
    if not np.isfinite(x).all():
        raise ValueError("whitening training vectors contain NaN or infinity")
    if not (0.0 <= power <= 1.0) or not (eps >= 0.0):
        raise ValueError(f"whitening power must be in [0, 1] and eps >= 0, got power={power}, eps={eps}")
    limit = min(width, count - 1)
    if dim is None:
        dim = limit
    elif not 1 <= dim <= limit:
        raise ValueError(
            f"whitening dimension {dim} is not possible from {count} vectors of dimension {width} (at most {limit})"
        )
    mean = x.mean(axis=0)
    centred = x - mean
    if count > width:
        values, vectors_ = np.linalg.eigh(centred.T @ centred / count)  # ascending
        values, vectors_ = values[::-1], vectors_[:, ::-1]
    else:  # fewer samples than dimensions: the SVD of the data is cheaper and exact
        _, singular, rows = np.linalg.svd(centred, full_matrices=False)
        values, vectors_ = singular**2 / count, rows.T
    values = np.maximum(values[:dim], 0.0)
    basis = vectors_[:, :dim]
    signs = np.sign(basis[np.abs(basis).argmax(axis=0), np.arange(dim)])
    basis = basis * np.where(signs == 0, 1.0, signs)
    floor = eps * max(float(values[0]), np.finfo(np.float64).tiny)
    projection = basis * (values + floor) ** -power
    return Whitening(mean=mean, projection=projection, eigenvalues=values, power=float(power), eps=float(eps), samples=count)


def apply_whitening(vectors: np.ndarray, whitening: Whitening) -> np.ndarray:
    """``l2n((x - mean) @ projection)``: (M, D) -> float32 (M, d) unit rows, or (D,) -> (d,)."""
    x = np.asarray(vectors, dtype=np.float64)
    single = x.ndim == 1
    x = np.atleast_2d(x)
    if x.ndim != 2 or x.shape[1] != whitening.input_dim:
        raise ValueError(f"vectors of shape {np.shape(vectors)} do not fit a whitening for dimension {whitening.input_dim}")
    out = l2_normalize((x - whitening.mean) @ whitening.projection)
    return out[0] if single else out


def whitening_to_arrays(whitening: Whitening) -> tuple[dict[str, np.ndarray], dict]:
    """(datasets, attributes) to store: float64 arrays ``mean``, ``projection``, ``eigenvalues``; JSON-safe attributes."""
    arrays = {
        "mean": np.asarray(whitening.mean, dtype=np.float64),
        "projection": np.asarray(whitening.projection, dtype=np.float64),
        "eigenvalues": np.asarray(whitening.eigenvalues, dtype=np.float64),
    }
    attributes = {
        "method": WHITENING_METHOD,
        "input_dim": whitening.input_dim,
        "dim": whitening.dim,
        "power": whitening.power,
        "eps": whitening.eps,
        "samples": whitening.samples,
    }
    return arrays, attributes


def whitening_from_arrays(arrays: dict, attributes: dict) -> Whitening:
    """Inverse of ``whitening_to_arrays``; raises ValueError when the pieces are missing or inconsistent."""
    method = attributes.get("method")
    if method != WHITENING_METHOD:
        raise ValueError(f"unknown whitening method {method!r} (expected {WHITENING_METHOD!r})")
    try:
        mean = np.asarray(arrays["mean"], dtype=np.float64)
        projection = np.asarray(arrays["projection"], dtype=np.float64)
        eigenvalues = np.asarray(arrays["eigenvalues"], dtype=np.float64)
        power, eps, samples = float(attributes["power"]), float(attributes["eps"]), int(attributes["samples"])
    except KeyError as missing:
        raise ValueError(f"whitening is missing {missing}") from None
    if mean.ndim != 1 or projection.ndim != 2 or projection.shape[0] != mean.shape[0] or eigenvalues.shape != (
        projection.shape[1],
    ):
        raise ValueError(
            f"whitening arrays disagree: mean {mean.shape}, projection {projection.shape}, eigenvalues {eigenvalues.shape}"
        )
    for key, actual in (("input_dim", projection.shape[0]), ("dim", projection.shape[1])):
        if key in attributes and int(attributes[key]) != actual:
            raise ValueError(f"whitening attribute {key}={attributes[key]} does not match the arrays ({actual})")
    return Whitening(mean=mean, projection=projection, eigenvalues=eigenvalues, power=power, eps=eps, samples=samples)
