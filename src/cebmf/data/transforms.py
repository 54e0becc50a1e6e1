"""Count transforms that keep sparse matrices sparse and never modify the input."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def log1p_normalize(
    x,
    target_sum: float = 1e4,
    size_factors: np.ndarray | None = None,
    totals: np.ndarray | None = None,
):
    """log1p(x_ij * target_sum / total_i): library-size normalisation then log1p.

    Applied to the stored non-zeros only, so sparsity is kept (log1p(0) = 0). ``total_i``
    is the row sum (or the given ``totals``, e.g. over all genes when ``x`` is a subset),
    or ``size_factors * mean(totals)`` when size factors are given. Returns a new matrix of
    the input's kind (CSR for sparse input, float64).
    """
    if target_sum <= 0:
        raise ValueError(f"target_sum must be > 0, got {target_sum}.")
    if sp.issparse(x):
        out = sp.csr_matrix(x, dtype=np.float64, copy=True)
        if out.nnz and out.data.min() < 0:
            raise ValueError("counts must be non-negative for log1p normalisation.")
        row_sums = np.asarray(out.sum(1)).ravel()
    else:
        out = np.array(x, dtype=np.float64, copy=True)
        if out.size and np.nanmin(out) < 0:
            raise ValueError("counts must be non-negative for log1p normalisation.")
        row_sums = np.nansum(out, 1)
    if totals is None:
        totals = row_sums
    totals = np.asarray(totals, dtype=np.float64).ravel()
    if totals.shape != row_sums.shape:
        raise ValueError("totals must have one entry per row.")
    if size_factors is not None:
        sf = np.asarray(size_factors, dtype=np.float64).ravel()
        if sf.shape != totals.shape or not np.all(sf > 0):
            raise ValueError("size_factors must be positive, one per row.")
        totals = sf * totals.mean()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    if sp.issparse(out):
        out.data *= np.repeat(scale, np.diff(out.indptr))
        np.log1p(out.data, out=out.data)
    else:
        out *= scale[:, None]
        np.log1p(out, out=out)
    return out
