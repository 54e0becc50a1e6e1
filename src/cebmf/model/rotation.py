"""Sparsity-seeking rotations of the learned factors, proposed between greedy and backfit.

Greedy factors are leading singular pairs of the residual: with several factors of
similar size, each is a mixture of true factors, and backfitting untangles them only one
slow coordinate step at a time (on make_data.py's dense case: 76 sweeps, with the loadings'
pi0 climbing from 0.35-0.63 to 0.8 factor after factor). The product L F^T does not change
under L -> L T, F -> F T^{-T}, so a rotation is a free move of the mean structure; the one
that makes one side sparsest is a good guess of where the sparse priors want to go.

The rotation is found by varimax (Kaiser 1958) on the scaled loadings of that side of
L F^T = U S V^T, A = U S^{1/2} (or V S^{1/2}): maximise
sum_k [ sum_i lam_ik^4 - (sum_i lam_ik^2)^2 / n ] over orthogonal R with lam = A R, by
the usual SVD fixed point R <- P Q^T, where P D Q^T = A^T (lam^3 - lam diag(lam^T lam) / n).
Then L' = U S^{1/2} R and F' = V S^{1/2} R, columns rescaled to equal norms on both sides.
(Varimax of the orthonormal U instead lets the directions of tiny singular values, noise
and outlier factors, pull the rotation: on the counts case its first sweep ends 69,000
nats lower.)
"""

from __future__ import annotations

import torch

_F64 = torch.float64


def varimax(u: torch.Tensor, max_iter: int = 500, tol: float = 1e-10) -> torch.Tensor:
    """Orthogonal K x K rotation R maximising the varimax criterion of ``u @ R``.

    Parameters
    ----------
    u
        n x K matrix (float64), typically with orthonormal columns.
    max_iter, tol
        Stop when the criterion's SVD bound rises by less than a factor ``1 + tol``.
    """
    n, k = u.shape
    rot = torch.eye(k, dtype=u.dtype, device=u.device)
    bound = 0.0
    for _ in range(max_iter):
        lam = u @ rot
        grad = u.T @ (lam * lam * lam - lam * ((lam * lam).sum(0) / n))
        p, d, qt = torch.linalg.svd(grad)
        rot = p @ qt
        new = float(d.sum())
        if new <= bound * (1.0 + tol):
            break
        bound = new
    return rot


def sparse_rotation(
    lmean: torch.Tensor, fmean: torch.Tensor, side: str
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Transforms ``(T_l, T_f)`` with ``L T_l (F T_f)^T = L F^T`` and ``L T_l`` (side
    ``loadings``) or ``F T_f`` (side ``factors``) varimax-rotated; None when L or F is
    rank deficient (a rotation would not keep L F^T).

    Columns are signed so that their third moment is nonnegative (for nonnegative priors,
    the heavy side up) and ordered as they come from varimax.
    """
    lm, fm = lmean.to(_F64), fmean.to(_F64)
    if lm.shape[1] > min(lm.shape[0], fm.shape[0]):  # more factors than the rank allows
        return None
    # the split of each factor's scale between L and F is arbitrary (and can drift to
    # 1e-10 vs 1e10): balance it first, so that rank checks compare like with like
    ln, fn = lm.norm(dim=0), fm.norm(dim=0)
    if not bool(((ln > 0) & (fn > 0)).all()):
        return None
    balance = torch.sqrt(fn / ln)
    lm, fm = lm * balance, fm / balance
    rl = torch.linalg.qr(lm, mode="r")[1]
    rf = torch.linalg.qr(fm, mode="r")[1]
    for r in (rl, rf):
        diag = torch.diagonal(r).abs()
        if not bool(diag.min() > 1e-10 * diag.max()):
            return None
    u_c, s, vt_c = torch.linalg.svd(rl @ rf.T)
    if not bool(s.min() > 1e-12 * s.max()):
        return None
    # U = Ql u = L Rl^{-1} u and V = Qf v = F Rf^{-1} v. Varimax acts on the scaled
    # loadings U S^1/2 (as in PCA + varimax): the directions of small singular values
    # (noise, outliers) then weigh little. L' = U S^1/2 R, F' = V S^1/2 R.
    root = s.sqrt()
    t_l = torch.linalg.solve_triangular(rl, u_c * root, upper=True)
    t_f = torch.linalg.solve_triangular(rf, vt_c.T * root, upper=True)
    rot = varimax(lm @ t_l if side == "loadings" else fm @ t_f)
    t_l, t_f = t_l @ rot, t_f @ rot
    # sign: third moment of the sparse side nonnegative (the heavy tail up, for nonnegative
    # priors); scale: equal norms on both sides
    sparse = (lm @ t_l) if side == "loadings" else (fm @ t_f)
    sign = torch.where((sparse**3).sum(0) < 0, -1.0, 1.0).to(_F64)
    scale = torch.sqrt((fm @ t_f).norm(dim=0) / (lm @ t_l).norm(dim=0))
    return balance[:, None] * t_l * (sign * scale), t_f * (sign / scale) / balance[:, None]
