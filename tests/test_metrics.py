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


def test_non_interpolated_ap_by_hand():
    assert metrics.average_precision(RANKING, RELEVANT, JUNK) == pytest.approx((1 + 2 / 3 + 3 / 4) / 4)
    # without the junk rule y is a miss: hits at 1, 3, 5
    assert metrics.average_precision(RANKING, RELEVANT) == pytest.approx((1 + 2 / 3 + 3 / 5) / 4)
    assert metrics.average_precision(["a", "b"], {"a", "b"}) == 1.0
    assert metrics.average_precision(["x", "y"], {"a"}) == 0.0
    assert metrics.average_precision([], {"a"}) == 0.0
    with pytest.raises(ValueError, match="no relevant"):
        metrics.average_precision(RANKING, set())


def test_trapezoid_ap_by_hand_and_against_the_oxford_loop():
    # hits after deleting junk at 1, 3, 4: 1/4 * [(1 + 1)/2 + (1/2 + 2/3)/2 + (2/3 + 3/4)/2] = 55/96
    assert metrics.average_precision(RANKING, RELEVANT, JUNK, method="trapezoid") == pytest.approx(55 / 96)

    def oxford_loop(ranked, positives, junk):  # the benchmark's compute_ap, written out
        old_recall, old_precision, ap, found, j = 0.0, 1.0, 0.0, 0, 0
        for item in ranked:
            if item in junk:
                continue
            found += item in positives
            recall, precision = found / len(positives), found / (j + 1.0)
            ap += (recall - old_recall) * (old_precision + precision) / 2
            old_recall, old_precision, j = recall, precision, j + 1
        return ap

    rng = np.random.default_rng(0)
    for _ in range(20):
        ranked = list(rng.permutation(30))
        positives, junk = set(rng.choice(30, 6, replace=False)), set(rng.choice(30, 3, replace=False))
        positives -= junk
        assert metrics.average_precision(ranked, positives, junk, method="trapezoid") == pytest.approx(
            oxford_loop(ranked, positives, junk)
        )
    with pytest.raises(ValueError, match="unknown AP method"):
        metrics.average_precision(RANKING, RELEVANT, method="11-point")


def test_mean_average_precision():
    value = metrics.mean_average_precision([RANKING, ["a"]], [RELEVANT, {"a"}], [JUNK, ()])
    assert value == pytest.approx(((1 + 2 / 3 + 3 / 4) / 4 + 1) / 2)
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
