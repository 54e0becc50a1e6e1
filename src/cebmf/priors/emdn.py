"""``emdn`` and ``spiked_emdn``: mixture density networks as priors.

g(theta; x_i) = sum_k pi_k(x_i) N(mu_k(x_i), sigma_k(x_i)^2) (``emdn``), plus a point mass
pi_0(x_i) delta_0 (``spiked_emdn``); every weight, mean and sd is an output of one network.
Component k has marginal N(x; mu_k, s^2 + sigma_k^2) and posterior N(m_k, v_k) with
m_k = (x sigma_k^2 + mu_k s^2) / (sigma_k^2 + s^2), v_k = sigma_k^2 s^2 / (sigma_k^2 + s^2).
A cold fit starts from the best plain prior of the family found (constant network
outputs): the normal scale mixture fitted to the same data, reduced to ``n_components``
components (its heaviest ones, or its components merged into runs of neighbouring
scales) and refined by EM over weights, means and sds; the network training then only
accepts points of higher exact log-likelihood, so the fit is never below that plain
mixture.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .._math import log_normal_pdf, normal_sign_probs
from .._validation import check_count, real_array
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
    g_keys = (*CovariatePrior.g_keys, "n_components", "log_sd_bounds")
    g_options = (*CovariatePrior.g_options, "n_components")

    def __init__(self, mode: float = 0.0, *, n_components: int = 5, **network) -> None:
        super().__init__(mode, **network)
        self.n_components = check_count(n_components, "n_components")

    def _check_outputs(self, n_out, saved, argname):
        # per component a logit, a mean and a log sd (and the point mass's logit)
        j = int(self.spiked)
        if n_out != 3 * self.n_components + j:
            k, rest = divmod(n_out - j, 3)
            of = f", those of n_components={k}" if k > 0 and not rest else ""
            raise ValueError(
                f"{argname}['network'] has {n_out} outputs{of}, but this prior has "
                f"n_components={self.n_components} ({3 * self.n_components + j} outputs); "
                f"pass a prior with the {argname}'s n_components, or the {argname} of a "
                f"fit with n_components={self.n_components}."
            )

    def _check_g_entries(self, g, argname):
        super()._check_g_entries(g, argname)
        bounds = real_array(g["log_sd_bounds"], f"{argname}['log_sd_bounds']")
        if bounds.shape != (2,) or not (np.isfinite(bounds).all() and bounds[0] < bounds[1]):
            raise ValueError(
                f"{argname}['log_sd_bounds'] must be two finite numbers, lower < upper, got "
                f"{g['log_sd_bounds']!r}."
            )

    def _setup(self, x, s, warm, g_init):
        if warm is not None and "log_sd_bounds" in warm:
            # the saved network's sds are only the same prior with the same bounds
            lo, hi = (float(v) for v in np.asarray(warm["log_sd_bounds"]))
            setup = {"log_sd_lo": lo, "log_sd_hi": hi}
        else:
            setup = self._fresh_bounds(x, s)
        if warm is not None and "plain_mixture" in warm:
            setup["plain_warm"] = _plain_from_state(warm["plain_mixture"], self.spiked)
        return setup

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
        entries = {"log_sd_bounds": np.array([setup["log_sd_lo"], setup["log_sd_hi"]])}
        if "plain_fit" in setup:
            w, mu, sd, w0 = setup["plain_fit"]
            entries["plain_mixture"] = {
                "w": w,
                "mu": mu,
                "sd": sd,
                "w0": np.asarray(np.nan if w0 is None else w0),
            }
        return entries

    def _n_outputs(self, setup):
        return 3 * self.n_components + int(self.spiked)

    def _plain_start(self, x, s, setup):
        """Output biases of the best plain prior of this family found (constant network
        outputs: one mixture of ``n_components`` normals, plus the point mass for
        ``spiked_emdn``), fitted to these data.

        Two starts come from the normal scale mixture fitted on its grid (means 0): its
        ``n_components`` heaviest components, and its used components merged into
        ``n_components`` runs of neighbouring scales (weights added, variances averaged by
        weight). Each gets a short EM over the weights, means and sds (see
        :func:`_em_normal_mixture`; n x K work per iteration), and EM continues from the
        better one; its result is kept unless the heaviest components as they are have a
        higher exact log-likelihood under this family (its sd bounds included).

        A warm call (``setup['plain_warm']``: the plain mixture of the previous call, in
        these units) adds that mixture as a third start, and EM continues from the best
        start for ``_EM_SCREEN_ITER`` iterations instead of up to ``_EM_MAX_ITER``: the
        saved network is a candidate of the warm start too, so this plain candidate only
        has to follow the data (the two scale-mixture starts keep it from falling behind
        when they moved far, e.g. standard errors that shrank ten-fold).
        """
        pi0, pi, scale = self._ash_components(x, s)
        k = self.n_components
        n = x.numel()
        # a short EM from each start picks one, whose EM then continues
        starts = [
            (w, np.zeros(k), sd, pi0) for w, sd in (_heaviest(pi, scale, k), _merged(pi, scale, k))
        ]
        warm = setup.get("plain_warm")
        if warm is not None:
            starts.append(warm)
        fits = [_em_normal_mixture(x, s, *start, _EM_SCREEN_ITER) for start in starts]
        w, mu, sd, w0, _ = max(fits, key=lambda f: f[-1])
        final_iter = _EM_MAX_ITER if warm is None else _EM_SCREEN_ITER
        w, mu, sd, w0, _ = _em_normal_mixture(x, s, w, mu, sd, w0, final_iter)
        best = self._bias(w, mu, sd, w0).to(dtype=x.dtype, device=x.device)
        # the family's exact log-likelihood (its sd bounds included) of each start; the
        # heaviest components of the scale mixture as they are stay a candidate
        heavy_w, heavy_sd = _heaviest(pi, scale, k)
        plain = self._bias(heavy_w, np.zeros(k), heavy_sd, pi0)
        cands = [best, plain.to(dtype=x.dtype, device=x.device)]
        lls = [self._loglik_of(b.expand(n, -1), {}, x, s.expand_as(x), setup) for b in cands]
        chosen = int(lls[1] > lls[0])
        if chosen:  # the prior of those biases: the heaviest weights renormalised
            total = heavy_w.sum() + (pi0 or 0.0)
            w, mu, sd = heavy_w / total, np.zeros(k), heavy_sd
            w0 = None if pi0 is None else pi0 / total
        setup["plain_fit"] = (w, mu, sd, w0)
        return cands[chosen], {}

    def _ash_components(self, x, s):
        """``(pi0, pi, scale)``: the normal scale mixture fitted to these data (with the
        point mass only for ``spiked_emdn``; pi0 None otherwise), its components without
        weight left out."""
        grid = NormalScaleMixture()._fresh_grid(x, s)
        fit = NormalScaleMixture(scale=grid if self.spiked else grid[1:]).fit(x, s)
        pi, scale = np.asarray(fit.g["pi"]), np.asarray(fit.g["scale"])
        pi0 = None
        if self.spiked:
            pi0, pi, scale = float(pi[0]), pi[1:], scale[1:]
        used = pi > 0
        if not used.any():  # everything in the point mass
            return pi0, np.full(1, 1e-300), scale[-1:]
        return pi0, pi[used], scale[used]

    def _bias(self, w, mu, sd, pi0: float | None) -> torch.Tensor:
        """Output biases (float64) of the constant prior with weights ``w``, means ``mu``
        and sds ``sd`` (and point-mass weight ``pi0``)."""
        log_w = np.maximum(np.log(np.maximum(w, 1e-300)), _MIN_LOG_WEIGHT)
        bias = [log_w, mu, np.log(np.maximum(sd, 1e-300))]
        if self.spiked:
            bias.insert(0, [max(math.log(max(pi0, 1e-300)), _MIN_LOG_WEIGHT)])
        return torch.as_tensor(np.concatenate(bias), dtype=torch.float64)

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
        out = {**state, "network": net, "log_sd_bounds": bounds}
        if "plain_mixture" in state:
            plain = dict(state["plain_mixture"])
            plain["mu"] = np.asarray(plain["mu"]) * ratio
            plain["sd"] = np.asarray(plain["sd"]) * ratio
            out["plain_mixture"] = plain
        return out

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


def _heaviest(pi: np.ndarray, scale: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` heaviest components (in scale order), padded with weightless copies of
    the widest one."""
    top = np.sort(np.argsort(-pi)[:k])
    w = np.zeros(k)
    sd = np.full(k, scale[top].max())
    w[: top.size], sd[: top.size] = pi[top], scale[top]
    return w, sd


def _merged(pi: np.ndarray, scale: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The components merged into ``min(k, K)`` runs of neighbouring scales, as equal in
    size as possible: weights added, variances averaged by weight; padded as in
    :func:`_heaviest`."""
    runs = np.array_split(np.arange(pi.size), min(k, pi.size))
    w = np.array([pi[r].sum() for r in runs])
    sd = np.array([math.sqrt(float(pi[r] @ scale[r] ** 2) / pi[r].sum()) for r in runs])
    pad = k - w.size
    return np.r_[w, np.zeros(pad)], np.r_[sd, np.full(pad, sd.max())]


#: EM of the plain start: at most this many iterations; it stops earlier once an iteration
#: gains less than ``_EM_TOL`` per observation.
_EM_MAX_ITER = 300
_EM_TOL = 1e-9
#: EM iterations of each start before one is chosen.
_EM_SCREEN_ITER = 30


def _plain_from_state(plain: dict, spiked: bool):
    """``(w, mu, sd, w0)`` of a saved plain mixture (``state['plain_mixture']``)."""
    w0 = float(np.asarray(plain["w0"])) if spiked else None
    return (
        np.asarray(plain["w"], dtype=np.float64),
        np.asarray(plain["mu"], dtype=np.float64),
        np.asarray(plain["sd"], dtype=np.float64),
        w0,
    )


def _em_normal_mixture(x, s, w, mu, sd, pi0, max_iter: int = _EM_MAX_ITER):
    """EM for the prior sum_k w_k N(mu_k, sd_k^2) (+ w0 delta_0 when ``pi0`` is not None)
    of normal means x_i ~ N(theta_i, s_i^2), in float64 on the data's device. The complete
    data are (component, theta): the E-step gives responsibilities and each component's
    posterior mean m and variance v of theta; the M-step sets w_k to the mean
    responsibility, mu_k to the responsibility-weighted mean of m and sd_k^2 to that
    of (m - mu_k)^2 + v. Each iteration raises the marginal log-likelihood.
    Stops when an iteration gains less than ``_EM_TOL`` per observation. Returns numpy
    ``(w, mu, sd, w0)`` and the log-likelihood of the last E-step (at these parameters,
    or one iteration before them when ``max_iter`` ran out)."""
    xd = x.to(torch.float64)[:, None]
    s2 = (s.to(torch.float64) ** 2).expand_as(x.to(torch.float64))[:, None]
    w_all = np.r_[pi0, w] if pi0 is not None else w
    log_w = torch.as_tensor(np.log(np.maximum(w_all, 1e-300)), device=x.device)
    mu = torch.as_tensor(mu, dtype=torch.float64, device=x.device)
    var = torch.as_tensor(sd, dtype=torch.float64, device=x.device) ** 2
    j = int(pi0 is not None)
    n = x.numel()
    if j:
        spike = -0.5 * (math.log(2 * math.pi) + torch.log(s2) + xd * xd / s2)
    last = -math.inf
    for _ in range(max_iter):
        tot = var + s2
        log_lik = -0.5 * (math.log(2 * math.pi) + torch.log(tot) + (xd - mu) ** 2 / tot)
        if j:
            log_lik = torch.cat([spike.expand(-1, 1), log_lik], dim=1)
        log_joint = log_lik + log_w
        log_marg = torch.logsumexp(log_joint, dim=1, keepdim=True)
        total = float(log_marg.sum())
        gain, last = total - last, total
        if gain < _EM_TOL * n:
            break
        resp = torch.exp(log_joint - log_marg)
        r_sum = resp.sum(0)
        log_w = torch.log(r_sum.clamp(min=1e-300) / n)
        r, rs = resp[:, j:], r_sum[j:].clamp(min=1e-300)
        m = (xd * var + mu * s2) / tot
        v = var * s2 / tot
        mu = (r * m).sum(0) / rs
        var = ((r * ((m - mu) ** 2 + v)).sum(0) / rs).clamp(min=1e-300)
    w_out = torch.exp(log_w).cpu().numpy()
    w0 = float(w_out[0]) if j else None
    return w_out[j:], mu.cpu().numpy(), var.sqrt().cpu().numpy(), w0, last
