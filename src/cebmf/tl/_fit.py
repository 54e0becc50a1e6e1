"""``cebmf.tl.fit``: EBMF / cEBMF on an AnnData or a MuData, results in the object."""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
from pandas.api.types import is_bool_dtype, is_numeric_dtype

from .._mudata import obs_with_modalities
from .._validation import check_flags, resolve_seed, shortlist
from ..data.convert import resolve_device
from ..data.transforms import column_sums_of_squares, row_sums_of_squares
from ..model.fit import PriorChoice, check_prior_covariates, fit_ebmf
from ..priors.base import Prior
from ..priors.block import BlockPrior
from ._inputs import (
    DEFAULT_TARGET_SUM,
    HIGHLY_VARIABLE,
    apply_transform,
    resolve_covariates,
    resolve_mask,
    resolve_target_sum,
    select_matrix,
)
from ._results import (
    check_key_free,
    drop_joint_outputs,
    factor_names,
    full_rows,
    h5_safe,
    output_names,
    pve_by_block,
    uns_summary,
)

logger = logging.getLogger("cebmf")


def _fitted_modalities(mdata, mods) -> list[str]:
    """``mods`` checked against the MuData: all modalities when None, one name or a list
    of distinct names."""
    known = ", ".join(mdata.mod)
    if mods is None:
        return list(mdata.mod)
    mods = [mods] if isinstance(mods, str) else list(mods)
    if not mods:
        raise ValueError(f"mods is empty; name at least one modality ({known}), or pass None.")
    unknown = [m for m in mods if m not in mdata.mod]
    if unknown:
        raise ValueError(f"mods: {unknown} not modalities of the MuData ({known}).")
    if len(set(mods)) != len(mods):
        raise ValueError(f"mods names a modality more than once: {mods}.")
    return mods


def _per_mod(value, mod: str, default=None):
    """A per-modality option: one value for all, or a dict keyed by modality (a modality
    the dict leaves out gets ``default``)."""
    if isinstance(value, dict):
        return value.get(mod, default)
    return value


def _prepare_matrix(
    adata, *, layer, transform, target_sum, size_factors, mask_var, prefix: str = ""
) -> PreparedMatrix:
    """The transformed matrix restricted to the fitted genes (those in ``mask_var`` with
    some signal after the transform), and which cells have signal in them."""
    x = select_matrix(adata, layer, f"{prefix}layer")
    if x.ndim != 2 or x.shape != (adata.n_obs, adata.n_vars):
        raise ValueError(
            f"{prefix}the data matrix has shape {x.shape}, not {(adata.n_obs, adata.n_vars)}."
        )
    mask, mask_record = resolve_mask(adata, mask_var, f"{prefix}mask_var")
    sf = None
    if size_factors is not None:
        if isinstance(size_factors, str):
            if size_factors not in adata.obs:
                raise ValueError(
                    f"{prefix}size_factors={size_factors!r} is not a column of adata.obs."
                )
            column = adata.obs[size_factors]
            if not is_numeric_dtype(column) or is_bool_dtype(column):
                raise ValueError(
                    f"{prefix}size_factors={size_factors!r} names a column of {column.dtype} "
                    "values; size factors are positive numbers, one per cell."
                )
            sf = column.to_numpy(dtype=np.float64, na_value=np.nan)
        else:
            try:
                sf = np.asarray(size_factors, dtype=np.float64)
            except (TypeError, ValueError):
                raise TypeError(
                    f"{prefix}size_factors must be a column name of adata.obs or positive "
                    f"numbers, one per cell; got {type(size_factors).__name__} of values that "
                    "are not numbers."
                ) from None
    # library sizes over every gene, as scanpy's normalize_total, before subsetting
    totals = (
        np.asarray(x.sum(1), dtype=np.float64).ravel()
        if sp.issparse(x)
        else np.nansum(np.asarray(x, dtype=np.float64), 1)
    )
    target_sum = resolve_target_sum(target_sum, totals, f"{prefix}target_sum")
    sub = x if mask.all() else x[:, np.flatnonzero(mask)]
    y, resolved = apply_transform(
        sub,
        transform,
        size_factors=sf,
        target_sum=target_sum,
        totals=totals,
        argname=f"{prefix}transform",
    )
    if sf is not None and resolved != "log1p_normalize":
        raise ValueError(
            f"{prefix}size_factors is used only by the 'log1p_normalize' transform, but "
            f"transform={transform!r} resolved to {resolved!r}"
            + (" (the data are not integer counts)" if transform == "auto" else "")
            + "; drop size_factors or choose transform='log1p_normalize'."
        )
    # genes without any signal have no noise variance and carry no information
    if sp.issparse(y):
        col_sq = column_sums_of_squares(y)
    else:
        col_sq = np.nansum(np.asarray(y, dtype=np.float64) ** 2, 0)
    empty = col_sq <= 0
    rows = np.flatnonzero(mask)
    if empty.all():
        raise ValueError(
            f"{prefix}no gene has any signal after the transform: every value of the "
            f"{rows.size} selected gene(s) is zero (or missing)."
        )
    if empty.any():
        logger.warning(
            "%s%d of %d gene(s) have no signal after the transform (all zero) and are left "
            "out of the fit (zero rows in varm): %s",
            prefix,
            int(empty.sum()),
            rows.size,
            shortlist(adata.var_names[rows[empty]], 5),
        )
        y = y[:, np.flatnonzero(~empty)]
        rows = rows[~empty]
    if sp.issparse(y):
        row_sq = row_sums_of_squares(y)
    else:
        row_sq = np.nansum(np.asarray(y, dtype=np.float64) ** 2, 1)
    return PreparedMatrix(y, rows, resolved, row_sq > 0, mask_record, x, target_sum)


@dataclass
class PreparedMatrix:
    """What ``_prepare_matrix`` makes of one AnnData: the matrix to fit (fitted genes
    only), the fitted genes' indices, the transform used, which cells have any signal,
    what ``params["mask_var"]`` records, and the caller's matrix it comes from."""

    y: Any
    rows: np.ndarray
    transform: str
    cell_signal: np.ndarray
    mask_record: str | None
    source: Any
    target_sum: float  # the library size after normalisation (resolved from None)


def _fitted_cells(signal: np.ndarray, obs_names) -> np.ndarray:
    """Indices of the cells with some signal; the others are left out (and said so)."""
    cells = np.flatnonzero(signal)
    if cells.size == 0:
        raise ValueError("no cell has any signal in the fitted genes.")
    if cells.size < signal.size:
        logger.warning(
            "%d of %d cell(s) have no signal in the fitted genes (all zero) and are left "
            "out of the fit (zero rows in obsm): %s",
            signal.size - cells.size,
            signal.size,
            shortlist(obs_names[~signal], 5),
        )
    return cells


def _take_rows(y, cells: np.ndarray, n: int):
    return y if cells.size == n else y[cells]


def _fitted_rows(value, keep: np.ndarray, n: int, name: str, what: str):
    """``value`` (one row per cell / gene of the object, ``n`` rows) restricted to the
    fitted ones ``keep``; a value that already has one row per fitted cell / gene is
    passed as it is."""
    arr = np.asarray(value)
    rows = arr.shape[0] if arr.ndim else -1
    if rows == keep.size:
        return value
    if rows != n:
        raise ValueError(
            f"{name} has {rows if rows >= 0 else 'no'} rows; give one per {what} "
            f"({n}; the {n - keep.size} left out of the fit are dropped from it)."
        )
    return arr[keep]


def _engine_arrays_in_fitted_rows(options, cells, n_obs, gene_rows, obj: str) -> dict[str, Any]:
    """``init`` and ``fixed_factors`` of ``**engine_options`` given in the object's cells
    and genes, restricted to those the fit uses (cells and genes without signal, and
    genes outside ``mask_var``, are left out). ``gene_rows(value, name)`` does the genes."""
    out = dict(options)
    init = options.get("init")
    if isinstance(init, tuple | list) and len(init) == 2:
        out["init"] = (
            _fitted_rows(init[0], cells, n_obs, "init[0] (L0)", f"cell of {obj}"),
            gene_rows(init[1], "init[1] (F0)"),
        )
    if options.get("fixed_factors") is not None:
        out["fixed_factors"] = gene_rows(options["fixed_factors"], "fixed_factors")
    return out


def _mudata_feature_rows(mdata, mods: list[str], rows: dict[str, np.ndarray]):
    """``gene_rows`` of a joint MuData fit: a value is a dict {modality: one row per
    feature of it}, or one array whose rows are the features of the fitted modalities in
    ``mods`` order (all of them, or only the fitted ones)."""
    sizes = [mdata.mod[m].n_vars for m in mods]
    offsets = np.cumsum([0, *sizes[:-1]])
    keep = np.concatenate([rows[m] + off for m, off in zip(mods, offsets, strict=True)])

    def gene_rows(value, name: str):
        if not isinstance(value, dict):
            return _fitted_rows(value, keep, sum(sizes), name, "feature of the fitted modalities")
        if set(value) != set(mods):
            raise ValueError(
                f"{name}: a dict needs one entry per fitted modality ({', '.join(mods)}), "
                f"got {', '.join(map(str, value))}."
            )
        parts = [  # (rows, factors); a vector is one factor, as fit_ebmf reads it
            np.asarray(
                _fitted_rows(
                    value[m],
                    rows[m],
                    mdata.mod[m].n_vars,
                    f"{name}[{m!r}]",
                    f"feature of modality {m!r}",
                )
            ).reshape(rows[m].size, -1)
            for m in mods
        ]
        widths = {part.shape[1] for part in parts}
        if len(widths) != 1:
            raise ValueError(
                f"{name}: the modalities' arrays have different numbers of columns "
                f"({sorted(widths)}); give each the same factors."
            )
        return np.vstack(parts)

    return gene_rows


# what obs_covariates / var_covariates are, for the messages of _check_prior
_OBS_WHAT = "columns of adata.obs, keys of adata.obsm or an array with one row per cell"
_VAR_WHAT = "columns of adata.var, keys of adata.varm or an array with one row per gene"

# fit_ebmf arguments that tl.fit sets itself, and the tl.fit argument that sets each
_SET_BY_FIT = {
    "Y": "layer",  # the matrix comes from the AnnData
    "max_factors": "n_factors",
    "prior_loadings": "prior_loadings",
    "prior_factors": "prior_factors",
    "noise": "noise",
    "X_l": "obs_covariates",
    "X_f": "var_covariates",
    "device": "device",
    "random_state": "random_state",
    "progress": "progress",
    "fixed_loadings": "intercept",
}


def _check_engine_options(options: dict[str, Any]) -> None:
    """Refuse ``**engine_options`` that :func:`fit_ebmf` does not take, or that ``tl.fit``
    sets from one of its own arguments (which is then named)."""
    known = [n for n in inspect.signature(fit_ebmf).parameters if n not in _SET_BY_FIT]
    for name in options:
        if name in _SET_BY_FIT:
            raise TypeError(f"{name}= is set by tl.fit; pass {_SET_BY_FIT[name]}= instead.")
        if name not in known:
            raise TypeError(
                f"tl.fit got an unknown option {name}=; the options passed on to "
                f"cebmf.fit_ebmf are {', '.join(known)}."
            )


def _engine_options(y, made_here: bool, device, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` plus ``sparse_backend="scipy"`` for a sparse matrix this module made (a
    float64 transform or concatenation) on the CPU: the torch kernels would add a
    transposed copy, keeping the matrix in memory three times over the caller's float32
    counts. The caller's own matrix (or an explicit ``sparse_backend``) keeps the default."""
    if (
        made_here
        and sp.issparse(y)
        and "sparse_backend" not in options
        and resolve_device(device).type == "cpu"
    ):
        return {**options, "sparse_backend": "scipy"}
    return options


def _prior_spec(prior, has_cov: bool, default: str) -> Any:
    if prior is None:
        return "cash" if has_cov else default
    return prior


def _check_prior(
    spec, has_cov: bool, prior_arg: str, cov_arg: str, what: str, engine_options: dict
) -> None:
    """The engine's prior / covariate checks, with tl.fit's argument names in the messages
    (``fit_ebmf`` would name its own, ``X_l`` and ``X_f``)."""
    check_prior_covariates(
        PriorChoice(spec, prior_arg).priors,
        has_cov,
        prior_arg=prior_arg,
        covariates_arg=cov_arg,
        what=what,
        self_covariates=bool(engine_options.get("self_covariates", False)),
    )


def _describe(prior) -> Any:
    if isinstance(prior, str):
        return prior
    if isinstance(prior, Prior):
        return repr(prior)
    return [_describe(p) for p in prior]


def fit(
    data,
    *,
    layer: str | dict | None = None,
    obs_covariates: Any = None,
    var_covariates: Any = None,
    n_factors: int = 30,
    prior_loadings: Any = None,
    prior_factors: Any = None,
    noise: str = "column",
    transform: str | dict | None = "auto",
    target_sum: float | None = DEFAULT_TARGET_SUM,
    size_factors: Any = None,
    mask_var: Any = HIGHLY_VARIABLE,
    intercept: bool = False,
    mods: list[str] | None = None,
    key_added: str = "cebmf",
    device: str = "auto",
    random_state: int | np.random.Generator | None = 0,
    copy: bool = False,
    progress: bool = False,
    **engine_options: Any,
):
    r"""Empirical Bayes matrix factorisation of an AnnData (or a MuData), covariate-moderated
    when covariates are given: Y ~ L F^T, cells x factors loadings L, genes x factors F.

    Parameters
    ----------
    data
        AnnData (cells x genes), or MuData whose modalities share the cells (fitted jointly:
        shared loadings, per-modality factors, noise and transforms).
    layer
        Use ``adata.layers[layer]`` instead of ``.X`` (MuData: one for all or a dict by
        modality). The matrix is never densified or modified.
    obs_covariates, var_covariates
        Cell / gene covariates for the priors of the loadings / factors: an ``obs`` / ``var``
        column name or list of names (numeric as is, booleans 0/1, categoricals one-hot),
        an ``obsm`` / ``varm`` key (e.g. ``"spatial"``, a gene-set membership matrix), or an
        array, DataFrame or Series (a DataFrame / Series is aligned on its index; any
        index other than the default RangeIndex must hold the obs / var names). Only the
        fitted cells / genes need finite values. Standardised inside the priors. MuData:
        ``var_covariates`` is a dict by modality (each modality's features have their own
        covariates; a modality left out keeps a plain prior), and
        ``uns[key]["params"]["var_covariates"]`` names the columns ``"mod:name"``.
    n_factors
        Most factors to add; the number kept is chosen by the data (greedy + nullcheck).
        ``uns[key]["max_factors_reached"]`` is True when the fit ended with this many
        learned factors: then the cap set their number, and a larger one lets the data
        choose.
    prior_loadings, prior_factors
        Prior family names or :class:`~cebmf.priors.Prior` objects; default
        ``"point_normal"``, or ``"cash"`` for a side with covariates.
    noise
        ``"column"`` (one variance per gene, default), ``"row"`` or ``"constant"``.
    transform
        ``"auto"`` (integer counts: ``"log1p_normalize"``; anything else: none),
        ``"log1p_normalize"`` (x * target_sum / library size, then log1p, on the stored
        non-zeros; library sizes over all genes), ``"log1p"``, ``"binary"`` and ``"tfidf"``
        (ATAC peaks), or None (also ``"none"``, as recorded in ``params``). Negative
        values with a count transform, and negative integers with ``"auto"``, are an error.
    target_sum
        Library size after normalisation (10^4, as scanpy's CP10k); None: the median
        library size of the cells with any counts, as scanpy's ``normalize_total``
        (``params["target_sum"]`` records the value used; MuData: one per modality).
    size_factors
        An ``obs`` column or array of per-cell size factors replacing library sizes (only
        with ``"log1p_normalize"``; an error with any other transform).
    mask_var
        Genes to fit, as scanpy: a boolean ``var`` column or array; by default
        ``var["highly_variable"]`` when present, else every gene; None: every gene. Genes
        and cells without any signal (all zero after the transform) are left out, with a
        warning that says which and how many; outputs are full length, with zero rows for
        the genes and cells not fitted (``uns[key]["var_mask"]`` / ``["obs_mask"]``).
    intercept
        Add a first factor with loadings fixed at 1 (its factor: the gene means).
    mods
        MuData: the modalities to fit (default: all).
    key_added
        Results go to ``obsm["X_" + key_added]``, ``varm[key_added + "_factors"]`` and
        ``uns[key_added]``.
    device, random_state, progress, **engine_options
        Passed to :func:`cebmf.fit_ebmf` (e.g. ``tol``, ``max_iter``, ``dtype``; an
        option that ``tl.fit`` sets itself, such as ``max_factors``, is refused with the
        name of the ``tl.fit`` argument to use); ``params["random_state"]`` records the
        integer seed used (drawn when None or a numpy generator is given). ``init`` and
        ``fixed_factors`` have one row per cell / gene of the object (those of the cells
        and genes left out of the fit are dropped); for a MuData, ``F0`` and
        ``fixed_factors`` are a dict {modality: one row per feature} or the modalities'
        features stacked in ``mods`` order.
    copy
        Return a modified copy instead of writing into ``data``.

    Returns
    -------
    None, or the copy when ``copy=True``. Writes ``obsm["X_{key}"]`` (loadings, N x K),
    ``obsm["X_{key}_sd"]``, ``obsm["X_{key}_lfsr"]``, ``varm["{key}_factors"]`` and its
    ``_sd`` / ``_lfsr`` (n_vars x K), and ``uns[key]`` (params, elbo trace, pve, noise_sd,
    converged, n_iter, max_factors_reached, factor_names, priors, var_mask, obs_mask, covariates). A
    ``key_added`` whose outputs would overwrite another fit's is refused.
    """
    try:
        import mudata as md
    except ImportError:  # pragma: no cover - mudata is a dependency
        md = None
    if not isinstance(key_added, str) or not key_added or "/" in key_added:
        raise ValueError(f"key_added must be a non-empty string without '/', got {key_added!r}.")
    if isinstance(n_factors, bool) or not isinstance(n_factors, int | np.integer) or n_factors < 1:
        raise ValueError(f"n_factors must be a positive integer, got {n_factors!r}.")
    check_flags(intercept=intercept, copy=copy, progress=progress)
    _check_engine_options(engine_options)
    random_state = resolve_seed(random_state)  # params record the seed actually used
    if md is not None and isinstance(data, md.MuData):
        return _fit_mudata(
            data,
            layer=layer,
            obs_covariates=obs_covariates,
            var_covariates=var_covariates,
            n_factors=n_factors,
            prior_loadings=prior_loadings,
            prior_factors=prior_factors,
            noise=noise,
            transform=transform,
            target_sum=target_sum,
            size_factors=size_factors,
            mask_var=mask_var,
            intercept=intercept,
            mods=mods,
            key_added=key_added,
            device=device,
            random_state=random_state,
            copy=copy,
            progress=progress,
            **engine_options,
        )
    import anndata as ad

    if not isinstance(data, ad.AnnData):
        raise TypeError(f"data must be an AnnData or a MuData, got {type(data).__name__}.")
    if mods is not None:
        raise ValueError("mods= is for MuData input; data is an AnnData.")
    if getattr(data, "isbacked", False):
        raise ValueError(
            "data is backed on disk (read with backed='r'); load it into memory first "
            "(adata = adata.to_memory()) or pass copy=True on a loaded object."
        )
    check_key_free(data, key_added)
    adata = data.copy() if copy else data
    prep = _prepare_matrix(
        adata,
        layer=layer,
        transform=transform,
        target_sum=target_sum,
        size_factors=size_factors,
        mask_var=mask_var,
    )
    rows = prep.rows
    cells = _fitted_cells(prep.cell_signal, adata.obs_names)
    y = _take_rows(prep.y, cells, adata.n_obs)
    x_l, l_names = resolve_covariates(
        obs_covariates, adata.obs, adata.obsm, adata.n_obs, "obs_covariates", "cells", cells
    )
    x_f, f_names = resolve_covariates(
        var_covariates, adata.var, adata.varm, adata.n_vars, "var_covariates", "genes", rows
    )
    pl = _prior_spec(prior_loadings, x_l is not None, "point_normal")
    pf = _prior_spec(prior_factors, x_f is not None, "point_normal")
    _check_prior(pl, x_l is not None, "prior_loadings", "obs_covariates", _OBS_WHAT, engine_options)
    _check_prior(pf, x_f is not None, "prior_factors", "var_covariates", _VAR_WHAT, engine_options)
    res = fit_ebmf(
        y,
        max_factors=n_factors,
        prior_loadings=pl,
        prior_factors=pf,
        noise=noise,
        X_l=x_l,
        X_f=x_f,
        device=device,
        random_state=random_state,
        progress=progress,
        fixed_loadings=np.ones(cells.size) if intercept else None,
        **_engine_options(
            y,
            y is not prep.source,
            device,
            _engine_arrays_in_fitted_rows(
                engine_options,
                cells,
                adata.n_obs,
                lambda value, name: _fitted_rows(value, rows, adata.n_vars, name, "gene of adata"),
                "adata",
            ),
        ),
    )
    params = {
        "layer": layer,
        "transform": prep.transform,
        "target_sum": prep.target_sum,
        "size_factors": _size_factors_record(size_factors),
        "obs_covariates": l_names,
        "var_covariates": f_names,
        "n_factors": int(n_factors),
        "prior_loadings": _describe(pl),
        "prior_factors": _describe(pf),
        "noise": noise,
        "mask_var": prep.mask_record,
        "intercept": bool(intercept),
        "key_added": key_added,
        "device": str(device),
        "random_state": int(random_state),
        "engine": h5_safe(engine_options),
    }
    covariates = {}
    if x_l is not None:
        covariates["loadings"], covariates["loadings_names"] = x_l, l_names
    if x_f is not None:
        covariates["factors"], covariates["factors_names"] = x_f, f_names
    noise_sd = res.noise_sd
    if noise == "column":
        noise_sd = full_rows(np.asarray(noise_sd)[:, None], rows, adata.n_vars, np.nan)[:, 0]
    elif noise == "row":
        noise_sd = full_rows(np.asarray(noise_sd)[:, None], cells, adata.n_obs, np.nan)[:, 0]
    _write_obsm(adata.obsm, res, cells, adata.n_obs, key_added)
    _write_varm(adata.varm, res.F, res.F_sd, res.F_lfsr, rows, adata.n_vars, key_added)
    adata.uns[key_added] = uns_summary(
        res,
        params,
        covariates,
        {
            "var_mask": _mask(rows, adata.n_vars),
            "obs_mask": _mask(cells, adata.n_obs),
            "noise_sd": noise_sd,
        },
    )
    return adata if copy else None


def _size_factors_record(size_factors) -> str | None:
    if size_factors is None or isinstance(size_factors, str):
        return size_factors
    return "array"


def _mask(index: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=bool)
    out[index] = True
    return out


def _write_obsm(obsm, res, cells: np.ndarray, n_obs: int, key: str) -> None:
    """Loadings, sds and lfsr (N x K); zero rows for cells left out of the fit."""
    for name, values in zip(output_names(key)[0], (res.L, res.L_sd, res.L_lfsr), strict=True):
        obsm[name] = full_rows(values, cells, n_obs, 0.0)


def _write_varm(varm, f, f_sd, f_lfsr, rows, n_vars, key: str) -> None:
    """Factors, sds and lfsr (n_vars x K); zero rows for genes not fitted (as PCA)."""
    for name, values in zip(output_names(key)[1], (f, f_sd, f_lfsr), strict=True):
        varm[name] = full_rows(values, rows, n_vars, 0.0)


def _block_var_covariates(spec, mdata, mods, rows, sizes):
    """Feature covariates of a joint fit, laid out block-diagonally: modality m's fitted
    features (rows) times its own covariate columns, zeros elsewhere. Returns the matrix
    (or None), the column labels ``"mod:name"`` and each block's column indices (None for
    a modality without covariates)."""
    if not spec:
        return None, [], [None] * len(mods)
    mats, labels, columns, width = [], [], [], 0
    for m in mods:
        if spec.get(m) is None:
            mats.append(None)
            columns.append(None)
            continue
        mod = mdata.mod[m]
        x, names = resolve_covariates(
            spec[m],
            mod.var,
            mod.varm,
            mod.n_vars,
            f"var_covariates[{m!r}]",
            "features",
            rows[m],
            owner=f"mdata[{m!r}]",
        )
        mats.append(x)
        columns.append(list(range(width, width + x.shape[1])))
        labels += [f"{m}:{name}" for name in names]
        width += x.shape[1]
    out = np.zeros((sum(sizes), width))
    start = 0
    for x, cols, size in zip(mats, columns, sizes, strict=True):
        if x is not None:
            out[start : start + size, cols[0] : cols[-1] + 1] = x
        start += size
    return out, labels, columns


def _fit_mudata(
    mdata,
    *,
    layer,
    obs_covariates,
    var_covariates,
    n_factors,
    prior_loadings,
    prior_factors,
    noise,
    transform,
    target_sum,
    size_factors,
    mask_var,
    intercept,
    mods,
    key_added,
    device,
    random_state,
    copy,
    progress,
    **engine_options,
):
    if var_covariates is not None and not isinstance(var_covariates, dict):
        raise TypeError(
            "var_covariates of a MuData fit is a dict {modality: columns of its var / keys "
            "of its varm / an array with one row per feature}: the modalities' features "
            f"differ; got {type(var_covariates).__name__}."
        )
    if noise != "column":
        raise ValueError("a joint MuData fit uses noise='column' (per-feature variances).")
    mods = _fitted_modalities(mdata, mods)
    per_mod = {
        "layer": layer,
        "transform": transform,
        "size_factors": size_factors,
        "mask_var": mask_var,
        "prior_factors": prior_factors,
        "var_covariates": var_covariates,
    }
    for name, value in per_mod.items():
        # a misspelt modality would silently leave the real one on the default
        extra = [m for m in value if m not in mods] if isinstance(value, dict) else []
        if extra:
            raise ValueError(
                f"{name}: {extra} not among the fitted modalities ({', '.join(mods)})."
            )
    obs_names = mdata.obs_names
    for m in mods:
        mod_obs = mdata.mod[m].obs_names
        if len(mod_obs) != len(obs_names) or not (mod_obs == obs_names).all():
            raise ValueError(
                f"modality {m!r} does not have the MuData's cells in the same order "
                f"({mdata.mod[m].n_obs} vs {mdata.n_obs}); a joint fit needs every modality "
                "on the same cells (e.g. mu.pp.intersect_obs(mdata))."
            )
    if getattr(mdata, "isbacked", False):
        raise ValueError(
            "data is backed on disk; load it into memory first (mdata = mdata.to_memory())."
        )
    check_key_free(mdata, key_added)
    out = mdata.copy() if copy else mdata
    preps = {}
    for m in mods:
        preps[m] = _prepare_matrix(
            out.mod[m],
            layer=_per_mod(layer, m),
            transform=_per_mod(transform, m, "auto"),
            target_sum=target_sum,
            size_factors=_per_mod(size_factors, m),
            mask_var=_per_mod(mask_var, m, HIGHLY_VARIABLE),
            prefix=f"[{m}] ",
        )
    # a cell is fitted when it has signal in some modality
    cells = _fitted_cells(
        np.logical_or.reduce([p.cell_signal for p in preps.values()]), out.obs_names
    )
    blocks, parts, rows, resolved, sizes = {}, [], {}, {}, []
    start = 0
    sparse = any(sp.issparse(p.y) for p in preps.values())
    for m, prep in preps.items():
        y = _take_rows(prep.y, cells, out.n_obs)
        if sparse and not sp.issparse(y) and np.isnan(np.asarray(y, dtype=np.float64)).any():
            raise ValueError(
                f"[{m}] has missing values (NaN), which a joint fit can only take when every "
                "modality is dense, but other modalities are sparse; impute the missing "
                f"values of {m!r} or fit it on its own."
            )
        parts.append(sp.csr_matrix(y) if sparse else y)
        rows[m], resolved[m] = prep.rows, prep.transform
        blocks[m] = slice(start, start + y.shape[1])
        sizes.append(y.shape[1])
        start += y.shape[1]
    y = sp.hstack(parts, format="csr") if sparse else np.hstack(parts)
    x_l, l_names = resolve_covariates(
        obs_covariates,
        obs_with_modalities(out, mods),
        out.obsm,
        out.n_obs,
        "obs_covariates",
        "cells",
        cells,
        owner="mdata",
    )
    pl = _prior_spec(prior_loadings, x_l is not None, "point_normal")
    x_f, f_names, f_columns = _block_var_covariates(var_covariates, out, mods, rows, sizes)
    _check_prior(pl, x_l is not None, "prior_loadings", "obs_covariates", _OBS_WHAT, engine_options)
    per_mod_f = [
        _prior_spec(_per_mod(prior_factors, m), cols is not None, "point_normal")
        for m, cols in zip(mods, f_columns, strict=True)
    ]
    each = isinstance(prior_factors, dict) or isinstance(var_covariates, dict)
    for m, spec, cols in zip(mods, per_mod_f, f_columns, strict=True):
        if isinstance(spec, list | tuple):
            raise TypeError(
                f"prior_factors of modality {m!r} is a sequence; a joint MuData fit takes one "
                "prior per modality (a name or a Prior instance)."
            )
        _check_prior(
            spec,
            cols is not None,
            f"prior_factors[{m!r}]" if isinstance(prior_factors, dict) else "prior_factors",
            f"var_covariates[{m!r}]" if each else "var_covariates",
            f"columns of mdata[{m!r}].var, keys of its varm or an array with one row per feature",
            engine_options,
        )
    pf = BlockPrior(sizes, per_mod_f, names=mods, covariate_columns=f_columns)
    res = fit_ebmf(
        y,
        max_factors=n_factors,
        prior_loadings=pl,
        prior_factors=pf,
        noise=noise,
        X_l=x_l,
        X_f=x_f,
        device=device,
        random_state=random_state,
        progress=progress,
        fixed_loadings=np.ones(cells.size) if intercept else None,
        **_engine_options(
            y,
            True,
            device,
            _engine_arrays_in_fitted_rows(
                engine_options,
                cells,
                out.n_obs,
                _mudata_feature_rows(out, mods, rows),
                "the MuData",
            ),
        ),
    )
    _write_obsm(out.obsm, res, cells, out.n_obs, key_added)
    var_mask, noise_sd = {}, {}
    for m in mods:
        cols = blocks[m]
        mod = out.mod[m]
        _write_varm(
            mod.varm, res.F[cols], res.F_sd[cols], res.F_lfsr[cols], rows[m], mod.n_vars, key_added
        )
        var_mask[m] = _mask(rows[m], mod.n_vars)
        noise_sd[m] = full_rows(
            np.asarray(res.noise_sd)[cols][:, None], rows[m], mod.n_vars, np.nan
        )[:, 0]
    params = {
        "mods": mods,
        "layer": h5_safe(layer),
        "transform": resolved,
        "target_sum": (
            float(target_sum)
            if target_sum is not None
            else {m: p.target_sum for m, p in preps.items()}
        ),
        "obs_covariates": l_names,
        "var_covariates": f_names,
        "n_factors": int(n_factors),
        "prior_loadings": _describe(pl),
        "prior_factors": {m: _describe(p) for m, p in zip(mods, per_mod_f, strict=True)},
        "noise": noise,
        "mask_var": {m: p.mask_record for m, p in preps.items()},
        "size_factors": {m: _size_factors_record(_per_mod(size_factors, m)) for m in mods},
        "intercept": bool(intercept),
        "key_added": key_added,
        "device": str(device),
        "random_state": int(random_state),
        "engine": h5_safe(engine_options),
    }
    covariates = {} if x_l is None else {"loadings": x_l, "loadings_names": l_names}
    if x_f is not None:
        covariates["factors"], covariates["factors_names"] = x_f, f_names
    out.uns[key_added] = uns_summary(
        res,
        params,
        covariates,
        {
            "mods": np.asarray(mods, dtype=object),
            "pve_by_mod": pve_by_block(res, blocks),
            "var_mask": var_mask,
            "obs_mask": _mask(cells, out.n_obs),
            "noise_sd": noise_sd,
        },
    )
    names = factor_names(res.n_factors)
    for m in mods:  # each modality also carries its own view of the fit
        mod = out.mod[m]
        mod.uns[key_added] = h5_safe(
            {"factor_names": names, "joint_fit": True, "pve": out.uns[key_added]["pve_by_mod"][m]}
        )
    # a refit under the same key that leaves a modality out replaces the fit there too
    for m, mod in out.mod.items():
        if m not in mods and drop_joint_outputs(mod, key_added):
            logger.info("removed the previous joint fit %r from modality %r", key_added, m)
    return out if copy else None
