"""float16 storage is searched by faiss' QT_fp16 scalar quantizer over the very same halves (memory backend), and
ranks exactly like the float32 maths over those halves; float32 keeps numpy + argpartition."""

import numpy as np
import pytest

from retrieval.search.backends import memory
from retrieval.search.backends.memory import MemoryBackend, float16_scanner
from retrieval.vectors import l2_normalize, top_k


def unit_rows(count, dim=64, seed=0):
    return l2_normalize(np.random.default_rng(seed).normal(size=(count, dim))).astype(np.float32)


def test_the_scanner_holds_the_same_halves():
    halves = unit_rows(300).astype(np.float16)
    scanner = float16_scanner(halves)
    assert scanner.ntotal == 300
    np.testing.assert_array_equal(scanner.reconstruct_n(0, 300), halves.astype(np.float32))


@pytest.mark.parametrize("count, k", [(5000, 10), (7, 10), (1, 1)])
def test_float16_search_ranks_like_exact_maths_over_the_halves(count, k):
    halves = unit_rows(count).astype(np.float16)
    queries = unit_rows(25, seed=1)
    backend = MemoryBackend(halves)
    rows, scores = backend.search_batch(queries, k)
    want_rows, want_scores = top_k(halves, queries, k)
    assert rows.shape == want_rows.shape == (25, min(k, count)) and rows.dtype == np.int64
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    assert backend._scanner is not None  # the faiss path answered, not numpy


def test_float32_keeps_numpy_and_argpartition(monkeypatch):
    matrix = unit_rows(500)
    monkeypatch.setattr(memory, "float16_scanner", lambda _: pytest.fail("float32 must not use the scanner"))
    rows, _ = MemoryBackend(matrix).search_batch(unit_rows(3, seed=2), 5)
    np.testing.assert_array_equal(rows, top_k(matrix, unit_rows(3, seed=2), 5)[0])


def test_empty_float16_matrix():
    rows, scores = MemoryBackend(np.empty((0, 64), np.float16)).search_batch(unit_rows(2), 3)
    assert rows.shape == (2, 0) and scores.shape == (2, 0)
