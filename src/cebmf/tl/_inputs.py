"""From an AnnData to the engine's inputs: the matrix, its transform, the gene mask and
the covariates. Nothing here modifies the user's object."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..data.convert import check_values
from ..data.transforms import canonical_sparse, log1p_normalize

logger = logging.getLogger("cebmf")

TRANSFORMS = ("auto", "log1p_normalize", "log1p", "binary", "tfidf", "none", None)
DEFAULT_TARGET_SUM = 1e4


def select_matrix(adata, layer: str | None, argname: str = "layer"):
    """``adata.X`` or ``adata.layers[layer]``: not copied, except a sparse matrix that
    stores an entry more than once (or in unsorted order), or in a format other than CSR /
    CSC, which is given as a canonical copy (the transforms work entry by entry)."""
    if layer is None:
        x, name = adata.X, "adata.X"
        if x is None:
            raise ValueError("adata.X is empty; pass layer= to use a layer.")
    else:
        if not isinstance(layer, str):
            raise ValueError(
                f"{argname} must be the name of a layer of adata (a str) or None for adata.X, "
                f"got {layer!r}."
            )
        if layer not in adata.layers:
            known = ", ".join(map(repr, adata.layers)) or "none"
            raise ValueError(f"{argname}={layer!r} is not a layer of adata (layers: {known}).")
        x, name = adata.layers[layer], f"adata.layers[{layer!r}]"
    check_values(x, name)
    return canonical_sparse(x) if sp.issparse(x) else x


def _values(x) -> np.ndarray:
    """The stored values of a sparse or dense matrix (no copy for CSR/CSC data)."""
    if sp.issparse(x):
        return np.asarray(x.data)
    return np.asarray(x).ravel()


def _integer_valued(values: np.ndarray) -> bool:
    if values.dtype.kind in "biu":
        return True
    if values.dtype.kind != "f" or not np.all(np.isfinite(values)):
        return False
    return bool(np.all(values == np.round(values)))


def resolve_auto(x, argname: str = "transform") -> str | None:
    """What ``transform="auto"`` means for ``x``: ``"log1p_normalize"`` for non-negative
    integer values (raw counts), None for anything else (e.g. log-normalised data). Integer
    values some of which are negative are neither, most likely corrupted counts: an error
    rather than a fit of the raw integers."""
    values = _values(x)
    n_missing = 0
    if values.dtype.kind == "f" and not sp.issparse(x):
        missing = np.isnan(values)
        n_missing = int(missing.sum())
        if n_missing:  # dense counts with missing entries: judged on the observed ones
            values = values[~missing]
    if not _integer_valued(values):
        return None
    if values.size and values.min() < 0:
        raise ValueError(
            f"{argname}='auto': the data are integers, but {int((values < 0).sum())} of them "
            "are negative, so they are not counts; fix the counts, or pass transform=None "
            "to fit the values as they are."
        )
    if n_missing:
        logger.info(
            "%s='auto': counts with %d missing (NaN) entries; the library sizes of "
            "'log1p_normalize' sum the observed counts, and the missing entries stay missing",
            argname,
            n_missing,
        )
    return "log1p_normalize"


def resolve_target_sum(target_sum, totals: np.ndarray, argname: str = "target_sum") -> float:
    """The library size after normalisation: ``target_sum`` itself (a positive finite
    number), or with None the median library size of the cells that have any counts
    (scanpy's ``normalize_total(target_sum=None)``)."""
    if target_sum is None:
        positive = totals[totals > 0]
        return float(np.median(positive)) if positive.size else 1.0
    ok = isinstance(target_sum, int | float | np.integer | np.floating) and not isinstance(
        target_sum, bool
    )
    if not ok or not (np.isfinite(target_sum) and target_sum > 0):
        raise ValueError(
            f"{argname} must be a positive finite number (10^4 gives counts per 10k), or "
            f"None for the median library size; got {target_sum!r}."
        )
    return float(target_sum)


def apply_transform(
    x,
    transform: str | None,
    *,
    size_factors: np.ndarray | None = None,
    target_sum: float = DEFAULT_TARGET_SUM,
    totals: np.ndarray | None = None,
    argname: str = "transform",
):
    """Transform a count matrix into the data that are factorised; returns
    ``(matrix, resolved transform name)``. Sparse stays sparse, the input is never
    modified (every transform returns a new matrix, ``None`` returns the input).
    ``totals``: the library sizes of ``"log1p_normalize"`` (default: the row sums of
    ``x``; pass the sums over all genes when ``x`` is a subset of them). ``"none"`` is
    None (the name a fit records for it)."""
    if transform not in TRANSFORMS:
        raise ValueError(
            f"{argname}={transform!r} is not a transform; choose one of "
            f"{', '.join(map(repr, TRANSFORMS))}."
        )
    if transform == "auto":
        transform = resolve_auto(x, argname)
        logger.info("transform='auto' -> %s", transform)
    if transform is None or transform == "none":
        return x, "none"
    values = _values(x)
    if values.size and np.nanmin(values) < 0:
        raise ValueError(
            f"{argname}={transform!r} needs non-negative counts, but the data hold negative "
            "values; pass transform=None for data that are already transformed."
        )
    if transform == "log1p_normalize":
        return log1p_normalize(
            x, target_sum=target_sum, size_factors=size_factors, totals=totals
        ), transform
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
        dense = np.asarray(x, dtype=np.float64)
        return np.where(np.isnan(dense), np.nan, dense > 0), transform  # NaN stays missing
    # tfidf: term frequency (per cell) x log inverse document frequency (per feature)
    n_missing = 0 if sp.issparse(x) else int(np.isnan(values).sum())
    if n_missing:
        raise ValueError(
            f"{argname}='tfidf' needs every count of a cell, but the data hold "
            f"{n_missing} missing (NaN) entries; fill them, or use "
            "'log1p_normalize' or 'log1p', which keep missing entries missing."
        )
    csr = sp.csr_matrix(x, dtype=np.float64, copy=True)
    totals = np.asarray(csr.sum(1)).ravel()
    scale = np.divide(1.0, totals, out=np.zeros_like(totals), where=totals > 0)
    csr.data *= np.repeat(scale, np.diff(csr.indptr))
    df = np.bincount(csr.indices, minlength=csr.shape[1]).astype(np.float64)
    idf = np.log1p(csr.shape[0] / np.maximum(df, 1.0))
    csr.data *= idf[csr.indices]
    np.log1p(csr.data * 1e4, out=csr.data)
    return (csr if sp.issparse(x) else csr.toarray()), transform


class _HighlyVariableDefault:
    """The default of ``mask_var`` (scanpy's): ``var["highly_variable"]`` when that column
    exists, else every gene. ``mask_var=None`` means every gene."""

    def __repr__(self) -> str:
        return "<var['highly_variable'] if present>"


HIGHLY_VARIABLE = _HighlyVariableDefault()


def resolve_mask(adata, mask_var, argname: str = "mask_var") -> tuple[np.ndarray, str | None]:
    """A boolean gene mask as scanpy's ``mask_var``, and what ``params`` records: the
    default uses ``var['highly_variable']`` when present (recorded by that name), None uses
    every gene (None), a ``var`` column name (the name), or a boolean array (``"array"``)."""
    n = adata.n_vars
    if mask_var is HIGHLY_VARIABLE:
        if "highly_variable" not in adata.var:
            return np.ones(n, dtype=bool), None
        mask_var = "highly_variable"
    if mask_var is None:
        return np.ones(n, dtype=bool), None
    if isinstance(mask_var, str):
        if mask_var not in adata.var:
            raise ValueError(f"{argname}={mask_var!r} is not a column of adata.var.")
        mask = adata.var[mask_var].to_numpy()
        what = f"adata.var[{mask_var!r}]"
    else:
        mask = np.asarray(mask_var)
        what = argname
    if mask.dtype != bool or mask.shape != (n,):
        raise ValueError(
            f"{argname} must be a boolean var column or array of length {n} (n_vars), got "
            f"{'a column' if isinstance(mask_var, str) else 'an array'} of dtype {mask.dtype} "
            f"and shape {mask.shape}."
        )
    if not mask.any():
        raise ValueError(
            f"{argname} selects no genes ({what} is all False); pass mask_var=None to fit "
            "every gene."
        )
    return mask, (mask_var if isinstance(mask_var, str) else "array")


def _frame_column(frame: pd.DataFrame, name, argname: str) -> tuple[np.ndarray, list[str]]:
    col = frame[name]
    label = str(name)
    if isinstance(col.dtype, pd.CategoricalDtype):
        cats = list(col.cat.categories)
        codes = col.cat.codes.to_numpy()
        if (codes < 0).any():
            raise ValueError(
                f"{argname}: categorical column {label!r} has missing values; fill them first."
            )
        onehot = np.zeros((len(col), len(cats)))
        onehot[np.arange(len(col)), codes] = 1.0
        return onehot, [f"{label}={c}" for c in cats]
    if col.dtype.kind in "biuf":  # numpy and pandas nullable (boolean, Int64, Float64) dtypes
        values = col.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(values)
        if bad.any():
            raise ValueError(
                f"{argname}: column {label!r} has {int(bad.sum())} missing / NaN / Inf "
                f"value(s) among the fitted {_entries(argname)}; {_missing_fix(argname)}."
            )
        return values[:, None], [label]
    raise ValueError(
        f"{argname}: column {label!r} has dtype {col.dtype}, which is neither numeric nor "
        f"categorical; convert it, e.g. adata.obs[{label!r}].astype('category')."
    )


def _aligned(df: pd.DataFrame, index: pd.Index, argname: str, where: str) -> pd.DataFrame:
    """``df`` in the order of ``index`` (obs_names / var_names). A default RangeIndex is
    taken as positional; any other index must hold exactly the same labels."""
    if df.index.equals(index):
        return df
    if isinstance(df.index, pd.RangeIndex) and df.index.equals(pd.RangeIndex(len(index))):
        return df.set_axis(index, axis=0)
    names = "obs_names" if where == "cells" else "var_names"
    if len(df) == len(index) and df.index.is_unique and df.index.isin(index).all():
        return df.loc[index]
    missing = int((~index.isin(df.index)).sum())
    raise ValueError(
        f"{argname}: the index of the DataFrame / Series does not match adata.{names} "
        f"({len(df)} rows; {missing} of the {len(index)} {where} of adata are not in it); "
        f"align it first (e.g. df.loc[adata.{names}]) or pass df.to_numpy() to use its "
        "rows in order."
    )


def _frame_block(df: pd.DataFrame, argname: str) -> tuple[np.ndarray, list[str]]:
    blocks, labels = [], []
    for name in df.columns:
        block, lab = _frame_column(df, name, argname)
        blocks.append(block)
        labels += lab
    if not blocks:
        raise ValueError(f"{argname}: the DataFrame has no columns.")
    return np.hstack(blocks), labels


def _numeric_block(value, argname: str) -> np.ndarray:
    if np.ma.isMaskedArray(value) and value.dtype.kind in "biuf":
        # masked entries are missing (NaN), not their hidden values: refused where fitted
        value = np.ma.filled(value.astype(np.float64), np.nan)
    arr = value.toarray() if sp.issparse(value) else np.asarray(value)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{argname} must be 1- or 2-dimensional, got shape {arr.shape}.")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{argname} must be numeric, got an array of dtype {arr.dtype}.")
    return arr.astype(np.float64)


def _entries(argname: str) -> str:
    return "cells" if argname.startswith("obs") else "genes"


def _missing_fix(argname: str) -> str:
    """How to get rid of covariate values that are missing where the fit needs them."""
    if argname.startswith("obs"):
        return "impute them (e.g. with the column's median) or subset adata to other cells"
    return "impute them (e.g. with the column's median) or leave those genes out (mask_var)"


def _check_finite(block: np.ndarray, argname: str) -> None:
    bad = ~np.isfinite(block)
    if bad.any():
        raise ValueError(
            f"{argname} contains {int(bad.sum())} NaN or Inf value(s) among the fitted "
            f"{_entries(argname)} (the first in fitted row {int(np.argwhere(bad)[0, 0])}); "
            f"{_missing_fix(argname)}."
        )


def resolve_covariates(
    spec: Any,
    frame: pd.DataFrame,
    multi: dict,
    n: int,
    argname: str,
    where: str,
    rows: np.ndarray | None = None,
    owner: str = "adata",
) -> tuple[np.ndarray | None, list[str]]:
    """Covariates from column names of ``frame`` (obs / var), keys of ``multi`` (obsm /
    varm), a DataFrame / Series (aligned on its index), or an array. Numeric columns as they
    are, booleans as 0/1, categoricals one-hot. Only ``rows`` (the fitted cells / genes;
    default all) are returned, and only they must be finite. ``owner`` names the object in
    messages ("adata", "mdata"). Returns ``(matrix (len(rows), d) float64 or None, column
    labels)``."""
    if spec is None:
        return None, []
    block, labels = _covariate_block(spec, frame, multi, n, argname, where, rows, owner)
    if block.shape[1] == 0:
        raise ValueError(
            f"{argname} has no columns; pass None for no covariates (a prior without "
            "covariates), or give at least one covariate."
        )
    return block, labels


def _covariate_block(spec, frame, multi, n, argname, where, rows, owner):
    """The body of :func:`resolve_covariates` for a spec that is not None."""
    sel = slice(None) if rows is None else rows
    if isinstance(spec, pd.Series):
        spec = spec.to_frame(name=argname if spec.name is None else spec.name)
    if isinstance(spec, pd.DataFrame):
        block, labels = _frame_block(_aligned(spec, frame.index, argname, where).iloc[sel], argname)
        return block, labels
    if isinstance(spec, np.ndarray) or sp.issparse(spec):
        arr = _numeric_block(spec, argname)
        if arr.shape[0] != n:
            raise ValueError(
                f"{argname} has {arr.shape[0]} rows but there are {n} {where}; give one row "
                f"per {where[:-1]}."
            )
        arr = arr[sel]
        _check_finite(arr, argname)
        return arr, [f"{argname}[{j}]" for j in range(arr.shape[1])]
    kinds = "a column name, a list of names, an obsm / varm key, a DataFrame or an array"
    if isinstance(spec, Mapping):
        raise ValueError(
            f"{argname} must be {kinds}, got a dict"
            + (
                " (a dict by modality is for var_covariates of a MuData)."
                if where == "genes"
                else "."
            )
        )
    if isinstance(spec, str):
        names = [spec]
    else:
        try:
            names = list(spec)
        except TypeError:
            raise ValueError(f"{argname} must be {kinds}, got {spec!r}.") from None
    if not names:
        raise ValueError(f"{argname} is an empty list; pass None for no covariates.")
    sub = frame.iloc[sel]
    blocks, labels = [], []
    for name in names:
        if not isinstance(name, str):
            raise TypeError(
                f"{argname} must be {kinds}; got an entry of type {type(name).__name__}."
            )
        if name in frame.columns:
            block, lab = _frame_column(sub, name, argname)
        elif name in multi:
            value = multi[name]
            where_name = f"{argname}: {name!r}"
            if isinstance(value, pd.DataFrame):
                block, lab = _frame_block(value.iloc[sel], where_name)
            else:
                block = _numeric_block(value, where_name)[sel]
                _check_finite(block, where_name)
                lab = [f"{name}[{j}]" for j in range(block.shape[1])]
        else:
            m = "obsm" if where == "cells" else "varm"
            f = "obs" if where == "cells" else "var"
            hint = " (a modality's column as 'mod:column')" if owner == "mdata" else ""
            raise ValueError(
                f"{argname}: {name!r} is neither a column of {owner}.{f}{hint} nor a key of "
                f"{owner}.{m}; known {m} keys: {', '.join(map(repr, multi)) or 'none'}."
            )
        blocks.append(block)
        labels += lab
    return np.hstack(blocks), labels
