"""Data operators: the matrix Y (N x P) as the engine sees it.

The engine never touches Y's entries directly; it asks for products ``Y @ B`` and
``Y.T @ A`` (and, for dense data with missing entries, the dense matrix and its mask) and
for the sums of squares of each row and column, computed once. Sparse data stay sparse
(see :class:`SparseData`). An implicit low-rank offset ``Y - U V^T`` (e.g. column
centring) is applied inside the products and never materialised.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod

import numpy as np
import scipy.sparse as sp
import torch

from .transforms import (
    canonical_sparse,
    column_sums_of_squares,
    row_blocks,
    row_sums_of_squares,
)

_F64 = torch.float64
#: Index arrays (indptr counts stored entries) switch to int64 from this size on.
_INT32_LIMIT = 2**31


def _torch_csr(mat: sp.csr_matrix, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A torch CSR tensor from a canonical scipy CSR matrix: int32 indices (int64 from 2^31
    stored entries on); on the CPU it shares the arrays that need no conversion."""
    index = np.int32 if max(mat.nnz, *mat.shape) < _INT32_LIMIT else np.int64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(
            torch.from_numpy(mat.indptr.astype(index, copy=False)),
            torch.from_numpy(mat.indices.astype(index, copy=False)),
            torch.from_numpy(np.asarray(mat.data)).to(dtype),
            size=mat.shape,
            check_invariants=False,
        ).to(device)


class DataMatrix(ABC):
    """The data matrix Y behind products, sums of squares and (optionally) a mask.

    Attributes
    ----------
    shape
        (N, P).
    row_sq, col_sq
        Sums of squares of the observed entries of each row / column (float64).
    n_obs_row, n_obs_col
        Number of observed entries per row / column (float64).
    mask
        None, or the (N, P) 0/1 matrix of observed entries (dense data only).
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    row_sq: torch.Tensor
    col_sq: torch.Tensor
    n_obs_row: torch.Tensor
    n_obs_col: torch.Tensor
    mask: torch.Tensor | None = None

    @property
    def is_sparse(self) -> bool:
        return False

    @abstractmethod
    def matmul(self, b: torch.Tensor) -> torch.Tensor:
        """``Y @ b`` for a (P, k) matrix (missing entries count as 0), accumulated and
        returned in float64 whatever the compute dtype: the engine subtracts L (F^T b) from
        it, and a float32 sum over P entries would leave an error of the size of the
        residual it is after (the fit would stall; see docs/engine.md)."""

    @abstractmethod
    def rmatmul(self, a: torch.Tensor) -> torch.Tensor:
        """``Y.T @ a`` for an (N, k) matrix (missing entries count as 0), in float64."""

    @property
    def n_obs(self) -> float:
        return float(self.n_obs_row.sum())


class DenseData(DataMatrix):
    """A dense matrix; NaN entries are missing (``mask``), stored as 0 in ``values``."""

    def __init__(self, y: torch.Tensor) -> None:
        self.shape = (int(y.shape[0]), int(y.shape[1]))
        self.dtype, self.device = y.dtype, y.device
        missing = torch.isnan(y)
        if bool(missing.any()):
            self.mask = (~missing).to(y.dtype)
            self.values = torch.where(missing, torch.zeros((), dtype=y.dtype, device=y.device), y)
        else:
            self.mask = None
            self.values = y
        sq = self.values.to(_F64) ** 2
        self.row_sq, self.col_sq = sq.sum(1), sq.sum(0)
        del sq
        if self.mask is None:
            n, p = self.shape
            self.n_obs_row = torch.full((n,), float(p), dtype=_F64, device=self.device)
            self.n_obs_col = torch.full((p,), float(n), dtype=_F64, device=self.device)
        else:
            self.n_obs_row = self.mask.sum(1, dtype=_F64)
            self.n_obs_col = self.mask.sum(0, dtype=_F64)

    def _row_blocks(self):
        """Row blocks of float32 values upcast to float64 (no float64 copy of Y)."""
        n, p = self.shape
        rows = max(1, _DENSE_BLOCK // max(p, 1))
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            yield start, stop, self.values[start:stop].to(_F64)

    def matmul(self, b):
        b = b.to(_F64)
        if self.values.dtype == _F64:
            # (b^T Y^T)^T: a row-major Y times a thin b is ~3x slower as Y @ b on CPU
            return (b.T @ self.values.T).T.contiguous()
        out = torch.empty((self.shape[0], *b.shape[1:]), dtype=_F64, device=self.device)
        for start, stop, block in self._row_blocks():
            out[start:stop] = (b.T @ block.T).T
        return out

    def rmatmul(self, a):
        a = a.to(_F64)
        if self.values.dtype == _F64:
            # (a^T Y)^T reads Y row-major; Y.T @ a with several columns is ~3x slower on CPU
            return (a.T @ self.values).T.contiguous()
        out = torch.zeros((self.shape[1], *a.shape[1:]), dtype=_F64, device=self.device)
        for start, stop, block in self._row_blocks():
            out += (a[start:stop].T @ block).T
        return out


class SparseData(DataMatrix):
    """A sparse matrix (absent entries are zeros, never missing).

    Two backends compute the products ``Y @ B`` and ``Y.T @ A``:

    - ``"torch"``: two torch CSRs, of Y and of Y^T (torch's ``X.t() @ U`` on a CSR is ~30x
      slower than a CSR of X^T). On the CPU the CSR of Y shares the caller's arrays and Y^T
      is one transposed copy (the matrix twice in memory); torch's kernels use every
      intra-op thread, 2-3x faster than scipy's on 2 cores. The only backend on a GPU.
    - ``"scipy"``: scipy's single-threaded CSR kernels on the canonical CSR itself
      (``Y.T @ a`` is a CSC view of the same arrays: no transposed copy). With float32
      values (as in most h5ad files) the values are not copied either: the products
      upcast row blocks, exactly.

    The products accumulate in float64 whatever the compute dtype, so the torch CSRs hold
    float64 values. ``"auto"`` picks ``"torch"`` unless the values would need a converted
    copy on the CPU (float32 values), where ``"scipy"`` keeps the memory at one matrix.
    ``fit_ebmf(..., sparse_backend="scipy")`` fits a matrix that fits in memory once but not
    twice.
    """

    def __init__(
        self,
        mat: sp.spmatrix,
        dtype: torch.dtype,
        device: torch.device,
        backend: str = "auto",
    ) -> None:
        if backend not in ("auto", "scipy", "torch"):
            raise ValueError(f"backend must be 'auto', 'scipy' or 'torch', got {backend!r}")
        if backend == "scipy" and device.type != "cpu":
            raise ValueError("backend='scipy' needs device='cpu'")
        # shares the arrays of a canonical CSR input; sorting / summing duplicates is done
        # on a copy, never on the caller's
        csr = canonical_sparse(sp.csr_matrix(mat))
        # the values are float64 (or float32 upcast in blocks) whatever the compute dtype:
        # the products accumulate in float64 (see DataMatrix)
        if backend == "auto":
            upcast = device.type == "cpu" and csr.dtype == np.float32
            backend = "scipy" if upcast else "torch"
        use_scipy = backend == "scipy"
        self.backend = backend
        self._blocks = None
        if csr.dtype == np.float32 and use_scipy:
            # float32 values (as in most h5ad files) are kept: the products upcast them in
            # row blocks, exactly, instead of holding a float64 copy of the matrix
            self._blocks = row_blocks(csr.indptr, _BLOCK_NNZ)
        elif csr.dtype != np.float64:
            # a converted copy of the values only; indices and indptr are shared
            csr = sp.csr_matrix(
                (csr.data.astype(np.float64), csr.indices, csr.indptr), shape=csr.shape
            )
        self.shape = (int(csr.shape[0]), int(csr.shape[1]))
        self.dtype, self.device = dtype, device
        self.nnz = int(csr.nnz)
        if use_scipy:
            self.scipy = csr
        else:
            self.scipy = None
            self.csr = _torch_csr(csr, _F64, device)
            self.csr_t = _torch_csr(csr.T.tocsr(), _F64, device)
        n, p = self.shape
        self.row_sq = torch.as_tensor(row_sums_of_squares(csr), device=device)
        self.col_sq = torch.as_tensor(column_sums_of_squares(csr), device=device)
        self.n_obs_row = torch.full((n,), float(p), dtype=_F64, device=device)
        self.n_obs_col = torch.full((p,), float(n), dtype=_F64, device=device)

    @property
    def is_sparse(self) -> bool:
        return True

    def stored_arrays(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(indptr, indices, values)`` of the CSR of Y, as tensors on the device (views of
        the arrays on the CPU; values float32 or float64 as stored)."""
        if self.scipy is None:
            return self.csr.crow_indices(), self.csr.col_indices(), self.csr.values()
        m = self.scipy
        return (
            torch.from_numpy(m.indptr.astype(np.int64)),
            torch.from_numpy(m.indices),
            torch.from_numpy(m.data),
        )

    def _block(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows start:stop with their values in float64 (views of indices)."""
        indptr = self.scipy.indptr
        a, b = indptr[start], indptr[stop]
        return sp.csr_matrix(
            (
                self.scipy.data[a:b].astype(np.float64),
                self.scipy.indices[a:b],
                indptr[start : stop + 1] - a,
            ),
            shape=(stop - start, self.shape[1]),
        )

    def matmul(self, b):
        b = b.to(_F64)
        if self.scipy is None:
            return self.csr @ b
        bn = b.numpy()
        if self._blocks is None:
            return torch.from_numpy(np.asarray(self.scipy @ bn))
        out = np.empty((self.shape[0], *bn.shape[1:]), dtype=np.float64)
        for start, stop in self._blocks:
            out[start:stop] = self._block(start, stop) @ bn
        return torch.from_numpy(out)

    def rmatmul(self, a):
        a = a.to(_F64)
        if self.scipy is None:
            return self.csr_t @ a
        an = a.numpy()
        if self._blocks is None:
            return torch.from_numpy(np.asarray(self.scipy.T @ an))
        out = np.zeros((self.shape[1], *an.shape[1:]), dtype=np.float64)
        for start, stop in self._blocks:
            out += self._block(start, stop).T @ an[start:stop]
        return torch.from_numpy(out)


#: Stored values per row block when float32 values are upcast inside the products.
_BLOCK_NNZ = 1 << 21
#: Entries per row block when dense float32 values are upcast inside the products.
_DENSE_BLOCK = 1 << 22


def _offset_factor(x, n: int, name: str, device: torch.device) -> torch.Tensor:
    """``U`` (N x r) or ``V`` (P x r) of an offset as float64 on ``device`` (a 1-D vector is
    one column), or a clear error for another shape or non-finite values."""
    t = torch.as_tensor(x).detach()
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2 or t.shape[0] != n:
        raise ValueError(
            f"{name} must have {n} rows ({'N' if name == 'U' else 'P'} x r, or a vector of "
            f"length {n}), got shape {tuple(t.shape)}."
        )
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be real numbers, got dtype {t.dtype}.")
    t = t.to(device=device, dtype=_F64)
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise ValueError(
            f"{name} contains {bad} NaN or infinite value(s); the offset must be finite."
        )
    return t


def _offset_sums_of_squares(
    base: DataMatrix, u: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column sums of squares of ``Y - U V^T``, summed term by term (never as
    ``sum Y^2 - 2 ... + ...``, which cancels where a column's mean is large against its
    spread: a nearly constant column came out negative). Dense Y: row blocks of the
    residual. Sparse Y: the stored entries' residuals in blocks, plus the absent entries'
    ``(U_i V_j)^2`` as all of them minus the stored ones (exactly 0 for a line without
    absent entries; otherwise the absent entries' terms dominate the rounding)."""
    n, p = base.shape
    if isinstance(base, DenseData):
        row = torch.empty(n, dtype=_F64, device=base.device)
        col = torch.zeros(p, dtype=_F64, device=base.device)
        for start, stop, block in base._row_blocks():
            r2 = (block - u[start:stop] @ v.T).square_()
            row[start:stop] = r2.sum(1)
            col += r2.sum(0)
        return row, col
    if isinstance(base, SparseData):
        row = torch.zeros(n, dtype=_F64, device=base.device)
        col = torch.zeros(p, dtype=_F64, device=base.device)
        row_fit = torch.zeros(n, dtype=_F64, device=base.device)  # stored (U_i V_j)^2
        col_fit = torch.zeros(p, dtype=_F64, device=base.device)
        indptr, indices, values = base.stored_arrays()
        counts = indptr[1:] - indptr[:-1]
        for start, stop in row_blocks(indptr.cpu().numpy(), _OFFSET_BLOCK_NNZ):
            a, b = int(indptr[start]), int(indptr[stop])
            rows = torch.repeat_interleave(
                torch.arange(start, stop, device=base.device), counts[start:stop]
            )
            cols = indices[a:b].long()
            fit = (u.index_select(0, rows) * v.index_select(0, cols)).sum(1)
            r2 = (values[a:b].to(_F64) - fit).square_()
            fit2 = fit.square_()
            row.index_add_(0, rows, r2)
            col.index_add_(0, cols, r2)
            row_fit.index_add_(0, rows, fit2)
            col_fit.index_add_(0, cols, fit2)
        all_row = ((u @ (v.T @ v)) * u).sum(1)
        all_col = ((v @ (u.T @ u)) * v).sum(1)
        col_counts = torch.zeros(p, dtype=torch.long, device=base.device)
        col_counts.index_add_(0, indices.long(), torch.ones_like(indices, dtype=torch.long))
        absent_row = torch.where(counts == p, 0.0, (all_row - row_fit).clamp_min(0.0))
        absent_col = torch.where(col_counts == n, 0.0, (all_col - col_fit).clamp_min(0.0))
        return row + absent_row, col + absent_col
    # another operator (e.g. an offset of an offset): the closed form
    ytu, yv = base.rmatmul(u), base.matmul(v)
    row = base.row_sq - 2 * (yv * u).sum(1) + ((u @ (v.T @ v)) * u).sum(1)
    col = base.col_sq - 2 * (ytu * v).sum(1) + ((v @ (u.T @ u)) * v).sum(1)
    return row.clamp_min(0.0), col.clamp_min(0.0)


#: Stored entries per block when the sums of squares of an offset are formed.
_OFFSET_BLOCK_NNZ = 1 << 19


class OffsetData(DataMatrix):
    """``Y - U V^T`` for a base matrix Y and an (N, r) / (P, r) pair, never materialised.

    Column centring is ``U = 1``, ``V = column means``. Only for data without missing
    entries.
    """

    def __init__(self, base: DataMatrix, u: torch.Tensor, v: torch.Tensor) -> None:
        if base.mask is not None:
            raise ValueError("an implicit offset needs data without missing entries.")
        self.base = base
        self.shape, self.dtype, self.device = base.shape, base.dtype, base.device
        self.u = _offset_factor(u, base.shape[0], "U", base.device)
        self.v = _offset_factor(v, base.shape[1], "V", base.device)
        if self.u.shape[1] != self.v.shape[1]:
            raise ValueError(
                f"U has {self.u.shape[1]} columns but V has {self.v.shape[1]}: the offset "
                "U V^T needs the same number r of columns in both (N x r and P x r)."
            )
        self.row_sq, self.col_sq = _offset_sums_of_squares(base, self.u, self.v)
        self.n_obs_row, self.n_obs_col = base.n_obs_row, base.n_obs_col

    @property
    def is_sparse(self) -> bool:
        return self.base.is_sparse

    def matmul(self, b):
        b = b.to(_F64)
        return self.base.matmul(b) - self.u @ (self.v.T @ b)

    def rmatmul(self, a):
        a = a.to(_F64)
        return self.base.rmatmul(a) - self.v @ (self.u.T @ a)
