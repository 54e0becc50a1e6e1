"""Parametric "spike and slab" families: pi0 * delta_mode + (1 - pi0) * slab(eta).

The slab has one free parameter ``eta`` (the log of its scale). The marginal
log-likelihood

    f(pi0, eta) = sum_i log( pi0 N(x_i; 0, s_i^2) + (1 - pi0) p_slab(x_i | eta) )

is concave in pi0 for fixed eta. It is maximised by a damped Newton method on the box
pi0 in [eps, 1 - eps] (projected steps, so the pi0 = 0 and pi0 = 1 edges are reached in a
few steps), with exact derivatives: with the likelihood ratios E0_i = N(x_i; 0, s_i^2) /
p(x_i), E1_i = p_slab(x_i) / p(x_i), slab responsibilities r_i = (1 - pi0) E1_i and
per-observation slab derivatives d1_i, d2_i (w.r.t. eta),

    df/dpi0 = sum (E0_i - E1_i),        d2f/dpi0^2   = -sum (E0_i - E1_i)^2,
    df/deta = sum r_i d1_i,             d2f/dpi0deta = -sum E0_i E1_i d1_i,
    d2f/deta2 = sum r_i d2_i + r_i (1 - r_i) d1_i^2.

The exact edges pi0 = 0 and pi0 = 1 are compared with the interior optimum at the end.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from .._math import exp_flushed, log_normal_pdf, point_sign_probs
from .._validation import check_count, real_array
from ._posterior import summarize
from .base import EBNMResult, Prior

_PI0_EPS = 1e-12  # pi0 box of the interior search; the exact edges are checked apart
_SUBSAMPLE = 20_000  # observations used to pick a starting point on cold starts


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b) accumulated in float64."""
    if a.dtype == torch.float64:
        return torch.dot(a, b)
    return torch.dot(a.double(), b.double())


def _log(v: float) -> float:
    return math.log(v) if v > 0 else -math.inf


def _ascent_step(grad: list[float], hess: list[list[float]], free: list[bool]) -> list[float]:
    """Newton step on the free coordinates of a 2-parameter problem, with the Hessian's
    eigenvalues replaced by their absolute values (floored at 1e-10 of the largest):
    sum_i v_i (v_i . g) / |lambda_i| over the eigenpairs of -H, always an ascent
    direction. The symmetric 2 x 2 eigenproblem in closed form; the smaller eigenvalue
    as det / larger, which keeps its relative accuracy."""
    if free[0] and free[1]:
        a, b, c = -hess[0][0], -hess[0][1], -hess[1][1]
        if not (math.isfinite(a) and math.isfinite(b) and math.isfinite(c)):
            return [math.nan, math.nan]
        if b == 0.0:
            pairs = [(a, 1.0, 0.0), (c, 0.0, 1.0)]
        else:
            half_sum = 0.5 * (a + c)
            radius = math.hypot(0.5 * (a - c), b)  # > 0 as b != 0
            big = half_sum + radius if half_sum >= 0 else half_sum - radius
            large, other = (a, c) if abs(a) > abs(c) else (c, a)
            small = (large / big) * other - (b / big) * b  # det / big
            # eigenvector of big: the better conditioned of (big - c, b) and (b, big - a)
            e1, e2 = (big - c, b) if abs(big - c) >= abs(big - a) else (b, big - a)
            norm = math.hypot(e1, e2)
            e1, e2 = e1 / norm, e2 / norm
            pairs = [(big, e1, e2), (small, -e2, e1)]
        floor = 1e-10 * max(abs(pairs[0][0]), abs(pairs[1][0]), 1e-300)
        step = [0.0, 0.0]
        for lam, u1, u2 in pairs:
            coef = (u1 * grad[0] + u2 * grad[1]) / max(abs(lam), floor)
            step[0] += coef * u1
            step[1] += coef * u2
        return step
    step = [0.0, 0.0]
    for i in (0, 1):
        if free[i]:
            step[i] = grad[i] / max(abs(hess[i][i]), 1e-310)  # the 2-D floor, one eigenvalue
    return step


@dataclass
class _Data:
    x: torch.Tensor  # observations minus the mode
    s: torch.Tensor
    l0: torch.Tensor | None  # log N(x; 0, s^2): the spike's marginal
    n: int
    cache: dict[str, Any] = field(default_factory=dict)  # a family's per-call quantities


class SpikeSlabPrior(Prior):
    """Base class for ``pi0 * delta_mode + (1 - pi0) * slab`` with a one-parameter slab.

    Subclasses implement :meth:`_slab_loglik` (log marginal of the slab, per observation),
    :meth:`_slab_pieces` (its posterior), the map between ``eta`` and the fitted ``g``,
    and may override :meth:`_slab_derivs` with analytic derivatives (the default uses
    forward-mode automatic differentiation).
    """

    has_spike: ClassVar[bool] = True
    g_keys: ClassVar[tuple[str, ...]] = ("pi0", "scale")
    #: E_slab[theta^2] = slab_m2 * exp(2 eta), used for the moment-based start.
    slab_m2: ClassVar[float] = 1.0

    def __init__(self, mode: float = 0.0, *, max_iter: int = 100) -> None:
        super().__init__(mode)
        self.max_iter = check_count(max_iter, "max_iter")

    # ---- family hooks -------------------------------------------------------------
    @abstractmethod
    def _slab_loglik(self, x: torch.Tensor, s: torch.Tensor, eta) -> torch.Tensor:
        """log int N(x_i; theta, s_i^2) slab(theta; eta) dtheta, per observation. ``eta`` is
        a float (or a 0-dim tensor in the autodiff fallback; use :func:`exp_any`)."""

    def _slab_derivs(
        self, x: torch.Tensor, s: torch.Tensor, eta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Slab log marginal and its first two derivatives in eta, per observation."""
        eta = torch.as_tensor(eta, dtype=x.dtype, device=x.device)
        one = torch.ones_like(eta)

        def first(e: torch.Tensor):
            return torch.func.jvp(lambda ee: self._slab_loglik(x, s, ee), (e,), (one,))

        (l1, d1), (_, d2) = torch.func.jvp(first, (eta,), (one,))
        return l1, d1, d2

    @abstractmethod
    def _slab_pieces(
        self, x: torch.Tensor, s: torch.Tensor, eta: torch.Tensor, c: float
    ) -> list[tuple[torch.Tensor, ...]]:
        """Posterior pieces of the slab: ``(log_weight, mean, var, p_le, p_ge)`` with
        ``logsumexp`` of the log weights equal to :meth:`_slab_loglik`; sign probabilities
        are about ``theta <= c`` / ``theta >= c`` (c = -mode)."""

    @abstractmethod
    def _eta_to_g(self, eta: float) -> dict[str, float]:
        """The slab's entries of ``g`` (at least ``scale``)."""

    @abstractmethod
    def _g_to_eta(self, g: dict[str, Any]) -> float:
        """Inverse of :meth:`_eta_to_g`."""

    def _eta_bounds(self, x: torch.Tensor, s: torch.Tensor) -> tuple[float, float]:
        """Search box for eta (log of the slab scale), from the scale of the data."""
        s_min, s_max, x_max = torch.stack([s.min(), s.max(), x.abs().max()]).double().tolist()
        return math.log(s_min * 1e-3), math.log(10.0 * (x_max + s_max))

    # ---- fitting ------------------------------------------------------------------
    def _fit(self, x, s, *, covariates=None, state, g_init, fix_g) -> EBNMResult:
        xs = x - self.mode if self.mode != 0.0 else x
        data = _Data(xs, s, log_normal_pdf(xs, s * s) if self.has_spike else None, x.numel())
        if g_init is not None:
            start = self._theta_from_g(g_init)
        if fix_g:
            theta = start
        else:
            warm = []
            if g_init is not None:
                warm.append(start)
            if state is not None and "pi0_eta" in state:
                warm.append(self._theta_from_state(state["pi0_eta"]))
            theta = self._optimise(data, warm)
        return self._result(data, theta)

    def _theta_from_state(self, value: Any) -> tuple[float, float]:
        """``state['pi0_eta']`` of an earlier fit, checked: pi0 in [0, 1], eta < inf."""
        theta = real_array(value, "state['pi0_eta']").ravel()
        # eta = -inf: a slab of scale 0 (the normal prior's sigma = 0)
        ok = theta.size == 2 and 0 <= theta[0] <= 1 and -math.inf <= theta[1] < math.inf
        if not ok:
            raise ValueError(
                f"state['pi0_eta'] must be (pi0 in [0, 1], log scale < inf), got {value!r}; "
                "pass the `state` of an earlier fit of this family."
            )
        return float(theta[0]), float(theta[1])

    def _theta_from_g(self, g: dict[str, Any]) -> tuple[float, float]:
        if not self.has_spike:
            return (0.0, self._g_to_eta(g))
        return (float(g["pi0"]), self._g_to_eta(g))  # pi0 in [0, 1]: see check_g

    def _value(self, data: _Data, pi0: float, l1: torch.Tensor | None) -> torch.Tensor:
        """f(pi0, eta) as a float64 0-dim tensor (no device sync) from the slab's
        per-observation log marginal ``l1`` at eta (unused, may be None, at pi0 = 1)."""
        f64 = torch.float64
        if self.has_spike and pi0 == 1.0:  # the null: no slab
            return data.l0.sum(dtype=f64)
        if not self.has_spike or pi0 == 0.0:
            return l1.sum(dtype=f64)
        return torch.logaddexp(data.l0 + math.log(pi0), l1 + math.log1p(-pi0)).sum(dtype=f64)

    def _objective(self, data: _Data, pi0: float, eta: float, derivs: bool):
        """f(pi0, eta), and with ``derivs`` its gradient and Hessian (2-vectors)."""
        f64 = torch.float64
        if not derivs:
            null = self.has_spike and pi0 == 1.0
            l1 = None if null else self._slab_loglik(data.x, data.s, eta)
            return self._value(data, pi0, l1).item(), None, None
        l1, d1, d2 = self._slab_derivs(data.x, data.s, eta)
        if not self.has_spike or pi0 == 0.0:
            f, g1, h11 = torch.stack([t.sum(dtype=f64) for t in (l1, d1, d2)]).tolist()
            return f, np.array([0.0, g1]), np.array([[0.0, 0.0], [0.0, h11]])
        lw0, lw1 = math.log(pi0), math.log1p(-pi0)
        ll = torch.logaddexp(data.l0 + lw0, l1 + lw1)
        e0 = exp_flushed(data.l0 - ll)
        e1 = exp_flushed(l1 - ll)
        r1 = (1.0 - pi0) * e1
        diff = e0 - e1
        r1d1 = r1 * d1
        sums = torch.stack(
            [
                ll.sum(dtype=f64),
                diff.sum(dtype=f64),
                _dot(diff, diff),
                r1d1.sum(dtype=f64),
                _dot(e0 * e1, d1),
                _dot(r1, d2) + _dot(r1d1 - r1d1 * r1, d1),
            ]
        ).tolist()
        f, g_p, h_pp, g_e, h_pe, h_ee = sums
        return f, np.array([g_p, g_e]), np.array([[-h_pp, -h_pe], [-h_pe, h_ee]])

    def _cold_start(self, data: _Data, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Best of a moment-matched start and a coarse grid, judged on a subsample."""
        x, s = data.x, data.s
        m2 = torch.stack([(x * x).mean(dtype=torch.float64), (s * s).mean(dtype=torch.float64)])
        ex2, es2 = m2.tolist()
        excess = max(ex2 - es2, 0.0)
        slab_m2 = 2.0 * excess if excess > 0 else es2  # moments at pi0 = 1/2
        eta0 = float(np.clip(0.5 * math.log(slab_m2 / self.slab_m2), lo[1], hi[1]))
        sub = data
        step = -(-data.n // _SUBSAMPLE)
        if step > 1:
            idx = slice(0, None, step)
            sub = _Data(
                x[idx],
                s[idx] if s.numel() > 1 else s,
                data.l0[idx] if data.l0 is not None else None,
                x[idx].numel(),
            )
        eta_lo = max(lo[1], 0.5 * math.log(max(es2, 1e-300)) - math.log(100.0))
        etas = [eta0, *np.linspace(eta_lo, hi[1] - math.log(10.0), 12).tolist()]
        pi0s = [0.05, 0.5, 0.95] if self.has_spike else [0.0]
        # the slab's log marginal once per eta, the grid's values in one device sync
        values = torch.empty((len(pi0s), len(etas)), dtype=torch.float64, device=x.device)
        for j, eta in enumerate(etas):
            l1 = self._slab_loglik(sub.x, sub.s, eta)
            for i, pi0 in enumerate(pi0s):
                values[i, j] = self._value(sub, pi0, l1)
        best, best_f = np.array([0.5 if self.has_spike else 0.0, eta0]), -math.inf
        for i, row in enumerate(values.tolist()):  # the first best, pi0 major, wins
            for j, fv in enumerate(row):
                if fv > best_f:
                    best, best_f = np.array([pi0s[i], etas[j]]), fv
        return best

    def _optimise(self, data: _Data, warm: list[tuple[float, float]]) -> tuple[float, float]:
        eta_lo, eta_hi = self._eta_bounds(data.x, data.s)
        eps = _PI0_EPS if self.has_spike else 0.0
        lo = np.array([eps if self.has_spike else 0.0, eta_lo])
        hi = np.array([1.0 - eps if self.has_spike else 0.0, eta_hi])
        warm_exact = False
        if len(warm) == 1:
            start = np.clip(np.array(warm[0], dtype=np.float64), lo, hi)
            warm_exact = bool(np.all(start == np.asarray(warm[0])))
        elif warm:
            cands = [np.clip(np.array(t, dtype=np.float64), lo, hi) for t in warm]
            vals = [self._objective(data, *v, False)[0] for v in cands]
            start = cands[int(np.argmax(vals))]
        else:
            start = self._cold_start(data, lo, hi)
        v, f = self._newton(data, start, lo, hi)
        theta = (float(v[0]), float(v[1]))
        # the exact edges pi0 = 1 (null) and pi0 = 0 (pure slab); f is concave in pi0, so
        # an edge can only beat a point that stopped at the pi0 box
        if self.has_spike and (v[0] <= lo[0] or v[0] >= hi[0]):
            for edge in (1.0, 0.0):
                f_edge = self._objective(data, edge, theta[1], False)[0]
                if f_edge >= f:
                    theta, f = (edge, theta[1]), f_edge
        # never end below a warm start (Newton only accepts ascent steps, so this can only
        # happen when a warm start lay outside the search box, e.g. exactly on an edge)
        if not warm_exact:
            for t in warm:
                f_warm = self._objective(data, *t, False)[0]
                if f_warm > f:
                    theta, f = (float(t[0]), float(t[1])), f_warm
        return theta

    def _newton(
        self, data: _Data, v: np.ndarray, lo: np.ndarray, hi: np.ndarray
    ) -> tuple[np.ndarray, float]:
        """Maximise f over the box [lo, hi] by projected, damped Newton steps (on Python
        floats: with two parameters, numpy's per-call overhead would dominate)."""
        dims = (self.has_spike, True)
        max_step = (1.0, 3.0)
        v = [float(v[0]), float(v[1])]
        lo = [float(lo[0]), float(lo[1])]
        hi = [float(hi[0]), float(hi[1])]
        f, grad, hess = self._objective(data, *v, True)
        grad, hess = grad.tolist(), hess.tolist()
        n = max(data.n, 1)
        tol = 1e-10 * n + 1e-13 * abs(f)
        for _ in range(self.max_iter):
            free = [
                dims[i] and not ((v[i] <= lo[i] and grad[i] < 0) or (v[i] >= hi[i] and grad[i] > 0))
                for i in (0, 1)
            ]
            if not any(free):
                break
            step = _ascent_step(grad, hess, free)
            pred = grad[0] * step[0] + grad[1] * step[1]
            if not math.isfinite(pred) or pred < tol:
                break
            # Newton converges quadratically: after a step predicted to gain < 1e-7 n, what
            # is left is negligible, so accept it on the objective alone and stop
            last = pred < 1e-7 * n
            scale = max(abs(step[0]) / max_step[0], abs(step[1]) / max_step[1])
            if scale > 1:
                step = [step[0] / scale, step[1] / scale]
            t = 1.0
            accepted = False
            for trial in range(40):
                cand = [min(max(v[i] + t * step[i], lo[i]), hi[i]) for i in (0, 1)]
                if trial == 0 and not last:
                    fc, gc, hc = self._objective(data, *cand, True)
                else:
                    fc = self._objective(data, *cand, False)[0]
                rise = grad[0] * (cand[0] - v[0]) + grad[1] * (cand[1] - v[1])
                if math.isfinite(fc) and fc >= f + 1e-4 * rise and fc > f:
                    accepted = True
                    break
                t *= 0.5
            if not accepted:
                break
            gain = fc - f
            v, f = cand, fc
            if last:
                break
            if trial == 0:
                grad, hess = gc.tolist(), hc.tolist()
            else:
                f, grad, hess = self._objective(data, *v, True)
                grad, hess = grad.tolist(), hess.tolist()
            if gain < tol:
                break
        return np.array(v), f

    # ---- results ------------------------------------------------------------------
    def _result(self, data: _Data, theta: tuple[float, float]) -> EBNMResult:
        pi0, eta = theta
        c = -self.mode
        lw1 = math.log1p(-pi0) if pi0 < 1.0 else -math.inf
        parts = []
        for lw, mean, var, p_le, p_ge in self._slab_pieces(data.x, data.s, eta, c):
            parts.append((lw + lw1, mean, var, p_le, p_ge))
        if self.has_spike:
            parts.insert(0, (data.l0 + _log(pi0), None, None, *point_sign_probs(0.0, c)))
        post = summarize(parts, shift=self.mode)
        return EBNMResult.from_posterior(post, self._fitted_g(theta), {"pi0_eta": (pi0, eta)})

    def _fitted_g(self, theta: tuple[float, float]) -> dict[str, Any]:
        """The fitted prior ``g`` of ``theta = (pi0, eta)``."""
        pi0, eta = theta
        g: dict[str, Any] = {"family": self.name, "mode": self.mode}
        if self.has_spike:
            g["pi0"] = pi0
        g.update(self._eta_to_g(eta))
        return g
