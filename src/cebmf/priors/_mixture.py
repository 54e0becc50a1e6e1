"""Mixture families on a fixed grid of scales: the weights are fitted by mix-SQP.

A family supplies the grid rule, the (n, K) matrix of component log marginals, and the
posterior pieces of each component; this base class does the rest: grid choice (a fresh
grid, the union with a warm start's grid, or ``g_init``'s), maximum-likelihood weights,
posterior summaries computed in row chunks so that memory stays O(n K) at most once.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import numpy as np
import torch

from ._grids import merge_grids
from ._mixsqp import mixsqp
from ._posterior import Pieces, summarize_chunked
from .base import EBNMResult, Prior


class MixturePrior(Prior):
    """Base class: g = sum_k pi_k g_k with component scales ``scale`` (scale[0] = 0 is
    the point mass at the mode)."""

    def __init__(self, mode: float = 0.0, *, scale=None, tol: float = 1e-8) -> None:
        super().__init__(mode)
        self.scale = None if scale is None else self._check_scale(scale, "scale")
        self.tol = float(tol)

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
        """(n, K) log marginal likelihood of each component."""

    @abstractmethod
    def _component_pieces(self, x, s, scale: torch.Tensor, c: float) -> tuple:
        """``(mean, var, p_le, p_ge)`` of each component's posterior, each (n, K)."""

    def _fit(self, x, s, *, state, g_init, fix_g) -> EBNMResult:
        xs = x - self.mode if self.mode != 0.0 else x
        pi_init = None
        if g_init is not None:
            scales = self._check_scale(g_init["scale"], "g_init['scale']")
            pi_init = np.asarray(g_init["pi"], dtype=np.float64).ravel()
            if pi_init.shape != scales.shape or pi_init.min() < 0 or not pi_init.sum() > 0:
                raise ValueError(
                    "g_init['pi'] must be non-negative weights, one per g_init['scale']."
                )
            pi_init = pi_init / pi_init.sum()
        elif self.scale is not None:
            scales = self.scale
        elif state is not None and "scale" in state:
            scales, pi_init = merge_grids(
                self._fresh_grid(xs, s), np.asarray(state["scale"]), np.asarray(state["pi"])
            )
        else:
            scales = self._fresh_grid(xs, s)
        dev, dt = x.device, x.dtype
        scale_t = torch.as_tensor(scales, dtype=dt, device=dev)
        if fix_g:
            pi = torch.as_tensor(pi_init, dtype=torch.float64, device=dev)
        else:
            log_lik = self._component_loglik(xs, s, scale_t)
            lik = torch.exp(log_lik - log_lik.max(dim=1, keepdim=True).values).double()
            del log_lik
            warm = None if pi_init is None else torch.as_tensor(pi_init, device=dev)
            pi = mixsqp(lik, warm, tol=self.tol)
            del lik
        log_pi = torch.log(pi).to(dt)
        c = -self.mode
        s_full = s.expand_as(x)

        def build(i: int, j: int) -> Pieces:
            xi, si = xs[i:j], s_full[i:j]
            lw = self._component_loglik(xi, si, scale_t) + log_pi
            return Pieces(lw, *self._component_pieces(xi, si, scale_t, c))

        post = summarize_chunked(build, x.numel(), scale_t.numel(), shift=self.mode)
        pi_np = pi.cpu().numpy()
        g: dict[str, Any] = {
            "family": self.name,
            "mode": self.mode,
            "pi0": float(pi_np[0]) if scales[0] == 0 else 0.0,
            "pi": pi_np,
            "scale": np.asarray(scales, dtype=np.float64),
        }
        return EBNMResult(
            mean=post.mean,
            mean2=post.mean2,
            sd=post.sd,
            lfsr=post.lfsr,
            loglik=post.log_marginal.sum(dtype=torch.float64).item(),
            g=g,
            state={"scale": g["scale"], "pi": pi_np},
        )
