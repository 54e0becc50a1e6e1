"""``normal_scale_mixture`` (alias ``ash``): g = sum_k pi_k N(mode, sigma_k^2), sigma_0 = 0.

Component k has marginal N(x; 0, s^2 + sigma_k^2) and posterior N(q_k x, q_k s^2) with
q_k = sigma_k^2 / (sigma_k^2 + s^2).
"""

from __future__ import annotations

import torch

from .._math import LOG_2PI, log_normal_pdf, normal_sign_probs
from ._grids import normal_mixture_scales
from ._mixture import MixturePrior
from .base import register_prior


@register_prior(aliases=("ash",))
class NormalScaleMixture(MixturePrior):
    """``normal_scale_mixture`` / ``ash``: a unimodal symmetric prior, a mixture of
    zero-centred normals on a grid of sds with a point mass (sd 0) first.

    Grid: ebnm's KL rule (see :func:`cebmf.priors._grids.normal_mixture_scales`), with
    ``kl_target`` (default 1/n) or a fixed variance ratio ``grid_mult``; or pass ``scale``.
    Weights: maximum likelihood by mix-SQP (log-likelihood within ``tol * n`` of the
    optimum, certified for any number of components: ``max_k`` caps only the automatic
    rule, and a ``grid_mult`` or ``scale`` grid may have thousands). ``g`` holds ``pi``,
    ``scale`` (sds), ``pi0`` and ``mode``.
    """

    name = "normal_scale_mixture"

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
        return normal_mixture_scales(
            x, s, kl_target=self.kl_target, mult=self.grid_mult, max_k=self.max_k
        )

    def _component_loglik(self, x, s, scale):
        var = s * s + scale * scale
        if var.shape[1] == 1:  # one s for all: (K, 1) constants times x^2 in one pass
            return torch.addcmul(-0.5 * (LOG_2PI + torch.log(var)), -0.5 / var, x * x)
        return log_normal_pdf(x, var)

    def _component_posterior(self, x, s, scale, c):
        s2 = s * s
        q = scale * scale / (s2 + scale * scale)
        mean = q * x
        var = q * s2
        return (mean, var, *normal_sign_probs(mean, var.sqrt(), c))
