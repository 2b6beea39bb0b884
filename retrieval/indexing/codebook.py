"""Part of stage 2 (plan) for the MOP poolings: the codebook the database's vectors are encoded with.

Design: the codebook is learned **once**, when the database is created (or rebuilt), on a sample of its own images,
or taken from another database with ``--codebook-from OTHER.h5``; incremental updates keep it. Why not re-learn it at
every update, as the whitening is? Whitening is applied at search time to stored vectors, so re-learning it costs one
PCA. A MOP vector is the codebook applied to the image's patch descriptors (74 x 1280 floats per image for ``mop``,
245 x 1280 for ``mop-fast``, 380 KB to 1.2 MB as float32): re-learning would mean storing all of that per image (20 to 60
times the vectors themselves) or extracting every image again, which is what ``--rebuild`` does, at the cost of a full
run. So an update encodes its new images against the stored codebook, every stored vector stays valid, and a query is
encoded exactly like the database. The price: a codebook learned on the first images can fit later ones less well;
``--rebuild`` re-learns it on the current folder.

The sample: at most ``CODEBOOK_IMAGES`` images, evenly spaced over the sorted paths (deterministic, so a rerun of an
interrupted first build learns the same codebook and can resume its checkpoint). They are extracted twice (once for
learning, once for their vectors), which bounds the extra cost at ``CODEBOOK_IMAGES`` extractions.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from ..descriptors import mop
from ..descriptors.encoder import EncoderConfig, EncoderRequest
from ..descriptors.extractor import Extractor
from ..descriptors.pooling import CODEBOOK_POOLINGS
from ..errors import ImageError, IndexFileError, RetrievalError
from ..images import load_for_backbone
from ..models.backbones import Weights
from ..storage.database import FeatureDatabase, read_database
from .scan import Scan

CODEBOOK_IMAGES = 500
LEARN_BATCH = 16


def codebook_for(
    source: str | None,
    asked: EncoderRequest,
    existing: FeatureDatabase | None,
    encoder: EncoderConfig,
    weights: Weights,
    scan: Scan,
    notice: Callable[[str], None],
) -> tuple[EncoderConfig, mop.MopCodebook | None, str]:
    """(encoder with its dim and codebook digest, codebook, codebook source) for the database being written.

    ``source``: ``--codebook-from``; ``asked``: the encoder options given (checked against its settings). Non-MOP poolings: the encoder unchanged, no codebook (``--codebook-from`` refused).
    """
    if encoder.pooling not in CODEBOOK_POOLINGS:
        if source is not None:
            raise RetrievalError(f"--codebook-from is for --pooling {' or '.join(CODEBOOK_POOLINGS)}, not {encoder.pooling}")
        return encoder, None, ""
    other = _codebook_file(source, asked, weights) if source is not None else None
    if existing is not None:  # the stored vectors were encoded with it: kept (see the module docstring)
        if other is not None and other.encoder.codebook != existing.encoder.codebook:
            raise IndexFileError(
                f"{source}: has another codebook than the existing index; rerun with --rebuild to encode with it",
                kind="conflict",
            )
        return existing.encoder, existing.codebook, existing.codebook_source
    if other is not None:
        notice(f"MOP codebook taken from {source} (learned on {other.codebook.images} images)")
        return (dataclasses.replace(other.encoder, weights_path=encoder.weights_path), other.codebook,
                str(Path(source).resolve()))
    return learn_on_sample(encoder, weights, scan, notice)


def _codebook_file(source: str, asked: EncoderRequest, weights: Weights) -> FeatureDatabase:
    """The database ``--codebook-from`` names: it must hold a codebook, and the options given must agree with the
    settings it was made with (those it records are taken over: pooling parameters, input size, resize rule, ...)."""
    other = read_database(source)
    if other.codebook is None:
        raise RetrievalError(f"{source}: has no MOP codebook (built with pooling {other.encoder.pooling})")
    differs = asked.conflicts_with(other.encoder)
    if differs is None and weights.hash != other.encoder.weights_hash:
        differs = f"other weights ({other.encoder.weights_name})"
    if differs:
        raise RetrievalError(f"{source}: its codebook was made with {differs}; a codebook only fits descriptors made the same way")
    return other


def sample_paths(paths, limit: int = CODEBOOK_IMAGES) -> list[str]:
    """At most ``limit`` of the sorted ``paths``, evenly spaced (all of them when there are fewer)."""
    ordered = sorted(paths)
    if len(ordered) <= limit:
        return ordered
    return [ordered[i * len(ordered) // limit] for i in range(limit)]


def learn_on_sample(
    encoder: EncoderConfig, weights: Weights, scan: Scan, notice: Callable[[str], None]
) -> tuple[EncoderConfig, mop.MopCodebook, str]:
    """Learn the codebook on a sample of the scanned images (unreadable ones left out)."""
    chosen = sample_paths(scan.stats)
    extractor = Extractor(encoder, weights)
    parts, used = [], 0
    for start in range(0, len(chosen), LEARN_BATCH):
        arrays = []
        for rel in chosen[start : start + LEARN_BATCH]:
            try:
                arrays.append(load_for_backbone(scan.root / rel, encoder.input_size, encoder.resize_rule))
            except ImageError:
                continue  # reported when the extraction meets it
        if arrays:
            parts.append(extractor.mop_material(arrays))
            used += len(arrays)
    if used < 2:
        raise RetrievalError(f"{scan.root}: cannot learn the MOP codebook: it needs at least 2 readable images, found {used}")
    params = {k: v for k, v in encoder.pooling_params.items() if k != "fast_scale"}
    try:
        codebook = mop.learn_codebook(mop.Material.concatenate(parts), encoder.pooling, **params)
    except ValueError as exc:
        raise RetrievalError(f"cannot learn the MOP codebook: {exc}") from None
    notice(f"MOP codebook learned on {used} images: k={[level.k for level in codebook.levels]}, "
           f"level dims {codebook.level_dims} ({codebook.dim}-d)")
    return dataclasses.replace(encoder, dim=codebook.dim, codebook=codebook.digest()), codebook, "database"
