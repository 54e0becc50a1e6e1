"""Maximum-likelihood mixture weights by sequential quadratic programming (mix-SQP).

Solves  max_{pi in simplex} sum_i log sum_k L_ik pi_k  for a fixed likelihood matrix L
(Kim, Carbonetto and Stephens 2020). As there, the equality constraint is relaxed:

    minimise  F(w) = -(1/n) sum_i log (L w)_i + sum_k w_k   over  w >= 0,

whose minimiser lies on the simplex. Each iteration forms the exact gradient
g = -(1/n) L^T (1 / Lw) and Hessian H = (1/n) L^T diag(1 / Lw)^2 L on the data's device
(one GEMM), solves the K x K box QP  min_p 1/2 p^T H p + (g + 1)^T p,  w + p >= 0
by a primal active-set method on the host, and backtracks on F.

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


def mixsqp(
    lik: torch.Tensor,
    pi_init: torch.Tensor | None = None,
    *,
    tol: float = 1e-8,
    max_iter: int = 200,
) -> torch.Tensor:
    """Maximum-likelihood weights for the (n, K) likelihood matrix ``lik`` (float64).

    Rows may be scaled by any positive constant (e.g. divided by their maximum); the
    weights do not change. ``pi_init`` (on the simplex) is the warm start; the returned
    weights are never worse than it. Returns a (K,) float64 tensor on ``lik``'s device.
    """
    n, k = lik.shape
    if k == 1:
        return torch.ones(1, dtype=lik.dtype, device=lik.device)
    if pi_init is None:
        w = torch.full((k,), 1.0 / k, dtype=lik.dtype, device=lik.device)
    else:
        w = pi_init.to(lik.dtype).clamp(min=0.0)
        w = w / w.sum()
        u = lik @ w
        if not bool((u > 0).all()):
            # the warm start gives zero likelihood to some observation: mix in uniform
            w = 0.5 * w + 0.5 / k
    u = lik @ w
    obj = -torch.log(u).mean().item() + 1.0
    for _ in range(max_iter):
        inv_u = 1.0 / u
        grad = -(lik.T @ inv_u) / n
        grad1 = grad + 1.0
        if grad1.min().item() >= -tol:
            break
        scaled = lik * inv_u[:, None]
        hess = (scaled.T @ scaled) / n
        h = hess.cpu().numpy()
        h[np.diag_indices(k)] += 1e-10 * max(float(np.trace(h)) / k, 1e-300)
        g1 = grad1.cpu().numpy()
        w_np = w.cpu().numpy()
        y = _box_qp(h, g1 - h @ w_np, w_np, tol * 1e-2)
        p = torch.as_tensor(y - w_np, dtype=lik.dtype, device=lik.device)
        slope = float(g1 @ (y - w_np))
        if not slope < 0:
            break
        t = 1.0
        improved = False
        lik_p = lik @ p
        for _ in range(50):
            w_new = w + t * p
            u_new = u + t * lik_p
            if bool((u_new > 0).all()):
                obj_new = -torch.log(u_new).mean().item() + w_new.sum().item()
                if obj_new <= obj + 0.01 * t * slope:
                    improved = True
                    break
            t *= 0.5
        if not improved:
            break
        w_new = w_new.clamp(min=0.0)
        total = w_new.sum()
        w = w_new / total
        u = lik @ w
        obj = -torch.log(u).mean().item() + 1.0
    return w / w.sum()
