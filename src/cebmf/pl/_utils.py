"""Shared helpers of :mod:`cebmf.pl`: reading a fit from AnnData, choosing factors and
bases, laying out panels, and scanpy's ``show`` / ``save`` / ``return_fig`` conventions."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from matplotlib import pyplot as plt
from matplotlib.axes import Axes
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.figure import Figure

from .._validation import shortlist as _shortlist

SIGNED_CMAP = "RdBu_r"
NONNEGATIVE_CMAP = "viridis"
POSITIVE_COLOR = "#b2182b"
NEGATIVE_COLOR = "#2166ac"


# ---- the fit stored in AnnData ---------------------------------------------------------
def check_adata(adata: Any) -> None:
    if not isinstance(adata, ad.AnnData):
        raise TypeError(f"adata must be an AnnData object, got {type(adata).__name__}.")


def _fit_hint(key: str) -> str:
    return f"run cebmf.tl.fit(adata, key_added={key!r}) first, or pass the key= it was run with"


def get_uns(adata: ad.AnnData, key: str) -> Mapping:
    """``adata.uns[key]``, with a clear error when the fit is absent."""
    check_adata(adata)
    if not isinstance(key, str):
        raise TypeError(f"key must be a str (the key_added of cebmf.tl.fit), got {key!r}.")
    uns = adata.uns.get(key)
    if not isinstance(uns, Mapping):
        raise ValueError(f"adata.uns[{key!r}] not found: {_fit_hint(key)}.")
    return uns


def uns_entry(adata: ad.AnnData, key: str, entry: str) -> Any:
    uns = get_uns(adata, key)
    if entry not in uns:
        raise ValueError(
            f"adata.uns[{key!r}] has no {entry!r} entry (an incomplete cebmf result): "
            f"{_fit_hint(key)}."
        )
    return uns[entry]


def _stored_matrix(adata: ad.AnnData, key: str, slot: str, name: str, dims: str) -> np.ndarray:
    """``adata.<slot>[name]`` as a 2-D float64 array, with clear errors."""
    check_adata(adata)
    store = getattr(adata, slot)
    if name not in store:
        raise ValueError(f"adata.{slot}[{name!r}] not found: {_fit_hint(key)}.")
    arr = np.asarray(store[name], dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"adata.{slot}[{name!r}] must be 2-D ({dims}).")
    return arr


def loadings(adata: ad.AnnData, key: str, suffix: str = "") -> np.ndarray:
    """The N x K loadings (``suffix`` "_sd" / "_lfsr" for the other summaries)."""
    return _stored_matrix(adata, key, "obsm", f"X_{key}{suffix}", "cells x factors")


def factors_matrix(adata: ad.AnnData, key: str, suffix: str = "") -> np.ndarray:
    """The n_vars x K factors (``suffix`` "_sd" / "_lfsr" for the other summaries)."""
    return _stored_matrix(adata, key, "varm", f"{key}_factors{suffix}", "genes x factors")


def factor_names(adata: ad.AnnData, key: str, n_factors: int | None = None) -> list[str]:
    """``uns[key]["factor_names"]`` as a list of str ("factor_1", ... when absent)."""
    uns = get_uns(adata, key)
    names = uns.get("factor_names")
    if names is None:
        if n_factors is None:
            n_factors = len(np.atleast_1d(uns_entry(adata, key, "pve")))
        return [f"factor_{i + 1}" for i in range(n_factors)]
    names = [str(n) for n in np.atleast_1d(np.asarray(names))]
    if n_factors is not None and len(names) != n_factors:
        raise ValueError(
            f"adata.uns[{key!r}]['factor_names'] has {len(names)} names but the result has "
            f"{n_factors} factors; the result is inconsistent: {_fit_hint(key)}."
        )
    return names


def _fit_mask(adata: ad.AnnData, key: str, entry: str, n: int, what: str) -> np.ndarray:
    mask = get_uns(adata, key).get(entry)
    if mask is None:
        return np.ones(n, dtype=bool)
    mask = np.asarray(mask, dtype=bool).ravel()
    if mask.size != n:
        raise ValueError(
            f"adata.uns[{key!r}][{entry!r}] has {mask.size} entries but adata has "
            f"{n} {what}; was the AnnData subset after the fit? {_fit_hint(key)}."
        )
    return mask


def var_mask(adata: ad.AnnData, key: str) -> np.ndarray:
    """Boolean mask of the genes used in the fit (all genes when not stored)."""
    return _fit_mask(adata, key, "var_mask", adata.n_vars, "genes")


def obs_mask(adata: ad.AnnData, key: str) -> np.ndarray:
    """Boolean mask of the cells used in the fit (all cells when not stored)."""
    return _fit_mask(adata, key, "obs_mask", adata.n_obs, "cells")


def resolve_factors(factors: Any, names: Sequence[str], argname: str = "factors") -> list[int]:
    """0-based indices from None (all), an int / name, or a sequence of them."""
    k = len(names)
    if k == 0:
        raise ValueError("the result has no factors (K = 0): there is nothing to plot.")
    if factors is None:
        return list(range(k))
    items = [factors] if isinstance(factors, str | int | np.integer) else factors
    try:
        items = list(items)
    except TypeError:
        raise TypeError(
            f"{argname} must be None, a factor index, a factor name or a list of them, "
            f"got {type(factors).__name__}."
        ) from None
    if not items:
        raise ValueError(f"{argname} is empty; pass None for all factors.")
    return [resolve_factor(f, names, argname) for f in items]


def resolve_factor(factor: Any, names: Sequence[str], argname: str = "factor") -> int:
    """A 0-based index from a factor index (negative counts from the end) or name."""
    k = len(names)
    if isinstance(factor, bool | np.bool_):
        raise TypeError(f"{argname} must be a factor index or name, got a bool.")
    if isinstance(factor, int | np.integer):
        i = int(factor)
        if not -k <= i < k:
            raise ValueError(
                f"{argname}={i} is out of range: the result has {k} factors (indices 0 to "
                f"{k - 1}; names {_shortlist(names)})."
            )
        return i % k
    if isinstance(factor, str):
        if factor not in names:
            raise ValueError(
                f"unknown factor name {factor!r} in {argname}; known factors: "
                f"{_shortlist(names)} (or 0-based indices)."
            )
        return list(names).index(factor)
    raise TypeError(
        f"{argname} entries must be factor indices (int) or names (str), got "
        f"{type(factor).__name__}."
    )


def resolve_basis(adata: ad.AnnData, basis: Any) -> str:
    """The ``adata.obsm`` key of an embedding: ``basis`` itself or ``"X_" + basis``."""
    if not isinstance(basis, str) or not basis:
        raise TypeError(f"basis must be a non-empty str (e.g. 'umap', 'spatial'), got {basis!r}.")
    for cand in (basis, f"X_{basis}"):
        if cand in adata.obsm:
            arr = adata.obsm[cand]
            if np.ndim(arr) != 2 or np.shape(arr)[1] < 2:
                raise ValueError(
                    f"adata.obsm[{cand!r}] must have at least 2 columns to be plotted as an "
                    f"embedding, got shape {np.shape(arr)}."
                )
            return cand
    available = [k for k in adata.obsm if np.ndim(adata.obsm[k]) == 2]
    raise ValueError(
        f"basis {basis!r} not found: neither adata.obsm[{basis!r}] nor "
        f"adata.obsm['X_{basis}'] exists (available: {_shortlist(available)}); compute it "
        "first (e.g. sc.tl.umap(adata)) or pass another basis."
    )


def basis_array(adata: ad.AnnData, obsm_key: str) -> np.ndarray:
    arr = adata.obsm[obsm_key]
    if isinstance(arr, pd.DataFrame):
        arr = arr.to_numpy()
    return np.asarray(arr, dtype=np.float64)


def temporary_adata(
    adata: ad.AnnData, obsm_key: str, columns: Mapping[str, np.ndarray]
) -> tuple[ad.AnnData, str]:
    """A new, shallow AnnData with only the basis and the given obs columns.

    Returns the object and the basis name to give ``sc.pl.embedding``. The user's AnnData
    is never touched: scanpy may add columns or colours to this object only.
    """
    index = pd.Index(np.arange(adata.n_obs).astype(str))
    obs = pd.DataFrame(dict(columns), index=index)
    tmp = ad.AnnData(obs=obs, obsm={obsm_key: basis_array(adata, obsm_key)})
    name = obsm_key[2:] if obsm_key.startswith("X_") else obsm_key
    return tmp, name


def is_nonnegative(values: np.ndarray) -> bool:
    finite = values[np.isfinite(values)]
    return bool(finite.size == 0 or finite.min() >= 0)


def factor_palette(n: int) -> list[str]:
    import scanpy as sc

    pal = sc.pl.palettes.default_20 if n <= 20 else sc.pl.palettes.default_102
    return [pal[i % len(pal)] for i in range(n)]


# ---- figure layout and the scanpy return conventions ------------------------------------
def check_choice(value: Any, argname: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(
            f"{argname} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}."
        )
    return value


def check_ncols(ncols: Any) -> int:
    """The number of panel columns: a positive integer."""
    if isinstance(ncols, bool) or not isinstance(ncols, int | np.integer) or ncols < 1:
        raise ValueError(f"ncols must be a positive integer, got {ncols!r}.")
    return int(ncols)


def panels(
    n: int, ncols: int, panel_size: tuple[float, float], ax: Axes | None
) -> tuple[Figure, list[Axes]]:
    """A figure with ``n`` panels on a grid of ``ncols`` columns (or ``ax`` when n is 1)."""
    check_ncols(ncols)
    if ax is not None:
        if not isinstance(ax, Axes):
            raise TypeError(f"ax must be a matplotlib Axes, got {type(ax).__name__}.")
        if n != 1:
            raise ValueError(
                f"ax= can only be used when one panel is drawn, but {n} panels were asked "
                "for; pass ax=None or select a single factor / covariate."
            )
        return ax.figure, [ax]
    ncols = min(int(ncols), n)
    nrows = math.ceil(n / ncols)
    fig, axs = plt.subplots(
        nrows,
        ncols,
        figsize=(panel_size[0] * ncols, panel_size[1] * nrows),
        squeeze=False,
        layout="constrained",
    )
    flat = list(axs.ravel())
    for extra in flat[n:]:
        extra.remove()
    return fig, flat[:n]


def save_path(save: Any, writekey: str) -> Path:
    """Where ``save`` asks a figure to go.

    ``True``: ``{sc.settings.figdir}/{writekey}.{sc.settings.file_format_figs}``. A path with
    a directory part (or a :class:`os.PathLike`) is used as given. A bare file name follows
    scanpy's convention: ``{figdir}/{writekey}{save}``.
    """
    import scanpy as sc

    fmt = sc.settings.file_format_figs
    suffix = sc.settings.plot_suffix
    figdir = Path(sc.settings.figdir)
    if save is True:
        path = figdir / f"{writekey}{suffix}.{fmt}"
    elif isinstance(save, os.PathLike) or (
        isinstance(save, str) and (Path(save).is_absolute() or Path(save).parent != Path("."))
    ):
        path = Path(save)
        if not path.suffix:
            path = path.with_name(f"{path.name}.{fmt}")
    elif isinstance(save, str) and save:
        path = figdir / f"{writekey}{save}"
        if not path.suffix:
            path = path.with_name(f"{path.name}{suffix}.{fmt}")
    else:
        raise TypeError(
            f"save must be True, a file name or a path (e.g. 'figures/plot.png'), got {save!r}."
        )
    ext = path.suffix[1:].lower()
    supported = FigureCanvasBase.get_supported_filetypes()
    if ext not in supported:
        raise ValueError(
            f"save={str(save)!r}: unsupported figure format {ext!r}; use one of "
            f"{', '.join(sorted(supported))} (e.g. a name ending in '.png' or '.pdf')."
        )
    return path


def finish(
    fig: Figure,
    axes: Axes | list[Axes],
    writekey: str,
    *,
    show: bool | None,
    save: Any,
    return_fig: bool | None,
):
    """Save and/or show the figure and return what scanpy would: the Figure with
    ``return_fig=True``, else the Axes (or list of Axes) unless the figure was shown."""
    import scanpy as sc

    path = None
    if save is not None and save is not False:
        path = save_path(save, writekey)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, bbox_inches="tight")
    if return_fig:
        return fig
    show = sc.settings.autoshow if show is None else show
    if show:
        plt.show()
    if path is not None:
        plt.close(fig)
    if show:
        return None
    return axes


def single_or_list(axes: list[Axes]) -> Axes | list[Axes]:
    return axes[0] if len(axes) == 1 else axes


def check_save(save: Any) -> None:
    """Validate ``save`` before anything is drawn (so a bad value leaves no open figure)."""
    if save is not None and save is not False:
        save_path(save, "cebmf")
