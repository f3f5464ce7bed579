"""Empirical variational Bayesian matrix factorization (EVBMF): rank estimation by a global analytic solution.

Paper 000 (after Kim et al. 2016) picks the Tucker ranks of each convolution with VBMF [32]: the
rank of a weight unfolding is the number of singular components that empirical VB keeps. This is
the global analytic solution of Nakajima, Sugiyama, Babacan, Tomioka (2013), "Global analytic
solution of fully-observed variational Bayesian matrix factorization", JMLR 14:1-37, with the noise
variance estimated as in Nakajima, Tomioka, Sugiyama, Babacan (2015), "Condition for perfect
dimensionality recovery by variational Bayesian PCA", JMLR 16 (the bounds that the public ports of
the authors' MATLAB code use too).

Notation (the papers'): the observed matrix is `Y` (L x M) with L <= M (transposed otherwise),
alpha = L / M, singular values gamma_1 >= ... >= gamma_L, noise variance sigma^2, and the model
rank H <= L.

EVB solution (2013). Each singular component is kept or dropped on its own:

    gamma_hat_h = gamma_breve_h   if gamma_h >= gamma_evb,   else 0,

    gamma_evb   = sqrt(M sigma^2 x_bar),   x_bar = (1 + tau_bar) (1 + alpha / tau_bar),

    gamma_breve_h = gamma_h / 2 * (1 - (L + M) sigma^2 / gamma_h^2
                     + sqrt((1 - (L + M) sigma^2 / gamma_h^2)^2 - 4 L M sigma^4 / gamma_h^4)),

where tau_bar is the positive zero of

    Psi(tau) = log(tau + 1) + alpha log(tau / alpha + 1) - tau

(the paper writes it with kappa = tau / sqrt(alpha) as the zero of Phi(sqrt(alpha) kappa) +
Phi(kappa / sqrt(alpha)), Phi(z) = log(z + 1) / z - 1/2; the two are the same equation). Public
ports use the approximation tau_bar ~= 2.5129 sqrt(alpha), exact only at alpha = 1; we solve the
equation (a 1-D root, microseconds) so the threshold is exact for the wide unfoldings of conv
weights (alpha ~= 0.1 there, where the approximation is 3% off).

Noise variance (2015). sigma^2 minimizes the EVB free energy, which up to constants is

    Omega(sigma^2) = sum_{h=1}^{L} psi_0(x_h) + sum_{h=1}^{H} theta(x_h > x_bar) psi_1(x_h),
    x_h = gamma_h^2 / (M sigma^2),
    psi_0(x) = x - log x,
    psi_1(x) = log(tau(x) + 1) + alpha log(tau(x) / alpha + 1) - tau(x),
    tau(x) = (x - (1 + alpha) + sqrt((x - (1 + alpha))^2 - 4 alpha)) / 2,

over the interval the 2015 paper shows to hold the minimizer:

    sigma^2_upper = sum_{h=1}^{L} gamma_h^2 / (L M),
    sigma^2_lower = max(gamma_{H_bar + 1}^2 / (M x_bar), sum_{h=H_bar+1}^{L} gamma_h^2 / (M (L - H_bar))),
    H_bar = min(ceil(L / (1 + alpha)) - 1, H)   (an upper bound on the EVB rank).

`psi_1(x_bar) = Psi(tau_bar) = 0`, so Omega is continuous at the threshold.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy.optimize import brentq, minimize_scalar

__all__ = ["VBMFResult", "estimate_rank", "evbmf", "evbmf_from_singular_values"]

# Omega is not guaranteed unimodal on [sigma^2_lower, sigma^2_upper] (each component's psi_1 term
# switches on at its own threshold), so a single bounded Brent search, as public ports do, can stop
# in a local minimum. A log-spaced grid (cheap: Omega costs O(L)) finds the basin, Brent refines it.
_NOISE_GRID_POINTS = 64


@dataclasses.dataclass(frozen=True)
class VBMFResult:
    """Empirical VBMF solution of one matrix.

    Attributes:
        rank: the number of singular components empirical VB keeps (0 means "all noise").
        singular_values: the kept components' shrunk singular values `gamma_breve_h`, descending,
            length `rank`.
        noise_variance: the noise variance sigma^2 (estimated, or the one passed in).
        threshold: the EVB threshold `gamma_evb`: observed singular values below it are dropped.
    """

    rank: int
    singular_values: np.ndarray
    noise_variance: float
    threshold: float


def evbmf(matrix: np.ndarray, sigma2: float | None = None, H: int | None = None) -> VBMFResult:
    """Empirical VBMF of `matrix` by the global analytic solution (Nakajima et al. 2013).

    Args:
        matrix: a 2-D array of finite values (a CPU torch tensor converts too); its orientation does
            not matter (it is transposed so that L <= M).
        sigma2: the noise variance if known; `None` estimates it by minimizing the EVB free
            energy over its bounded interval (see the module docstring).
        H: the model rank, an upper bound on the returned rank, in [1, min(matrix.shape)];
            `None` means min(matrix.shape).

    Returns:
        The kept rank, the shrunk singular values, the noise variance and the threshold.

    Raises:
        ValueError: if `matrix` is not a non-empty 2-D finite array, `sigma2` is not > 0, or `H` is
            out of range.
    """
    Y = np.asarray(matrix, dtype=np.float64)
    if Y.ndim != 2 or Y.size == 0:
        raise ValueError(f"`matrix` must be a non-empty 2-D array, got shape {Y.shape}.")
    if not np.all(np.isfinite(Y)):
        raise ValueError("`matrix` must hold only finite values, got NaN or inf.")
    # Only singular values are needed: the EVB solution is a reweighted SVD, and the rank and the
    # shrunk values depend on gamma_h alone.
    return evbmf_from_singular_values(np.linalg.svd(Y, compute_uv=False), Y.shape, sigma2=sigma2, H=H)


def evbmf_from_singular_values(
    singular_values: np.ndarray, shape: tuple[int, int], sigma2: float | None = None, H: int | None = None
) -> VBMFResult:
    """`evbmf` of a matrix of `shape` known by its singular values.

    For callers that already have the spectrum, e.g. from an eigendecomposition of the Gram matrix
    whose eigenvectors they need too (the Tucker HOSVD does): one decomposition serves both.

    Args:
        singular_values: the matrix's min(shape) singular values (any order; more are allowed, the
            largest min(shape) are used).
        shape: the matrix's shape.
        sigma2: as `evbmf`.
        H: as `evbmf`.

    Raises:
        ValueError: for a bad shape, too few, negative or non-finite singular values, or `sigma2` /
            `H` as `evbmf`.
    """
    if len(shape) != 2 or not all(isinstance(n, (int, np.integer)) and n >= 1 for n in shape):
        raise ValueError(f"`shape` must be two ints >= 1, got {shape!r}.")
    L, M = sorted(int(n) for n in shape)
    gamma = np.sort(np.asarray(singular_values, dtype=np.float64).ravel())[::-1]
    if gamma.size < L or not np.all(np.isfinite(gamma)) or np.any(gamma < 0):
        raise ValueError(
            f"`singular_values` must hold at least {L} finite values >= 0 for shape {tuple(shape)}, got {gamma.size} "
            f"values in [{gamma.min(initial=np.inf)}, {gamma.max(initial=-np.inf)}]."
        )
    gamma = gamma[:L]
    if H is None:
        H = L
    if isinstance(H, bool) or not isinstance(H, (int, np.integer)) or not 1 <= H <= L:
        raise ValueError(f"`H` must be an int in [1, {L}] (the smaller side of the matrix), got {H!r}.")
    if sigma2 is not None and not (np.isfinite(sigma2) and sigma2 > 0):
        raise ValueError(f"`sigma2` must be a finite float > 0 or None, got {sigma2!r}.")

    alpha = L / M
    tau_bar = _tau_bar(alpha)
    x_bar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)

    if sigma2 is None:
        total_energy = float(np.sum(gamma**2))
        if total_energy == 0.0:
            # An all-zero matrix holds no component and no noise to estimate.
            return VBMFResult(rank=0, singular_values=np.zeros(0), noise_variance=0.0, threshold=0.0)
        sigma2 = _estimate_noise_variance(gamma, L, M, H, alpha, x_bar)

    threshold = math.sqrt(M * sigma2 * x_bar)
    rank = int(min(np.sum(gamma > threshold), H))
    kept = gamma[:rank]
    ratio = (L + M) * sigma2 / kept**2
    # max(., 0) guards the sqrt against rounding right at the threshold (the discriminant is > 0
    # above it).
    discriminant = np.maximum((1.0 - ratio) ** 2 - 4.0 * L * M * sigma2**2 / kept**4, 0.0)
    shrunk = kept / 2.0 * (1.0 - ratio + np.sqrt(discriminant))
    return VBMFResult(rank=rank, singular_values=shrunk, noise_variance=float(sigma2), threshold=threshold)


def estimate_rank(matrix: np.ndarray) -> int:
    """The EVBMF rank of `matrix` (noise variance estimated): see `evbmf`.

    Raises:
        ValueError: as `evbmf`.
    """
    return evbmf(matrix).rank


def _tau_bar(alpha: float) -> float:
    """The positive zero of Psi(tau) = log(tau + 1) + alpha log(tau / alpha + 1) - tau."""

    def psi(tau: float) -> float:
        return math.log1p(tau) + alpha * math.log1p(tau / alpha) - tau

    # Psi > 0 just above sqrt(alpha) (its smallest admissible value) and Psi -> -inf, so the root
    # is bracketed by [sqrt(alpha), a point where Psi < 0]; it lies below 4 sqrt(alpha) + 3 for all
    # alpha in (0, 1].
    low, high = math.sqrt(alpha), 4.0 * math.sqrt(alpha) + 3.0
    return brentq(psi, low, high, xtol=1e-12)


def _estimate_noise_variance(gamma: np.ndarray, L: int, M: int, H: int, alpha: float, x_bar: float) -> float:
    """sigma^2 minimizing the EVB free energy Omega over its bounded interval (2015 paper)."""
    gamma2 = gamma**2
    h_bar = min(math.ceil(L / (1.0 + alpha)) - 1, H)
    upper = float(np.sum(gamma2)) / (L * M)
    lower = max(gamma2[h_bar] / (M * x_bar), float(np.mean(gamma2[h_bar:])) / M)
    # An exactly rank-deficient matrix (no noise) gives lower = 0, where Omega -> -inf: clamp to a
    # relative floor so the search stays finite (the estimate is then ~0 and every nonzero
    # component is kept, which is the right answer for noiseless data).
    lower = max(lower, upper * np.finfo(np.float64).eps)
    if lower >= upper:
        return upper

    def omega(log_sigma2: float) -> float:
        s2 = math.exp(log_sigma2)
        x = gamma2 / (M * s2)
        # psi_0(x_h) = x_h - log(x_h) = gamma_h^2 / (M s2) + log(s2) + const(gamma_h); the dropped
        # constant is infinite for a zero singular value, so it must be dropped, not computed.
        value = float(np.sum(x)) + L * log_sigma2
        signal = x[:H][x[:H] > x_bar]
        if signal.size:
            shifted = signal - (1.0 + alpha)
            tau = 0.5 * (shifted + np.sqrt(shifted**2 - 4.0 * alpha))
            value += float(np.sum(np.log1p(tau) + alpha * np.log1p(tau / alpha) - tau))
        return value

    # Searching log(sigma^2) rather than sigma^2: the interval can span many orders of magnitude.
    log_lower, log_upper = math.log(lower), math.log(upper)
    grid = np.linspace(log_lower, log_upper, _NOISE_GRID_POINTS)
    values = [omega(v) for v in grid]
    best = int(np.argmin(values))
    bracket = (grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)])
    result = minimize_scalar(omega, bounds=bracket, method="bounded", options={"xatol": 1e-10})
    best_log = float(result.x) if result.fun <= values[best] else float(grid[best])
    return math.exp(best_log)
