"""``emdn`` and ``spiked_emdn``: mixture density networks as priors.

g(theta; x_i) = sum_k pi_k(x_i) N(mu_k(x_i), sigma_k(x_i)^2) (``emdn``), plus a point mass
pi_0(x_i) delta_0 (``spiked_emdn``); every weight, mean and sd is an output of one network.
Component k has marginal N(x; mu_k, s^2 + sigma_k^2) and posterior N(m_k, v_k) with
m_k = (x sigma_k^2 + mu_k s^2) / (sigma_k^2 + s^2), v_k = sigma_k^2 s^2 / (sigma_k^2 + s^2).
A cold fit starts from the normal scale mixture fitted to the same data (its heaviest
components, means 0).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .._math import log_normal_pdf, normal_sign_probs
from ._covariates import CovariatePrior
from .base import register_prior
from .scale_mixture import NormalScaleMixture

_MIN_LOG_WEIGHT = -30.0


@register_prior
class Emdn(CovariatePrior):
    """``emdn``: a mixture of ``n_components`` normals whose weights, means and sds are
    network outputs. ``g`` holds ``pi_mean``, ``mu_mean``, ``sd_mean`` (averages over the
    observations), the network weights and the covariate standardisation."""

    name = "emdn"
    spiked = False

    def __init__(self, mode: float = 0.0, *, n_components: int = 5, **network) -> None:
        super().__init__(mode, **network)
        if n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components}.")
        self.n_components = int(n_components)

    def _setup(self, x, s, warm, g_init):
        if warm is not None and "log_sd_bounds" in warm:
            # the saved network's sds are only the same prior with the same bounds
            lo, hi = (float(v) for v in np.asarray(warm["log_sd_bounds"]))
            return {"log_sd_lo": lo, "log_sd_hi": hi}
        return self._fresh_bounds(x, s)

    @staticmethod
    def _fresh_bounds(x, s) -> dict[str, float]:
        """log sd bounds for these data: from 1e-4 of the smallest s to 10 times the
        largest |x| + s."""
        stats = torch.stack([s.min(), s.max(), x.abs().max()]).double().tolist()
        return {
            "log_sd_lo": math.log(stats[0] * 1e-4),
            "log_sd_hi": math.log(10.0 * (stats[2] + stats[1])),
        }

    def _widen_setup(self, setup, net, z, x, s):
        # data that grew (or shrank) past the saved bounds need sds outside them: widen
        # to the fresh bounds, if no saved sd sits at a bound (then the saved network is
        # the same prior under the wider bounds; otherwise keep them)
        fresh = self._fresh_bounds(x, s)
        lo = min(setup["log_sd_lo"], fresh["log_sd_lo"])
        hi = max(setup["log_sd_hi"], fresh["log_sd_hi"])
        if lo == setup["log_sd_lo"] and hi == setup["log_sd_hi"]:
            return setup
        with torch.no_grad():
            raw = net(z)[:, int(self.spiked) + 2 * self.n_components :]
        inside = torch.stack([raw.min(), raw.max()]).double().tolist()
        if not (setup["log_sd_lo"] < inside[0] and inside[1] < setup["log_sd_hi"]):
            return setup
        return {**setup, "log_sd_lo": lo, "log_sd_hi": hi}

    def _state_entries(self, setup):
        return {"log_sd_bounds": np.array([setup["log_sd_lo"], setup["log_sd_hi"]])}

    def _n_outputs(self, setup):
        return 3 * self.n_components + int(self.spiked)

    def _plain_start(self, x, s, setup):
        ash = NormalScaleMixture()
        grid = ash._fresh_grid(x, s)
        fit = NormalScaleMixture(scale=grid if self.spiked else grid[1:]).fit(x, s)
        pi, scale = np.asarray(fit.g["pi"]), np.asarray(fit.g["scale"])
        if self.spiked:
            pi0, pi, scale = pi[0], pi[1:], scale[1:]
        top = np.argsort(-pi)[: self.n_components]
        top = np.sort(top)
        k = self.n_components
        w = np.full(k, 0.0)
        sd = np.full(k, scale[top].max() if top.size else 1.0)
        w[: top.size] = pi[top]
        sd[: top.size] = scale[top]
        log_w = np.log(np.maximum(w, 1e-300))
        bias = [np.maximum(log_w, _MIN_LOG_WEIGHT), np.zeros(k), np.log(sd)]
        if self.spiked:
            bias.insert(0, [max(math.log(max(pi0, 1e-300)), _MIN_LOG_WEIGHT)])
        return torch.as_tensor(np.concatenate(bias), dtype=x.dtype, device=x.device), {}

    def _split(self, out, setup):
        k = self.n_components
        o = out[:, int(self.spiked) :]
        logits = out[:, : k + int(self.spiked)] if self.spiked else o[:, :k]
        if self.spiked:
            mu, log_sd = o[:, k : 2 * k], o[:, 2 * k :]
        else:
            mu, log_sd = o[:, k : 2 * k], o[:, 2 * k :]
        log_sd = log_sd.clamp(setup["log_sd_lo"], setup["log_sd_hi"])
        return logits, mu, log_sd

    def _log_weights(self, out, extra, x, s, setup):
        logits, mu, log_sd = self._split(out, setup)
        var = torch.exp(2.0 * log_sd) + (s * s)[:, None]
        comps = log_normal_pdf(x[:, None] - mu, var)
        if self.spiked:
            comps = torch.cat([log_normal_pdf(x, s * s)[:, None], comps], dim=1)
        return torch.log_softmax(logits, dim=1) + comps

    def _posterior_pieces(self, out, extra, x, s, setup, c, used):
        _, mu, log_sd = self._split(out, setup)
        j = int(self.spiked)
        normal = used[used >= j] - j  # component indices among the normals
        sigma2 = torch.exp(2.0 * log_sd[:, normal]).T
        s2 = s * s
        tot = sigma2 + s2
        mean = (x * sigma2 + mu[:, normal].T * s2) / tot
        var = sigma2 * s2 / tot
        p_le, p_ge = normal_sign_probs(mean, var.sqrt(), c)
        if self.spiked and bool((used == 0).any()):
            zero = torch.zeros_like(x)[None, :]
            mean = torch.cat([zero, mean])
            var = torch.cat([zero, var])
            p_le = torch.cat([torch.full_like(zero, 1.0 if c >= 0 else 0.0), p_le])
            p_ge = torch.cat([torch.full_like(zero, 1.0 if c <= 0 else 0.0), p_ge])
        return mean, var, p_le, p_ge

    def _g_entries(self, out, extra, setup):
        logits, mu, log_sd = self._split(out, setup)
        pi = torch.softmax(logits, dim=1)
        entries = {
            "pi_mean": pi.mean(0).cpu().numpy(),
            "mu_mean": mu.mean(0).cpu().numpy(),
            "sd_mean": torch.exp(log_sd).mean(0).cpu().numpy(),
            "n_components": self.n_components,
            "log_sd_bounds": np.array([setup["log_sd_lo"], setup["log_sd_hi"]]),
        }
        if self.spiked:
            entries["pi0"] = pi[:, 0].cpu().numpy()
        return entries

    def _state_in_units(self, state, ratio):
        k, j = self.n_components, int(self.spiked)
        net = {name: np.array(v, dtype=np.float64) for name, v in state["network"].items()}
        mu, log_sd = slice(j + k, j + 2 * k), slice(j + 2 * k, j + 3 * k)
        net["out.weight"][mu] *= ratio
        net["out.bias"][mu] *= ratio
        net["out.bias"][log_sd] += math.log(ratio)
        bounds = np.asarray(state["log_sd_bounds"], dtype=np.float64) + math.log(ratio)
        return {**state, "network": net, "log_sd_bounds": bounds}

    def _g_to_data_units(self, g, unit):
        g["mu_mean"] = g["mu_mean"] * unit
        g["sd_mean"] = g["sd_mean"] * unit
        g["log_sd_bounds"] = g["log_sd_bounds"] + math.log(unit)
        return g

    def _g_from_data_units(self, g, unit):
        g = dict(g)
        g["mu_mean"] = np.asarray(g["mu_mean"]) / unit
        g["sd_mean"] = np.asarray(g["sd_mean"]) / unit
        g["log_sd_bounds"] = np.asarray(g["log_sd_bounds"], dtype=np.float64) - math.log(unit)
        return g

    def prior_parameters(self, g: dict, covariates) -> dict:
        """The prior of each observation: ``pi`` (n, K) weights of normals with means ``mu``
        and sds ``sd`` (n, K); for ``spiked_emdn`` the first column of ``pi`` is the point
        mass at zero."""
        out = self.network_outputs(g, covariates)
        unit = float(np.asarray(g.get("unit", 1.0)))
        lo, hi = (float(v) - math.log(unit) for v in g["log_sd_bounds"])
        logits, mu, log_sd = self._split(out, {"log_sd_lo": lo, "log_sd_hi": hi})
        return {
            "pi": torch.softmax(logits, 1).numpy(),
            "mu": mu.numpy() * unit,
            "sd": torch.exp(log_sd).numpy() * unit,
        }


@register_prior
class SpikedEmdn(Emdn):
    """``spiked_emdn``: ``emdn`` plus a point mass at zero with weight pi_0(x). ``g`` also
    holds ``pi0`` per observation."""

    name = "spiked_emdn"
    spiked = True
