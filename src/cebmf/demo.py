"""The demo behind ``cebmf demo``: the whole scverse path on real counts that ship with
scanpy (``pbmc68k_reduced``, integer counts recovered exactly).

cEBMF with ``cash`` loading priors moderated by two cell covariates (fraction of
mitochondrial counts and log10 library size), point-normal factor priors, the number of
factors chosen by the data. Writes the AnnData and PNG figures: factors on the UMAP, top
genes, variance explained, mean loadings by cell type, the ELBO trace, and the learned
prior of the first factors against a covariate.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from ._validation import check_count, check_flags

logger = logging.getLogger("cebmf")

COVARIATES = ["percent_mito", "log10_n_counts"]


def _priors(pl, plt, adata, n: int):
    """The learned probability of a non-zero loading against percent_mito, for the factors
    whose sparsity varies most across cells."""
    record = adata.uns["cebmf"]
    spread = [
        float(np.std(record["priors"][name]["loadings"].get("pi0", 0.0)))
        for name in record["factor_names"]
    ]
    chosen = sorted(np.argsort(spread)[::-1][:n].tolist())
    fig, axes = plt.subplots(1, max(n, 1), figsize=(3.6 * max(n, 1), 3.2), squeeze=False)
    for ax, j in zip(axes[0], chosen, strict=False):
        pl.prior(adata, factor=j, covariate="percent_mito", ax=ax, show=False)
    fig.tight_layout()
    return fig


def _output_folder(out: str | Path) -> Path:
    """``out`` as a folder, created if missing; a clear ValueError naming ``out`` if it
    cannot be (a file, a file above it, or not writable)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"out={str(out)!r} is an existing file, not a folder; pass a folder (it is "
            "created if missing)."
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"out={str(out)!r} cannot be created as a folder ({err.strerror or err}); pass "
            "a folder that can be created."
        ) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"out={str(out)!r} is not a writable folder; pass one that is.")
    return out


def run_demo(
    out: str | Path, n_factors: int = 20, max_iter: int = 80, progress: bool = False
) -> str:
    """Run the demo into folder ``out``; return a text summary.

    Parameters
    ----------
    out
        Folder of the AnnData and the figures (created if missing).
    n_factors
        Most factors (an integer >= 1).
    max_iter
        Most backfit sweeps (an integer >= 1; 80 keeps the demo near a minute on two CPU
        cores; the fit keeps gaining slowly for a few hundred sweeps with 20 factors, and
        the summary says whether it converged).
    progress
        Show a progress bar.

    Returns
    -------
    The summary: per factor, its variance explained, the cell types of highest and lowest
    mean loading and its top genes, then the files written.

    Raises
    ------
    ValueError, TypeError
        For a bad argument (checked before any work), naming it.
    """
    n_factors = check_count(n_factors, "n_factors")
    max_iter = check_count(max_iter, "max_iter")
    check_flags(progress=progress)
    out = _output_folder(out)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from . import pl, tl
    from .datasets import pbmc68k_counts

    start = time.perf_counter()
    adata = pbmc68k_counts()
    tl.fit(
        adata,
        obs_covariates=COVARIATES,
        n_factors=n_factors,
        max_iter=max_iter,
        progress=progress,
    )
    fit_s = time.perf_counter() - start
    record = adata.uns["cebmf"]
    k = len(record["pve"])
    h5ad = out / "pbmc68k_cebmf.h5ad"
    adata.write_h5ad(h5ad)

    figures = {
        "factors_umap.png": lambda: pl.embedding(adata, basis="umap", show=False, return_fig=True),
        "top_genes.png": lambda: pl.top_genes(
            adata, factors=list(range(min(k, 8))), show=False, return_fig=True
        ),
        "variance_explained.png": lambda: pl.variance_explained(adata, show=False, return_fig=True),
        "structure.png": lambda: pl.structure(adata, "bulk_labels", show=False, return_fig=True),
        "elbo.png": lambda: pl.elbo(adata, show=False, return_fig=True),
        "prior_percent_mito.png": lambda: _priors(pl, plt, adata, min(k, 4)),
    }
    written = []
    for name, draw in figures.items():
        fig = draw()
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(name)

    loadings = adata.obsm["X_cebmf"]
    types = adata.obs["bulk_labels"].astype(str)
    means = pd.DataFrame(loadings, index=adata.obs_names).groupby(types.to_numpy()).mean()
    factors = adata.varm["cebmf_factors"]
    lines = [
        f"cebmf demo: pbmc68k_reduced, {adata.n_obs} cells x {adata.n_vars} genes "
        f"(integer counts, log1p-normalised), cash loading priors on {', '.join(COVARIATES)}",
        (
            f"{k} factors: the cap (n_factors={n_factors}) set their number, a larger one lets "
            "the data choose"
            if record["max_factors_reached"]
            else f"{k} factors chosen by the data (at most {n_factors})"
        )
        + f", {record['n_iter']} backfit sweeps, converged={record['converged']}, fit in "
        f"{fit_s:.1f} s",
        "",
        f"{'factor':<10}{'pve':>7}  {'highest mean loading':<30}{'lowest mean loading':<30}"
        "top genes (|factor|)",
    ]
    for j, name in enumerate(record["factor_names"]):
        col = means.iloc[:, j]
        genes = adata.var_names[np.argsort(-np.abs(factors[:, j]))[:5]]
        lines.append(
            f"{name:<10}{record['pve'][j]:>7.3f}  {col.idxmax():<30}{col.idxmin():<30}"
            f"{', '.join(genes)}"
        )
    lines += ["", f"wrote {h5ad}", *(f"wrote {out / n}" for n in written)]
    return "\n".join(lines)
