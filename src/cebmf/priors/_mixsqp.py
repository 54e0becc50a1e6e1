"""Maximum-likelihood mixture weights by sequential quadratic programming (mix-SQP).

Solves  max_{pi in simplex} sum_i log sum_k A_ki pi_k  for a fixed (K, n) likelihood
matrix A (Kim, Carbonetto and Stephens 2020). As there, the equality constraint is relaxed:

    minimise  F(w) = -(1/n) sum_i log (A^T w)_i + sum_k w_k   over  w >= 0,

whose minimiser lies on the simplex. Each iteration forms the exact gradient
g = -(1/n) A (1 / A^T w) on the data's device (a matrix-vector product) and the Hessian
H = (1/n) A diag(1 / A^T w)^2 A^T (one GEMM over the components in play; from an evenly
spaced subsample of observations when that GEMM would be large, which changes the search
direction but neither the objective nor the stopping rule), solves the box QP
min_p 1/2 p^T H p + (g + 1)^T p,  w + p >= 0  by a primal active-set method on the host,
and backtracks on F.

Certificate: for pi on the simplex and any optimum pi*, by concavity
loglik(pi*) - loglik(pi) <= n * (max_k(-g_k) - 1), so stopping at
``min(g + 1) >= -tol`` bounds the log-likelihood gap by ``n * tol``.
"""

from __future__ import annotations

import numpy as np
import torch


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


def mixsqp(
    lik: torch.Tensor,
    pi_init: torch.Tensor | None = None,
    *,
    tol: float = 1e-8,
    max_iter: int = 200,
    hessian_budget: float = 5e7,
) -> torch.Tensor:
    """Maximum-likelihood weights for the (K, n) likelihood matrix ``lik`` (float64).

    Columns may be scaled by any positive constant (e.g. divided by their maximum); the
    weights do not change. ``pi_init`` (on the simplex) is the warm start; the returned
    weights are never worse than it. Returns a (K,) float64 tensor on ``lik``'s device.

    The QP of each iteration involves only the components that carry weight or whose
    gradient invites them in; the others stay at zero for that iteration (the stopping
    rule still checks all K). The Hessian of those k components is formed from at most
    ``hessian_budget / k^2`` evenly spaced observations.
    """
    k, n = lik.shape
    if k == 1:
        return torch.ones(1, dtype=lik.dtype, device=lik.device)
    if pi_init is None and n >= 4 * _PRESOLVE_N:
        # a cold start on many observations: solve an evenly spaced subsample first and
        # start from its weights (the full problem then needs a few iterations, not ~15)
        step = n // _PRESOLVE_N
        pi_init = mixsqp(
            lik[:, ::step].contiguous(),
            None,
            tol=tol,
            max_iter=max_iter,
            hessian_budget=hessian_budget,
        )
    if pi_init is None:
        w = torch.full((k,), 1.0 / k, dtype=lik.dtype, device=lik.device)
    else:
        w = pi_init.to(lik.dtype).clamp(min=0.0)
        w = w / w.sum()
    u = w @ lik
    if not bool((u > 0).all()):
        # the warm start gives zero likelihood to some observation: mix in uniform
        w = 0.5 * w + 0.5 / k
        u = w @ lik
    obj = -torch.log(u).mean().item() + 1.0
    for _ in range(max_iter):
        inv_u = 1.0 / u
        grad1 = 1.0 - (lik @ inv_u) / n
        g1 = grad1.cpu().numpy()
        if g1.min() >= -tol:
            break
        w_np = w.cpu().numpy()
        act = np.flatnonzero((w_np > 0) | (g1 < 0))
        step = max(1, int(np.ceil(n * act.size**2 / hessian_budget)))
        # rows of lik are contiguous: gather the active ones from strided views (a loop
        # over components, not observations)
        sub = torch.stack([lik[j, ::step] for j in act.tolist()]) * inv_u[::step]
        h = ((sub @ sub.T) / sub.shape[1]).cpu().numpy()
        del sub
        h[np.diag_indices(act.size)] += 1e-10 * max(float(np.trace(h)) / act.size, 1e-300)
        y = np.zeros(k)
        y[act] = _box_qp(h, g1[act] - h @ w_np[act], w_np[act], tol * 1e-2)
        slope = float(g1 @ (y - w_np))
        if not slope < 0:
            break
        p_np = y - w_np
        p = torch.as_tensor(p_np, dtype=lik.dtype, device=lik.device)
        lik_p = torch.zeros_like(u)
        for j in np.flatnonzero(p_np).tolist():
            lik_p.add_(lik[j], alpha=float(p_np[j]))
        t = 1.0
        improved = False
        for _ in range(50):
            u_new = u + t * lik_p
            if bool((u_new > 0).all()):
                obj_new = -torch.log(u_new).mean().item() + (w + t * p).sum().item()
                if obj_new <= obj + 0.01 * t * slope:
                    improved = True
                    break
            t *= 0.5
        if not improved:
            break
        # (1 - t) w + t y >= 0 stays feasible; renormalising to the simplex only lowers F
        w = w + t * p
        total = w.sum()
        w = w / total
        u = u_new / total
        obj = -torch.log(u).mean().item() + 1.0
    # weights below 1e-14 of the largest change the log-likelihood by < n * 1e-14
    w = torch.where(w < 1e-14 * w.max(), 0.0, w)
    return w / w.sum()
