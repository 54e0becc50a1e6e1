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
        if sf.shape != totals.shape:
            raise ValueError(
                f"size_factors has {sf.size} entries but the matrix has {totals.size} rows; "
                "give one per row (cell)."
            )
        ok = np.isfinite(sf) & (sf > 0)
        if not ok.all():
            raise ValueError(
                f"size_factors must be positive and finite; {int(np.count_nonzero(~ok))} "
                "entries are not (zero, negative, NaN or Inf)."
            )
        totals = sf * totals.mean()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    if sp.issparse(out):
        scale_rows_inplace(out, scale)
        np.log1p(out.data, out=out.data)
    else:
        out *= scale[:, None]
        np.log1p(out, out=out)
    return out


def canonical_sparse(x):
    """A CSR or CSC matrix with sorted indices and no duplicate entries: ``x`` itself when it
    already is one, else a new matrix (CSR for other sparse formats, whose conversion sums
    duplicates). Entry-wise formulas (log1p, thresholds) need each entry stored once:
    log1p(a) + log1p(b) is not log1p(a + b). The input is never modified."""
    if x.format not in ("csr", "csc"):
        return sp.csr_matrix(x)
    if x.has_canonical_format:
        return x
    out = x.copy()
    out.sum_duplicates()
    return out


def row_blocks(indptr: np.ndarray, nnz: int) -> list[tuple[int, int]]:
    """Consecutive row ranges ``(start, stop)`` of a CSR holding about ``nnz`` stored
    values each (a row with more is a block of its own)."""
    n = indptr.size - 1
    blocks, start = [], 0
    while start < n:
        stop = int(np.searchsorted(indptr, indptr[start] + nnz, side="right")) - 1
        stop = min(max(stop, start + 1), n)
        blocks.append((start, stop))
        start = stop
    return blocks


def scale_rows_inplace(csr: sp.csr_matrix, scale: np.ndarray, chunk: int = 1 << 20) -> None:
    """``csr[i, :] *= scale[i]`` on the stored values, in row blocks of about ``chunk``
    non-zeros (no temporary of the size of the matrix)."""
    indptr = csr.indptr
    for start, stop in row_blocks(indptr, chunk):
        a, b = indptr[start], indptr[stop]
        csr.data[a:b] *= np.repeat(scale[start:stop], np.diff(indptr[start : stop + 1]))


def column_sums_of_squares(csr: sp.spmatrix, chunk: int = 1 << 20) -> np.ndarray:
    """sum_i x_ij^2 per column, in blocks of ``chunk`` stored values (CSR or CSC, no copy;
    other sparse formats are converted to CSR)."""
    if csr.format == "csc":
        return row_sums_of_squares(csr.T, chunk)
    if csr.format != "csr":
        csr = sp.csr_matrix(csr)
    out = np.zeros(csr.shape[1])
    for a in range(0, csr.nnz, chunk):
        b = min(a + chunk, csr.nnz)
        out += np.bincount(
            csr.indices[a:b],
            weights=np.square(csr.data[a:b], dtype=np.float64),
            minlength=csr.shape[1],
        )
    return out


def row_sums_of_squares(csr: sp.spmatrix, chunk: int = 1 << 20) -> np.ndarray:
    """sum_j x_ij^2 per row, in row blocks of about ``chunk`` stored values (CSR or CSC, no
    copy; other sparse formats are converted to CSR)."""
    if csr.format == "csc":
        return column_sums_of_squares(csr.T, chunk)
    if csr.format != "csr":
        csr = sp.csr_matrix(csr)
    out = np.zeros(csr.shape[0])
    indptr = csr.indptr
    for start, stop in row_blocks(indptr, chunk):
        a, b = indptr[start], indptr[stop]
        sq = np.square(csr.data[a:b], dtype=np.float64)
        rows = np.repeat(np.arange(stop - start), np.diff(indptr[start : stop + 1]))
        out[start:stop] = np.bincount(rows, weights=sq, minlength=stop - start)
    return out
