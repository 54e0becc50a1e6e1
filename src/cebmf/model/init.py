"""Initialisation of a new factor from the implicit residual Y - L F^T.

The leading singular pair comes from a randomised range finder with power iterations
(Halko, Martinsson and Tropp 2011) applied through residual products only; for
nonnegative priors the sign is chosen to put the mass on the constrained side(s), then
projected alternating power steps (u = max(R v, 0), v = max(R^T u, 0)) refine it.

Successive calls of a greedy fit can share a :class:`InitBasis`: each call keeps the
trailing right singular vectors of its block, and the next call starts its block from
them (plus one random column) instead of from random columns alone. After a factor close
to the leading pair is added, the residual's leading singular vectors lie mostly in that
span, so two power iterations then give what four give from a random start.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .engine import Engine


@dataclass
class InitBasis:
    """Warm start of :func:`leading_pair` across the greedy additions of one fit:
    ``vectors`` (P x (rank - 1)) are the right singular vectors of the last call's block
    after its leading one, or None before the first call."""

    vectors: torch.Tensor | None = None


def _orth(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(m.to(torch.float64))[0].to(m.dtype).contiguous()


def leading_pair(
    engine: Engine,
    generator: torch.Generator,
    *,
    nonneg_l: bool = False,
    nonneg_f: bool = False,
    rank: int = 6,
    power_iter: int = 4,
    nonneg_iter: int = 30,
    basis: InitBasis | None = None,
    warm_power_iter: int = 2,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(l, f)`` with l f^T the best rank-one approximation of the residual (under the
    sign constraints), scaled evenly; None when the residual has nothing left.

    With ``basis``, the block starts from ``basis.vectors`` when they fit (then
    ``warm_power_iter`` power iterations instead of ``power_iter``), and ``basis`` is
    updated for the next call."""
    n, p = engine.data.shape
    dt, dev = engine.data.dtype, engine.data.device
    r = max(1, min(rank, n, p))
    omega = torch.randn(p, r, generator=generator, dtype=torch.float64).to(dev, dt)
    iterations = power_iter
    warm = None if basis is None else basis.vectors
    if warm is not None and r > 1 and warm.shape == (p, r - 1):
        omega[:, : r - 1] = warm.to(dev, dt)
        iterations = warm_power_iter
    q = _orth(engine.resid_matmul(omega))
    for _ in range(iterations):
        q = _orth(engine.resid_matmul(_orth(engine.resid_rmatmul(q))))
    bt = engine.resid_rmatmul(q)  # (P, r) = (Q^T R)^T
    u_b, sv, vh = torch.linalg.svd(bt.T.to(torch.float64), full_matrices=False)
    if basis is not None:
        basis.vectors = vh[1:].T.to(dt).contiguous() if r > 1 else None
    if not float(sv[0]) > 0:
        return None
    u = (q.to(torch.float64) @ u_b[:, 0]).to(dt)
    v = vh[0].to(dt)
    d = float(sv[0])
    if nonneg_l or nonneg_f:

        def score(uu, vv):
            return (uu.clamp(min=0).norm() ** 2 if nonneg_l else 0) + (
                vv.clamp(min=0).norm() ** 2 if nonneg_f else 0
            )

        if float(score(-u, -v)) > float(score(u, v)):
            u, v = -u, -v
        for _ in range(nonneg_iter):
            if nonneg_l:
                u = u.clamp(min=0)
            nu = u.norm()
            if not float(nu) > 0:
                return None
            u = u / nu
            v_new = engine.resid_rmatmul(u[:, None])[:, 0]
            if nonneg_f:
                v_new = v_new.clamp(min=0)
            d = float(v_new.norm())
            if not d > 0:
                return None
            v_new = v_new / d
            done = float((v_new - v).norm()) < 1e-6
            v = v_new
            u = engine.resid_matmul(v[:, None])[:, 0]
            if done:
                break
        if nonneg_l:
            u = u.clamp(min=0)
        d = float(u.norm())
        if not d > 0:
            return None
        u = u / d
    root = d**0.5
    return u * root, v * root
