"""Maximum-likelihood mixture weights by sequential quadratic programming (mix-SQP).

Solves  max_{pi in simplex} sum_i log sum_k A_ki pi_k  for a fixed (K, n) likelihood
matrix A (Kim, Carbonetto and Stephens 2020). As there, the equality constraint is relaxed:

    minimise  F(w) = -(1/n) sum_i log (A^T w)_i + sum_k w_k   over  w >= 0,

whose minimiser lies on the simplex. Each iteration forms the exact gradient
g = -(1/n) A (1 / A^T w) on the data's device (a matrix-vector product) and the Hessian
H = (1/n) A diag(1 / A^T w)^2 A^T (one GEMM over the components in play; from an evenly
spaced subsample of at least 20 observations per component in play when that GEMM would
be large, for the first 30 iterations, then from all observations: the subsample changes
the search direction but neither the objective nor the stopping rule), solves the box QP
min_p 1/2 p^T H p + (g + 1)^T p,  w + p >= 0  by a primal active-set method on the host
(from the empty set), and backtracks on F. Cold starts on fine grids (more than 200
components) first solve every other component; cold starts on many observations first
solve a subsample. Iterations continue until the certificate below holds; a
``RuntimeWarning`` says so when it cannot be reached (``max_iter``, or no step improves F).

Certificate: for pi on the simplex and any optimum pi*, by concavity
loglik(pi*) - loglik(pi) <= n * (max_k(-g_k) - 1), so stopping at
``min(g + 1) >= -tol`` bounds the log-likelihood gap by ``n * tol``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from contextvars import ContextVar

import numpy as np
import torch

#: Where shortfalls go instead of a warning each (see :func:`collect_shortfalls`).
_SHORTFALLS: ContextVar[list[tuple[int, int, float]] | None] = ContextVar(
    "cebmf_mixsqp_shortfalls", default=None
)


@contextlib.contextmanager
def collect_shortfalls() -> Iterator[list[tuple[int, int, float]]]:
    """Within the block, a mix-SQP run that stops short of its certificate appends
    ``(components, observations, largest possible log-likelihood shortfall)`` to the list
    yielded instead of warning: the EBMF engine reports them once, against its tol."""
    sink: list[tuple[int, int, float]] = []
    token = _SHORTFALLS.set(sink)
    try:
        yield sink
    finally:
        _SHORTFALLS.reset(token)


def _box_qp(h: np.ndarray, b: np.ndarray, y0: np.ndarray, tol: float) -> np.ndarray:
    """Minimise 1/2 y^T h y + b^T y over y >= 0 by a primal active-set method."""
    k = b.size
    y = np.maximum(y0, 0.0)
    free = y > 0
    if not free.any():
        free[np.argmin(b)] = True
        y[:] = 0.0
    for _ in range(10 * k + 50):
        z = np.zeros(k)
        idx = np.flatnonzero(free)
        hf = h[np.ix_(idx, idx)]
        try:
            z[idx] = np.linalg.solve(hf, -b[idx])
        except np.linalg.LinAlgError:
            z[idx] = np.linalg.lstsq(hf, -b[idx], rcond=None)[0]
        if np.all(z[idx] > 0):
            y = z
            grad = h @ y + b
            cand = (~free) & (grad < -tol)
            if not cand.any():
                return y
            free[np.flatnonzero(cand)[np.argmin(grad[cand])]] = True
        else:
            blocking = idx[z[idx] <= 0]
            ratios = y[blocking] / (y[blocking] - z[blocking])
            alpha = float(np.min(ratios))
            y = y + alpha * (z - y)
            hit = blocking[ratios <= alpha * (1 + 1e-12)]
            y[hit] = 0.0
            free[hit] = False
            y[~free] = 0.0
            if not free.any():
                free[np.argmin(b)] = True
    return np.maximum(y, 0.0)


#: Cold starts on more than 4x this many observations are pre-solved on a subsample.
_PRESOLVE_N = 50_000

#: The Hessian of k components is formed from at least this many observations per
#: component (all of them when there are fewer): a sample of m observations gives a
#: Hessian of rank <= m, which must not be small relative to k.
_HESSIAN_ROWS_PER_COMPONENT = 20

#: Cold starts on more components than this first solve every other component.
_COARSE_K = 200

#: Iterations that may use a subsampled Hessian. A subsample can miss the observations
#: that dominate the Hessian (those with a small likelihood u_i: it weighs them by
#: 1 / u_i^2), and the iterations then converge only linearly; later ones use all n.
_SUBSAMPLED_ITERATIONS = 30


def mixsqp(
    lik: torch.Tensor,
    pi_init: torch.Tensor | None = None,
    *,
    tol: float = 1e-8,
    max_iter: int = 1000,
    hessian_budget: float = 5e7,
) -> torch.Tensor:
    """Maximum-likelihood weights for the (K, n) likelihood matrix ``lik`` (float64).

    Columns may be scaled by any positive constant (e.g. divided by their maximum); the
    weights do not change. ``pi_init`` (on the simplex) is the warm start; the returned
    weights are never worse than it. Returns a (K,) float64 tensor on ``lik``'s device.

    Iterates until the certificate ``min(g + 1) >= -tol`` holds (log-likelihood within
    ``n * tol`` of the maximum), for any K. The QP of each iteration involves only the
    components that carry weight or whose gradient invites them in; the others stay at
    zero for that iteration (the certificate still checks all K). The Hessian of those k
    components is formed from ``max(hessian_budget / k^2, 20 k)`` evenly spaced
    observations (all n when that is at least n), for the first
    ``_SUBSAMPLED_ITERATIONS`` iterations; after them, or when a step from the subsampled
    Hessian makes no progress, from all n. Cold starts on more than 200 components first
    solve every other component, and cold starts on more than 200,000 observations an
    evenly spaced subsample of 50,000. A ``RuntimeWarning`` is issued (and the weights
    reached are returned) only if the certificate still fails after ``max_iter``
    iterations or no step improves the objective in floating point.
    """
    w, gap = _solve(lik, pi_init, tol, max_iter, hessian_budget)
    k, n = lik.shape
    sink = _SHORTFALLS.get()
    if gap > tol and sink is not None:  # inside an EBMF fit: reported once, at its end
        sink.append((k, n, n * gap))
    elif gap > tol:
        warnings.warn(
            f"mix-SQP stopped short of its certificate ({k} components, {n} observations): "
            f"the log-likelihood may be up to {n * gap:.3g} below the maximum (target "
            f"{n * tol:.3g}).",
            RuntimeWarning,
            stacklevel=2,
        )
    return w


def _solve(lik, pi_init, tol: float, max_iter: int, hessian_budget: float):
    """mix-SQP from ``pi_init`` (or a cold start): ``(weights, gap)`` with gap the
    certificate's max_k(-g_k - 1) at the weights returned."""
    k, n = lik.shape
    if k == 1:
        return torch.ones(1, dtype=lik.dtype, device=lik.device), 0.0
    if pi_init is None and n >= 4 * _PRESOLVE_N:
        # a cold start on many observations: solve an evenly spaced subsample first and
        # start from its weights (the full problem then needs a few iterations, not ~15)
        sub = lik[:, :: n // _PRESOLVE_N].contiguous()
        pi_init = _solve(sub, None, tol, max_iter, hessian_budget)[0]
    if pi_init is None and k > _COARSE_K:
        # a cold start on a fine grid: solve every other component first (neighbouring
        # components of a fine grid are nearly collinear, and the QPs of a cold start on
        # all of them carry hundreds of components for dozens of iterations)
        pi_init = torch.zeros(k, dtype=lik.dtype, device=lik.device)
        pi_init[::2] = _solve(lik[::2], None, tol, max_iter, hessian_budget)[0]
    w, u = _start(lik, pi_init)
    obj = -torch.log(u).mean().item() + 1.0
    for it in range(max_iter + 1):
        g1 = (1.0 - (lik @ (1.0 / u)) / n).cpu().numpy()
        gap = -float(g1.min())
        if gap <= tol or it == max_iter:
            break
        budget = hessian_budget if it < _SUBSAMPLED_ITERATIONS else math.inf
        step = _sqp_step(lik, w, u, obj, g1, tol, budget)
        if step is None:
            break
        w, u, obj = step
    return _prune(lik, w, obj), gap


#: A warm start is mixed half and half with uniform weights when it gives some
#: observation a likelihood below this fraction of the uniform weights' (e.g. a one-hot
#: start, 1e-157 for an outlier): the Hessian weighs observations by 1 / u_i^2, which would
#: overflow.
_START_FLOOR = 1e-6


def _start(lik: torch.Tensor, pi_init: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The starting weights w and u = w A: ``pi_init`` on the simplex, else uniform; mixed
    with uniform if they give some observation (nearly) zero likelihood."""
    k = lik.shape[0]
    if pi_init is None:
        w = torch.full((k,), 1.0 / k, dtype=lik.dtype, device=lik.device)
        return w, w @ lik
    w = pi_init.to(device=lik.device, dtype=lik.dtype).clamp(min=0.0)
    w = w / w.sum()
    u = w @ lik
    uniform = lik.mean(0)  # u of the uniform weights
    if not bool((u > _START_FLOOR * uniform).all()):
        w, u = 0.5 * w + 0.5 / k, 0.5 * u + 0.5 * uniform
    return w, u


def _hessian(lik, act: np.ndarray, inv_u: torch.Tensor, rows: float) -> np.ndarray:
    """H = (1/m) A_S diag(1/u)^2 A_S^T over the components ``act`` and m evenly spaced
    observations (every ``ceil(n / rows)``-th: all n when ``rows >= n``), plus a tiny
    ridge."""
    step = max(1, math.ceil(lik.shape[1] / rows))
    # rows of lik are contiguous: gather the active ones from strided views (a loop over
    # components, not observations)
    sub = torch.stack([lik[j, ::step] for j in act.tolist()]) * inv_u[::step]
    h = ((sub @ sub.T) / sub.shape[1]).cpu().numpy()
    del sub
    h[np.diag_indices(act.size)] += 1e-10 * max(float(np.trace(h)) / act.size, 1e-300)
    return h


def _sqp_step(lik, w, u, obj: float, g1: np.ndarray, tol: float, hessian_budget: float):
    """One mix-SQP iteration from weights ``w`` (u = w A, obj = F(w), g1 = grad F):
    ``(w, u, obj)`` after a backtracking step along the QP's direction, or None when no
    direction improves F (first from a subsampled Hessian, then from the full one)."""
    k, n = lik.shape
    w_np = w.cpu().numpy()
    act = np.flatnonzero((w_np > 0) | (g1 < 0))
    rows = max(hessian_budget / act.size**2, _HESSIAN_ROWS_PER_COMPONENT * act.size)
    tries = [rows] if rows >= n else [rows, n]
    inv_u = 1.0 / u
    for m in tries:
        h = _hessian(lik, act, inv_u, m)
        y = np.zeros(k)
        # the QP starts from the empty set: its solution is sparse, and adding components
        # one at a time is far cheaper than removing them from a large start
        y[act] = _box_qp(h, g1[act] - h @ w_np[act], np.zeros(act.size), tol * 1e-2)
        found = _line_search(lik, w, u, obj, g1, y - w_np)
        if found is not None:
            return found
    return None


def _line_search(lik, w, u, obj: float, g1: np.ndarray, p_np: np.ndarray):
    """Backtracking (Armijo) along ``p`` from ``w``; the new point renormalised to the
    simplex (which only lowers F), or None."""
    slope = float(g1 @ p_np)
    if not slope < 0:
        return None
    p = torch.as_tensor(p_np, dtype=lik.dtype, device=lik.device)
    lik_p = torch.zeros_like(u)
    for j in np.flatnonzero(p_np).tolist():
        lik_p.add_(lik[j], alpha=float(p_np[j]))
    t = 1.0
    for _ in range(50):
        u_new = u + t * lik_p
        if bool((u_new > 0).all()):
            obj_new = -torch.log(u_new).mean().item() + (w + t * p).sum().item()
            if obj_new <= obj + 0.01 * t * slope:
                # (1 - t) w + t y >= 0 stays feasible
                w_new = w + t * p
                total = w_new.sum()
                u_new = u_new / total
                return w_new / total, u_new, -torch.log(u_new).mean().item() + 1.0
        t *= 0.5
    return None


def _prune(lik: torch.Tensor, w: torch.Tensor, obj: float) -> torch.Tensor:
    """Weights below 1e-14 of the largest set to zero, unless that costs more than
    1e-12 per observation (a tiny weight that alone explains some observation)."""
    pruned = torch.where(w < 1e-14 * w.max(), 0.0, w)
    pruned = pruned / pruned.sum()
    u = pruned @ lik
    if bool((u > 0).all()) and -torch.log(u).mean().item() + 1.0 <= obj + 1e-12:
        return pruned
    return w
