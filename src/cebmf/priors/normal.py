"""Normal priors: ``normal`` N(mode, sigma^2) and ``point_normal`` pi0 delta + (1-pi0) N.

With v = s^2 + sigma^2 the slab's marginal is N(x; 0, v) and its posterior is
N(q x, q s^2) with q = sigma^2 / v.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._math import exp_any, log_normal_pdf, normal_sign_probs
from ._spike_slab import SpikeSlabPrior
from .base import register_prior


class _NormalSlab(SpikeSlabPrior):
    """Slab N(0, sigma^2) with eta = log sigma."""

    slab_m2 = 1.0

    def _slab_loglik(self, x, s, eta):
        return log_normal_pdf(x, s * s + exp_any(2.0 * eta))

    def _slab_derivs(self, x, s, eta):
        # d/deta with q = sigma^2 / v, z = x^2 / v:
        # d1 = q (z - 1),  d2 = 2 q (z - 1 - 2 z q + q)
        v = s * s + exp_any(2.0 * eta)
        q = exp_any(2.0 * eta) / v
        z = x * x / v
        l1 = log_normal_pdf(x, v)
        return l1, q * (z - 1.0), 2.0 * q * (z - 1.0 - 2.0 * z * q + q)

    def _slab_pieces(self, x, s, eta, c):
        s2 = s * s
        v = s2 + exp_any(2.0 * eta)
        q = exp_any(2.0 * eta) / v
        mean = q * x
        var = (q * s2).expand_as(x)
        return [(log_normal_pdf(x, v), mean, var, *normal_sign_probs(mean, torch.sqrt(var), c))]

    def _eta_to_g(self, eta: float) -> dict[str, float]:
        return {"scale": math.exp(eta)}

    def _g_to_eta(self, g: dict[str, Any]) -> float:
        scale = float(g["scale"])
        if not scale > 0 or not math.isfinite(scale):
            raise ValueError(f"g_init['scale'] must be a positive finite number, got {scale}.")
        return math.log(scale)


@register_prior
class Normal(_NormalSlab):
    """``normal``: theta ~ N(mode, sigma^2), sigma fitted by maximum marginal likelihood.

    ``g`` holds ``scale`` (sigma) and ``mode``.
    """

    name = "normal"
    has_spike = False


@register_prior
class PointNormal(_NormalSlab):
    """``point_normal``: theta ~ pi0 delta_mode + (1 - pi0) N(mode, sigma^2).

    The default prior for loadings and factors. ``g`` holds ``pi0``, ``scale`` (sigma)
    and ``mode``; (pi0, sigma) maximise the marginal likelihood (Newton on
    (logit(1 - pi0), log sigma) with exact derivatives; pi0 = 0 and pi0 = 1 checked).
    """

    name = "point_normal"
