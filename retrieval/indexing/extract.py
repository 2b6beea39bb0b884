"""Stage 3: descriptors of the images a plan has to do, in this process (``Extractor``) or as a Ray job; finished
descriptors are checkpointed as they come, so a killed run resumes. The loop is the same for both."""

from __future__ import annotations

import contextlib
import sys
import time
from contextlib import closing
from dataclasses import dataclass, field

import numpy as np

from ..descriptors.extractor import Extractor
from ..errors import RetrievalError
from ..files import describe_os_error
from .plan import Plan


@dataclass
class Extraction:
    """Vectors of the paths that were extracted, those that could not be, and how long it took."""

    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    image_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # (width, height) as displayed
    copies: dict[str, tuple] = field(default_factory=dict)  # path -> (regions (R, D) or None, LocalFeatures or None)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    mode: str = "local"  # local | ray (with ray, seconds include starting Ray and building the models)


def encoded_batches(plan: Plan):
    """(files, an iterator of ``EncodedItem`` batches whose positions index ``plan.todo``, mode)."""
    request = plan.request.extraction
    root = plan.scan.root
    if request.ray is None:
        files = [root / rel for rel in plan.todo]
        if plan.wants_copies and plan.copies["local_features"]:
            from ..descriptors.local_features import prepare_sift

            prepare_sift(background=True)  # beside the model's loading, not in the first picture's SIFT
        extractor = Extractor(plan.encoder, plan.weights, image_root=root)
        if plan.codebook is not None:
            extractor.use_codebook(plan.codebook)
        if plan.wants_copies:
            from ..descriptors.copy_encoder import CopyEncoder

            encoder = CopyEncoder(extractor, regions=plan.copies["regions"], local=plan.copies["local_features"])
            return files, encoder.encode_files(files, batch_size=request.batch_size), "local"
        return files, extractor.encode_files(files, batch_size=request.batch_size), "local"
    from ..descriptors.distributed import encode_files_ray

    files = [root.resolve() / rel for rel in plan.todo]  # workers on other nodes read these names
    batches = encode_files_ray(
        files, plan.encoder, address=request.ray, weights_file=plan.request.encoder.weights_file,
        batch_size=request.batch_size, actors=request.ray_actors,
    )
    return files, batches, "ray"


def extract(plan: Plan) -> Extraction:
    """Encode ``plan.todo``; checkpoint every ``checkpoint_every`` descriptors (also when interrupted)."""
    result = Extraction()
    if not plan.todo:
        return result
    from tqdm import tqdm

    started = time.perf_counter()
    files, batches, result.mode = encoded_batches(plan)
    request = plan.request.extraction
    pending: list[str] = []
    bar = tqdm(total=len(plan.todo), unit="img", disable=not request.progress, file=sys.stderr, dynamic_ncols=True, leave=False)

    def flush() -> None:
        if pending:
            stats = [plan.scan.stats[rel] for rel in pending]
            try:
                plan.checkpoint.add(
                    list(pending), [s.size for s in stats], [s.mtime_ns for s in stats],
                    np.stack([result.vectors[rel] for rel in pending]),
                    [result.image_sizes.get(rel, (-1, -1)) for rel in pending],
                )
            except OSError as exc:
                raise RetrievalError(
                    f"{plan.checkpoint.folder}: cannot save finished descriptors ({describe_os_error(exc)}); "
                    "nothing was written to the index"
                ) from None
            pending.clear()

    try:
        with closing(batches):
            for items in batches:
                for item in items:
                    rel = plan.todo[item.position]
                    if item.error is not None:
                        result.skipped.append((rel, str(item.error).removeprefix(f"{files[item.position]}: ")))
                        continue
                    result.vectors[rel] = item.vector
                    if plan.wants_copies:
                        result.copies[rel] = (getattr(item, "regions", None), getattr(item, "local", None), getattr(item, "page", False))
                    if item.size is not None:
                        result.image_sizes[rel] = item.size
                    pending.append(rel)
                bar.update(len(items))
                if len(pending) >= request.checkpoint_every:
                    flush()
    except BaseException:
        bar.close()
        with contextlib.suppress(RetrievalError):
            flush()  # also on Ctrl-C: what was finished is kept for the next run
        raise
    bar.close()
    flush()
    result.seconds = time.perf_counter() - started
    return result
