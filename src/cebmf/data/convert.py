"""Turning user matrices into :class:`DataMatrix` operators, with input validation."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from .._validation import check_magnitude, non_numeric_columns, tensor_view
from .matrix import DataMatrix, DenseData, SparseData


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` (or None) picks CUDA when available, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device={device!r} is not a torch device; use 'auto', 'cpu' or 'cuda'."
        ) from err
    if dev.type not in ("cpu", "cuda"):
        # other backends (mps, xpu, meta, ...) lack the float64 and sparse kernels the
        # engine needs
        raise ValueError(
            f"device={device!r}: cebmf runs on 'cpu' or 'cuda' devices only; use 'auto', "
            "'cpu' or 'cuda'."
        )
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} was requested but CUDA is not available; use 'auto' or 'cpu'."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA "
                f"device(s), numbered from 0; use 'cuda' or 'cuda:0' to "
                f"'cuda:{torch.cuda.device_count() - 1}'."
            )
    return dev


def resolve_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    """None: float32 on GPUs, float64 on the CPU. Else float32 or float64."""
    if dtype is None:
        return torch.float32 if device.type == "cuda" else torch.float64
    if isinstance(dtype, np.dtype):  # e.g. dtype=Y.dtype: np.dtype("float64") -> np.float64
        dtype = dtype.type
    mapping = {
        "float32": torch.float32,
        "float64": torch.float64,
        np.float32: torch.float32,
        np.float64: torch.float64,
        torch.float32: torch.float32,
        torch.float64: torch.float64,
    }
    if dtype not in mapping:
        raise ValueError(f"dtype must be float32 or float64 (or None), got {dtype!r}.")
    return mapping[dtype]


def check_values(x: Any, name: str) -> None:
    """The stored values of a scipy sparse matrix or a numpy array: Inf is never data,
    NaN marks a missing entry of a dense matrix only (an absent sparse entry is a zero)."""
    if sp.issparse(x):
        _check_sparse_values(np.asarray(x.data), name)
        return
    values = np.asarray(x)
    if values.dtype.kind == "f":
        _check_no_inf(int(np.count_nonzero(np.isinf(values))), name)


def _check_no_inf(count: int, name: str) -> None:
    if count:
        raise ValueError(
            f"{name} contains {count} infinite value(s); replace them (NaN marks a missing "
            "entry, Inf is not allowed)."
        )


def _check_sparse_values(values: np.ndarray, name: str) -> None:
    if values.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be numeric, got sparse values of dtype {values.dtype}.")
    if values.dtype.kind == "f":
        bad = ~np.isfinite(values)
        if bad.any():
            raise ValueError(
                f"{name} is sparse and contains {int(bad.sum())} NaN/Inf stored value(s); sparse "
                "input has no missing entries (an absent entry is a zero). Replace them, or pass "
                "a dense array with NaN for missing entries."
            )


def as_data_matrix(
    y: Any,
    *,
    dtype: torch.dtype,
    device: torch.device,
    name: str = "Y",
    sparse_backend: str = "auto",
) -> DataMatrix:
    """A :class:`DataMatrix` from a numpy / torch dense array (NaN = missing), a scipy
    sparse matrix or a torch sparse tensor. The input is never modified. ``sparse_backend``
    chooses the kernels of sparse input (see :class:`SparseData`)."""
    if sparse_backend not in ("auto", "scipy", "torch"):
        raise ValueError(
            f"sparse_backend must be 'auto', 'scipy' or 'torch', got {sparse_backend!r}."
        )
    if sparse_backend == "scipy" and device.type != "cpu":
        raise ValueError(
            f"sparse_backend='scipy' runs on the CPU only, but device is {device}; use "
            "sparse_backend='auto' or 'torch'."
        )
    if isinstance(y, DataMatrix):
        return y
    if sp.issparse(y):
        if y.ndim != 2:
            raise ValueError(f"{name} must be 2-dimensional, got shape {y.shape}.")
        csr = sp.csr_matrix(y)  # a copy for any other format; CSR input is not modified
        _check_sparse_values(csr.data, name)
        if csr.nnz:  # max and -min: no temporary of the size of the values
            _check_scale(max(float(csr.data.max()), -float(csr.data.min())), dtype, name)
        if csr.data.dtype.kind != "f":
            csr = csr.astype(np.float64)
        _check_shape(csr.shape, name)
        return SparseData(csr, dtype, device, backend=sparse_backend)
    if isinstance(y, torch.Tensor) and y.layout != torch.strided:
        return as_data_matrix(
            _torch_sparse_to_scipy(y, name),
            dtype=dtype,
            device=device,
            name=name,
            sparse_backend=sparse_backend,
        )
    if isinstance(y, torch.Tensor):
        t = y.detach()
        if t.is_complex():
            raise TypeError(f"{name} must be real, got a complex tensor.")
    else:
        arr = _as_numeric_array(y, name)
        if arr.ndim != 2:  # before ascontiguousarray, which makes a scalar 1-D
            raise ValueError(f"{name} must be 2-dimensional, got shape {arr.shape}.")
        t = tensor_view(arr)
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-dimensional, got shape {tuple(t.shape)}.")
    _check_shape(tuple(t.shape), name)
    if t.is_floating_point():  # before the conversion, which may overflow to Inf itself
        _check_no_inf(int(torch.isinf(t).sum()), name)
    # may share the caller's memory: the engine only ever reads it
    data = DenseData(t.to(device=device, dtype=dtype).contiguous())
    values = data.values  # missing entries are 0 here
    largest = float(torch.maximum(values.max(), -values.min()))
    if math.isinf(largest):  # the conversion overflowed (an Inf in Y was refused above)
        largest = float(torch.nan_to_num(t.double(), nan=0.0).abs().max())
    _check_scale(largest, dtype, name)
    return data


def _torch_sparse_to_scipy(y: torch.Tensor, name: str) -> sp.csr_matrix:
    """A scipy CSR of a 2-D torch sparse tensor (COO, CSR, CSC, BSR, BSC; a hybrid COO whose
    rows are stored as dense vectors too). float16 / bfloat16 values become float64
    (numpy and scipy's sparse kernels lack them)."""
    if y.ndim != 2:
        raise ValueError(f"{name} must be 2-dimensional, got shape {tuple(y.shape)}.")
    if y.is_complex():
        raise TypeError(f"{name} must be real, got a complex sparse tensor.")
    coo = y.detach().to_sparse_coo().coalesce().cpu()
    values = coo.values()
    if values.is_floating_point() and values.dtype not in (torch.float32, torch.float64):
        values = values.to(torch.float64)
    idx = coo.indices().numpy()
    if coo.sparse_dim() == 2:
        return sp.csr_matrix((values.numpy(), (idx[0], idx[1])), shape=tuple(coo.shape))
    if coo.sparse_dim() == 1:  # a hybrid tensor: the stored rows as dense vectors
        block = sp.coo_matrix(values.numpy())
        return sp.csr_matrix((block.data, (idx[0][block.row], block.col)), shape=tuple(coo.shape))
    return sp.csr_matrix(values.numpy())  # sparse_dim 0: one dense block


def _as_numeric_array(y: Any, name: str) -> np.ndarray:
    """A numeric numpy array; the masked entries of a numpy masked array become NaN
    (missing) in a floating copy."""
    if y is None:
        raise TypeError(f"{name} is None; pass the data matrix (numpy, scipy sparse or torch).")
    bad = non_numeric_columns(y)
    if bad:
        raise TypeError(
            f"{name} is a DataFrame with non-numeric column(s) {bad[:5]}; keep the numeric "
            "columns only (e.g. df.select_dtypes('number'))."
        )
    mask = np.ma.getmaskarray(y) if isinstance(y, np.ma.MaskedArray) else None
    arr = np.asarray(np.ma.getdata(y) if mask is not None else y)
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be numeric, got an array of dtype {arr.dtype}.")
    if mask is not None and mask.any():
        arr = arr.astype(np.promote_types(arr.dtype, np.float32))  # a copy
        arr[mask] = np.nan
    return arr


def _check_scale(largest: float, dtype: torch.dtype, name: str) -> None:
    """The engine squares values and variances of their size: the largest absolute value
    must lie in :func:`~cebmf._validation.representable_range` of the compute dtype.
    An all-zero matrix passes here (the fit refuses it with its own message)."""
    if largest == 0:
        return
    check_magnitude(
        largest,
        dtype,
        f"{name}'s largest absolute value",
        f"rescale {name}, e.g. divide it by {largest:.3g}",
    )


def _check_shape(shape: tuple[int, int], name: str) -> None:
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"{name} has shape {shape}; it needs at least one row and one column.")
