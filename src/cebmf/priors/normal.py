"""Normal priors: ``normal`` N(mode, sigma^2) and ``point_normal`` pi0 delta + (1-pi0) N.

With v = s^2 + sigma^2 the slab's marginal is N(x; 0, v) and its posterior is
N(q x, q s^2) with q = sigma^2 / v.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as fn

from .._math import (
    LOG_2PI,
    exp_any,
    log_normal_pdf,
    normal_sign_probs,
    point_sign_probs,
    sign_probs_wanted,
)
from ._spike_slab import SpikeSlabPrior, _Data
from .base import EBNMResult, register_prior


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

    ``g`` holds ``scale`` (sigma) and ``mode``. With tau = sigma^2 the log-likelihood is
    ``l(tau) = -1/2 sum_i [log 2 pi + log(s_i^2 + tau) + x_i^2 / (s_i^2 + tau)]`` (x
    centred at the mode), maximised over tau >= 0:

    * one s for all: ``tau = max(0, mean(x^2) - s^2)``, exactly;
    * varying s: l can have several local maxima, all in [0, max_i(x_i^2 - s_i^2)]; they
      are located on a geometric grid of tau (ratio 2, from 0.01 min s_i^2) and each is
      refined by Newton steps on l'(tau) = 0 safeguarded by bisection, to machine
      precision; the best is kept (and tau = 0 when l'(0) <= 0 wins).

    sigma = 0 is the point mass at the mode: posterior mean = mode, sd = 0, lfsr 1 at
    mode 0 (else 0) and log-likelihood that of N(mode, s^2).
    """

    name = "normal"
    has_spike = False
    g_keys = ("scale",)

    def _fit(self, x, s, *, covariates=None, state, g_init, fix_g) -> EBNMResult:
        xs = x - self.mode if self.mode != 0.0 else x
        data = _Data(xs, s, None, x.numel())
        if fix_g:
            tau = self._g_to_tau(g_init)
        else:
            warm = []
            if g_init is not None:
                warm.append(self._g_to_tau(g_init))
            if state is not None and "pi0_eta" in state:
                eta = self._theta_from_state(state["pi0_eta"])[1]
                warm.append(math.exp(min(2.0 * eta, 700.0)))
            tau = _normal_mle(xs, s, warm)
        eta = 0.5 * math.log(tau) if tau > 0 else -math.inf
        return self._result(data, (0.0, eta))

    @staticmethod
    def _g_to_tau(g: dict[str, Any]) -> float:
        """sigma^2 of a ``g`` already checked by :meth:`check_g` (scale finite, >= 0)."""
        return float(g["scale"]) ** 2


def _normal_mle(x: torch.Tensor, s: torch.Tensor, warm: list[float]) -> float:
    """argmax over tau >= 0 of sum_i log N(x_i; 0, s_i^2 + tau) (see :class:`Normal`)."""
    x2 = x.to(torch.float64).square()
    s2 = s.to(torch.float64).square()
    if s2.numel() == 1 or bool((s2 == s2[0]).all()):
        return max(0.0, (x2.mean() - s2[0]).item())
    s2 = s2.expand_as(x2)
    tau_hi, s2_min = torch.stack([(x2 - s2).max(), s2.min()]).tolist()
    if not tau_hi > 0:  # l'(tau) < 0 for every tau > 0
        return 0.0

    def value(taus: list[float]) -> list[float]:
        t = torch.tensor(taus, dtype=torch.float64, device=x2.device)
        out = torch.empty_like(t)
        step = max(1, (1 << 20) // x2.numel())
        for i in range(0, t.numel(), step):
            v = s2 + t[i : i + step, None]
            out[i : i + step] = -0.5 * (torch.log(v) + x2 / v).sum(1)
        return out.tolist()

    def slope(tau: float) -> tuple[float, float]:
        """2 l'(tau), 2 l''(tau)."""
        w = 1.0 / (s2 + tau)
        r = x2 * w
        return torch.stack([((r - 1.0) * w).sum(), ((1.0 - 2.0 * r) * w * w).sum()]).tolist()

    tau_lo = min(0.01 * s2_min, 1e-3 * tau_hi)
    m = int(min(max(math.ceil(math.log2(tau_hi / tau_lo)) + 1, 8), 120))
    grid = sorted({0.0, *np.geomspace(tau_lo, tau_hi, m).tolist(), *(t for t in warm if t >= 0)})
    vals = value(grid)
    cands = []
    for j, fj in enumerate(vals):
        left = vals[j - 1] if j > 0 else -math.inf
        right = vals[j + 1] if j + 1 < len(vals) else -math.inf
        if fj >= left and fj >= right:
            lo, hi = grid[max(j - 1, 0)], grid[min(j + 1, len(grid) - 1)]
            cands.append(_refine_root(slope, lo, hi, grid[j]))
    return cands[int(np.argmax(value(cands)))]


def _refine_root(slope, lo: float, hi: float, start: float) -> float:
    """A local maximiser of l near ``start`` (a grid point at least as high as its
    neighbours ``lo`` and ``hi``), from ``slope`` (2 l', 2 l''): ``start`` itself when it
    is 0 and l'(0) <= 0, else the root of l' on the side of ``start`` where l rises, by
    Newton steps kept inside the bracket (bisection otherwise, geometric when the bracket
    spans decades), until the step or the bracket reaches the rounding level of tau."""
    eps = float(np.finfo(np.float64).eps)
    d1, d2 = slope(start)
    if d1 == 0 or (d1 < 0 and start == lo):
        return start
    if d1 > 0:
        lo = start
        if hi == start or slope(hi)[0] >= 0:
            return hi
    else:
        hi = start
        if slope(lo)[0] <= 0:
            return start
    tau = start
    for _ in range(200):
        new = tau - d1 / d2 if d2 < 0 else math.nan
        if not lo < new < hi:
            new = math.sqrt(lo * hi) if lo > 0 and hi > 4.0 * lo else 0.5 * (lo + hi)
        if abs(new - tau) <= 2.0 * eps * tau or hi - lo <= 4.0 * eps * hi:
            return new
        tau = new
        d1, d2 = slope(tau)
        if d1 == 0:
            return tau
        if d1 > 0:
            lo = tau
        else:
            hi = tau
    return tau


@register_prior
class PointNormal(_NormalSlab):
    """``point_normal``: theta ~ pi0 delta_mode + (1 - pi0) N(mode, sigma^2).

    The default prior for loadings and factors. ``g`` holds ``pi0``, ``scale`` (sigma)
    and ``mode``; (pi0, sigma) maximise the marginal likelihood (Newton on
    (logit(1 - pi0), log sigma) with exact derivatives; pi0 = 0 and pi0 = 1 checked).
    """

    name = "point_normal"

    def _objective(self, data: _Data, pi0: float, eta: float, derivs: bool):
        """f(pi0, eta) (and its derivatives) in closed form when one s serves every
        observation (the loadings of a fit with constant or column noise).

        With w_i = x_i^2 / s^2 - 1, v = s^2 + sigma^2 and q = sigma^2 / v, the slab's and
        the spike's log marginals differ by an affine function of w: the slab's log-odds
        is u_i = logit(1 - pi0) - log(v / s^2) / 2 + q (w_i + 1) / 2, and its
        eta-derivatives are d1 = q (1 - q) w - q^2, d2 = 2 q (1 - q) ((1 - 2q) w - 2q).
        With r1 = sigmoid(u), r0 = sigmoid(-u) (so e0 = r0 / pi0, e1 = r1 / (1 - pi0)),
        every sum of the general gradient and Hessian is one of (e0 - e1, r1, r0 r1,
        (e0 - e1)^2) against (1, w, w^2): one product instead of some thirty passes over
        the data. Centring x^2 / s^2 at its null mean keeps the near-null sums free of
        cancellation; f is summed as in :meth:`_one_s_log_odds`.
        """
        if data.s.numel() != 1 or not 0.0 < pi0 < 1.0:
            return super()._objective(data, pi0, eta, derivs)
        q, p, neg_u, f = self._one_s_log_odds(data, pi0, eta)
        if not derivs:
            return f, None, None
        p1 = 1.0 - pi0
        r1 = torch.sigmoid(neg_u.neg())
        r0 = torch.sigmoid(neg_u)
        data.cache["responsibilities"] = ((pi0, eta), r0, r1)  # for _result at this point
        r01 = r0 * r1
        # e0 - e1 per observation: near the null both are about 1, and the expanded square
        # of their difference would cancel
        diff = (r0 * (1.0 / pi0)).sub_(r1, alpha=1.0 / p1)
        # (3, n) @ (n, 4): the long dimension inside, as BLAS likes it (4x faster here than
        # (4, n) @ (n, 3))
        sums = data.cache["basis"] @ torch.stack([diff, r1, r01, diff * diff]).T
        (g_p, s_r1, s_r01, h_pp), (_, s_r1w, s_r01w, _), (_, _, s_r01ww, _) = sums.tolist()
        a, b = q * p, -q * q  # d1 = a w + b
        c, d = 2.0 * a * (p - q), -4.0 * q * a  # d2 = c w + d
        g_e = a * s_r1w + b * s_r1
        h_pe = (a * s_r01w + b * s_r01) / (pi0 * p1)
        h_ee = c * s_r1w + d * s_r1 + a * a * s_r01ww + 2.0 * a * b * s_r01w + b * b * s_r01
        return f, np.array([g_p, g_e]), np.array([[-h_pp, -h_pe], [-h_pe, h_ee]])

    @staticmethod
    def _one_s_log_odds(
        data: _Data, pi0: float, eta: float
    ) -> tuple[float, float, torch.Tensor, float]:
        """``(q, 1 - q, -u, f)`` of a one-s problem: q = sigma^2 / (s^2 + sigma^2) and its
        complement (formed directly: q is near 1 where the slab is wide), the slab's
        log-odds u = u0 + q w / 2 (the tensor -u, float64) and the log-likelihood f. The
        first call of a fit keeps s^2, w = x^2 / s^2 - 1 and the basis (1, w, w^2) in
        ``data.cache``, and each call its result: the posterior at the optimum reuses the
        last evaluation of the Newton search."""
        cache = data.cache
        if cache.get("at") == (pi0, eta):
            return cache["log_odds"]
        if "w" not in cache:
            s2 = float(data.s.to(torch.float64)) ** 2
            w = data.x.to(torch.float64).square().div_(s2).sub_(1.0)
            cache["w"], cache["s2"] = w, s2
            cache["basis"] = torch.stack([torch.ones_like(w), w, w * w])  # (3, n)
        s2, w = cache["s2"], cache["w"]
        sigma2 = math.exp(2.0 * eta)
        q, p = sigma2 / (s2 + sigma2), s2 / (s2 + sigma2)
        lw0, lw1 = math.log(pi0), math.log1p(-pi0)
        u0 = lw1 - lw0 - 0.5 * math.log1p(sigma2 / s2) + 0.5 * q
        neg_u = (w * (-0.5 * q)).sub_(u0)
        # log(pi0 e^l0 + (1 - pi0) e^l1) = max(l0 + lw0, l1 + lw1) + log1p(e^-|u|): the larger
        # term is summed as it is (l1 affine in w), never as l0 + u, whose two parts are
        # both of size x^2 / s^2 where the slab dominates (they would cancel)
        slab = neg_u < 0
        l1 = (w * (-0.5 * p)).add_(-0.5 * (LOG_2PI + math.log(s2 + sigma2) + p))
        top = torch.where(slab, l1.add_(lw1 - lw0), data.l0.to(torch.float64))
        rest = fn.logsigmoid(neg_u.abs())  # -log1p(e^-|u|)
        f = data.n * lw0 + float(top.sum().sub_(rest.sum()))
        cache["at"], cache["log_odds"] = (pi0, eta), (q, p, neg_u, f)
        return q, p, neg_u, f

    def _result(self, data: _Data, theta: tuple[float, float]) -> EBNMResult:
        """Posterior summaries in closed form when one s serves every observation: with the
        slab's responsibility r1 (r0 = 1 - r1, both from the log-odds u of
        :meth:`_objective`) and its posterior N(q x, q s^2), the mean is r1 q x and the
        variance r1 q s^2 + r0 r1 (q x)^2 (the law of total variance, without the
        cancellation of E theta^2 - (E theta)^2); the sign probabilities mix the spike's
        and the slab's as in the general path."""
        pi0, eta = theta
        if data.s.numel() != 1 or not 0.0 < pi0 < 1.0 or not math.isfinite(eta):
            return super()._result(data, theta)
        q, _, neg_u, loglik = self._one_s_log_odds(data, pi0, eta)
        s2 = data.cache["s2"]
        at, r0, r1 = data.cache.get("responsibilities", (None, None, None))
        if at != (pi0, eta):
            r0, r1 = torch.sigmoid(neg_u), torch.sigmoid(-neg_u)
        m1 = data.x.to(torch.float64) * q  # the slab's posterior mean and sd
        var = (r0 * m1 * m1).add_(q * s2).mul_(r1)
        dt = data.x.dtype
        lfsr = None  # not wanted (Prior.fit(..., lfsr=False)): nothing to compute
        if sign_probs_wanted():
            c = -self.mode
            sd1 = torch.full((1,), math.sqrt(q * s2), dtype=torch.float64, device=m1.device)
            spike_le, spike_ge = point_sign_probs(0.0, c)
            slab_le, slab_ge = normal_sign_probs(m1, sd1, c)
            both = torch.minimum(r0 * spike_le + r1 * slab_le, r0 * spike_ge + r1 * slab_ge)
            lfsr = both.clamp(0.0, 1.0).to(dt)
        mean = (r1 * m1).add_(self.mode)
        return EBNMResult(
            mean=mean.to(dt),
            mean2=(mean * mean + var).to(dt),
            sd=var.sqrt().to(dt),
            lfsr=lfsr,
            loglik=loglik,
            g=self._fitted_g(theta),
            state={"pi0_eta": (pi0, eta)},
        )
