"""``point_exponential``: theta ~ pi0 delta_mode + (1 - pi0) (mode + Exp(mean b)).

With lambda = 1/b and u = x/s - lambda s the slab's marginal is
lambda exp(-x^2/(2 s^2)) M(u), M(u) = exp(u^2/2) Phi(u), and its posterior is
N(x - lambda s^2, s^2) truncated to [0, inf).
"""

from __future__ import annotations

import math
from typing import Any

from .._math import exp_any, log_tilted_ndtr, std_truncnorm_moments, truncnorm_sign_probs
from ._spike_slab import SpikeSlabPrior
from .base import register_prior


@register_prior
class PointExponential(SpikeSlabPrior):
    """``point_exponential``: pi0 delta_mode + (1 - pi0) Exp on [mode, inf) (nonnegative).

    ``g`` holds ``pi0``, ``scale`` (the exponential's mean b) and ``mode``.
    """

    name = "point_exponential"
    nonnegative = True
    slab_m2 = 2.0

    def _slab_loglik(self, x, s, eta):
        return -eta + log_tilted_ndtr(x / s, exp_any(-eta) * s)

    def _slab_derivs(self, x, s, eta):
        lam_s = exp_any(-eta) * s
        u = x / s - lam_s
        l1 = -eta + log_tilted_ndtr(x / s, lam_s)
        delta, var = std_truncnorm_moments(-u)
        d1 = -1.0 + delta * lam_s
        d2 = var * lam_s * lam_s - delta * lam_s
        return l1, d1, d2

    def _slab_pieces(self, x, s, eta, c):
        lam_s = exp_any(-eta) * s
        u = x / s - lam_s
        l1 = -eta + log_tilted_ndtr(x / s, lam_s)
        s = s.expand_as(x)
        delta, var = std_truncnorm_moments(-u)
        return [(l1, s * delta, s * s * var, *truncnorm_sign_probs(s * u, s, 0.0, c))]

    def _eta_to_g(self, eta: float) -> dict[str, float]:
        return {"scale": math.exp(eta)}

    def _g_to_eta(self, g: dict[str, Any]) -> float:
        scale = float(g["scale"])
        if not scale > 0 or not math.isfinite(scale):
            raise ValueError(f"g_init['scale'] must be a positive finite number, got {scale}.")
        return math.log(scale)
