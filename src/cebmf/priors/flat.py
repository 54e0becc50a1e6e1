"""``flat``: the improper uniform prior; the posterior of theta is N(x, s^2).

Its marginal likelihood is defined as the limit of the ``normal`` prior's as sigma -> inf
after dropping the divergent ``-n log sigma``: ``loglik = -n/2 log(2 pi)``. With this
convention the ELBO of a fit with flat priors is the limit of the ELBO with very wide
normal priors up to a constant that depends on neither data nor parameters.
"""

from __future__ import annotations

import torch

from .._math import LOG_2PI, normal_sign_probs
from .base import EBNMResult, Prior, register_prior


@register_prior
class Flat(Prior):
    """``flat``: no shrinkage (posterior mean x, sd s). ``g`` is ``{"family": "flat"}``."""

    name = "flat"

    def __init__(self, mode: float = 0.0) -> None:
        super().__init__(mode)
        if self.mode != 0.0:
            raise ValueError("mode has no meaning for the flat prior; leave mode=0.")

    def _fit(self, x, s, *, covariates=None, state, g_init, fix_g) -> EBNMResult:
        sd = s.expand_as(x).clone()
        p_le, p_ge = normal_sign_probs(x, sd, 0.0)
        return EBNMResult(
            mean=x.clone(),
            mean2=x * x + sd * sd,
            sd=sd,
            lfsr=torch.minimum(p_le, p_ge),
            loglik=-0.5 * x.numel() * LOG_2PI,
            g={"family": self.name, "mode": 0.0},
            state=None,
        )
