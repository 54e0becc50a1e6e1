"""The result of an EBMF fit."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch


@dataclass
class LDF:
    """Normalised view: ``Y ~ L diag(d) F^T`` with unit-norm columns of L and F."""

    L: np.ndarray
    d: np.ndarray
    F: np.ndarray


@dataclass
class EBMFResult:
    """Posterior summaries and fitted model of ``fit_ebmf``.

    Attributes
    ----------
    L, F
        Posterior means of the loadings (N x K) and factors (P x K); K may be 0.
        Fixed factors come first, then the others by decreasing variance explained.
    L_sd, F_sd, L_lfsr, F_lfsr
        Posterior sds and local false sign rates.
    elbo
        Final evidence lower bound (float64).
    elbo_trace
        ELBO after the starting factors' first update (with ``init``), each accepted
        greedy factor, each backfit sweep and each factor removed by the nullcheck, in
        order.
    noise
        The noise model (``"constant"``, ``"row"`` or ``"column"``).
    noise_sd
        Fitted noise sd: a float, or one per row / column.
    pve
        Proportion of variance explained per factor: d_k^2 / (sum d^2 + sum_ij 1/tau_ij)
        with d_k = ||L_k|| ||F_k|| (as flashier).
    priors
        Per factor, ``{"loadings": g, "factors": g}`` (fitted priors; ``{}`` for a fixed side).
    fixed
        Per factor, ``(loadings fixed, factors fixed)``.
    converged, stop_reason, n_iter
        Whether the last backfit converged, why the fit stopped, and backfit sweeps run.
    timing
        Seconds spent in the greedy stage, the backfit and the nullcheck.
    max_factors_reached
        Whether the fit ended with ``max_factors`` learned factors (or min(N, P)): then
        the cap, not the data, set their number, and a larger ``max_factors`` lets the
        data choose.
    ebnm_inputs
        With ``fit_ebmf(..., keep_ebnm_inputs=True)``: per factor, ``{side: (x, s)}``, the
        observations and standard errors of that side's last EBNM problem as numpy arrays
        (on the host, whatever the fit's device); ``(None, None)`` for a fixed side.
    """

    L: np.ndarray
    F: np.ndarray
    L_sd: np.ndarray
    F_sd: np.ndarray
    L_lfsr: np.ndarray
    F_lfsr: np.ndarray
    elbo: float
    elbo_trace: list[float]
    noise: str
    noise_sd: float | np.ndarray
    pve: np.ndarray
    priors: list[dict[str, dict[str, Any]]]
    fixed: list[tuple[bool, bool]]
    converged: bool
    stop_reason: str
    n_iter: int
    timing: dict[str, float] = field(default_factory=dict)
    max_factors_reached: bool = False
    ebnm_inputs: list[dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def n_factors(self) -> int:
        return self.L.shape[1]

    def ldf(self) -> LDF:
        """Unit-norm columns of L and F and the scale d_k = ||L_k|| ||F_k|| of each factor."""
        nl = np.linalg.norm(self.L, axis=0)
        nf = np.linalg.norm(self.F, axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return LDF(
                L=np.where(nl > 0, self.L / nl, 0.0),
                d=nl * nf,
                F=np.where(nf > 0, self.F / nf, 0.0),
            )

    def fitted(self, rows=None, cols=None) -> np.ndarray:
        """Posterior mean of L F^T (dense), optionally for a subset of rows / columns."""
        lm = self.L if rows is None else self.L[rows]
        fm = self.F if cols is None else self.F[cols]
        return lm @ fm.T

    def impute(self, y) -> np.ndarray:
        """A copy of dense ``y`` with its missing entries (NaN, or the masked entries of a
        numpy masked array, as in the fit) replaced by the fitted values."""
        if sp.issparse(y) or (isinstance(y, torch.Tensor) and y.layout != torch.strided):
            raise TypeError(
                "impute needs the dense y with NaN for missing entries; a sparse matrix has "
                "no missing entries (use fitted() for the fitted values)."
            )
        if isinstance(y, torch.Tensor):
            y = y.detach().cpu().numpy()
        if np.ma.isMaskedArray(y):
            y = np.ma.filled(np.ma.asarray(y, dtype=np.float64), np.nan)
        out = np.array(y, dtype=np.float64, copy=True)
        if out.shape != (self.L.shape[0], self.F.shape[0]):
            raise ValueError(
                f"y has shape {out.shape} but the fit is {self.L.shape[0]} x {self.F.shape[0]}."
            )
        rows, cols = np.nonzero(np.isnan(out))
        out[rows, cols] = np.einsum("ik,ik->i", self.L[rows], self.F[cols])
        return out
