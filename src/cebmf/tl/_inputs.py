"""From an AnnData to the engine's inputs: the matrix, its transform, the gene mask and
the covariates. Nothing here modifies the user's object."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..data.convert import check_values
from ..data.transforms import log1p_normalize

logger = logging.getLogger("cebmf")

TRANSFORMS = ("auto", "log1p_normalize", "log1p", "binary", "tfidf", None)
DEFAULT_TARGET_SUM = 1e4


def select_matrix(adata, layer: str | None, argname: str = "layer"):
    """``adata.X`` or ``adata.layers[layer]`` (never copied)."""
    if layer is None:
        x = adata.X
        if x is None:
            raise ValueError("adata.X is empty; pass layer= to use a layer.")
        check_values(x, "adata.X")
        return x
    if layer not in adata.layers:
        known = ", ".join(map(repr, adata.layers)) or "none"
        raise ValueError(f"{argname}={layer!r} is not a layer of adata (layers: {known}).")
    x = adata.layers[layer]
    check_values(x, f"adata.layers[{layer!r}]")
    return x


def _values(x) -> np.ndarray:
    """The stored values of a sparse or dense matrix (no copy for CSR/CSC data)."""
    if sp.issparse(x):
        return np.asarray(x.data)
    return np.asarray(x).ravel()


def is_integer_counts(x) -> bool:
    values = _values(x)
    if values.dtype.kind in "biu":
        return bool(values.size == 0 or values.min() >= 0)
    if values.dtype.kind != "f" or not np.all(np.isfinite(values)):
        return False
    return bool((values >= 0).all() and np.all(values == np.round(values)))


def apply_transform(
    x,
    transform: str | None,
    *,
    size_factors: np.ndarray | None = None,
    target_sum: float = DEFAULT_TARGET_SUM,
    argname: str = "transform",
):
    """Transform a count matrix into the data that are factorised; returns
    ``(matrix, resolved transform name)``. Sparse stays sparse, the input is never
    modified (every transform returns a new matrix, ``None`` returns the input)."""
    if transform not in TRANSFORMS:
        raise ValueError(
            f"{argname}={transform!r} is not a transform; choose one of "
            f"{', '.join(map(repr, TRANSFORMS))}."
        )
    if transform == "auto":
        transform = "log1p_normalize" if is_integer_counts(x) else None
        logger.info("transform='auto' -> %s", transform)
    if transform is None:
        return x, "none"
    values = _values(x)
    if values.size and np.nanmin(values) < 0:
        raise ValueError(
            f"{argname}={transform!r} needs non-negative counts, but the data hold negative "
            "values; pass transform=None for data that are already transformed."
        )
    if transform == "log1p_normalize":
        return log1p_normalize(x, target_sum=target_sum, size_factors=size_factors), transform
    if transform == "log1p":
        if sp.issparse(x):
            out = sp.csr_matrix(x, dtype=np.float64, copy=True)
            np.log1p(out.data, out=out.data)
            return out, transform
        return np.log1p(np.asarray(x, dtype=np.float64)), transform
    if transform == "binary":
        if sp.issparse(x):
            out = sp.csr_matrix(x, dtype=np.float64, copy=True)
            out.data = (out.data > 0).astype(np.float64)
            out.eliminate_zeros()
            return out, transform
        return (np.asarray(x) > 0).astype(np.float64), transform
    # tfidf: term frequency (per cell) x log inverse document frequency (per feature)
    csr = sp.csr_matrix(x, dtype=np.float64, copy=True)
    totals = np.asarray(csr.sum(1)).ravel()
    scale = np.divide(1.0, totals, out=np.zeros_like(totals), where=totals > 0)
    csr.data *= np.repeat(scale, np.diff(csr.indptr))
    df = np.bincount(csr.indices, minlength=csr.shape[1]).astype(np.float64)
    idf = np.log1p(csr.shape[0] / np.maximum(df, 1.0))
    csr.data *= idf[csr.indices]
    np.log1p(csr.data * 1e4, out=csr.data)
    return (csr if sp.issparse(x) else csr.toarray()), transform


def resolve_mask(adata, mask_var, argname: str = "mask_var") -> np.ndarray:
    """A boolean gene mask as scanpy's ``mask_var``: None uses ``var['highly_variable']``
    when present (else every gene); a var column name; or a boolean array."""
    n = adata.n_vars
    if mask_var is None:
        if "highly_variable" in adata.var:
            return adata.var["highly_variable"].to_numpy(dtype=bool)
        return np.ones(n, dtype=bool)
    if isinstance(mask_var, str):
        if mask_var not in adata.var:
            raise ValueError(f"{argname}={mask_var!r} is not a column of adata.var.")
        mask = adata.var[mask_var].to_numpy()
    else:
        mask = np.asarray(mask_var)
    if mask.dtype != bool or mask.shape != (n,):
        raise ValueError(f"{argname} must be a boolean column or array of length {n} (n_vars).")
    if not mask.any():
        raise ValueError(f"{argname} selects no genes.")
    return mask


def _frame_column(frame: pd.DataFrame, name: str, argname: str) -> tuple[np.ndarray, list[str]]:
    col = frame[name]
    if isinstance(col.dtype, pd.CategoricalDtype):
        cats = list(col.cat.categories)
        codes = col.cat.codes.to_numpy()
        if (codes < 0).any():
            raise ValueError(
                f"{argname}: categorical column {name!r} has missing values; fill them first."
            )
        onehot = np.zeros((len(col), len(cats)))
        onehot[np.arange(len(col)), codes] = 1.0
        return onehot, [f"{name}={c}" for c in cats]
    if col.dtype == bool or col.dtype.kind == "b":
        return col.to_numpy(dtype=np.float64)[:, None], [name]
    if col.dtype.kind in "iuf":
        values = col.to_numpy(dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError(
                f"{argname}: column {name!r} has {int((~np.isfinite(values)).sum())} "
                "NaN/Inf value(s); impute or drop them first."
            )
        return values[:, None], [name]
    raise ValueError(
        f"{argname}: column {name!r} has dtype {col.dtype}, which is neither numeric nor "
        f"categorical; convert it, e.g. adata.obs[{name!r}].astype('category')."
    )


def resolve_covariates(
    spec: Any, frame: pd.DataFrame, multi: dict, n: int, argname: str, where: str
) -> tuple[np.ndarray | None, list[str]]:
    """Covariates from column names of ``frame`` (obs / var), keys of ``multi`` (obsm /
    varm), or an array. Numeric columns as they are, booleans as 0/1, categoricals
    one-hot. Returns ``(matrix (n, d) float64 or None, column labels)``."""
    if spec is None:
        return None, []
    if isinstance(spec, np.ndarray | pd.DataFrame) or sp.issparse(spec):
        arr = spec.toarray() if sp.issparse(spec) else np.asarray(spec)
        if arr.ndim == 1:
            arr = arr[:, None]
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"{argname} must be numeric, got an array of dtype {arr.dtype}.")
        if arr.shape[0] != n:
            raise ValueError(
                f"{argname} has {arr.shape[0]} rows but there are {n} {where}; give one row "
                f"per {where[:-1]}."
            )
        arr = arr.astype(np.float64)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{argname} contains NaN or Inf; impute or drop them first.")
        return arr, [f"{argname}[{j}]" for j in range(arr.shape[1])]
    names = [spec] if isinstance(spec, str) else list(spec)
    blocks, labels = [], []
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{argname} must be a column name, a list of names or an array.")
        if name in frame.columns:
            block, lab = _frame_column(frame, name, argname)
        elif name in multi:
            value = multi[name]
            block = value.to_numpy() if isinstance(value, pd.DataFrame) else value
            block = block.toarray() if sp.issparse(block) else np.asarray(block)
            if block.ndim == 1:
                block = block[:, None]
            if block.dtype.kind not in "biuf":
                raise ValueError(f"{argname}: {name!r} is not numeric (dtype {block.dtype}).")
            block = block.astype(np.float64)
            if not np.all(np.isfinite(block)):
                raise ValueError(f"{argname}: {name!r} contains NaN or Inf.")
            lab = [f"{name}[{j}]" for j in range(block.shape[1])]
        else:
            m = "obsm" if where == "cells" else "varm"
            f = "obs" if where == "cells" else "var"
            raise ValueError(
                f"{argname}: {name!r} is neither a column of adata.{f} nor a key of "
                f"adata.{m}; known {m} keys: {', '.join(map(repr, multi)) or 'none'}."
            )
        blocks.append(block)
        labels += lab
    return np.hstack(blocks), labels
