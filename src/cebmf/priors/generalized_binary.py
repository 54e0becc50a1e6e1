"""``generalized_binary``: theta ~ pi0 delta_mode + (1 - pi0) (mode + TN_+(mu, (r mu)^2)).

Everything below is in the centred variable theta - mode (x means x - mode). The slab is
N(mu, sigma^2), sigma = r mu, truncated to [0, inf) (r fixed, 0.1 by default), so theta
itself is N(mode + mu, sigma^2) truncated to [mode, inf). Its marginal is
N(x; mu, s^2 + sigma^2) Phi(m / sqrt(v)) / Phi(1 / r) and its posterior N(m, v)
truncated to [0, inf), with m = (x sigma^2 + mu s^2) / (sigma^2 + s^2) and
v = sigma^2 s^2 / (sigma^2 + s^2).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._math import (
    exp_any,
    log_normal_pdf,
    std_truncnorm_moments,
    truncnorm_moments,
    truncnorm_sign_probs,
)
from ._spike_slab import SpikeSlabPrior
from .base import register_prior


@register_prior
class GeneralizedBinary(SpikeSlabPrior):
    """``generalized_binary``: pi0 delta_mode + (1 - pi0) (mode + TN_+(mu, (r mu)^2)), with
    TN_+ a normal truncated to [0, inf): theta - mode ~ N(mu, (r mu)^2) restricted to
    theta >= mode. r = ``ratio`` (fixed); pi0 and mu (measured from the mode) are fitted.

    ``g`` holds ``pi0``, ``mu``, ``scale`` (sigma = r mu), ``ratio`` and ``mode``.
    """

    name = "generalized_binary"
    nonnegative = True
    g_keys = ("pi0", "mu")

    def __init__(self, mode: float = 0.0, *, ratio: float = 0.1, max_iter: int = 100) -> None:
        super().__init__(mode, max_iter=max_iter)
        ratio = float(ratio)
        if not (ratio > 0 and math.isfinite(ratio)):
            raise ValueError(f"ratio must be a positive finite number, got {ratio}.")
        self.ratio = ratio
        self.slab_m2 = 1.0 + ratio * ratio
        self._log_norm = float(
            torch.special.log_ndtr(torch.tensor(1.0 / ratio, dtype=torch.float64))
        )

    def _moments(self, x, s, eta):
        # weights q = sigma^2 / V and 1 - q = s^2 / V, formed as ratios: products such as
        # x sigma^2 or sigma^2 s^2 are cubes and fourth powers of the data's scale, which
        # overflow (or underflow) long before V does
        mu = exp_any(eta)
        sigma2 = (self.ratio * mu) ** 2
        s2 = s * s
        tot = sigma2 + s2
        q, w = sigma2 / tot, s2 / tot
        post_mean = x * q + mu * w
        post_sd = self.ratio * mu * torch.sqrt(w)
        return mu, tot, post_mean, post_sd

    def _slab_loglik(self, x, s, eta):
        mu, tot, post_mean, post_sd = self._moments(x, s, eta)
        return (
            log_normal_pdf(x - mu, tot)
            + torch.special.log_ndtr(post_mean / post_sd)
            - self._log_norm
        )

    def _slab_derivs(self, x, s, eta):
        # d/deta (mu = e^eta, sigma = r mu, V = sigma^2 + s^2, e = x - mu) of
        # A = -log(2 pi V)/2, B = -e^2/(2V), C = log Phi(z), z = (x r^2 mu + s^2)/(r s sqrt V);
        # with h = phi(z)/Phi(z) = delta - z and h' = var - 1 from the standard normal
        # truncated to [-z, inf) (no cancellation for z << 0).
        mu = exp_any(eta)
        sigma2 = (self.ratio * mu) ** 2
        t = s * s
        big_v = sigma2 + t
        e = x - mu
        q = sigma2 / big_v
        z = (x * self.ratio**2 * mu + t) / (self.ratio * s * torch.sqrt(big_v))
        p = x * self.ratio * mu / (s * torch.sqrt(big_v))
        z1 = p - z * q
        z2 = p * t / big_v - z1 * q - z * 2.0 * q * t / big_v
        delta, var = std_truncnorm_moments(-z)
        h = delta - z
        a1 = -q
        a2 = -2.0 * q * t / big_v
        b1 = e * mu / big_v + e * e * q / big_v
        b2 = (
            mu * (e - mu) / big_v
            - 2.0 * e * mu * q / big_v
            + 2.0 * e * q * (e - mu) / big_v
            - 4.0 * e * e * q * q / big_v
        )
        l1 = log_normal_pdf(e, big_v) + torch.special.log_ndtr(z) - self._log_norm
        return l1, a1 + b1 + h * z1, a2 + b2 + (var - 1.0) * z1 * z1 + h * z2

    def _slab_pieces(self, x, s, eta, c):
        l1 = self._slab_loglik(x, s, eta)
        _, _, post_mean, post_sd = self._moments(x, s, eta)
        post_sd = post_sd.expand_as(x)
        mean, var = truncnorm_moments(post_mean, post_sd, 0.0)
        return [(l1, mean, var, *truncnorm_sign_probs(post_mean, post_sd, 0.0, c))]

    def _eta_to_g(self, eta: float) -> dict[str, float]:
        mu = math.exp(eta)
        return {"mu": mu, "scale": self.ratio * mu, "ratio": self.ratio}

    def _g_to_eta(self, g: dict[str, Any]) -> float:
        mu = float(g["mu"])
        if not mu > 0 or not math.isfinite(mu):
            raise ValueError(f"g_init['mu'] must be a positive finite number, got {mu}.")
        if "ratio" in g and float(g["ratio"]) != self.ratio:
            raise ValueError(
                f"g_init['ratio'] is {g['ratio']} but this prior has ratio={self.ratio}; "
                f"pass ratio={g['ratio']}."
            )
        return math.log(mu)
