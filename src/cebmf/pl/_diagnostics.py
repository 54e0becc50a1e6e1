"""Fit diagnostics: variance explained per factor and the ELBO trace."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from . import _utils as u
from ._source import plot_data


def _float_array(value, adata: AnnData, key: str, entry: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise ValueError(
            f"adata.uns[{key!r}][{entry!r}] must be an array of numbers, got "
            f"{type(value).__name__}."
        ) from None
    if arr.size == 0 and entry == "pve":
        u.resolve_factors(None, [])  # K = 0: the error of the other plots
    if arr.size == 0:
        raise ValueError(f"adata.uns[{key!r}][{entry!r}] is empty: there is nothing to plot.")
    return arr


def variance_explained(
    adata: AnnData,
    key: str = "cebmf",
    log: bool = False,
    *,
    n_factors: int | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
    ax: Axes | None = None,
    return_fig: bool | None = None,
    mod: str | None = None,
) -> Figure | Axes | None:
    """Scree plot: the proportion of variance explained (``uns[key]["pve"]``) per factor.

    Parameters
    ----------
    adata
        AnnData with a cebmf result, or a MuData fitted jointly by :func:`cebmf.tl.fit`
        (see ``mod``).
    key
        The ``key_added`` of :func:`cebmf.tl.fit`.
    log
        Logarithmic y axis.
    n_factors
        Show only the first ``n_factors`` factors (default all).
    mod
        MuData only: plot the variance explained within this modality
        (``uns[key]["pve_by_mod"][mod]``). Default: the whole fit, with one more line per
        modality when several were fitted.
    show, save, ax, return_fig
        As in scanpy (see :func:`cebmf.pl.embedding`).

    Returns
    -------
    The Figure with ``return_fig=True``; the Axes with ``show=False``; otherwise None.

    Raises
    ------
    ValueError
        When the cebmf result (or its ``pve``) is missing.
    """
    u.check_save(save)
    adata = plot_data(adata, key, mod, features=False, joint_modality_ok=True)
    pve = _float_array(u.uns_entry(adata, key, "pve"), adata, key, "pve")
    names = u.factor_names(adata, key, pve.size)
    if n_factors is not None:
        if isinstance(n_factors, bool) or not isinstance(n_factors, int | np.integer):
            raise ValueError(f"n_factors must be a positive integer or None, got {n_factors!r}.")
        if n_factors < 1:
            raise ValueError(f"n_factors must be a positive integer or None, got {n_factors}.")
        pve, names = pve[:n_factors], names[:n_factors]
    uns = u.get_uns(adata, key)
    by_mod = uns.get("pve_by_mod") if "modality" not in uns else None
    series = {}
    if isinstance(by_mod, Mapping) and len(by_mod) > 1:  # a joint MuData fit, all modalities
        order = [str(m) for m in np.atleast_1d(np.asarray(uns.get("mods", list(by_mod))))]
        order = [m for m in order if m in by_mod] + [m for m in by_mod if m not in order]
        series = {
            m: _float_array(by_mod[m], adata, key, f"pve_by_mod'][{m!r}")[: pve.size] for m in order
        }
    fig, (a,) = u.panels(1, 1, (max(3.5, 0.3 * pve.size + 1.5), 3.2), ax)
    x = np.arange(1, pve.size + 1)
    a.plot(x, pve, marker="o", color="0.2", linewidth=1.0, markersize=4, label="all")
    for (m, v), color in zip(series.items(), u.factor_palette(len(series)), strict=True):
        a.plot(x[: v.size], v, marker=".", color=color, linewidth=1.0, markersize=4, label=m)
    if series:
        a.legend(title="modality", frameon=False, loc="best")
    a.set_xticks(x, names, rotation=90 if pve.size > 4 else 0)
    a.set_ylabel("proportion of variance explained")
    a.set_xlabel("factor")
    lowest = min(float(np.nanmin(v)) for v in [pve, *series.values()] if v.size)
    if log:
        a.set_yscale("log")
    else:
        a.set_ylim(bottom=min(0.0, lowest))
    where = f" in {uns['modality']}" if "modality" in uns else ""
    a.set_title(f"variance explained{where} (total {np.nansum(pve):.3g})")
    a.grid(False)
    return u.finish(fig, a, "cebmf_variance_explained", show=show, save=save, return_fig=return_fig)


def elbo(
    adata: AnnData,
    key: str = "cebmf",
    relative: bool = True,
    *,
    show: bool | None = None,
    save: bool | str | None = None,
    ax: Axes | None = None,
    return_fig: bool | None = None,
) -> Figure | Axes | None:
    """The ELBO trace of the fit (``uns[key]["elbo"]``), one point per fitting step.

    Parameters
    ----------
    adata
        AnnData with a cebmf result, or a MuData fitted jointly by :func:`cebmf.tl.fit`
        (see ``mod``).
    key
        The ``key_added`` of :func:`cebmf.tl.fit`.
    relative
        Plot the gap to the best ELBO, ``max(elbo) - elbo``, on a symmetric-log axis, so
        that the small late increments stay visible (default). ``False`` plots the ELBO
        itself on a linear axis. Steps where the ELBO decreased are marked in red.
    show, save, ax, return_fig
        As in scanpy (see :func:`cebmf.pl.embedding`).

    Returns
    -------
    The Figure with ``return_fig=True``; the Axes with ``show=False``; otherwise None.

    Raises
    ------
    ValueError
        When the cebmf result (or its ``elbo`` trace) is missing.
    """
    u.check_save(save)
    adata = plot_data(adata, key)
    uns = u.get_uns(adata, key)
    trace = _float_array(u.uns_entry(adata, key, "elbo"), adata, key, "elbo")
    steps = np.arange(1, trace.size + 1)
    best = float(np.nanmax(trace))
    fig, (a,) = u.panels(1, 1, (4.5, 3.2), ax)
    if relative:
        y = best - trace
        positive = y[np.isfinite(y) & (y > 0)]
        floor = 1e-12 * max(1.0, abs(best))
        linthresh = max(float(positive.min()), floor) if positive.size else 1.0
        a.plot(steps, y, marker="o", color="0.2", linewidth=1.0, markersize=3)
        a.set_yscale("symlog", linthresh=linthresh)
        a.set_ylabel("max(ELBO) - ELBO")
    else:
        y = trace
        a.plot(steps, y, marker="o", color="0.2", linewidth=1.0, markersize=3)
        a.set_ylabel("ELBO")
    drops = np.flatnonzero(np.diff(trace) < -1e-12 * max(1.0, abs(best))) + 1
    if drops.size:
        a.scatter(steps[drops], y[drops], color="red", zorder=3, s=18, label="ELBO decreased")
        a.legend(loc="best", frameon=False)
    a.set_xlabel("step")
    status = []
    if "converged" in uns:
        status.append("converged" if bool(np.asarray(uns["converged"])) else "not converged")
    if "n_iter" in uns:
        status.append(f"{int(np.asarray(uns['n_iter']))} iterations")
    extra = f" ({', '.join(status)})" if status else ""
    a.set_title(f"ELBO {trace[-1]:.6g}{extra}")
    a.grid(False)
    return u.finish(fig, a, "cebmf_elbo", show=show, save=save, return_fig=return_fig)
