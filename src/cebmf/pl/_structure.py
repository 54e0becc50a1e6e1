"""Mean loading per group of cells and factor: a heatmap or a structure (bar) plot."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.colors import Colormap
from matplotlib.figure import Figure

from . import _utils as u
from ._source import plot_data


def _groups(adata: AnnData, groupby: str) -> pd.Categorical:
    if not isinstance(groupby, str):
        raise TypeError(f"groupby must be the name of an adata.obs column, got {groupby!r}.")
    if groupby not in adata.obs.columns:
        cats = [
            c
            for c in adata.obs.columns
            if isinstance(adata.obs[c].dtype, pd.CategoricalDtype)
            or adata.obs[c].dtype.kind in "bOSU"
        ]
        raise ValueError(
            f"groupby={groupby!r} is not a column of adata.obs; categorical columns: "
            f"{u._shortlist(cats)}."
        )
    col = adata.obs[groupby]
    if isinstance(col.dtype, pd.CategoricalDtype):
        return pd.Categorical(col)
    if col.dtype.kind == "f":
        raise ValueError(
            f"groupby={groupby!r} is a numeric (float) column; pass a categorical adata.obs "
            "column, e.g. bin it first with pd.cut into a new column."
        )
    return pd.Categorical(col.astype(str) if col.dtype.kind == "O" else col)


def group_means(
    adata: AnnData,
    groupby: str,
    key: str = "cebmf",
    factors: int | str | Sequence[int | str] | None = None,
    standardize: bool = False,
) -> pd.DataFrame:
    """The mean loading per group (rows, in category order) and factor (columns).

    With ``standardize=True`` each factor's loadings are first divided by their largest
    absolute value over all cells. Empty categories are left out.
    """
    L = u.loadings(adata, key)
    names = u.factor_names(adata, key, L.shape[1])
    idx = u.resolve_factors(factors, names)
    groups = _groups(adata, groupby)
    values = L[:, idx]
    if standardize:
        scale = np.nanmax(np.abs(values), axis=0)
        values = values / np.where(scale > 0, scale, 1.0)
    frame = pd.DataFrame(values, columns=[names[i] for i in idx], index=adata.obs_names)
    means = frame.groupby(np.asarray(groups), sort=False).mean()
    order = [c for c in groups.categories if c in means.index]
    # by position: .loc with a list of booleans (a bool groupby) would be read as a mask
    means = means.iloc[[means.index.get_loc(c) for c in order]]
    means.index = pd.Index([str(c) for c in order], name=groupby)
    return means


def structure(
    adata: AnnData,
    groupby: str,
    key: str = "cebmf",
    kind: Literal["heatmap", "bars"] = "heatmap",
    standardize: bool = False,
    *,
    factors: int | str | Sequence[int | str] | None = None,
    cmap: str | Colormap | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
    ax: Axes | None = None,
    return_fig: bool | None = None,
    mod: str | None = None,
) -> Figure | Axes | None:
    """Mean loading of each factor per group of cells.

    ``kind="heatmap"``: groups x factors, coloured by the mean loading (diverging
    ``"RdBu_r"`` centred at 0 when some mean is negative, ``"viridis"`` otherwise).
    ``kind="bars"``: for nonnegative loadings a structure plot as in fastTopics (one bar per
    group, stacked by factor); for signed loadings grouped bars around 0.

    Parameters
    ----------
    adata
        AnnData with a cebmf result (``obsm["X_" + key]``), or a MuData
        fitted jointly by :func:`cebmf.tl.fit` (see ``mod``).
    groupby
        A categorical column of ``adata.obs`` (string / bool / integer columns are treated
        as categories; float columns are refused).
    key
        The ``key_added`` of :func:`cebmf.tl.fit`.
    kind
        ``"heatmap"`` or ``"bars"``.
    standardize
        Divide each factor's loadings by their largest absolute value over all cells
        before averaging, so that factors of different scale are comparable (the scale of
        EBMF loadings and factors is only fixed up to their product).
    factors
        Factors to show: indices, names, a list of them, or ``None`` for all.
    cmap
        Colour map of the heatmap (default as above).
    mod
        MuData only: a fitted modality. Not needed here (the loadings belong to the cells):
        the cells' groups are columns of ``mdata.obs`` (e.g. ``"rna:cell_type"``).
    show, save, ax, return_fig
        As in scanpy (see :func:`cebmf.pl.embedding`).

    Returns
    -------
    The Figure with ``return_fig=True``; the (main) Axes with ``show=False``; otherwise
    None.

    Raises
    ------
    ValueError
        When the cebmf result is missing, ``groupby`` is not a categorical ``adata.obs``
        column, ``kind`` is unknown or a factor is unknown.
    """
    u.check_save(save)
    adata = plot_data(adata, key, mod, features=False)
    u.check_choice(kind, "kind", ("heatmap", "bars"))
    means = group_means(adata, groupby, key, factors, standardize)
    n_groups, n_fac = means.shape
    values = means.to_numpy()
    L = u.loadings(adata, key)
    idx = u.resolve_factors(factors, u.factor_names(adata, key, L.shape[1]))
    signed = not u.is_nonnegative(L[:, idx])
    label = "mean standardized loading" if standardize else "mean loading"

    if kind == "heatmap":
        fig, (a,) = u.panels(1, 1, (0.45 * n_fac + 2.8, 0.32 * n_groups + 1.4), ax)
        if cmap is None:
            cmap = u.SIGNED_CMAP if signed else u.NONNEGATIVE_CMAP
        if signed:
            lim = float(np.nanmax(np.abs(values))) or 1.0
            vmin, vmax = -lim, lim
        else:
            vmin, vmax = None, None
        im = a.imshow(values, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="none")
        a.set_xticks(np.arange(n_fac), means.columns, rotation=90)
        a.set_yticks(np.arange(n_groups), means.index)
        a.set_xlabel("factor")
        a.set_ylabel(groupby)
        fig.colorbar(im, ax=a, label=label, shrink=0.8)
    else:
        per_group = 0.35 if not signed else max(0.35, 0.12 * n_fac)
        longest = max(len(str(g)) for g in means.index)
        height = 3.0 + min(0.075 * longest, 3.5)  # room for the rotated group labels
        fig, (a,) = u.panels(1, 1, (per_group * n_groups + 3.0, height), ax)
        colors = u.factor_palette(n_fac)
        x = np.arange(n_groups)
        if not signed:
            bottom = np.zeros(n_groups)
            for j in range(n_fac):
                a.bar(
                    x,
                    values[:, j],
                    bottom=bottom,
                    color=colors[j],
                    width=0.85,
                    label=means.columns[j],
                )
                bottom += np.nan_to_num(values[:, j])
        else:
            width = 0.85 / n_fac
            for j in range(n_fac):
                a.bar(
                    x - 0.425 + width * (j + 0.5),
                    values[:, j],
                    width=width,
                    color=colors[j],
                    label=means.columns[j],
                )
            a.axhline(0.0, color="0.3", linewidth=0.8)
        a.set_xticks(x, means.index, rotation=90)
        a.set_xlim(-0.6, n_groups - 0.4)
        a.set_xlabel(groupby)
        a.set_ylabel(label)
        a.legend(
            loc="upper left",
            bbox_to_anchor=(1.0, 1.0),
            frameon=False,
            fontsize="small",
            title="factor",
        )
        a.grid(False)
    return u.finish(fig, a, "cebmf_structure", show=show, save=save, return_fig=return_fig)
