"""Mixture families on a fixed grid of scales: the weights are fitted by mix-SQP.

A family supplies the grid rule, the (K, n) matrix of component log marginals, and the
posterior of each component; this base class does the rest: grid choice (a fresh grid,
the union with a warm start's grid, or ``g_init``'s), maximum-likelihood weights, and
posterior summaries from the same likelihood matrix, computed in column chunks.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import numpy as np
import torch

from .._math import exp_flushed
from .._validation import check_count, check_positive
from ._grids import merge_grids
from ._mixsqp import mixsqp
from ._posterior import chunked, column_chunks, combine
from .base import EBNMResult, Prior


class MixturePrior(Prior):
    """Base class: g = sum_k pi_k g_k with component scales ``scale`` (scale[0] = 0 is
    the point mass at the mode)."""

    g_keys = ("pi", "scale")

    def __init__(self, mode: float = 0.0, *, scale=None, tol: float = 1e-8) -> None:
        super().__init__(mode)
        self.scale = None if scale is None else self._check_scale(scale, "scale")
        self.tol = check_positive(tol, "tol")

    def _set_grid_rule(self, grid_mult, kl_target, max_k) -> None:
        """Options of the automatic grid: spacing ``grid_mult`` (> 1) or ``kl_target``
        (> 0), and at most ``max_k`` (>= 3) components."""
        if grid_mult is not None and not check_positive(grid_mult, "grid_mult") > 1:
            raise ValueError(f"grid_mult must be > 1, got {grid_mult}.")
        self.grid_mult = None if grid_mult is None else float(grid_mult)
        self.kl_target = None if kl_target is None else check_positive(kl_target, "kl_target")
        self.max_k = check_count(max_k, "max_k", 3)

    @staticmethod
    def _check_scale(scale, argname: str) -> np.ndarray:
        arr = np.sort(np.asarray(scale, dtype=np.float64).ravel())
        if arr.size == 0 or not np.all(np.isfinite(arr)) or arr.min() < 0:
            raise ValueError(f"{argname} must be a non-empty array of finite scales >= 0.")
        return arr

    @abstractmethod
    def _fresh_grid(self, x: torch.Tensor, s: torch.Tensor) -> np.ndarray:
        """The automatic grid for these data (x centred at the mode)."""

    @abstractmethod
    def _component_loglik(self, x, s, scale: torch.Tensor) -> torch.Tensor:
        """(K, n) log marginal likelihood of each component (``scale`` is (K, 1))."""

    @abstractmethod
    def _component_posterior(self, x, s, scale: torch.Tensor, c: float) -> tuple:
        """``(mean, var, p_le, p_ge)`` of each component's posterior, (K, n) or
        broadcastable; sign probabilities about theta <= c / theta >= c (c = -mode)."""

    def _grid_and_start(self, xs, s, state, g_init):
        if g_init is not None:
            scales = self._check_scale(g_init["scale"], "g_init['scale']")
            order = np.argsort(np.asarray(g_init["scale"], dtype=np.float64).ravel())
            pi = np.asarray(g_init["pi"], dtype=np.float64).ravel()
            if pi.shape != scales.shape or pi.min() < 0 or not pi.sum() > 0:
                raise ValueError(
                    "g_init['pi'] must be non-negative weights, one per g_init['scale']."
                )
            return scales, pi[order] / pi.sum()
        if self.scale is not None:
            return self.scale, None
        if state is not None and "scale" in state:
            return merge_grids(
                self._fresh_grid(xs, s), np.asarray(state["scale"]), np.asarray(state["pi"])
            )
        return self._fresh_grid(xs, s), None

    def _likelihood(self, xs, s, scale_t) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, m)``: the (K, n) float64 matrix A = exp(log L - m) of component
        likelihoods over their column maxima m (entries below e^-500 flushed to 0), built
        in column chunks so that no other (K, n) array is formed."""
        k, n = scale_t.shape[0], xs.numel()
        lik = torch.empty((k, n), dtype=torch.float64, device=xs.device)
        colmax = torch.empty(n, dtype=torch.float64, device=xs.device)
        for i, j in column_chunks(n, k, xs.device):
            log_lik = self._component_loglik(xs[i:j], _rows(s, i, j), scale_t).to(torch.float64)
            colmax[i:j] = log_lik.max(dim=0).values
            lik[:, i:j] = exp_flushed(log_lik.sub_(colmax[i:j]))
        return lik, colmax

    def _fit(self, x, s, *, covariates=None, state, g_init, fix_g) -> EBNMResult:
        xs = x - self.mode if self.mode != 0.0 else x
        scales, pi_start = self._grid_and_start(xs, s, state, g_init)
        dev, dt = x.device, x.dtype
        scale_t = torch.as_tensor(scales, dtype=dt, device=dev)[:, None]
        lik = colmax = None
        if fix_g:
            pi = torch.as_tensor(pi_start, dtype=torch.float64, device=dev)
        else:
            lik, colmax = self._likelihood(xs, s, scale_t)
            warm = None if pi_start is None else torch.as_tensor(pi_start, device=dev)
            pi = mixsqp(lik, warm, tol=self.tol)
        c = -self.mode
        # components without weight have no responsibility: leave them out, and normalise
        # over the kept ones only (a dropped component may dominate the likelihood)
        used = torch.nonzero(pi > 0).ravel()
        log_pi_used, scale_used = torch.log(pi[used]).to(dt), scale_t[used]

        def part(i: int, j: int):
            xi, si = xs[i:j], _rows(s, i, j)
            log_w = None
            if lik is not None:
                # log L from the likelihood matrix (no second pass over the densities);
                # a column whose used components were all flushed is recomputed
                log_w = (torch.log(lik[:, i:j].index_select(0, used)) + colmax[i:j]).to(dt)
                if not bool(torch.isfinite(log_w.max(dim=0).values).all()):
                    log_w = None
            if log_w is None:
                log_w = self._component_loglik(xi, si, scale_used)
            log_w = log_w + log_pi_used[:, None]
            log_marginal = torch.logsumexp(log_w, dim=0)
            resp = exp_flushed(log_w - log_marginal)
            comp = self._component_posterior(xi, si.expand_as(xi), scale_used, c)
            return combine(resp, *comp, log_marginal=log_marginal, shift=self.mode)

        post = chunked(part, x.numel(), scale_used.numel(), dev)
        pi_np = pi.cpu().numpy()
        g: dict[str, Any] = {
            "family": self.name,
            "mode": self.mode,
            "pi0": float(pi_np[0]) if scales[0] == 0 else 0.0,
            "pi": pi_np,
            "scale": np.asarray(scales, dtype=np.float64),
        }
        return EBNMResult.from_posterior(post, g, {"scale": g["scale"], "pi": pi_np})


def _rows(s: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """Entries i:j of the standard errors, which may be one value shared by all."""
    return s if s.numel() == 1 else s[i:j]
