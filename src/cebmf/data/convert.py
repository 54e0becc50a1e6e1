"""Turning user matrices into :class:`DataMatrix` operators, with input validation."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

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
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but CUDA is not available; use 'auto'.")
    return dev


def resolve_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    """None: float32 on GPUs, float64 on the CPU. Else float32 or float64."""
    if dtype is None:
        return torch.float32 if device.type == "cuda" else torch.float64
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
        if csr.data.dtype.kind != "f":
            csr = csr.astype(np.float64)
        _check_shape(csr.shape, name)
        return SparseData(csr, dtype, device, backend=sparse_backend)
    if isinstance(y, torch.Tensor) and y.layout != torch.strided:
        coo = y.detach().to_sparse_coo().coalesce().cpu()
        idx = coo.indices().numpy()
        mat = sp.csr_matrix((coo.values().numpy(), (idx[0], idx[1])), shape=tuple(coo.shape))
        return as_data_matrix(
            mat, dtype=dtype, device=device, name=name, sparse_backend=sparse_backend
        )
    if isinstance(y, torch.Tensor):
        t = y.detach()
        if t.is_complex():
            raise TypeError(f"{name} must be real, got a complex tensor.")
    else:
        arr = np.asarray(y)
        if arr.dtype == object or arr.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be numeric, got an array of dtype {arr.dtype}.")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-dimensional, got shape {tuple(t.shape)}.")
    _check_shape(tuple(t.shape), name)
    # may share the caller's memory: the engine only ever reads it
    t = t.to(device=device, dtype=dtype).contiguous()
    inf = torch.isinf(t)
    if bool(inf.any()):
        raise ValueError(
            f"{name} contains {int(inf.sum())} infinite value(s); replace them (NaN marks a "
            "missing entry, Inf is not allowed)."
        )
    return DenseData(t)


def _check_shape(shape: tuple[int, int], name: str) -> None:
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"{name} has shape {shape}; it needs at least one row and one column.")
