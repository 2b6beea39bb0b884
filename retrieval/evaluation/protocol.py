"""The evaluation loop: ground truth + database vectors (+ an encoder for queries that need one) -> metrics.

Two steps, so the benchmark and ``evaluate.py`` share them:

1. ``prepare_queries(ground_truth, paths, vectors, encode)`` matches ground-truth paths to database rows
   (``PathResolver``) and gives each query its vector: a query that *is* a database image uses its stored vector and is
   excluded from its own ranking; a query with a box (Oxford/Paris), one missing from the index, or one that is not a
   database image at all (``Query.image``: ``--queries``, Revisited) is encoded by the ``encode(query, row)`` callback
   (``encode_query``: crop + the engine's extractor) and ranks the whole database.
2. ``evaluate_queries(pipeline, prepared, ...)`` ranks the database for every query through the engine's query
   pipeline (exactly what the server serves: stored whitening, the backend, query expansion), N queries a batched
   search per block, and computes AP, P@k, R@k, the interpolated PR curve and, when asked, the UKBench N-S score
   and DISC21's micro-AP.

Which AP each benchmark's official code computes is ``OFFICIAL_AP`` (the trapezoid rule for all of them; see
``retrieval.evaluation.metrics``). ``write_pr_plot`` draws the mean PR curve (matplotlib, imported lazily).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import ImageError, RetrievalError
from ..search.expansion import NO_EXPANSION, QueryExpansion
from ..search.copies import QueryFeatures
from ..search.pipeline import QueryPipeline
from . import metrics
from .groundtruth import GroundTruth, Query

DEFAULT_KS = (1, 5, 10)

OFFICIAL_AP = {
    "oxford": ("trapezoid", "as Oxford/Paris compute_ap.cpp"),
    "revisited": ("trapezoid", "as revisitop compute_map"),
    "holidays": ("trapezoid", "as INRIA holidays_map.py"),
    "ukbench": ("trapezoid", "as the other benchmarks; UKBench's own score is N-S"),
    "folders": ("trapezoid", "the benchmarks' rule (Oxford compute_ap); --ap non-interpolated for TREC's"),
    "csv": ("trapezoid", "the benchmarks' rule (Oxford compute_ap); --ap non-interpolated for TREC's"),
}
"""Ground-truth kind -> (the AP its benchmark's official code computes, where that comes from). The generic kinds
(folders, csv) have no official code: they report the same trapezoid AP, so every number of this evaluator means the
same thing."""


def describe_ap(kind: str, method: str) -> str:
    """One phrase for the output: which AP is reported, and whether it is the official one for ``kind``."""
    official, source = OFFICIAL_AP.get(kind, ("trapezoid", "the benchmarks' rule"))
    if method == official:
        return f"{method} ({source})"
    return f"{method} (not the official {official} AP of this ground truth)"


class PathResolver:
    """Ground-truth path -> database row: the exact relative path, else, for a bare file name (no folder), the one
    database image with the same file stem (so Oxford's ``all_souls_000013`` finds ``oxbuild/all_souls_000013.jpg``)."""

    def __init__(self, paths: Sequence[str]):
        self._exact = {path: row for row, path in enumerate(paths)}
        stems: dict[str, list[int]] = {}
        for row, path in enumerate(paths):
            stems.setdefault(PurePosixPath(path).stem, []).append(row)
        self._stem = {stem: rows[0] for stem, rows in stems.items() if len(rows) == 1}

    def row(self, path: str) -> int | None:
        found = self._exact.get(path)
        if found is None and "/" not in path:
            found = self._stem.get(PurePosixPath(path).stem)
        return found


@dataclass(frozen=True, eq=False)
class PreparedQuery:
    """A query ready to rank: ``vector`` (D,), relevant / junk database rows (int64), how many relevant there are in
    the ground truth (some may be missing from the index), the row excluded from its ranking, and its own row."""

    name: str
    vector: np.ndarray
    relevant: np.ndarray
    junk: np.ndarray
    n_relevant: int
    exclude: int | None = None
    own_row: int | None = None
    features: Any = None  # copy search: the query's retrieval.search.copies.QueryFeatures (windows, local features)


@dataclass
class Preparation:
    """What ``prepare_queries`` made: the queries, those skipped with a reason, relevant paths missing from the index,
    the database size and how many database images no query names (distractors: irrelevant to every query)."""

    queries: list[PreparedQuery]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    missing_relevant: list[str] = field(default_factory=list)
    database_size: int = 0
    unreferenced: int = 0


def prepare_queries(
    ground_truth: GroundTruth,
    paths: Sequence[str],
    vectors: np.ndarray,
    encode: Callable[[Query, int | None], np.ndarray] | None = None,
) -> Preparation:
    """Match ``ground_truth`` to the database (``paths`` (N,), ``vectors`` (N, D)) and give every query a vector.

    ``encode(query, row)`` is called for queries with a ``bbox``, not in the index, or not database images
    (``query.image``; ``row`` is the query image's database row or None); an ``ImageError`` from it skips that query
    with the reason. Without ``encode`` such queries are skipped. Queries with no relevant image in the ground truth
    are skipped (AP is undefined; revisitop leaves them out of its means too), but for a query with no copy in the
    database (``Query.unmatched``: ``n_relevant`` 0), which counts in µAP only.
    """
    resolver = PathResolver(paths)
    prepared, skipped, missing, mentioned = [], [], set(), set()
    for query in ground_truth.queries:
        if not query.relevant and not query.unmatched:
            skipped.append((query.path, "no relevant images in the ground truth"))
            continue
        relevant_rows = []
        for path in query.relevant:
            row = resolver.row(path)
            if row is None:
                missing.add(path)
            else:
                relevant_rows.append(row)
        junk_rows = [row for row in map(resolver.row, query.junk) if row is not None]
        own = None if query.image is not None else resolver.row(query.path)
        mentioned.update(relevant_rows, junk_rows, () if own is None else (own,))
        features = None
        if query.bbox is None and own is not None:
            vector, exclude = np.asarray(vectors[own], dtype=np.float32), own
        elif encode is None:
            skipped.append((query.path, "needs the model to be encoded (query region or image not in the index)"))
            continue
        else:
            try:
                encoded, exclude = encode(query, own), None
                features = encoded if isinstance(encoded, QueryFeatures) else None
                vector = np.asarray(encoded.vector if features is not None else encoded, dtype=np.float32).reshape(-1)
            except ImageError as exc:
                skipped.append((query.path, str(exc)))
                continue
        prepared.append(
            PreparedQuery(
                name=query.path,
                vector=vector,
                relevant=np.array(sorted(relevant_rows), dtype=np.int64),
                junk=np.array(sorted(junk_rows), dtype=np.int64),
                n_relevant=len(query.relevant),
                exclude=exclude,
                own_row=own,
                features=features,
            )
        )
    return Preparation(prepared, skipped, sorted(missing), len(paths), len(paths) - len(mentioned))


@dataclass(frozen=True)
class QueryScore:
    """One query's numbers. ``ns`` is the UKBench count (0..4) when asked for."""

    name: str
    average_precision: float
    precision_at: dict[int, float]
    recall_at: dict[int, float]
    n_relevant: int
    ns: int | None = None

    def as_dict(self) -> dict:
        out = {"query": self.name, "ap": round(self.average_precision, 6), "relevant": self.n_relevant}
        out.update({f"P@{k}": round(v, 6) for k, v in self.precision_at.items()})
        out.update({f"R@{k}": round(v, 6) for k, v in self.recall_at.items()})
        if self.ns is not None:
            out["N-S"] = self.ns
        return out


@dataclass
class EvaluationResult:
    """Per-query scores and their means; ``pr_precision`` is the mean interpolated precision at ``pr_recall``;
    ``micro_ap`` is DISC21's µAP over the pooled (query, database image) pairs when it was asked for, ``unmatched``
    how many queries with no copy in the database it pooled besides (their best score each in ``unmatched_top``)."""

    queries: list[QueryScore]
    ks: tuple[int, ...]
    pr_recall: np.ndarray
    pr_precision: np.ndarray
    ns_score: float | None = None
    settings: dict = field(default_factory=dict)
    micro_ap: float | None = None
    unmatched_top: dict[str, float] = field(default_factory=dict)

    @property
    def unmatched(self) -> int:
        return len(self.unmatched_top)

    @property
    def mean_average_precision(self) -> float:
        return float(np.mean([q.average_precision for q in self.queries]))

    def mean_precision_at(self, k: int) -> float:
        return float(np.mean([q.precision_at[k] for q in self.queries]))

    def mean_recall_at(self, k: int) -> float:
        return float(np.mean([q.recall_at[k] for q in self.queries]))

    def metrics(self) -> dict[str, float]:
        """``{"mAP": ..., "P@1": ..., ..., "R@1": ..., "N-S": ..., "µAP": ...}`` in that order (the last two when
        computed)."""
        out = {"mAP": self.mean_average_precision}
        out.update({f"P@{k}": self.mean_precision_at(k) for k in self.ks})
        out.update({f"R@{k}": self.mean_recall_at(k) for k in self.ks})
        if self.ns_score is not None:
            out["N-S"] = self.ns_score
        if self.micro_ap is not None:
            out["µAP"] = self.micro_ap
        return out

    def table(self) -> str:
        lines = [f"{'metric':<8}{'value':>8}"]
        lines += [f"{name:<8}{value:>8.4f}" for name, value in self.metrics().items()]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {
            "metrics": {name: round(value, 6) for name, value in self.metrics().items()},
            "queries_evaluated": len(self.queries),
            **({"unmatched_queries": [{"query": name, "top_score": None if not np.isfinite(score) else round(score, 6)}
                                      for name, score in self.unmatched_top.items()]} if self.unmatched else {}),
            "settings": self.settings,
            "pr_curve": {
                "recall": [round(float(r), 6) for r in self.pr_recall],
                "precision": [round(float(p), 6) for p in self.pr_precision],
            },
            "per_query": [q.as_dict() for q in self.queries],
        }


QUERY_BLOCK = 256  # queries ranked per batched pipeline call
FIRST_DEPTH = 1000  # results ranked at first; a query whose relevant images are not all among them is ranked again


def _rankings(pipeline: QueryPipeline, block: list[PreparedQuery], k: int, expansion: QueryExpansion, verify: bool = False):
    """One batched pipeline search for ``block``: per query (full ranking with its own row, similarities), -1 dropped.
    A database with copy features is searched as the server searches it (``QueryPipeline.search_copies``)."""
    excluded = [query.exclude for query in block]
    extra = 1 if any(row is not None for row in excluded) else 0
    if pipeline.copies is not None:
        features = [
            query.features if query.features is not None
            else pipeline.stored_query(query.vector, query.own_row) if query.own_row is not None
            else QueryFeatures(query.vector)
            for query in block
        ]
        rows, similarities, _ = pipeline.search_copies(
            features, min(k + extra, len(pipeline)), expansion, query_rows=excluded, verify=verify
        )
        return [(ranking[ranking >= 0], similarity[ranking >= 0]) for ranking, similarity in zip(rows, similarities)]
    rows, similarities = pipeline.search(
        np.stack([query.vector for query in block]), min(k + extra, len(pipeline)), expansion, query_rows=excluded
    )
    return [(ranking[ranking >= 0], similarity[ranking >= 0]) for ranking, similarity in zip(rows, similarities)]


def _ranked_blocks(pipeline, queries, depth: int, first: int, expansion, verify: bool = False):
    """(query, ranking, similarities) for every query, ``depth`` deep: each block is searched ``first`` deep, and
    only the queries with a relevant image below that are searched again, ``depth`` deep. The rankings are the
    same as one search ``depth`` deep (the backends rank ties by row), minus most of the sorting."""
    for start in range(0, len(queries), QUERY_BLOCK):
        block = list(queries[start : start + QUERY_BLOCK])
        ranked = _rankings(pipeline, block, first, expansion, verify)
        again = [i for i, (query, (order, _)) in enumerate(zip(block, ranked))
                 if first < depth and np.count_nonzero(np.isin(order, query.relevant)) < query.relevant.size]
        if again:
            for i, deeper in zip(again, _rankings(pipeline, [block[i] for i in again], depth, expansion, verify)):
                ranked[i] = deeper
        for query, (order, similarity) in zip(block, ranked):
            yield query, order, similarity


def evaluate_queries(
    pipeline: QueryPipeline,
    queries: Sequence[PreparedQuery],
    *,
    ks: Sequence[int] = DEFAULT_KS,
    expansion: QueryExpansion = NO_EXPANSION,
    ap_method: str = "trapezoid",
    precision: str = "plain",
    ns_score: bool = False,
    micro_ap: int | None = None,
    depth: int | None = None,
    recall_levels: np.ndarray = metrics.DEFAULT_RECALL_LEVELS,
    verify: bool = False,
) -> EvaluationResult:
    """Rank the database for every prepared query through ``pipeline`` (the one the server serves: stored whitening,
    the database's backend, query expansion through it) and score the rankings; see the module docstring.

    Queries go in blocks of ``QUERY_BLOCK``, each one batched search (``_ranked_blocks``). ``depth`` (default: the
    whole database) is how many results are ranked; a relevant image beyond it counts as missed. A query's excluded
    row (the query itself) is dropped from its ranking and is never its own expansion neighbour. ``ap_method``: one
    of ``metrics.AP_METHODS``; ``precision``: ``plain`` P@k or ``revisitop`` mP@k (``metrics.PRECISION_RULES``);
    ``micro_ap=N``: also DISC21's µAP, pooling the first N ranked (query, database image) pairs of every query (its
    predictions: score and whether it is relevant; junk and the query's own row left out; a relevant image not among
    them counts as missed). A query with no copy in the database (``n_relevant`` 0) adds only its pooled pairs, all
    false, to µAP; it is left out otherwise (no AP). Raises RetrievalError when no query with a copy is left.
    """
    if ap_method not in metrics.AP_METHODS:
        raise ValueError(f"unknown AP method {ap_method!r}; choose from {', '.join(metrics.AP_METHODS)}")
    if precision not in metrics.PRECISION_RULES:
        raise ValueError(f"unknown precision rule {precision!r}; choose from {', '.join(metrics.PRECISION_RULES)}")
    ks = tuple(sorted(set(int(k) for k in ks)))
    if not ks or ks[0] < 1:
        raise ValueError(f"every k must be at least 1, got {ks}")
    if not any(query.n_relevant for query in queries):
        raise RetrievalError("no query left to evaluate")
    if not micro_ap:
        queries = [query for query in queries if query.n_relevant]
    count = len(pipeline)
    depth = min(depth or count, count)
    first = min(depth, max(FIRST_DEPTH, micro_ap or 0, 4))
    scores_out, curves, ns_counts, pooled, unmatched_top = [], [], [], [], {}
    for query, ranking, similarity in _ranked_blocks(pipeline, queries, depth, first, expansion, verify):
        order = ranking if query.exclude is None else ranking[ranking != query.exclude]
        similarity = similarity if query.exclude is None else similarity[ranking != query.exclude]
        order, similarity = order[:depth], similarity[:depth]
        if not query.n_relevant:  # no copy in the database: its predictions can only be false
            pooled.append((similarity[:micro_ap], np.zeros(min(micro_ap, len(similarity)), bool), 0))
            unmatched_top[query.name] = float(similarity[0]) if len(similarity) else -np.inf
            continue
        is_relevant = np.zeros(count, dtype=bool)
        is_relevant[query.relevant] = True
        scored = np.ones(count, dtype=bool)
        scored[query.junk] = False
        scored = scored[order]
        flags = is_relevant[order][scored]
        if micro_ap:
            pooled.append((similarity[scored][:micro_ap], flags[:micro_ap], query.n_relevant))
        ns = None
        if ns_score:
            group = is_relevant.copy()
            if query.own_row is not None:
                group[query.own_row] = True
            ns = int(group[ranking[:4]].sum())
            ns_counts.append(ns)
        scores_out.append(_query_score(query, flags, ks, ap_method, precision, ns))
        curves.append(metrics.interpolated_precision_from_flags(flags, query.n_relevant, recall_levels))
    whitening = pipeline.whitening
    settings = {
        "qe": expansion.method, "ap": ap_method, "precision": precision,
        "whitening": None if whitening is None else whitening.dim, "search": pipeline.kind, "depth": depth,
    }
    if pipeline.copies is not None:
        settings["copy_search"] = {"regions": pipeline.copies.has_regions, "verify": verify}
    if micro_ap:
        settings["micro_ap_depth"] = micro_ap
    if expansion.active:
        settings.update({"qe_top_n": expansion.top_n, **({"qe_alpha": expansion.alpha} if expansion.method == "alpha" else {})})
    return EvaluationResult(
        queries=scores_out,
        ks=ks,
        pr_recall=np.asarray(recall_levels, dtype=np.float64),
        pr_precision=np.mean(curves, axis=0),
        ns_score=float(np.mean(ns_counts)) if ns_score else None,
        settings=settings,
        micro_ap=_pooled_micro_ap(pooled) if micro_ap else None,
        unmatched_top=unmatched_top,
    )


def _query_score(query: PreparedQuery, flags: np.ndarray, ks, ap_method: str, precision: str, ns) -> QueryScore:
    """One query's AP, P@k (plain or revisitop), R@k from its junk-free relevance flags."""
    found = np.cumsum(flags)
    at = {k: int(found[min(k, found.size) - 1]) if found.size else 0 for k in ks}
    if precision == "revisitop":
        precision_at = dict(zip(ks, metrics.precision_at_kappas(flags, ks).tolist()))
    else:
        precision_at = {k: at[k] / k for k in ks}
    return QueryScore(
        name=query.name,
        average_precision=metrics.average_precision_from_flags(flags, query.n_relevant, ap_method),
        precision_at=precision_at,
        recall_at={k: at[k] / query.n_relevant for k in ks},
        n_relevant=query.n_relevant,
        ns=ns,
    )


def _pooled_micro_ap(pooled: list[tuple[np.ndarray, np.ndarray, int]]) -> float:
    """µAP of every query's (scores, relevance flags, number relevant) pooled into one list (DISC21)."""
    scores = np.concatenate([item[0] for item in pooled])
    truth = np.concatenate([item[1] for item in pooled])
    return metrics.micro_average_precision(scores, truth, sum(item[2] for item in pooled))


def relearned_pipeline(database, training, training_path, dim: int | None) -> QueryPipeline:
    """An exact pipeline over ``database`` with PCA-whitening learned on another database ``training`` (an
    evaluation-time experiment, ``evaluate.py --whiten-from``). RetrievalError when it cannot be learned."""
    from ..descriptors.whitening import learn_pca_whitening
    from ..search.backends.memory import MemoryBackend
    from ..search.pipeline import searched_matrix

    if database.whitening is not None:
        raise RetrievalError("the index already carries a whitening; --whiten-from would apply a second one")
    if training.encoder.dim != database.encoder.dim:
        raise RetrievalError(f"{training_path}: {training.encoder.dim}-d vectors, the index has {database.encoder.dim}-d")
    try:
        whitening = learn_pca_whitening(np.asarray(training.vectors, np.float32), dim)
    except ValueError as exc:
        raise RetrievalError(f"{training_path}: {exc}") from None
    matrix = searched_matrix(database.vectors, whitening)
    return QueryPipeline(MemoryBackend(matrix), matrix, whitening)


def crop_to_box(image, bbox: tuple[float, float, float, float]):
    """The query region as revisitop and cirtorch cut it: PIL ``image.crop(bbox)`` and nothing else. Pillow rounds
    each coordinate (half to even: 136.5 -> 136) and does not clip: the part of a box past the border is black.
    A box that rounds to no pixel raises ImageError."""
    crop = image.crop(tuple(float(v) for v in bbox))
    if crop.width < 1 or crop.height < 1:
        raise ImageError(f"query box {tuple(bbox)} holds no pixel")
    return crop


def encode_query(
    engine, query: Query, row: int | None, query_root: str | os.PathLike | None = None, verify: bool = True
) -> np.ndarray:
    """The ``encode`` callback of ``prepare_queries`` for a ``retrieval.engine.RetrievalEngine``: open the query image
    (``query_root / query.image`` for a query that is not a database image, default root the index's image folder;
    else its database row's file, else ``image_root / query.path``), crop it to ``query.bbox`` if any, encode -> (D,); with copy search its ``QueryFeatures`` (local features only
    when ``verify``)."""
    from ..engine import open_query
    from ..images import open_image

    if query.image is not None and query_root is not None:
        source = Path(query_root) / query.image
    elif engine.image_root is None:
        raise RetrievalError("the index records no image folder: give the image folder (--database DIR)")
    elif query.image is not None:
        source = engine.image_root / query.image
    else:
        source = engine.image_path(row) if row is not None else engine.image_root / query.path
    if query.bbox is None:
        image = open_query(source) if engine.copy_search else open_image(source)  # as the server decodes an upload
    else:  # the box is in the full picture's pixels
        image = crop_to_box(open_image(source), query.bbox)
    if engine.copy_search:  # windows and local features too: the query as the server would search it
        return engine.query_features(image, for_verification=verify)
    return engine.encode_images([image])[0]


def encode_query_files(engine, queries: Sequence[Query], query_root: str | os.PathLike | None = None) -> dict:
    """Every whole-image query that is not a database image (``image`` set, no box), encoded in batches on the
    indexer's decoding threads, exactly as ``encode_query`` would one by one: {query.image: (D,) or its ImageError}.
    ``engine`` needs its extractor."""
    wanted = sorted({q.image for q in queries if q.image is not None and q.bbox is None and q.relevant})
    if not wanted:
        return {}
    root = Path(query_root) if query_root is not None else engine.image_root
    if root is None:
        raise RetrievalError("the index records no image folder: give the image folder (--database DIR)")
    out: dict = {}
    for batch in engine.extractor.encode_files([root / name for name in wanted]):
        for item in batch:
            out[wanted[item.position]] = item.vector if item.error is None else item.error
    return out


def write_pr_plot(path: str | os.PathLike, result: EvaluationResult, title: str = "") -> Path:
    """Draw the mean interpolated precision-recall curve to a PNG; needs matplotlib (Agg, no display)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise RetrievalError("drawing the precision-recall plot needs matplotlib (pip install matplotlib)") from None
    path = Path(path)
    figure = Figure(figsize=(5, 4), dpi=100)
    axes = figure.add_subplot()
    axes.plot(result.pr_recall, result.pr_precision, linewidth=2, label=f"mAP {result.mean_average_precision:.4f}")
    axes.set(xlabel="recall", ylabel="interpolated precision", xlim=(0, 1), ylim=(0, 1.02))
    axes.set_title(title or f"precision-recall, {len(result.queries)} queries", fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower left")
    figure.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, format="png")
    except OSError as exc:
        raise RetrievalError(f"{path}: cannot write the plot ({exc.strerror or exc})") from None
    return path
