"""Empirical VBMF rank estimation (Nakajima et al. 2013): planted ranks, pure noise, validation."""

from __future__ import annotations

import numpy as np
import pytest

from compresslight.compression.vbmf import _tau_bar, estimate_rank, evbmf, evbmf_from_singular_values


def planted(shape: tuple[int, int], rank: int, sigma: float, seed: int, strength: float = 3.0) -> np.ndarray:
    """A rank-`rank` matrix whose smallest singular value is `strength` x the noise edge, plus noise.

    The noise edge sigma (sqrt(L) + sqrt(M)) is the largest singular value pure Gaussian noise of
    that size reaches (Marchenko-Pastur); components clearly above it are recoverable.
    """
    rng = np.random.default_rng(seed)
    L, M = shape
    signal = np.zeros(shape)
    if rank:
        u, _ = np.linalg.qr(rng.standard_normal((L, rank)))
        v, _ = np.linalg.qr(rng.standard_normal((M, rank)))
        edge = sigma * (np.sqrt(L) + np.sqrt(M))
        values = strength * edge * np.linspace(2.0, 1.0, rank)
        signal = (u * values) @ v.T
    return signal + sigma * rng.standard_normal(shape)


@pytest.mark.parametrize("shape", [(64, 48), (128, 256), (300, 100)])
@pytest.mark.parametrize("sigma", [0.01, 1.0, 30.0])
@pytest.mark.parametrize("rank", [1, 5, 12])
def test_recovers_planted_rank(shape: tuple[int, int], sigma: float, rank: int) -> None:
    Y = planted(shape, rank, sigma, seed=rank)
    result = evbmf(Y)
    assert result.rank == rank
    # The noise variance estimate is close to the truth (the 2015 bounds make it consistent).
    assert result.noise_variance == pytest.approx(sigma**2, rel=0.15)
    observed = np.linalg.svd(Y, compute_uv=False)[:rank]
    # VB shrinks every kept component, and keeps it positive.
    assert np.all(result.singular_values > 0) and np.all(result.singular_values < observed)
    assert result.threshold < observed[-1]


@pytest.mark.parametrize("shape", [(64, 48), (128, 256), (300, 100), (20, 20), (1, 50)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pure_noise_gives_rank_zero(shape: tuple[int, int], seed: int) -> None:
    result = evbmf(planted(shape, 0, sigma=0.5, seed=seed))
    assert result.rank == 0
    assert result.singular_values.shape == (0,)


def test_weak_components_below_the_threshold_are_dropped() -> None:
    # Signal singular values 3.8..7.6 below sigma (L M)^(1/4) = 9.5, the limit under which a
    # component does not rise out of the noise spectrum at all: VB must not keep them.
    assert estimate_rank(planted((100, 80), 3, sigma=1.0, seed=0, strength=0.2)) == 0


def test_orientation_does_not_matter() -> None:
    Y = planted((40, 90), 4, sigma=0.3, seed=3)
    a, b = evbmf(Y), evbmf(Y.T)
    assert a.rank == b.rank == 4
    assert a.noise_variance == pytest.approx(b.noise_variance)
    np.testing.assert_allclose(a.singular_values, b.singular_values)


def test_known_noise_variance_and_model_rank() -> None:
    Y = planted((64, 48), 6, sigma=0.2, seed=4)
    known = evbmf(Y, sigma2=0.04)
    assert known.rank == 6 and known.noise_variance == 0.04
    # A noise variance far too large hides the signal.
    assert evbmf(Y, sigma2=100.0).rank == 0
    # H caps the rank.
    assert evbmf(Y, H=2).rank == 2


def test_from_singular_values_matches_the_matrix_path() -> None:
    Y = planted((50, 70), 3, sigma=0.1, seed=5)
    a = evbmf(Y)
    b = evbmf_from_singular_values(np.linalg.svd(Y, compute_uv=False)[::-1], Y.shape)
    assert a.rank == b.rank == 3
    assert a.noise_variance == pytest.approx(b.noise_variance)


def test_noiseless_and_zero_matrices() -> None:
    rng = np.random.default_rng(6)
    exact = rng.standard_normal((30, 2)) @ rng.standard_normal((2, 40))
    assert estimate_rank(exact) == 2
    zero = evbmf(np.zeros((5, 7)))
    assert zero.rank == 0 and zero.noise_variance == 0.0


def test_threshold_constant_matches_the_paper() -> None:
    # For a square matrix (alpha = 1) the zero of Psi is the paper's 2.5129; elsewhere the
    # popular approximation 2.5129 sqrt(alpha) underestimates it.
    assert _tau_bar(1.0) == pytest.approx(2.5129, abs=1e-4)
    assert _tau_bar(0.1) > 2.5129 * np.sqrt(0.1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"matrix": np.ones(5)}, r"`matrix` must be a non-empty 2-D array, got shape \(5,\)"),
        ({"matrix": np.ones((0, 3))}, r"`matrix` must be a non-empty 2-D array, got shape \(0, 3\)"),
        ({"matrix": np.array([[1.0, np.nan], [0.0, 1.0]])}, r"`matrix` must hold only finite values"),
        ({"matrix": np.ones((4, 6)), "sigma2": 0.0}, r"`sigma2` must be a finite float > 0 or None, got 0.0"),
        ({"matrix": np.ones((4, 6)), "H": 5}, r"`H` must be an int in \[1, 4\] .*, got 5"),
        ({"matrix": np.ones((4, 6)), "H": True}, r"`H` must be an int in \[1, 4\] .*, got True"),
    ],
)
def test_evbmf_rejects_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        evbmf(**kwargs)


@pytest.mark.parametrize(
    ("values", "shape", "match"),
    [
        (np.ones(3), (4, 6), r"`singular_values` must hold at least 4 finite values >= 0 for shape \(4, 6\), got 3"),
        (np.array([1.0, -1.0]), (2, 3), r"`singular_values` must hold at least 2 finite values >= 0"),
        (np.ones(3), (3,), r"`shape` must be two ints >= 1, got \(3,\)"),
    ],
)
def test_from_singular_values_rejects_bad_input(values: np.ndarray, shape: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        evbmf_from_singular_values(values, shape)
