"""What a plot reads: the AnnData itself, or an AnnData view of a joint MuData fit.

:func:`cebmf.tl.fit` on a MuData writes the loadings to ``mdata.obsm``, the fit's record
to ``mdata.uns[key]`` (with the per-modality entries ``var_mask``, ``pve_by_mod``, the
factor priors as blocks and block-diagonal feature covariates) and each modality's factors
to ``mdata.mod[m].varm``. The plots are written against one AnnData; :func:`plot_data`
gives them a new, shallow one that has the MuData's cells and, for a chosen modality, that
modality's features, with the record cut down to that modality. Nothing of the MuData is
modified: the view holds new containers around the user's arrays.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from .._mudata import obs_with_modalities
from ._utils import get_uns


def _is_mudata(data: Any) -> bool:
    try:
        import mudata as md
    except ImportError:  # pragma: no cover - mudata is a dependency
        return False
    return isinstance(data, md.MuData)


def plot_data(
    data: Any,
    key: str,
    mod: str | None = None,
    *,
    features: bool = False,
    joint_modality_ok: bool = False,
):
    """The AnnData that a plot of the fit ``key`` reads.

    Parameters
    ----------
    data
        AnnData, or MuData fitted jointly by :func:`cebmf.tl.fit` (or one of whose
        modalities was fitted alone: pass ``mod``).
    key
        The fit's ``key_added``.
    mod
        MuData only: the modality whose features (genes, peaks, ...) the plot shows.
    features
        Whether the plot reads the features (factor values, feature covariates). With a
        MuData of several fitted modalities, ``mod`` is then required.
    joint_modality_ok
        Whether the plot can read a modality of a joint fit given as an AnnData
        (``mdata.mod[m]`` holds its factors and its share of the variance explained, not
        the loadings or the record).
    """
    if not _is_mudata(data):
        if mod is not None:
            raise ValueError(
                f"mod={mod!r} selects a modality of a MuData, but the data is a "
                f"{type(data).__name__}; drop mod=."
            )
        uns = get_uns(data, key)  # AnnData check and a clear error when the fit is absent
        joint = uns.get("joint_fit") is not None and bool(np.asarray(uns["joint_fit"]))
        if joint and not joint_modality_ok:
            raise ValueError(
                f"adata.uns[{key!r}] marks a modality of a joint MuData fit: the loadings and "
                "the fit's record are in the MuData. Pass the MuData itself (with mod= naming "
                "this modality for plots of its features)."
            )
        return data
    mdata = data
    if mod is not None and (not isinstance(mod, str) or mod not in mdata.mod):
        raise ValueError(
            f"mod={mod!r} is not a modality of the MuData (modalities: "
            f"{', '.join(map(repr, mdata.mod))})."
        )
    if not isinstance(key, str):
        raise TypeError(f"key must be a str (the key_added of cebmf.tl.fit), got {key!r}.")
    record = mdata.uns.get(key)
    if not isinstance(record, Mapping):
        # a modality fitted on its own (cebmf.tl.fit(mdata[mod])) carries its own fit
        if mod is not None:
            own = mdata.mod[mod].uns.get(key)
            if isinstance(own, Mapping) and not own.get("joint_fit", False):
                return mdata.mod[mod]
        raise ValueError(
            f"mdata.uns[{key!r}] not found: run cebmf.tl.fit(mdata, key_added={key!r}) first, "
            "pass the key= it was run with, or, for a modality fitted on its own, mod=."
        )
    mods = [str(m) for m in np.atleast_1d(np.asarray(record.get("mods", list(mdata.mod))))]
    if mod is not None and mod not in mods:
        raise ValueError(
            f"mod={mod!r} was not part of the fit {key!r} (fitted modalities: "
            f"{', '.join(map(repr, mods))})."
        )
    if features and mod is None:
        if len(mods) != 1:
            raise ValueError(
                f"this plot shows features, and the fit {key!r} has several modalities "
                f"({', '.join(map(repr, mods))}) whose values are on different scales; pass "
                "mod= to choose one."
            )
        mod = mods[0]
    for m in mods:  # the fit's cells must still be the MuData's
        if m not in mdata.mod:
            raise ValueError(
                f"the fit {key!r} used modality {m!r}, which the MuData no longer has; run "
                f"cebmf.tl.fit(mdata, key_added={key!r}) again."
            )
        cells = mdata.mod[m].obs_names
        if len(cells) != mdata.n_obs or not (cells == mdata.obs_names).all():
            raise ValueError(
                f"modality {m!r} no longer has the MuData's cells in the same order "
                f"({mdata.mod[m].n_obs} vs {mdata.n_obs}); was the MuData subset after the fit?"
            )
    return _view(mdata, key, record, mods, mod)


def _view(mdata, key: str, record: Mapping, mods: list[str], mod: str | None) -> ad.AnnData:
    obs = obs_with_modalities(mdata, mods)
    # matrices with a row per cell (the loadings, embeddings); not the 1-D modality masks
    obsm: dict[str, Any] = {k: v for k, v in mdata.obsm.items() if np.ndim(v) == 2}
    # embeddings computed on a modality (e.g. mdata["rna"].obsm["X_umap"]) come after the
    # MuData's own, the chosen modality first
    for m in [mod] if mod is not None else mods:
        for k, v in mdata.mod[m].obsm.items():
            if np.ndim(v) == 2:
                obsm.setdefault(k, v)
    rec = dict(record)
    var = None
    varm: dict[str, Any] = {}
    if mod is not None:
        rec = _record_of_modality(record, mods, mod, key)
        var = mdata.mod[mod].var.copy(deep=False)
        varm = dict(mdata.mod[mod].varm.items())
    obsm = {k: (v.to_numpy() if isinstance(v, pd.DataFrame) else v) for k, v in obsm.items()}
    view = ad.AnnData(obs=obs, var=var, obsm=obsm, varm=varm or None)
    view.uns[key] = rec
    return view


def _record_of_modality(record: Mapping, mods: list[str], mod: str, key: str) -> dict:
    """The fit's record as one modality sees it: its var mask, its variance explained,
    the factor priors' block of this modality, and its rows and columns of the
    block-diagonal feature covariates."""
    rec = dict(record)
    rec["modality"] = mod
    masks = record.get("var_mask")
    if not isinstance(masks, Mapping) or mod not in masks:
        raise ValueError(
            f"mdata.uns[{key!r}]['var_mask'] has no entry for {mod!r}: the record is not a "
            f"joint fit's; run cebmf.tl.fit(mdata, key_added={key!r}) again."
        )
    rec["var_mask"] = np.asarray(masks[mod], dtype=bool)
    sizes = [int(np.asarray(masks[m], dtype=bool).sum()) for m in mods]
    start = sum(sizes[: mods.index(mod)])
    rows = slice(start, start + sizes[mods.index(mod)])
    pve = record.get("pve_by_mod")
    if isinstance(pve, Mapping) and mod in pve:
        rec["pve"] = np.asarray(pve[mod], dtype=np.float64)
    priors = record.get("priors")
    if isinstance(priors, Mapping):
        rec["priors"] = {name: _prior_of_modality(entry, mod) for name, entry in priors.items()}
    stored = record.get("covariates")
    if isinstance(stored, Mapping) and stored.get("factors") is not None:
        cov = dict(stored)
        x_f = np.asarray(stored["factors"], dtype=np.float64)
        names = [str(n) for n in np.atleast_1d(np.asarray(stored.get("factors_names", [])))]
        prefix = f"{mod}:"
        cols = [j for j, n in enumerate(names) if n.startswith(prefix)]
        if len(names) != x_f.shape[1]:  # labels unknown: no way to tell the blocks' columns
            cols = list(range(x_f.shape[1]))
        if cols:
            cov["factors"] = x_f[rows][:, cols]
            cov["factors_names"] = np.asarray(
                [names[j][len(prefix) :] if names else str(j) for j in cols], dtype=object
            )
        else:
            cov.pop("factors")
            cov.pop("factors_names", None)
        rec["covariates"] = cov
    return rec


def _prior_of_modality(entry: Any, mod: str) -> Any:
    if not isinstance(entry, Mapping):
        return entry
    out = dict(entry)
    g = entry.get("factors")
    if isinstance(g, Mapping) and isinstance(g.get("blocks"), Mapping) and mod in g["blocks"]:
        out["factors"] = g["blocks"][mod]
    return out
