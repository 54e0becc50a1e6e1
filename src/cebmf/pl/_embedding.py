"""Loadings on an embedding (UMAP, PCA, spatial coordinates, ...)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.colors import Colormap
from matplotlib.figure import Figure

from . import _utils as u
from ._source import plot_data


def embedding(
    adata: AnnData,
    basis: str = "umap",
    factors: int | str | Sequence[int | str] | None = None,
    key: str = "cebmf",
    ncols: int = 4,
    cmap: str | Colormap | None = None,
    *,
    title: str | Sequence[str] | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
    ax: Axes | None = None,
    return_fig: bool | None = None,
    mod: str | None = None,
    **kwargs: Any,
) -> Figure | Axes | list[Axes] | None:
    """Colour the cells of an embedding by their loadings, one panel per factor.

    Parameters
    ----------
    adata
        AnnData with a cebmf result (``obsm["X_" + key]``) and the embedding in ``obsm``,
        or a MuData fitted jointly by :func:`cebmf.tl.fit` (see ``mod``).
    basis
        The embedding: ``"umap"`` (``obsm["X_umap"]``), ``"X_umap"``, ``"spatial"``
        (``obsm["spatial"]``), ... Any ``obsm`` key with at least two columns.
    factors
        Factors to show: 0-based indices, names from ``uns[key]["factor_names"]``, or a
        list of them; ``None`` shows all.
    key
        The ``key_added`` of :func:`cebmf.tl.fit`.
    ncols
        Panels per row.
    cmap
        Colour map. Default: ``"RdBu_r"`` centred at 0 (symmetric limits per factor) when
        some loading is negative, ``"viridis"`` when all shown loadings are >= 0.
    title
        Panel title(s); default the factor names.
    mod
        MuData only: a fitted modality. Not needed here (the loadings belong to the cells);
        given, its ``obsm`` embeddings are searched right after the MuData's own.
    show, save, ax, return_fig
        As in scanpy: ``show=False`` returns the Axes (a list for several panels),
        ``return_fig=True`` the Figure; ``save`` is ``True``, a file name (written to
        ``sc.settings.figdir`` as ``cebmf_embedding<save>``) or a path such as
        ``"figures/loadings.png"``; ``ax`` draws a single factor into an existing Axes.
    **kwargs
        Passed to :func:`scanpy.pl.embedding` (e.g. ``size``, ``vmin``, ``vmax``,
        ``frameon``, ``sort_order``).

    Returns
    -------
    The Figure with ``return_fig=True``; the Axes (or list of Axes) with ``show=False``;
    otherwise None.

    Raises
    ------
    ValueError
        When the cebmf result or the basis is missing, or a factor is unknown.
    """
    import scanpy as sc

    u.check_save(save)
    u.check_ncols(ncols)  # scanpy divides by it
    adata = plot_data(adata, key, mod, features=False)
    L = u.loadings(adata, key)
    names = u.factor_names(adata, key, L.shape[1])
    idx = u.resolve_factors(factors, names)
    obsm_key = u.resolve_basis(adata, basis)
    if ax is not None and len(idx) != 1:
        raise ValueError(
            f"ax= can only be used with a single factor, but {len(idx)} factors were "
            "selected; pass factors=<one factor> or ax=None."
        )
    for reserved in ("color", "basis", "show", "save", "return_fig"):
        if reserved in kwargs:
            raise TypeError(f"embedding() sets {reserved!r} itself; do not pass it.")
    cols = [names[i] for i in idx]
    values = L[:, idx]
    tmp, basis_name = u.temporary_adata(adata, obsm_key, dict(zip(cols, values.T, strict=True)))
    signed = not u.is_nonnegative(values)
    if cmap is None and "color_map" not in kwargs:
        cmap = u.SIGNED_CMAP if signed else u.NONNEGATIVE_CMAP
    if signed and not {"vmin", "vmax", "vcenter", "norm"} & set(kwargs):
        lim = [float(np.nanmax(np.abs(v))) or 1.0 for v in values.T]
        kwargs["vmin"] = [-m for m in lim]
        kwargs["vmax"] = lim
    if cmap is not None:
        kwargs["cmap"] = cmap
    axes = sc.pl.embedding(
        tmp,
        basis=basis_name,
        color=cols,
        ncols=ncols,
        title=title,
        ax=ax,
        show=False,
        **kwargs,
    )
    axes_list = list(axes) if isinstance(axes, list | tuple) else [axes]
    return u.finish(
        axes_list[0].figure,
        u.single_or_list(axes_list),
        "cebmf_embedding",
        show=show,
        save=save,
        return_fig=return_fig,
    )
