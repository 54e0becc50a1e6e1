"""Simulations with known low-rank structure (and covariates that drive it)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .._validation import check_count, check_positive


@dataclass
class SimulatedData:
    """``Y = L F^T + E`` with the truth and the covariates that generated it."""

    Y: np.ndarray
    L: np.ndarray
    F: np.ndarray
    X_l: np.ndarray | None = None
    X_f: np.ndarray | None = None
    sigma: float = 1.0

    @property
    def signal(self) -> np.ndarray:
        """L F^T (dense)."""
        return self.L @ self.F.T


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def simulate_covariate_sparsity(
    n: int = 2000,
    p: int = 100,
    k: int = 2,
    d: int = 10,
    *,
    beta0: float = 0.0,
    beta1: float = 3.0,
    sigma: float = 1.0,
    seed: int | None = 0,
) -> SimulatedData:
    """The covariate-driven sparsity design of the cEBMF paper (Denault et al. 2025).

    X_l (n x d) and X_f (p x d) are iid N(0, 1). L_ik is non-zero with probability
    sigmoid(beta0 + beta1 X_l[i, k]) and then N(0, 1); F_jk likewise from X_f[j, k];
    Y = L F^T + N(0, sigma^2). ``beta1 = 3`` makes the covariates informative, ``beta1 = 0``
    uninformative. Requires k <= d.
    """
    n, p, k, d = (check_count(v, name) for v, name in ((n, "n"), (p, "p"), (k, "k"), (d, "d")))
    if k > d:
        raise ValueError(f"k ({k}) must not exceed the number of covariates d ({d}).")
    sigma = check_positive(sigma, "sigma")
    for value, name in ((beta0, "beta0"), (beta1, "beta1")):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}.")
    rng = np.random.default_rng(seed)
    x_l = rng.normal(size=(n, d))
    x_f = rng.normal(size=(p, d))
    on_l = rng.random((n, k)) < _sigmoid(beta0 + beta1 * x_l[:, :k])
    on_f = rng.random((p, k)) < _sigmoid(beta0 + beta1 * x_f[:, :k])
    lo = np.where(on_l, rng.normal(size=(n, k)), 0.0)
    fa = np.where(on_f, rng.normal(size=(p, k)), 0.0)
    y = lo @ fa.T + rng.normal(0.0, sigma, (n, p))
    return SimulatedData(Y=y, L=lo, F=fa, X_l=x_l, X_f=x_f, sigma=sigma)


def simulate_low_rank(
    n: int = 1000,
    p: int = 300,
    k: int = 5,
    *,
    pi0: float = 0.7,
    sigma: float = 1.0,
    seed: int | None = 0,
) -> SimulatedData:
    """Sparse point-normal loadings and factors: entries are 0 with probability ``pi0``,
    else N(0, 1); ``Y = L F^T + N(0, sigma^2)``."""
    n, p, k = (check_count(v, name) for v, name in ((n, "n"), (p, "p"), (k, "k")))
    sigma = check_positive(sigma, "sigma")
    if not 0 <= pi0 <= 1:
        raise ValueError(f"pi0 must lie in [0, 1], got {pi0!r}.")
    rng = np.random.default_rng(seed)
    lo = rng.normal(size=(n, k)) * (rng.random((n, k)) > pi0)
    fa = rng.normal(size=(p, k)) * (rng.random((p, k)) > pi0)
    y = lo @ fa.T + rng.normal(0.0, sigma, (n, p))
    return SimulatedData(Y=y, L=lo, F=fa, sigma=sigma)
