"""``cgb``: covariate-moderated generalized binary / point-normal prior.

g(theta; x_i) = pi0(x_i) delta_0 + (1 - pi0(x_i)) slab, with pi0(x) = sigmoid(-net(x)) and a
global slab: N(mu, sigma^2), or with ``nonnegative=True`` N(mu, sigma^2) truncated to
[0, inf) (a generalized binary slab with a free sd). Slab marginal: N(x; mu, s^2 + sigma^2)
(times Phi(m / sqrt(v)) / Phi(mu / sigma) truncated); posterior N(m, v) (truncated), with
m = (x sigma^2 + mu s^2) / (sigma^2 + s^2), v = sigma^2 s^2 / (sigma^2 + s^2).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as fn

from .._math import (
    log_normal_pdf,
    normal_sign_probs,
    point_sign_probs,
    truncnorm_moments,
    truncnorm_sign_probs,
)
from .._validation import check_flags, real_array
from ._covariates import CovariatePrior
from .base import register_prior
from .generalized_binary import GeneralizedBinary
from .normal import PointNormal

_LOGIT_BOUND = 30.0


@register_prior
class Cgb(CovariatePrior):
    """``cgb``: pi0(x) delta_0 + (1 - pi0(x)) N(mu, sigma^2) (truncated to [0, inf) with
    ``nonnegative=True``); mu and sigma are global, pi0 a network of the covariates.

    ``g`` holds ``pi0`` (per observation), ``mu``, ``scale`` (sigma), the network weights
    and the covariate standardisation. A cold fit starts from ``point_normal`` (or
    ``generalized_binary`` when nonnegative).

    As a ``g_init``, ``g["mu"]`` and ``g["scale"]`` (in the data's units) define the slab;
    ``g["extra"]`` keeps the same two parameters as the fit holds them (in its units
    ``g["unit"]``: ``mu``, ``log_sd``), exactly, and is used only while it agrees with them
    (so a saved prior is reused bit for bit, and an edited ``mu`` or ``scale`` is honoured).
    """

    name = "cgb"
    g_keys = (*CovariatePrior.g_keys, "mu", "scale", "nonnegative")
    g_options = (*CovariatePrior.g_options, "nonnegative")

    def __init__(self, mode: float = 0.0, *, nonnegative: bool = False, **network) -> None:
        super().__init__(mode, **network)
        check_flags(nonnegative=nonnegative)
        self.nonnegative = bool(nonnegative)

    def _check_outputs(self, n_out, saved, argname):
        if n_out != 1:
            raise ValueError(
                f"{argname}['network'] has {n_out} outputs but a cgb network has one (the "
                f"logit of 1 - pi0); pass the {argname} of an earlier cgb fit unmodified."
            )

    def _check_g_entries(self, g, argname):
        super()._check_g_entries(g, argname)
        for key in ("mu", "scale"):
            arr = real_array(g[key], f"{argname}[{key!r}]")
            bad = arr.size != 1 or not np.isfinite(arr).all()
            if bad or (key == "scale" and bool((arr <= 0).any())):
                kind = "a finite number > 0" if key == "scale" else "a finite number"
                raise ValueError(f"{argname}[{key!r}] must be {kind}, got {g[key]!r}.")

    def _setup(self, x, s, warm, g_init):
        return {"l0_nk": log_normal_pdf(x, s * s)}

    def _n_outputs(self, setup):
        return 1

    def _plain_start(self, x, s, setup):
        plain = GeneralizedBinary() if self.nonnegative else PointNormal()
        res = plain.fit(x, s)
        g = res.g
        pi1 = min(max(1.0 - g["pi0"], 1e-13), 1.0 - 1e-13)
        bias = torch.full((1,), math.log(pi1 / (1.0 - pi1)), dtype=x.dtype, device=x.device)
        mu = g["mu"] if self.nonnegative else 0.0
        return bias, {"mu": mu, "log_sd": math.log(g["scale"])}

    def _extra_init(self, setup, start):
        dev = setup["l0_nk"].device
        dt = setup["l0_nk"].dtype
        return {k: torch.tensor(float(v), dtype=dt, device=dev) for k, v in start.items()}

    def _slab(self, x, s, extra):
        sigma2 = torch.exp(2.0 * extra["log_sd"])
        mu = extra["mu"]
        tot = sigma2 + s * s
        m = (x * sigma2 + mu * s * s) / tot
        sd = torch.sqrt(sigma2 * s * s / tot)
        log_marginal = log_normal_pdf(x - mu, tot)
        if self.nonnegative:
            log_marginal = (
                log_marginal
                + torch.special.log_ndtr(m / sd)
                - torch.special.log_ndtr(mu / torch.sqrt(sigma2))
            )
        return log_marginal, m, sd

    def _log_weights(self, out, extra, x, s, setup):
        a = out[:, 0].clamp(-_LOGIT_BOUND, _LOGIT_BOUND)
        slab, _, _ = self._slab(x, s, extra)
        return torch.stack([fn.logsigmoid(-a) + setup["l0_nk"], fn.logsigmoid(a) + slab], dim=1)

    def _posterior_pieces(self, out, extra, x, s, setup, c, used):
        _, m, sd = self._slab(x, s, extra)
        sd = sd.expand_as(x)
        if self.nonnegative:
            mean, var = truncnorm_moments(m, sd, 0.0)
            le, ge = truncnorm_sign_probs(m, sd, 0.0, c)
        else:
            mean, var = m, sd * sd
            le, ge = normal_sign_probs(m, sd, c)
        p0_le, p0_ge = point_sign_probs(0.0, c)
        zero = torch.zeros_like(x)
        return (
            torch.stack([zero, mean])[used],
            torch.stack([zero, var])[used],
            torch.stack([torch.full_like(x, p0_le), le])[used],
            torch.stack([torch.full_like(x, p0_ge), ge])[used],
        )

    def _g_entries(self, out, extra, setup):
        a = out[:, 0].clamp(-_LOGIT_BOUND, _LOGIT_BOUND)
        return {
            "pi0": torch.sigmoid(-a).cpu().numpy(),
            "mu": float(extra["mu"]),
            "scale": float(torch.exp(extra["log_sd"])),
            "nonnegative": self.nonnegative,
        }

    def _state_in_units(self, state, ratio):
        extra = dict(state["extra"])
        extra["mu"] = np.asarray(extra["mu"], dtype=np.float64) * ratio
        extra["log_sd"] = np.asarray(extra["log_sd"], dtype=np.float64) + math.log(ratio)
        return {**state, "extra": extra}

    def _g_to_data_units(self, g, unit):
        g["mu"] = g["mu"] * unit
        g["scale"] = g["scale"] * unit
        return g

    def _g_from_data_units(self, g, unit):
        g = dict(g)
        g["mu"] = float(np.asarray(g["mu"])) / unit
        g["scale"] = float(np.asarray(g["scale"])) / unit
        if not _extra_agrees(g.get("extra"), g["mu"], g["scale"]):
            # mu and scale define the prior (documented, and what prior_parameters returns)
            g["extra"] = {"mu": g["mu"], "log_sd": math.log(g["scale"])}
        return g

    def prior_parameters(self, g: dict, covariates) -> dict:
        """The prior of each observation: ``pi0`` (n,), and the global ``mu``, ``scale``."""
        a = self.network_outputs(g, covariates)[:, 0].clamp(-_LOGIT_BOUND, _LOGIT_BOUND)
        return {"pi0": torch.sigmoid(-a).numpy(), "mu": g["mu"], "scale": g["scale"]}


#: ``g["extra"]`` agrees with ``g["mu"]`` and ``g["scale"]`` within this relative error (the
#: rounding of a float32 fit's exp(log_sd) and of the change of units).
_EXTRA_RTOL = 1e-6


def _extra_agrees(extra: Any, mu: float, sd: float) -> bool:
    """Whether a saved ``g["extra"]`` (``mu``, ``log_sd`` as the fit holds them) is the slab
    N(mu, sd^2) (both in the fit's units), to rounding."""
    if not isinstance(extra, dict) or not {"mu", "log_sd"} <= set(extra):
        return False
    try:
        e_mu, e_log_sd = (float(np.asarray(extra[k], dtype=np.float64)) for k in ("mu", "log_sd"))
    except (TypeError, ValueError):
        return False
    if not (math.isfinite(e_mu) and math.isfinite(e_log_sd)):
        return False
    return (
        abs(e_mu - mu) <= _EXTRA_RTOL * (abs(mu) + sd)
        and abs(math.exp(e_log_sd) - sd) <= _EXTRA_RTOL * sd
    )
