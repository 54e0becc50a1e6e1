"""Noise models: E_ij ~ N(0, 1/tau_ij) with tau constant, per row or per column.

Every model is a rank-one precision tau_ij = a_i b_j (constant: a = 1, b = tau; row:
a = tau, b = 1; column: a = 1, b = tau). Given the expected squared residuals, the
maximiser of the ELBO is tau = (number of observed entries) / (sum of E R_ij^2) over the
entries that share a precision.
"""

from __future__ import annotations

import torch

NOISE_MODELS = ("constant", "row", "column")

# Variance floor, relative to the mean square of the data sharing a precision: a gene
# fitted almost exactly by a factor would otherwise get a precision so large that the
# rounding error of its expected squared residual (computed without forming the residual)
# dominates the ELBO. A floor of 1e-6 (an sd of 0.1% of the RMS) keeps that error below
# ~1e-9 nats per observation; as a fixed bound it keeps the noise update an exact
# (constrained) maximiser, so the ELBO still never decreases.
_VAR_FLOOR = 1e-6


def check_noise(noise: str) -> str:
    if noise not in NOISE_MODELS:
        raise ValueError(f"noise={noise!r} is not a noise model; choose one of {NOISE_MODELS}.")
    return noise


def uses_rows(noise: str) -> bool:
    """True when tau varies over rows (the row sums of E R^2 are needed), else columns."""
    return noise == "row"


def estimate_precision(
    noise: str,
    sq_resid: torch.Tensor,
    n_obs: torch.Tensor,
    shape: tuple[int, int],
    mean_square: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximum-ELBO precisions ``(a, b)`` (float64) from the expected squared residuals.

    ``sq_resid``, ``n_obs`` and ``mean_square`` (of the data) are per row for
    ``noise="row"``, per column otherwise. Variances are at least ``_VAR_FLOOR`` times the
    data's mean square of the same row / column (all data for ``constant``; plus 1e-6 of
    the overall mean square, for lines without signal).
    """
    n, p = shape
    dev = sq_resid.device
    ones_n = torch.ones(n, dtype=torch.float64, device=dev)
    ones_p = torch.ones(p, dtype=torch.float64, device=dev)
    if noise == "constant":
        floor = _VAR_FLOOR * float((mean_square * n_obs).sum() / n_obs.sum())
        v = max(float(sq_resid.sum() / n_obs.sum()), floor, 1e-300)
        return ones_n, ones_p / v
    # rows / columns without any signal fall back to a floor relative to all the data
    floor = _VAR_FLOOR * (mean_square + 1e-6 * mean_square.mean())
    var = torch.maximum(sq_resid / n_obs, floor).clamp(min=1e-300)
    if noise == "row":
        return 1.0 / var, ones_p
    return ones_n, 1.0 / var
