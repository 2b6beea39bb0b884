import numpy as np
import pytest

from retrieval.descriptors.whitening import (
    Whitening,
    apply_whitening,
    learn_pca_whitening,
    whitening_from_arrays,
    whitening_to_arrays,
)


def axis_data():
    # mean (1, 2); centred points (+-2, 0) and (0, +-1): covariance diag(2, 0.5), principal axis x
    return np.array([[3, 2], [-1, 2], [1, 3], [1, 1]], dtype=np.float64)


def test_learn_by_hand_on_axis_aligned_data():
    w = learn_pca_whitening(axis_data(), eps=0.0)
    np.testing.assert_allclose(w.mean, [1, 2])
    np.testing.assert_allclose(w.eigenvalues, [2.0, 0.5])
    # eigenvectors (1, 0), (0, 1) with positive sign, scaled by 1/sqrt(eigenvalue)
    np.testing.assert_allclose(w.projection, [[1 / np.sqrt(2), 0], [0, 1 / np.sqrt(0.5)]], atol=1e-12)
    assert (w.input_dim, w.dim, w.samples) == (2, 2, 4)


def test_whitened_training_set_has_identity_covariance_and_apply_normalises():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    w = learn_pca_whitening(x, eps=0.0)
    projected = (x - w.mean) @ w.projection
    np.testing.assert_allclose(projected.T @ projected / len(x), np.eye(6), atol=1e-8)
    out = apply_whitening(x[:5], w)
    assert out.shape == (5, 6) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(apply_whitening(x[0], w), out[0], rtol=1e-6)  # one vector -> one vector


def test_dimension_reduction_power_and_eps():
    w = learn_pca_whitening(axis_data(), dim=1, eps=0.0)
    np.testing.assert_allclose(w.projection, [[1 / np.sqrt(2)], [0]], atol=1e-12)
    np.testing.assert_allclose(apply_whitening(np.array([[5.0, 7.0]]), w), [[1.0]])
    rotation = learn_pca_whitening(axis_data(), power=0.0)  # plain PCA rotation, no scaling
    np.testing.assert_allclose(rotation.projection, np.eye(2), atol=1e-12)
    soft = learn_pca_whitening(axis_data(), eps=1.0)  # eigenvalues + 1.0 * largest (2.0)
    np.testing.assert_allclose(np.diag(soft.projection), [1 / 2, 1 / np.sqrt(2.5)])


def test_fewer_samples_than_dimensions():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 20))
    w = learn_pca_whitening(x)
    assert w.dim == 4  # N - 1
    projected = (x - w.mean) @ w.projection
    np.testing.assert_allclose(projected.T @ projected / 5, np.eye(4), atol=1e-5)
    with pytest.raises(ValueError, match="at most 4"):
        learn_pca_whitening(x, dim=10)
    with pytest.raises(ValueError, match="at least 2"):
        learn_pca_whitening(x[:1])
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        learn_pca_whitening(x[0])


def test_deterministic_signs_and_wrong_dimension():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 8))
    a, b = learn_pca_whitening(x), learn_pca_whitening(x.copy())
    np.testing.assert_allclose(a.projection, b.projection)
    assert (np.abs(a.projection).argmax(axis=0) == np.argmax(a.projection, axis=0)).all()
    with pytest.raises(ValueError, match="do not fit"):
        apply_whitening(np.ones((2, 7)), a)


def test_round_trip_through_arrays_and_bad_pieces():
    w = learn_pca_whitening(axis_data(), dim=1)
    arrays, attributes = whitening_to_arrays(w)
    assert set(arrays) == {"mean", "projection", "eigenvalues"}
    assert attributes == {"method": "pca-whitening", "input_dim": 2, "dim": 1, "power": 0.5, "eps": 1e-6, "samples": 4}
    back = whitening_from_arrays(arrays, attributes)
    assert isinstance(back, Whitening)
    np.testing.assert_array_equal(back.projection, w.projection)
    np.testing.assert_array_equal(back.mean, w.mean)
    with pytest.raises(ValueError, match="unknown whitening method"):
        whitening_from_arrays(arrays, {**attributes, "method": "lw"})
    with pytest.raises(ValueError, match="missing 'mean'"):
        whitening_from_arrays({"projection": arrays["projection"]}, attributes)
    with pytest.raises(ValueError, match="disagree"):
        whitening_from_arrays({**arrays, "mean": np.zeros(3)}, attributes)
    with pytest.raises(ValueError, match="does not match"):
        whitening_from_arrays(arrays, {**attributes, "dim": 2})
