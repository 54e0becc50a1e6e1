"""``point_laplace``: theta ~ pi0 delta_mode + (1 - pi0) Laplace(mode, b).

With lambda = 1/b and u_+- = +-x/s - lambda s, the slab's marginal is

    p(x) = lambda/2 exp(-x^2 / (2 s^2)) [M(u_+) + M(u_-)],  M(u) = exp(u^2/2) Phi(u),

(``-x^2 / (2 s^2) + log M(u)`` is :func:`cebmf._math.log_tilted_ndtr`, without
cancellation) and its posterior is
a two-piece mixture of N(x -+ lambda s^2, s^2) truncated to [0, inf) and (-inf, 0].
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._math import (
    exp_any,
    exp_flushed,
    log_tilted_ndtr,
    std_truncnorm_moments,
    truncnorm_sign_probs,
)
from ._spike_slab import SpikeSlabPrior
from .base import register_prior


@register_prior
class PointLaplace(SpikeSlabPrior):
    """``point_laplace``: pi0 delta_mode + (1 - pi0) Laplace(mode, scale).

    ``g`` holds ``pi0``, ``scale`` (the Laplace scale b; the slab sd is sqrt(2) b) and
    ``mode``.
    """

    name = "point_laplace"
    slab_m2 = 2.0

    def _halves(self, x, s, eta):
        lam_s = exp_any(-eta) * s
        u_pos = x / s - lam_s
        u_neg = -x / s - lam_s
        base = -eta - math.log(2.0)
        z = x / s
        return (
            lam_s,
            u_pos,
            u_neg,
            base + log_tilted_ndtr(z, lam_s),
            base + log_tilted_ndtr(-z, lam_s),
        )

    def _slab_loglik(self, x, s, eta):
        *_, lp, ln = self._halves(x, s, eta)
        return torch.logaddexp(lp, ln)

    def _slab_derivs(self, x, s, eta):
        lam_s, u_pos, u_neg, lp, ln = self._halves(x, s, eta)
        l1 = torch.logaddexp(lp, ln)
        p = exp_flushed(lp - l1)
        dp, vp = std_truncnorm_moments(-u_pos)
        dn, vn = std_truncnorm_moments(-u_neg)
        a1, b1 = dp * lam_s, dn * lam_s  # d/deta of log M(u_+-)
        a2 = vp * lam_s * lam_s - a1
        b2 = vn * lam_s * lam_s - b1
        d1 = -1.0 + p * a1 + (1.0 - p) * b1
        d2 = p * a2 + (1.0 - p) * b2 + p * (1.0 - p) * (a1 - b1) ** 2
        return l1, d1, d2

    def _slab_pieces(self, x, s, eta, c):
        _lam_s, u_pos, u_neg, lp, ln = self._halves(x, s, eta)
        s = s.expand_as(x)
        dp, vp = std_truncnorm_moments(-u_pos)
        dn, vn = std_truncnorm_moments(-u_neg)
        pos_le, pos_ge = truncnorm_sign_probs(s * u_pos, s, 0.0, c)
        # negative half: theta = -theta', theta' ~ N(-x - lambda s^2, s^2) on [0, inf)
        neg_ge, neg_le = truncnorm_sign_probs(s * u_neg, s, 0.0, -c)
        return [
            (lp, s * dp, s * s * vp, pos_le, pos_ge),
            (ln, -s * dn, s * s * vn, neg_le, neg_ge),
        ]

    def _eta_to_g(self, eta: float) -> dict[str, float]:
        return {"scale": math.exp(eta)}

    def _g_to_eta(self, g: dict[str, Any]) -> float:
        scale = float(g["scale"])
        if not scale > 0 or not math.isfinite(scale):
            raise ValueError(f"g_init['scale'] must be a positive finite number, got {scale}.")
        return math.log(scale)
