"""``nonnegative_mixture``: g = pi_0 delta_mode + sum_k pi_k (mode + Exp(mean a_k)).

Component k > 0 has marginal exp(-x^2/(2 s^2)) M(x/s - s/a_k) / a_k with
M(u) = exp(u^2/2) Phi(u), and posterior N(x - s^2/a_k, s^2) truncated to [0, inf).
"""

from __future__ import annotations

import torch

from .._math import (
    log_normal_pdf,
    log_tilted_ndtr,
    std_truncnorm_moments,
    truncnorm_sign_probs,
)
from ._grids import exponential_mixture_scales
from ._mixture import MixturePrior
from .base import register_prior


@register_prior
class NonnegativeMixture(MixturePrior):
    """``nonnegative_mixture``: a point mass plus a mixture of exponentials on a grid of
    means (NMF-like, nonnegative; the "exp" prior of cebmf_torch).

    Grid: exponential means from min(s)/10 to ~2 max(x) in ratio m, with m from the KL
    rule (``kl_target``, default 1/n; see
    :func:`cebmf.priors._grids.exponential_mixture_scales`) or fixed by ``grid_mult``;
    or pass ``scale``. Weights: maximum likelihood by mix-SQP. ``g`` holds ``pi``,
    ``scale`` (means), ``pi0`` and ``mode``.
    """

    name = "nonnegative_mixture"
    nonnegative = True

    def __init__(
        self,
        mode: float = 0.0,
        *,
        scale=None,
        grid_mult: float | None = None,
        kl_target: float | None = None,
        max_k: int = 300,
        tol: float = 1e-8,
    ) -> None:
        super().__init__(mode, scale=scale, tol=tol)
        self._set_grid_rule(grid_mult, kl_target, max_k)

    def _fresh_grid(self, x, s):
        return exponential_mixture_scales(
            x, s, kl_target=self.kl_target, mult=self.grid_mult, max_k=self.max_k
        )

    def _std(self, x, s, scale):
        slab = scale > 0
        inv = torch.where(slab, 1.0 / torch.where(slab, scale, 1.0), 0.0)
        u = x / s - s * inv
        return slab, inv, u

    def _component_loglik(self, x, s, scale):
        slab, inv, _ = self._std(x, s, scale)
        expo = torch.log(inv) + log_tilted_ndtr(x / s, s * inv)
        return torch.where(slab, expo, log_normal_pdf(x, s * s))

    def _component_posterior(self, x, s, scale, c):
        slab, _, u = self._std(x, s, scale)
        sk = s.expand_as(u)
        delta, var = std_truncnorm_moments(-u)
        p_le, p_ge = truncnorm_sign_probs(sk * u, sk, 0.0, c)
        zero = torch.zeros_like(u)
        point_le = torch.full_like(u, 1.0 if 0.0 <= c else 0.0)
        point_ge = torch.full_like(u, 1.0 if 0.0 >= c else 0.0)
        return (
            torch.where(slab, sk * delta, zero),
            torch.where(slab, sk * sk * var, zero),
            torch.where(slab, p_le, point_le),
            torch.where(slab, p_ge, point_ge),
        )
