"""The genes with the largest factor values (as ``sc.pl.pca_loadings``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from . import _utils as u
from ._source import plot_data


def _gene_labels(adata: AnnData, gene_symbols: str | None) -> np.ndarray:
    if gene_symbols is None:
        return np.asarray(adata.var_names.astype(str))
    if not isinstance(gene_symbols, str) or gene_symbols not in adata.var.columns:
        raise ValueError(
            f"gene_symbols={gene_symbols!r} is not a column of adata.var (columns: "
            f"{u._shortlist(list(adata.var.columns))}); pass one of them or None for "
            "adata.var_names."
        )
    return np.asarray(adata.var[gene_symbols].astype(str))


def select_top_genes(values: np.ndarray, used: np.ndarray, n_genes: int, sign: str) -> np.ndarray:
    """Indices of the ``n_genes`` top genes among ``used``, best first."""
    cand = np.flatnonzero(used & np.isfinite(values))
    v = values[cand]
    if sign == "both":
        score = np.abs(v)
    elif sign == "positive":
        cand, v = cand[v > 0], v[v > 0]
        score = v
    else:
        cand, v = cand[v < 0], v[v < 0]
        score = -v
    order = np.argsort(-score, kind="stable")[:n_genes]
    return cand[order]


def top_genes(
    adata: AnnData,
    factors: int | str | Sequence[int | str] | None = None,
    n_genes: int = 10,
    key: str = "cebmf",
    gene_symbols: str | None = None,
    *,
    sign: Literal["both", "positive", "negative"] = "both",
    error_bars: bool = True,
    ncols: int = 4,
    show: bool | None = None,
    save: bool | str | None = None,
    ax: Axes | None = None,
    return_fig: bool | None = None,
    mod: str | None = None,
) -> Figure | Axes | list[Axes] | None:
    """Bar charts of the genes with the largest factor values, one panel per factor.

    Per factor, the ``n_genes`` genes with the largest ``|factor|`` (or the largest
    positive / negative values, see ``sign``) among the genes used in the fit, best at the
    top; bars are red for positive and blue for negative values, with the posterior sd
    (``varm[key + "_factors_sd"]``) as error bars when stored.

    Parameters
    ----------
    adata
        AnnData with a cebmf result (``varm[key + "_factors"]``), or a MuData
        fitted jointly by :func:`cebmf.tl.fit` (see ``mod``).
    factors
        Factors to show: 0-based indices, names, a list of them, or ``None`` for all.
    n_genes
        Number of genes per factor.
    key
        The ``key_added`` of :func:`cebmf.tl.fit`.
    gene_symbols
        A column of ``adata.var`` to label the genes with (default ``adata.var_names``).
    sign
        ``"both"`` ranks by ``|value|``; ``"positive"`` / ``"negative"`` show only the genes
        with the largest positive / most negative values.
    error_bars
        Draw +- one posterior sd when ``varm[key + "_factors_sd"]`` exists.
    ncols
        Panels per row.
    mod
        MuData only: the modality whose features are ranked (required when several were
        fitted, since their values are on different scales); ``gene_symbols`` is then a
        column of its ``var``.
    show, save, ax, return_fig
        As in scanpy (see :func:`cebmf.pl.embedding`); ``ax`` only with a single factor.

    Returns
    -------
    The Figure with ``return_fig=True``; the Axes (or list of Axes) with ``show=False``;
    otherwise None.

    Raises
    ------
    ValueError
        When the cebmf result is missing, a factor is unknown or ``gene_symbols`` is not a
        column of ``adata.var``.
    """
    u.check_save(save)
    adata = plot_data(adata, key, mod, features=True, joint_modality_ok=True)
    u.check_choice(sign, "sign", ("both", "positive", "negative"))
    if isinstance(n_genes, bool) or not isinstance(n_genes, int | np.integer) or n_genes < 1:
        raise ValueError(f"n_genes must be a positive integer, got {n_genes!r}.")
    F = u.factors_matrix(adata, key)
    names = u.factor_names(adata, key, F.shape[1])
    idx = u.resolve_factors(factors, names)
    labels = _gene_labels(adata, gene_symbols)
    used = u.var_mask(adata, key)
    sd = None
    if error_bars and f"{key}_factors_sd" in adata.varm:
        sd = u.factors_matrix(adata, key, "_sd")

    n_shown = min(int(n_genes), int(used.sum()))
    fig, axs = u.panels(len(idx), ncols, (3.2, 0.6 + 0.26 * max(n_shown, 3)), ax)
    for a, k in zip(axs, idx, strict=True):
        genes = select_top_genes(F[:, k], used, int(n_genes), sign)
        vals = F[genes, k]
        pos = np.arange(genes.size)
        colors = np.where(vals >= 0, u.POSITIVE_COLOR, u.NEGATIVE_COLOR)
        xerr = None if sd is None else np.nan_to_num(sd[genes, k])
        a.barh(pos, vals, color=colors, xerr=xerr, error_kw={"elinewidth": 0.8, "capsize": 0})
        a.set_yticks(pos, labels[genes])
        a.set_ylim(genes.size - 0.5 if genes.size else 0.5, -0.5)  # best gene on top
        a.axvline(0.0, color="0.3", linewidth=0.8)
        a.set_title(names[k])
        a.set_xlabel("factor value")
        a.grid(False)
        if genes.size == 0:
            a.text(0.5, 0.5, f"no {sign} values", ha="center", va="center", transform=a.transAxes)
    return u.finish(
        fig,
        u.single_or_list(axs),
        "cebmf_top_genes",
        show=show,
        save=save,
        return_fig=return_fig,
    )
