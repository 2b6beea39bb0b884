"""Retrieval metrics for one ranked list per query. Pure numpy.

A *ranking* is the database ids (paths, row numbers, any hashable) in order of decreasing similarity; *relevant* and
*junk* are sets of ids. Junk ids (Oxford/Paris "junk": neither relevant nor counted as errors) are deleted from the
ranking before anything is computed, so the item after a junk item moves up one place.

Which AP (``AP_METHODS``):

* ``trapezoid`` (default): what the published benchmarks' own code computes. Oxford5k/Paris6k ``compute_ap.cpp``,
  INRIA Holidays ``holidays_map.py``, revisitop ``python/evaluate.py`` (Revisited Oxford/Paris) and cirtorch
  ``compute_ap`` all integrate precision over recall with the trapezoid rule, starting from (recall 0, precision 1).
* ``non-interpolated``: the TREC / scikit-learn AP, the mean of the precision at each relevant item. It is never
  below the trapezoid value (one relevant item at rank 4: 1/4 against 1/8). DISC21's micro-AP uses this rule over
  pooled pairs (``micro_average_precision``).

Which list to pass (the protocols, applied by ``retrieval.evaluation.protocol``):

* AP, P@k, R@k, PR curve: when the query is itself a database image it is removed from its own ranking and is not in
  its relevant set (folders, Holidays, UKBench, CSV). Oxford/Paris queries are a cropped region encoded afresh, so the
  whole database is ranked and the query's image counts if the ground truth lists it as good/ok.
* UKBench N-S score: the query is *kept* in its ranking and *included* in its relevant set (the group of 4), so a
  perfect result scores 4.

A relevant id that never appears in the ranking (not retrieved, or not in the database) counts as missed: AP and recall
divide by the full number of relevant ids.
"""

from __future__ import annotations

from typing import Collection, Hashable, Iterable, Sequence

import numpy as np

AP_METHODS = ("trapezoid", "non-interpolated")
PRECISION_RULES = ("plain", "revisitop")
"""P@k: ``plain`` divides the relevant items among the first k by k; ``revisitop`` is Revisited Oxford/Paris' mP@k
(``precision_at_kappas``)."""
DEFAULT_RECALL_LEVELS = np.linspace(0.0, 1.0, 101)


def relevance_flags(ranked_ids: Sequence[Hashable] | np.ndarray, relevant: Collection, junk: Collection = ()) -> np.ndarray:
    """bool (L,): whether each entry of the ranking, after deleting junk, is relevant. Repeated ids raise ValueError."""
    if isinstance(ranked_ids, np.ndarray) and ranked_ids.dtype.kind in "iu":
        ranked = ranked_ids.reshape(-1)
        if np.unique(ranked).size != ranked.size:
            raise ValueError("the ranking lists an id more than once")
        if len(junk):
            ranked = ranked[~np.isin(ranked, np.fromiter(junk, dtype=np.int64, count=len(junk)))]
        return np.isin(ranked, np.fromiter(relevant, dtype=np.int64, count=len(relevant)))
    ranked_list = list(ranked_ids)
    if len(set(ranked_list)) != len(ranked_list):
        raise ValueError("the ranking lists an id more than once")
    relevant, junk = set(relevant), set(junk)
    return np.array([item in relevant for item in ranked_list if item not in junk], dtype=bool)


def average_precision_from_flags(flags: np.ndarray, n_relevant: int, method: str = "trapezoid") -> float:
    """AP from ``relevance_flags`` (junk already removed) and the total number of relevant ids R.

    With the t-th hit at 1-based position i:

    * ``trapezoid``: each hit adds ``(p_before + p_at) / (2 R)`` with ``p_before = (t - 1) / (i - 1)`` (1 at i = 1)
      and ``p_at = t / i``: the area under the precision-recall steps by the trapezoid rule from (0, 1), as the
      benchmarks' code computes it (module docstring).
    * ``non-interpolated``: ``(1 / R) * sum of t / i``.

    Worked by hand: hits at positions 1 and 3 of R = 2 give trapezoid (1 + 1)/4 + (1/2 + 2/3)/4 = 19/24
    (non-interpolated 5/6); a single hit at position 4 of R = 1 gives (0 + 1/4)/2 = 1/8 (non-interpolated 1/4).
    """
    if n_relevant < 1:
        raise ValueError("average precision is undefined for a query with no relevant items")
    flags = np.asarray(flags, dtype=bool)
    positions = np.flatnonzero(flags) + 1.0  # 1-based rank of each hit
    hits = np.arange(1, positions.size + 1, dtype=np.float64)
    at_hit = hits / positions
    if method == "trapezoid":
        before = np.where(positions > 1, (hits - 1) / np.maximum(positions - 1, 1), 1.0)
        return float(((before + at_hit) / 2).sum() / n_relevant)
    if method == "non-interpolated":
        return float(at_hit.sum() / n_relevant)
    raise ValueError(f"unknown AP method {method!r}; choose from {', '.join(AP_METHODS)}")


def average_precision(
    ranked_ids: Sequence[Hashable] | np.ndarray,
    relevant: Collection,
    junk: Collection = (),
    *,
    method: str = "trapezoid",
) -> float:
    """Average precision of one ranking (junk deleted first); see ``average_precision_from_flags`` for ``method``.

    Example: ranking a, x, b, y, c with relevant {a, b, c, d} and junk {y} -> a, x, b, c -> hits at 1, 3, 4 ->
    trapezoid AP = [(1 + 1) + (1/2 + 2/3) + (2/3 + 3/4)] / 8 = 55/96. ValueError when ``relevant`` is empty.
    """
    return average_precision_from_flags(relevance_flags(ranked_ids, relevant, junk), len(set(relevant)), method)


def mean_average_precision(
    rankings: Sequence[Sequence[Hashable] | np.ndarray],
    relevants: Sequence[Collection],
    junks: Sequence[Collection] | None = None,
    *,
    method: str = "trapezoid",
) -> float:
    """Mean of ``average_precision`` over queries (one ranking, relevant set and junk set per query)."""
    if len(rankings) != len(relevants) or (junks is not None and len(junks) != len(rankings)):
        raise ValueError("give one relevant set (and one junk set) per ranking")
    if not rankings:
        raise ValueError("mean average precision of no queries is undefined")
    junks = junks if junks is not None else [()] * len(rankings)
    return float(np.mean([average_precision(r, rel, j, method=method) for r, rel, j in zip(rankings, relevants, junks)]))


def precision_at_k(ranked_ids, relevant: Collection, k: int, junk: Collection = ()) -> float:
    """Fraction of the first ``k`` (junk deleted) that is relevant; a ranking shorter than ``k`` still divides by k."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    return float(relevance_flags(ranked_ids, relevant, junk)[:k].sum() / k)


def precision_at_kappas(flags: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """Revisited Oxford/Paris mP@k of one query, as revisitop's ``compute_map``: float64 (len(ks),).

    With p the 1-based positions of the hits in ``flags`` (junk deleted): ``kq = min(max(p), k)`` and
    ``P = #(p <= kq) / kq``. The denominator is k or, when every hit lies within the first k, the position of the
    last hit (neither always k nor min(k, number of relevant)). Hits at 1 and 3, k = 5 -> 2/3 (plain P@5: 2/5);
    a single hit at 2 -> P@1 = 0, P@5 = 1/2. No hit: 0 (revisitop itself fails there).
    """
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be at least 1, got {list(ks)}")
    positions = np.flatnonzero(np.asarray(flags, dtype=bool)) + 1
    out = np.zeros(len(ks), dtype=np.float64)
    if positions.size:
        for i, k in enumerate(ks):
            kq = min(int(positions[-1]), int(k))
            out[i] = np.count_nonzero(positions <= kq) / kq
    return out


def recall_at_k(ranked_ids, relevant: Collection, k: int, junk: Collection = ()) -> float:
    """Fraction of all relevant ids found in the first ``k`` (junk deleted). (Not the "any hit in top k" rate.)"""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    count = len(set(relevant))
    if count == 0:
        raise ValueError("recall is undefined for a query with no relevant items")
    return float(relevance_flags(ranked_ids, relevant, junk)[:k].sum() / count)


def micro_average_precision(scores: np.ndarray, is_true: np.ndarray, n_true: int) -> float:
    """DISC21 (Image Similarity Challenge 2021) micro-AP, µAP, over pooled (query, reference) predictions.

    ``scores`` float (P,): one score per predicted pair; ``is_true`` bool (P,): whether that pair is in the ground
    truth; ``n_true``: the number of true pairs in the ground truth (pairs never predicted count as missed). Every pair
    of every query is sorted together by decreasing score, and among equal scores the false pairs come first (the
    official pessimistic rule: a constant score earns nothing). Then the non-interpolated AP of that one list:
    scores 0.9, 0.8, 0.7 with truth T, F, T and n_true 3 -> (1/1 + 2/3) / 3 = 5/9; with scores 0.9, 0.9, 0.7 the
    false pair ties with the first true one and goes first: (1/2 + 2/3) / 3 = 7/18.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    truth = np.asarray(is_true, dtype=bool).reshape(-1)
    if scores.shape != truth.shape:
        raise ValueError(f"{scores.size} scores but {truth.size} truth flags")
    if n_true < 1 or truth.sum() > n_true:
        raise ValueError(f"n_true must be at least the number of true predicted pairs ({int(truth.sum())}), got {n_true}")
    hits = truth[np.lexsort((truth, -scores))]  # by score descending, false before true on ties
    positions = np.flatnonzero(hits) + 1.0
    return float(np.sum(np.arange(1, positions.size + 1) / positions) / n_true)


def ukbench_ns_count(ranked_ids, relevant: Collection, k: int = 4) -> int:
    """UKBench (Nistér & Stewénius 2006) for one query: how many of its group (the query included) are in the top 4.

    Pass the ranking *with* the query in it and ``relevant`` = the whole group of 4 *including* the query. 0..4.
    """
    return int(relevance_flags(ranked_ids, relevant)[:k].sum())


def ukbench_ns_score(rankings: Iterable, relevants: Iterable[Collection], k: int = 4) -> float:
    """The N-S score: ``ukbench_ns_count`` averaged over queries (0..4; 4 is perfect)."""
    counts = [ukbench_ns_count(r, rel, k) for r, rel in zip(rankings, relevants, strict=True)]
    if not counts:
        raise ValueError("N-S score of no queries is undefined")
    return float(np.mean(counts))


def interpolated_precision_from_flags(
    flags: np.ndarray, n_relevant: int, levels: np.ndarray = DEFAULT_RECALL_LEVELS
) -> np.ndarray:
    """Interpolated precision at each recall level: the best precision at any recall >= the level (0 if never reached).

    flags bool (L,), levels float (R,) in [0, 1] -> float64 (R,). Averaging these over queries gives the usual mean
    precision-recall curve.
    """
    if n_relevant < 1:
        raise ValueError("a precision-recall curve is undefined for a query with no relevant items")
    flags = np.asarray(flags, dtype=bool)
    levels = np.asarray(levels, dtype=np.float64)
    positions = np.flatnonzero(flags) + 1.0
    precision = np.arange(1, positions.size + 1) / positions  # at the t-th hit, recall t / R
    best_from = np.maximum.accumulate(precision[::-1])[::-1] if precision.size else precision
    # smallest t with t / R >= level (t >= 1); a tiny tolerance keeps 0.3 * 10 -> 3, not 4
    needed = np.maximum(np.ceil(levels * n_relevant - 1e-9), 1).astype(np.int64)
    out = np.zeros(levels.shape, dtype=np.float64)
    reached = needed <= positions.size
    out[reached] = best_from[needed[reached] - 1]
    return out


def interpolated_precision(
    ranked_ids, relevant: Collection, junk: Collection = (), levels: np.ndarray = DEFAULT_RECALL_LEVELS
) -> np.ndarray:
    """``interpolated_precision_from_flags`` of one ranking (junk deleted). -> float64 (len(levels),)."""
    return interpolated_precision_from_flags(relevance_flags(ranked_ids, relevant, junk), len(set(relevant)), levels)
