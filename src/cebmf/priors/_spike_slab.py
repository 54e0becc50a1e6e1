"""Parametric "spike and slab" families: pi0 * delta_mode + (1 - pi0) * slab(eta).

The slab has one free parameter ``eta`` (the log of its scale); the spike weight is
parametrised by ``a = logit(1 - pi0)``. The marginal log-likelihood

    f(a, eta) = sum_i log( (1 - w) N(x_i; 0, s_i^2) + w p_slab(x_i | eta) ),  w = sigmoid(a)

is maximised by a damped, box-constrained Newton method whose gradient and Hessian are
exact: with slab responsibilities r_i and per-observation slab derivatives d1_i, d2_i
(w.r.t. eta),

    df/da = sum r_i - n w,            d2f/da2   = sum r_i (1 - r_i) - n w (1 - w),
    df/deta = sum r_i d1_i,           d2f/dadeta = sum r_i (1 - r_i) d1_i,
    d2f/deta2 = sum r_i d2_i + r_i (1 - r_i) d1_i^2.

Boundaries (pi0 = 1, pi0 = 0) are checked explicitly after the interior search.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from .._math import exp_flushed, log_normal_pdf, point_sign_probs
from ._posterior import summarize
from .base import EBNMResult, Prior

_A_BOUND = 25.0  # |logit(1 - pi0)| bound of the interior search; boundaries checked apart
_SUBSAMPLE = 20_000  # observations used to pick a starting point on cold starts


def _log_sigmoid(a: float) -> float:
    if a == math.inf:
        return 0.0
    if a == -math.inf:
        return -math.inf
    return -math.log1p(math.exp(-a)) if a >= 0 else a - math.log1p(math.exp(a))


@dataclass
class _Data:
    x: torch.Tensor  # observations minus the mode
    s: torch.Tensor
    l0: torch.Tensor | None  # log N(x; 0, s^2): the spike's marginal
    n: int


class SpikeSlabPrior(Prior):
    """Base class for ``pi0 * delta_mode + (1 - pi0) * slab`` with a one-parameter slab.

    Subclasses implement :meth:`_slab_loglik` (log marginal of the slab, per observation),
    :meth:`_slab_pieces` (its posterior), the map between ``eta`` and the fitted ``g``,
    and may override :meth:`_slab_derivs` with analytic derivatives (the default uses
    forward-mode automatic differentiation).
    """

    has_spike: ClassVar[bool] = True
    #: E_slab[theta^2] = slab_m2 * exp(2 eta), used for the moment-based start.
    slab_m2: ClassVar[float] = 1.0

    def __init__(self, mode: float = 0.0, *, max_iter: int = 100) -> None:
        super().__init__(mode)
        self.max_iter = int(max_iter)

    # ---- family hooks -------------------------------------------------------------
    @abstractmethod
    def _slab_loglik(self, x: torch.Tensor, s: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
        """log int N(x_i; theta, s_i^2) slab(theta; eta) dtheta, per observation."""

    def _slab_derivs(
        self, x: torch.Tensor, s: torch.Tensor, eta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Slab log marginal and its first two derivatives in eta, per observation."""
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
    def _fit(self, x, s, *, state, g_init, fix_g) -> EBNMResult:
        xs = x - self.mode if self.mode != 0.0 else x
        data = _Data(xs, s, log_normal_pdf(xs, s * s) if self.has_spike else None, x.numel())
        if g_init is not None:
            start = self._theta_from_g(g_init)
        if fix_g:
            theta = start
        else:
            starts = []
            if g_init is not None:
                starts.append(start)
            if state is not None and "theta" in state:
                starts.append(tuple(state["theta"]))
            theta = self._optimise(data, starts)
        return self._result(data, theta)

    def _theta_from_g(self, g: dict[str, Any]) -> tuple[float, float]:
        if not self.has_spike:
            return (math.inf, self._g_to_eta(g))
        pi0 = float(g["pi0"])
        if not 0.0 <= pi0 <= 1.0:
            raise ValueError(f"g_init['pi0'] must be in [0, 1], got {pi0}.")
        a = math.inf if pi0 == 0.0 else -math.inf if pi0 == 1.0 else math.log((1 - pi0) / pi0)
        return (a, self._g_to_eta(g))

    def _objective(self, data: _Data, a: float, eta: float, derivs: bool):
        """f(a, eta), and with ``derivs`` its gradient and Hessian over the free params."""
        f64 = torch.float64
        if self.has_spike and a == -math.inf and not derivs:  # the null: no slab
            return data.l0.sum(dtype=f64).item(), None, None
        eta_t = torch.tensor(eta, dtype=data.x.dtype, device=data.x.device)
        if derivs:
            l1, d1, d2 = self._slab_derivs(data.x, data.s, eta_t)
        else:
            l1 = self._slab_loglik(data.x, data.s, eta_t)
        if not self.has_spike:
            if not derivs:
                return l1.sum(dtype=f64).item(), None, None
            f, g1, h11 = torch.stack([t.sum(dtype=f64) for t in (l1, d1, d2)]).tolist()
            return f, np.array([g1]), np.array([[h11]])
        lw0, lw1 = _log_sigmoid(-a), _log_sigmoid(a)
        c0 = data.l0 + lw0
        c1 = l1 + lw1
        ll = torch.logaddexp(c0, c1)
        if not derivs:
            return ll.sum(dtype=f64).item(), None, None
        r1 = exp_flushed(c1 - ll)
        r01 = r1 * exp_flushed(c0 - ll)
        sums = torch.stack(
            [
                ll.sum(dtype=f64),
                r1.sum(dtype=f64),
                r01.sum(dtype=f64),
                (r1 * d1).sum(dtype=f64),
                (r01 * d1).sum(dtype=f64),
                (r1 * d2 + r01 * d1 * d1).sum(dtype=f64),
            ]
        ).tolist()
        f, s_r1, s_r01, s_r1d1, s_r01d1, s_ee = sums
        w1 = math.exp(lw1)
        w0 = math.exp(lw0)
        grad = np.array([s_r1 - data.n * w1, s_r1d1])
        hess = np.array([[s_r01 - data.n * w0 * w1, s_r01d1], [s_r01d1, s_ee]])
        return f, grad, hess

    def _theta_vec(self, theta: tuple[float, float]) -> np.ndarray:
        return np.array(theta if self.has_spike else theta[1:], dtype=np.float64)

    def _theta_tuple(self, v: np.ndarray) -> tuple[float, float]:
        return (float(v[0]), float(v[1])) if self.has_spike else (math.inf, float(v[0]))

    def _f(self, data: _Data, v: np.ndarray) -> float:
        a, eta = self._theta_tuple(v)
        return self._objective(data, a, eta, False)[0]

    def _cold_start(self, data: _Data, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Best of a moment-matched start and a coarse grid, judged on a subsample."""
        x, s = data.x, data.s
        m2 = torch.stack([(x * x).mean(dtype=torch.float64), (s * s).mean(dtype=torch.float64)])
        ex2, es2 = m2.tolist()
        excess = max(ex2 - es2, 0.0)
        slab_m2 = 2.0 * excess if excess > 0 else es2  # moments at pi0 = 1/2
        eta0 = float(np.clip(0.5 * math.log(slab_m2 / self.slab_m2), lo[-1], hi[-1]))
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
        eta_lo = max(lo[-1], 0.5 * math.log(max(es2, 1e-300)) - math.log(100.0))
        etas = [eta0, *np.linspace(eta_lo, hi[-1] - math.log(10.0), 12).tolist()]
        a_grid = [-3.0, 0.0, 3.0] if self.has_spike else [0.0]
        best, best_f = self._theta_vec((0.0, eta0)), -math.inf
        for a in a_grid:
            for eta in etas:
                v = self._theta_vec((a, eta))
                fv = self._f(sub, v)
                if fv > best_f:
                    best, best_f = v, fv
        return best

    def _optimise(self, data: _Data, warm: list[tuple[float, float]]) -> tuple[float, float]:
        eta_lo, eta_hi = self._eta_bounds(data.x, data.s)
        lo = self._theta_vec((-_A_BOUND, eta_lo))
        hi = self._theta_vec((_A_BOUND, eta_hi))
        if warm:
            cands = [np.clip(self._theta_vec(t), lo, hi) for t in warm]
            vals = [self._f(data, v) for v in cands]
            i = int(np.argmax(vals))
            v, f = self._newton(data, cands[i], lo, hi)
        else:
            v, f = self._newton(data, self._cold_start(data, lo, hi), lo, hi)
        theta = self._theta_tuple(v)
        # boundaries of the spike weight: pi0 = 1 (null) and pi0 = 0 (pure slab)
        if self.has_spike:
            for a_edge in (-math.inf, math.inf):
                f_edge = self._objective(data, a_edge, theta[1], False)[0]
                if f_edge >= f:
                    theta, f = (a_edge, theta[1]), f_edge
        # never end below a warm start (it may lie exactly on a boundary)
        for t in warm:
            f_warm = self._objective(data, *t, False)[0]
            if f_warm > f:
                theta, f = t, f_warm
        return theta

    def _newton(
        self, data: _Data, v: np.ndarray, lo: np.ndarray, hi: np.ndarray
    ) -> tuple[np.ndarray, float]:
        """Maximise f over the box [lo, hi] by projected, damped Newton steps."""
        max_step = np.array([10.0, 3.0]) if self.has_spike else np.array([3.0])
        f, grad, hess = self._objective(data, *self._theta_tuple(v), True)
        tol = 1e-11 * max(data.n, 1) + 1e-12 * abs(f)
        for _ in range(self.max_iter):
            free = ~(((v <= lo) & (grad < 0)) | ((v >= hi) & (grad > 0)))
            if not free.any():
                break
            gf = grad[free]
            hf = -hess[np.ix_(free, free)]
            w, vecs = np.linalg.eigh(hf)
            floor = 1e-10 * max(np.abs(w).max(), 1e-300)
            w = np.maximum(np.abs(w), floor)
            step = np.zeros_like(v)
            step[free] = vecs @ ((vecs.T @ gf) / w)
            pred = float(grad @ step)
            if not np.isfinite(pred) or pred < tol:
                break
            scale = np.max(np.abs(step) / max_step)
            if scale > 1:
                step /= scale
            t = 1.0
            accepted = False
            for trial in range(40):
                cand = np.clip(v + t * step, lo, hi)
                if trial == 0:
                    fc, gc, hc = self._objective(data, *self._theta_tuple(cand), True)
                else:
                    fc = self._f(data, cand)
                if np.isfinite(fc) and fc >= f + 1e-4 * t * float(grad @ (cand - v)) and fc > f:
                    accepted = True
                    break
                t *= 0.5
            if not accepted:
                break
            gain = fc - f
            v, f = cand, fc
            if trial == 0:
                grad, hess = gc, hc
            else:
                f, grad, hess = self._objective(data, *self._theta_tuple(v), True)
            if gain < tol:
                break
        return v, f

    # ---- results ------------------------------------------------------------------
    def _result(self, data: _Data, theta: tuple[float, float]) -> EBNMResult:
        a, eta = theta
        eta_t = torch.tensor(eta, dtype=data.x.dtype, device=data.x.device)
        c = -self.mode
        lw1 = _log_sigmoid(a)
        parts = []
        for lw, mean, var, p_le, p_ge in self._slab_pieces(data.x, data.s, eta_t, c):
            parts.append((lw + lw1, mean, var, p_le, p_ge))
        if self.has_spike:
            zero = torch.zeros_like(data.x)
            p_le, p_ge = point_sign_probs(zero, 0.0, c)
            parts.insert(0, (data.l0 + _log_sigmoid(-a), zero, zero, p_le, p_ge))
        post = summarize(parts, shift=self.mode)
        loglik = post.log_marginal.sum(dtype=torch.float64).item()
        g: dict[str, Any] = {"family": self.name, "mode": self.mode}
        if self.has_spike:
            g["pi0"] = math.exp(_log_sigmoid(-a))
        g.update(self._eta_to_g(eta))
        return EBNMResult(
            mean=post.mean,
            mean2=post.mean2,
            sd=post.sd,
            lfsr=post.lfsr,
            loglik=loglik,
            g=g,
            state={"theta": (a, eta)},
        )
