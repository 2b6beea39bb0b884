from fractions import Fraction as F

import numpy as np
import pytest

from retrieval.evaluation.protocol import metrics

RANKING = ["a", "x", "b", "y", "c"]
RELEVANT = {"a", "b", "c", "d"}
JUNK = {"y"}  # after deleting it: a x b c -> hits at 1, 3, 4 out of 4 relevant


def test_relevance_flags_delete_junk():
    np.testing.assert_array_equal(metrics.relevance_flags(RANKING, RELEVANT, JUNK), [True, False, True, True])
    rows = np.array([5, 9, 2, 7, 1])
    np.testing.assert_array_equal(metrics.relevance_flags(rows, {5, 2, 1, 8}, {7}), [True, False, True, True])
    with pytest.raises(ValueError, match="more than once"):
        metrics.relevance_flags(["a", "a"], {"a"})
    with pytest.raises(ValueError, match="more than once"):
        metrics.relevance_flags(np.array([1, 1]), {1})


@pytest.mark.parametrize(
    "flags, n_relevant, trapezoid, plain",
    [
        # hits at 1-based positions 1 and 3 of 2: (1 + 1)/2 * 1/2 + (1/2 + 2/3)/2 * 1/2
        ([1, 0, 1], 2, F(19, 24), F(5, 6)),
        ([1, 0, 1], 3, F(19, 36), F(5, 9)),  # one relevant never retrieved
        ([0, 1], 4, F(1, 16), F(1, 8)),  # precision just before the hit is 0/1
        ([0, 0, 0, 1], 1, F(1, 8), F(1, 4)),  # a lone hit below the top: the trapezoid halves it
        ([1, 1, 1], 5, F(3, 5), F(3, 5)),  # a perfect start, 2 of 5 missed
        ([0, 0], 2, F(0), F(0)),
        # hits at 1, 3, 4, 9 of 4 (revisitop's compute_map, worked by hand)
        ([1, 0, 1, 1, 0, 0, 0, 0, 1], 4, F(389, 576), (1 + F(2, 3) + F(3, 4) + F(4, 9)) / 4),
    ],
)
def test_ap_golden_values(flags, n_relevant, trapezoid, plain):
    flags = np.array(flags, dtype=bool)
    assert metrics.average_precision_from_flags(flags, n_relevant) == pytest.approx(float(trapezoid), abs=1e-15)
    assert metrics.average_precision_from_flags(flags, n_relevant, "non-interpolated") == pytest.approx(float(plain), abs=1e-15)


def test_default_ap_is_the_trapezoid_and_junk_is_deleted_first():
    # a x b y c, junk y -> a x b c: hits at 1, 3, 4 of 4 -> [(1 + 1) + (1/2 + 2/3) + (2/3 + 3/4)] / 8
    assert metrics.average_precision(RANKING, RELEVANT, JUNK) == pytest.approx(55 / 96)
    assert metrics.average_precision(RANKING, RELEVANT, JUNK, method="non-interpolated") == pytest.approx((1 + 2 / 3 + 3 / 4) / 4)
    # without the junk rule y is a miss: hits at 1, 3, 5
    assert metrics.average_precision(RANKING, RELEVANT, method="non-interpolated") == pytest.approx((1 + 2 / 3 + 3 / 5) / 4)
    assert metrics.average_precision(["a", "b"], {"a", "b"}) == 1.0
    assert metrics.average_precision(["x", "y"], {"a"}) == 0.0
    assert metrics.average_precision([], {"a"}) == 0.0
    with pytest.raises(ValueError, match="no relevant"):
        metrics.average_precision(RANKING, set())
    with pytest.raises(ValueError, match="unknown AP method"):
        metrics.average_precision(RANKING, RELEVANT, method="11-point")


def oxford_compute_ap(ranked, positives, junk):
    """Oxford's compute_ap.cpp, written out: every non-junk entry adds (recall step) x (mean of two precisions)."""
    old_recall, old_precision, ap, found, j = 0.0, 1.0, 0.0, 0, 0
    for item in ranked:
        if item in junk:
            continue
        found += item in positives
        recall, precision = found / len(positives), found / (j + 1.0)
        ap += (recall - old_recall) * (old_precision + precision) / 2
        old_recall, old_precision, j = recall, precision, j + 1
    return ap


def revisitop_compute_ap(ranks, n_positives):
    """revisitop / cirtorch compute_ap over the 0-based junk-free ranks of the retrieved positives, written out."""
    ap = 0.0
    for j, rank in enumerate(ranks):
        precision_0 = 1.0 if rank == 0 else j / rank
        precision_1 = (j + 1) / (rank + 1)
        ap += (precision_1 + precision_0) / (2 * n_positives)
    return ap


def test_trapezoid_ap_equals_the_official_loops():
    rng = np.random.default_rng(0)
    for _ in range(50):
        ranked = list(rng.permutation(30))
        positives, junk = set(rng.choice(30, 6, replace=False)), set(rng.choice(30, 3, replace=False))
        positives -= junk
        flags = metrics.relevance_flags(ranked, positives, junk)
        ours = metrics.average_precision(ranked, positives, junk)
        assert ours == pytest.approx(oxford_compute_ap(ranked, positives, junk), abs=1e-12)
        assert ours == pytest.approx(revisitop_compute_ap(np.flatnonzero(flags), len(positives)), abs=1e-12)


def test_revisitop_precision_divides_by_min_of_k_and_the_last_hit():
    # hits at 1 and 3: P@1 1, P@2 1/2, P@5 -> kq = 3 -> 2/3 (plain P@5 is 2/5, the min(#relevant, k) rule gives 1)
    np.testing.assert_allclose(metrics.precision_at_kappas([1, 0, 1, 0, 0], [1, 2, 5]), [1, 1 / 2, 2 / 3], atol=1e-15)
    # one hit at 2: P@1 0, P@5 1/2; hits at 1, 3, 4, 9: P@10 -> kq 9 -> 4/9
    np.testing.assert_allclose(metrics.precision_at_kappas([0, 1], [1, 5]), [0, 1 / 2], atol=1e-15)
    np.testing.assert_allclose(metrics.precision_at_kappas([1, 0, 1, 1, 0, 0, 0, 0, 1], [1, 5, 10]), [1, 3 / 5, 4 / 9])
    np.testing.assert_array_equal(metrics.precision_at_kappas([0, 0], [1, 5]), [0, 0])
    with pytest.raises(ValueError, match="at least 1"):
        metrics.precision_at_kappas([1], [0])


def test_micro_average_precision_by_hand_with_pessimistic_ties():
    assert metrics.micro_average_precision([0.9, 0.8, 0.7], [True, False, True], 3) == pytest.approx(5 / 9)
    assert metrics.micro_average_precision([0.7, 0.9, 0.8], [True, True, False], 3) == pytest.approx(5 / 9)
    # the false pair that ties with a true one goes first: (1/2 + 2/3) / 3
    assert metrics.micro_average_precision([0.9, 0.9, 0.7], [True, False, True], 3) == pytest.approx(7 / 18)
    assert metrics.micro_average_precision([0.5] * 4, [1, 0, 1, 0], 2) == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert metrics.micro_average_precision([0.2, 0.1], [False, False], 4) == 0.0
    with pytest.raises(ValueError, match="2 scores but 1"):
        metrics.micro_average_precision([0.1, 0.2], [True], 2)
    with pytest.raises(ValueError, match="n_true"):
        metrics.micro_average_precision([0.1, 0.2], [True, True], 1)


def test_mean_average_precision():
    value = metrics.mean_average_precision([RANKING, ["a"]], [RELEVANT, {"a"}], [JUNK, ()])
    assert value == pytest.approx((55 / 96 + 1) / 2)
    with pytest.raises(ValueError, match="one relevant set"):
        metrics.mean_average_precision([RANKING], [])
    with pytest.raises(ValueError, match="no queries"):
        metrics.mean_average_precision([], [])


def test_precision_and_recall_at_k():
    assert metrics.precision_at_k(RANKING, RELEVANT, 3, JUNK) == pytest.approx(2 / 3)  # a x b
    assert metrics.precision_at_k(RANKING, RELEVANT, 1) == 1.0
    assert metrics.precision_at_k(RANKING, RELEVANT, 10, JUNK) == pytest.approx(3 / 10)  # short list still / k
    assert metrics.recall_at_k(RANKING, RELEVANT, 3, JUNK) == pytest.approx(2 / 4)
    assert metrics.recall_at_k(RANKING, RELEVANT, 10, JUNK) == pytest.approx(3 / 4)  # d never retrieved
    with pytest.raises(ValueError, match="at least 1"):
        metrics.precision_at_k(RANKING, RELEVANT, 0)
    with pytest.raises(ValueError, match="no relevant"):
        metrics.recall_at_k(RANKING, set(), 1)


def test_ukbench_ns_counts_the_query_itself():
    group = {"q", "a", "b", "c"}
    assert metrics.ukbench_ns_count(["q", "a", "x", "b", "c"], group) == 3
    assert metrics.ukbench_ns_count(["q", "c", "b", "a", "x"], group) == 4
    assert metrics.ukbench_ns_score([["q", "a", "x", "b"], ["x", "y", "z", "w", "q"]], [group, group]) == 1.5
    with pytest.raises(ValueError, match="no queries"):
        metrics.ukbench_ns_score([], [])


def test_interpolated_precision_by_hand():
    # precision at the hits: 1 (recall .25), 2/3 (.5), 3/4 (.75); recall 1 is never reached
    levels = np.array([0.0, 0.25, 0.5, 0.6, 0.75, 1.0])
    out = metrics.interpolated_precision(RANKING, RELEVANT, JUNK, levels)
    np.testing.assert_allclose(out, [1, 1, 0.75, 0.75, 0.75, 0])
    assert metrics.interpolated_precision(["x"], {"a"}).shape == metrics.DEFAULT_RECALL_LEVELS.shape
    assert not metrics.interpolated_precision(["x"], {"a"}).any()
    # exact recall levels are not pushed to the next hit by rounding: 0.3 * 10 relevant -> 3 hits
    flags = np.ones(10, dtype=bool)
    flags[3] = False  # hits at 1, 2, 3, 5, ...
    assert metrics.interpolated_precision_from_flags(flags, 10, np.array([0.3]))[0] == 1.0
