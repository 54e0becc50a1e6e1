"""The learned covariate-moderated prior of one factor against its covariates."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.colors import Colormap
from matplotlib.figure import Figure

from . import _utils as u
from ._source import plot_data

QUANTITY_LABELS = {
    "nonzero": "P(non-zero) = 1 - pi0",
    "mean": "prior mean",
    "sd": "prior sd",
}


def _covariate_families() -> list[str]:
    from ..priors import available_priors

    return available_priors(covariates=True)


def _prior_instance(g: Mapping):
    """The prior object that reproduces the fitted network of ``g``."""
    from ..priors import get_prior

    family = str(g["family"])
    options: dict[str, Any] = {"mode": float(np.asarray(g.get("mode", 0.0)))}
    if "hidden" in g:
        options["hidden"] = tuple(int(h) for h in np.atleast_1d(np.asarray(g["hidden"])))
    if family in ("cash", "cgb"):
        options["nonnegative"] = bool(np.asarray(g.get("nonnegative", False)))
    if family in ("emdn", "spiked_emdn") and "n_components" in g:
        options["n_components"] = int(np.asarray(g["n_components"]))
    return get_prior(family, **options)


def _as_plain(g: Mapping) -> dict:
    """A plain dict (nested), as ``prior_parameters`` expects, from what AnnData stored."""
    return {k: _as_plain(v) if isinstance(v, Mapping) else v for k, v in g.items()}


def prior_parameters(g: Mapping, covariates: np.ndarray | None, where: str) -> dict:
    """``get_prior(...).prior_parameters(g, covariates)``, with clear errors."""
    if covariates is None:
        raise ValueError(
            f"the covariates of this fit are not stored ({where} is missing), so the prior "
            "cannot be evaluated per observation; store them in the fit, or use "
            "quantity='nonzero' with a family that keeps pi0 per observation."
        )
    stats = g.get("covariate_stats")
    if isinstance(stats, Mapping) and "keep" in stats:
        d_fit = np.asarray(stats["keep"]).size
        if d_fit != covariates.shape[1]:
            raise ValueError(
                f"the prior was fitted with {d_fit} covariate column(s) but {where} has "
                f"{covariates.shape[1]} (with self_covariates=True the other factors were "
                "appended during the fit); only quantity='nonzero' from the stored pi0 can "
                "be plotted."
            )
    return _prior_instance(g).prior_parameters(_as_plain(g), covariates)


def _nonnegative_truncnorm_moments(mu: float, sd: float) -> tuple[float, float]:
    from scipy.stats import truncnorm

    dist = truncnorm((0.0 - mu) / sd, np.inf, loc=mu, scale=sd)
    m1 = float(dist.mean())
    return m1, float(dist.var()) + m1 * m1


def prior_values(
    g: Mapping, covariates: np.ndarray | None, quantity: str, n: int, where: str
) -> np.ndarray:
    """Per observation: 1 - pi0 (``"nonzero"``), the prior mean or the prior sd."""
    family = str(g["family"])
    if quantity == "nonzero" and "pi0" in g:
        pi0 = np.asarray(g["pi0"], dtype=np.float64).ravel()
        if pi0.size == n:
            return 1.0 - pi0
    if quantity == "nonzero" and family == "emdn":
        raise ValueError(
            "the 'emdn' prior has no point mass at zero (every entry is non-zero a priori); "
            "use quantity='mean' or quantity='sd' to see how it depends on the covariates."
        )
    par = prior_parameters(g, covariates, where)
    if family == "cash":
        pi, scale = np.asarray(par["pi"]), np.asarray(par["scale"], dtype=np.float64)
        pi0 = pi[:, 0] if scale[0] == 0 else np.zeros(pi.shape[0])
        if bool(np.asarray(g.get("nonnegative", False))):
            m1, m2 = pi @ scale, pi @ (2.0 * scale**2)  # exponentials with means `scale`
        else:
            m1, m2 = np.zeros(pi.shape[0]), pi @ scale**2
    elif family == "cgb":
        pi0 = np.asarray(par["pi0"], dtype=np.float64)
        mu, sd = float(np.asarray(par["mu"])), float(np.asarray(par["scale"]))
        if bool(np.asarray(g.get("nonnegative", False))):
            s1, s2 = _nonnegative_truncnorm_moments(mu, sd)
        else:
            s1, s2 = mu, mu * mu + sd * sd
        m1, m2 = (1.0 - pi0) * s1, (1.0 - pi0) * s2
    elif family in ("emdn", "spiked_emdn"):
        pi, mu, sd = (np.asarray(par[k], dtype=np.float64) for k in ("pi", "mu", "sd"))
        spiked = pi.shape[1] == mu.shape[1] + 1
        pi0 = pi[:, 0] if spiked else np.zeros(pi.shape[0])
        w = pi[:, 1:] if spiked else pi
        m1, m2 = (w * mu).sum(1), (w * (mu * mu + sd * sd)).sum(1)
    else:  # a covariate family this module does not know the parameters of
        raise ValueError(f"prior() does not know how to evaluate the {family!r} prior family.")
    if quantity == "nonzero":
        return 1.0 - pi0
    if quantity == "mean":
        return m1 + float(np.asarray(g.get("mode", 0.0)))
    return np.sqrt(np.maximum(m2 - m1 * m1, 0.0))


def _covariate_labels(uns: Mapping, side: str, d: int) -> list[str]:
    """Labels of the stored covariate columns: ``uns[key]["covariates"][side + "_names"]``,
    else ``params["obs_covariates"]`` / ``["var_covariates"]`` when they match in number."""
    stored = uns.get("covariates")
    if isinstance(stored, Mapping) and stored.get(f"{side}_names") is not None:
        cand = [str(n) for n in np.atleast_1d(np.asarray(stored[f"{side}_names"]))]
        if len(cand) == d:
            return cand
    params = uns.get("params")
    if isinstance(params, Mapping):
        which = "obs_covariates" if side == "loadings" else "var_covariates"
        given = params.get(which)
        if given is not None and not isinstance(given, str):
            cand = [str(n) for n in np.atleast_1d(np.asarray(given))]
            if len(cand) == d:
                return cand
    return [f"covariate {i}" for i in range(d)]


def _axis_values(
    adata: AnnData, spec: Any, side: str, used: np.ndarray, cov, labels: list[str]
) -> tuple[np.ndarray | pd.Categorical, str]:
    """The x values (on the observations used in the fit) and their label."""
    if isinstance(spec, bool | np.bool_):
        raise TypeError("covariate must be a column name or an int index, got a bool.")
    if isinstance(spec, int | np.integer):
        if cov is None:
            raise ValueError(
                f"covariate={int(spec)} indexes the stored covariates, but this fit stored "
                "none; pass the name of a column of "
                f"adata.{'obs' if side == 'loadings' else 'var'} instead."
            )
        d = cov.shape[1]
        if not -d <= int(spec) < d:
            raise ValueError(
                f"covariate={int(spec)} is out of range: {d} covariate column(s) are stored "
                f"({u._shortlist(labels)})."
            )
        i = int(spec) % d
        return cov[:, i], labels[i]
    if isinstance(spec, str):
        frame = adata.obs if side == "loadings" else adata.var
        where = "adata.obs" if side == "loadings" else "adata.var"
        if spec not in frame.columns:
            raise ValueError(
                f"covariate={spec!r} is not a column of {where} (columns: "
                f"{u._shortlist(list(frame.columns))}); pass a column name or an int index "
                "into the stored covariates."
            )
        col = frame[spec].iloc[used]
        if isinstance(col.dtype, pd.CategoricalDtype) or col.dtype.kind in "bOSU":
            return pd.Categorical(col), spec
        return np.asarray(col, dtype=np.float64), spec
    raise TypeError(f"covariate must be a column name or an int index, got {spec!r}.")


def _draw(a: Axes, x, y: np.ndarray, size: float, kwargs: dict) -> None:
    if isinstance(x, pd.Categorical):
        cats = [c for c in x.categories if (x == c).any()]
        data = [y[np.asarray(x == c)] for c in cats]
        a.boxplot(data, tick_labels=[str(c) for c in cats], showfliers=False)
        rng = np.random.default_rng(0)
        for j, vals in enumerate(data):
            jitter = rng.uniform(-0.2, 0.2, vals.size)
            a.scatter(j + 1 + jitter, vals, s=size, color="0.3", alpha=0.4, rasterized=True)
        a.tick_params(axis="x", labelrotation=90)
    else:
        opts = {"s": size, "color": "0.2", "alpha": 0.6, "linewidths": 0, "rasterized": True}
        opts.update(kwargs)
        a.scatter(x, y, **opts)


def prior(
    adata: AnnData,
    factor: int | str,
    side: Literal["loadings", "factors"] = "loadings",
    covariate: int | str | Sequence[int | str] | None = None,
    basis: str | None = None,
    key: str = "cebmf",
    *,
    quantity: Literal["nonzero", "mean", "sd"] = "nonzero",
    ncols: int = 4,
    cmap: str | Colormap = "viridis",
    size: float | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
    ax: Axes | None = None,
    return_fig: bool | None = None,
    mod: str | None = None,
    **kwargs: Any,
) -> Figure | Axes | list[Axes] | None:
    """The learned covariate-moderated prior of one factor, per cell (or gene).

    For the covariate-moderated families (``cash``, ``cgb``, ``spiked_emdn``, ``emdn``)
    the prior of each entry depends on its covariates. This plots, per cell
    (``side="loadings"``) or per gene used in the fit (``side="factors"``), the prior
    probability that the entry is non-zero, 1 - pi0(x) (or the prior mean / sd, see
    ``quantity``), either against covariates as a scatter (a box plot for a categorical
    column) or, for cells, on an embedding coloured by it.

    Parameters
    ----------
    adata
        AnnData with a cebmf result (``uns[key]["priors"]``), or a MuData
        fitted jointly by :func:`cebmf.tl.fit` (see ``mod``).
    factor
        The factor: a 0-based index or a name from ``uns[key]["factor_names"]``.
    side
        ``"loadings"`` (the prior of the cells' loadings) or ``"factors"`` (of the genes').
    covariate
        x axis: the name of an ``adata.obs`` column (``adata.var`` for ``side="factors"``),
        an int index into the stored covariates ``uns[key]["covariates"][side]``, or a list
        of them (one panel each). ``None`` (and no ``basis``): one panel per stored
        covariate column.
    basis
        Instead of a scatter, show the cells on this embedding (e.g. ``"umap"``,
        ``"spatial"``) coloured by the prior quantity; loadings side only.
    key
        The ``key_added`` of :func:`cebmf.tl.fit`.
    quantity
        ``"nonzero"``: 1 - pi0 (the prior probability of a non-zero entry; not defined for
        ``emdn``, which has no point mass); ``"mean"`` / ``"sd"``: the prior mean / sd,
        evaluated from the fitted network at the stored covariates.
    ncols
        Panels per row (several covariates).
    cmap
        Colour map of the embedding.
    size
        Marker size (default from the number of points).
    mod
        MuData only, ``side="factors"``: the modality whose features' prior is shown (its
        block of the factors' prior; required when several were fitted). Covariate names
        are then columns of its ``var``, and int indices count its own covariates.
    show, save, ax, return_fig
        As in scanpy (see :func:`cebmf.pl.embedding`); ``ax`` only with a single panel.
    **kwargs
        Passed to :meth:`matplotlib.axes.Axes.scatter`, or to :func:`scanpy.pl.embedding`
        with ``basis``.

    Returns
    -------
    The Figure with ``return_fig=True``; the Axes (or list of Axes) with ``show=False``;
    otherwise None.

    Raises
    ------
    ValueError
        When the cebmf result is missing or has no factors, the factor is unknown, the
        prior of this factor and side does not depend on covariates (a plain family such as
        ``point_normal``), the covariate column or the basis is unknown, or both
        ``covariate`` and ``basis`` are given.
    """
    u.check_save(save)
    u.check_choice(side, "side", ("loadings", "factors"))
    u.check_choice(quantity, "quantity", tuple(QUANTITY_LABELS))
    adata = plot_data(adata, key, mod, features=side == "factors")
    uns = u.get_uns(adata, key)
    priors = u.uns_entry(adata, key, "priors")
    if not isinstance(priors, Mapping):
        raise ValueError(
            f"adata.uns[{key!r}]['priors'] must be a dict keyed by factor name, got "
            f"{type(priors).__name__}."
        )
    n_fac = len(np.atleast_1d(uns["factor_names"])) if "factor_names" in uns else len(priors)
    names = u.factor_names(adata, key, n_fac)
    u.resolve_factors(None, names)  # K = 0: the error of the other plots
    name = names[u.resolve_factor(factor, names, "factor")]
    if name not in priors:
        raise ValueError(
            f"adata.uns[{key!r}]['priors'] has no entry for factor {name!r} (entries: "
            f"{u._shortlist(list(priors))}); the result is incomplete: "
            f"run cebmf.tl.fit(adata, key_added={key!r}) again."
        )
    g = priors[name].get(side) if isinstance(priors[name], Mapping) else None
    if not isinstance(g, Mapping) or "family" not in g:
        raise ValueError(
            f"the {side} of factor {name!r} have no fitted prior (a fixed side, e.g. an "
            "intercept): there is no prior to plot."
        )
    family = str(g["family"])
    in_mod = f" in modality {uns['modality']!r}" if side == "factors" and "modality" in uns else ""
    cov_families = _covariate_families()
    if family not in cov_families:
        raise ValueError(
            f"the {side} prior of factor {name!r}{in_mod} is {family!r}, which does not depend on "
            f"covariates (the same prior for every {'cell' if side == 'loadings' else 'gene'}"
            "); prior() needs a covariate-moderated family ("
            f"{', '.join(cov_families)}) fitted with covariates."
        )
    if covariate is not None and basis is not None:
        raise ValueError("pass either covariate= (a scatter) or basis= (an embedding), not both.")
    if basis is not None and side != "loadings":
        raise ValueError(
            "basis= shows cells on an embedding, so it needs side='loadings'; for "
            "side='factors' pass covariate= (an adata.var column or a covariate index)."
        )

    mask = u.obs_mask(adata, key) if side == "loadings" else u.var_mask(adata, key)
    used = np.flatnonzero(mask)
    where = f"adata.uns[{key!r}]['covariates'][{side!r}]"
    stored = uns.get("covariates")
    cov = None
    if isinstance(stored, Mapping) and stored.get(side) is not None:
        cov = np.asarray(stored[side], dtype=np.float64)
        if cov.ndim == 1:
            cov = cov[:, None]
        if cov.shape[0] != used.size:
            raise ValueError(
                f"{where} has {cov.shape[0]} rows but the fit used {used.size} "
                f"{'cells' if side == 'loadings' else 'genes'}; was the AnnData subset after "
                "the fit?"
            )
    y = prior_values(g, cov, quantity, used.size, where)
    if y.size != used.size:
        raise ValueError(
            f"the stored prior of factor {name!r} has {y.size} entries but the fit used "
            f"{used.size} {'cells' if side == 'loadings' else 'genes'}."
        )
    ylabel = QUANTITY_LABELS[quantity]
    title = f"{name} {side}{in_mod} ({family})"

    if basis is not None:
        import scanpy as sc

        obsm_key = u.resolve_basis(adata, basis)
        col = f"{name} {ylabel}"
        values = np.full(adata.n_obs, np.nan)  # cells left out of the fit: NaN (grey)
        values[used] = y
        tmp, basis_name = u.temporary_adata(adata, obsm_key, {col: values})
        if quantity == "nonzero":
            kwargs.setdefault("vmin", 0.0)
            kwargs.setdefault("vmax", 1.0)
        if size is not None:
            kwargs["size"] = size
        a = sc.pl.embedding(
            tmp,
            basis=basis_name,
            color=col,
            cmap=cmap,
            title=f"{title}\n{ylabel}",
            ax=ax,
            show=False,
            **kwargs,
        )
        return u.finish(a.figure, a, "cebmf_prior", show=show, save=save, return_fig=return_fig)

    labels = _covariate_labels(uns, side, 0 if cov is None else cov.shape[1])
    if covariate is None:
        if cov is None:
            raise ValueError(
                f"no covariates are stored ({where} is missing); pass covariate= (a column of "
                f"adata.{'obs' if side == 'loadings' else 'var'}) or basis=."
            )
        specs: list[Any] = list(range(cov.shape[1]))
    elif isinstance(covariate, str | int | np.integer):
        specs = [covariate]
    else:
        specs = list(covariate)
        if not specs:
            raise ValueError("covariate is empty; pass None for all stored covariates.")
    xs = [_axis_values(adata, s, side, used, cov, labels) for s in specs]
    if size is None:
        size = float(np.clip(6000.0 / max(used.size, 1), 1.0, 20.0))
    width, height = 3.6, 3.2
    for x, _ in xs:  # room for the categories of a box plot and their rotated labels
        if isinstance(x, pd.Categorical):
            width = max(width, 0.4 * len(x.categories) + 1.5)
            height = max(height, 3.2 + min(0.075 * max(len(str(c)) for c in x.categories), 3.5))
    fig, axs = u.panels(len(xs), ncols, (width, height), ax)
    for a, (x, xlabel) in zip(axs, xs, strict=True):
        _draw(a, x, y, size, kwargs)
        a.set_xlabel(xlabel)
        a.set_ylabel(ylabel)
        a.set_title(title)
        if quantity == "nonzero":
            a.set_ylim(-0.03, 1.03)
        a.grid(False)
    return u.finish(
        fig, u.single_or_list(axs), "cebmf_prior", show=show, save=save, return_fig=return_fig
    )
