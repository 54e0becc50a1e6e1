"""Noise models: E_ij ~ N(0, 1/tau_ij) with tau constant, per row or per column.

Every model is a rank-one precision tau_ij = a_i b_j (constant: a = 1, b = tau; row:
a = tau, b = 1; column: a = 1, b = tau). Given the expected squared residuals, the
maximiser of the ELBO is tau = (number of observed entries) / (sum of E R_ij^2) over the
entries that share a precision.
"""

from __future__ import annotations

import torch

NOISE_MODELS = ("constant", "row", "column")

# variance floor relative to the mean variance: a row or column fitted exactly would
# otherwise get an infinite precision
_VAR_FLOOR = 1e-10


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximum-ELBO precisions ``(a, b)`` (float64) from the expected squared residuals.

    ``sq_resid`` and ``n_obs`` are per row for ``noise="row"``, per column otherwise.
    """
    n, p = shape
    dev = sq_resid.device
    var = sq_resid / n_obs
    if noise == "constant":
        v = (sq_resid.sum() / n_obs.sum()).clamp(min=1e-300)
        return torch.ones(n, dtype=torch.float64, device=dev), torch.full(
            (p,), 1.0, dtype=torch.float64, device=dev
        ) / v
    var = var.clamp(min=max(float(var.mean()) * _VAR_FLOOR, 1e-300))
    if noise == "row":
        return 1.0 / var, torch.ones(p, dtype=torch.float64, device=dev)
    return torch.ones(n, dtype=torch.float64, device=dev), 1.0 / var
