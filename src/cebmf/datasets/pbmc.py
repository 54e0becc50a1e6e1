"""Real counts that ship with scanpy: ``pbmc68k_reduced`` with its integer counts."""

from __future__ import annotations

import numpy as np


def pbmc68k_counts():
    """scanpy's bundled ``pbmc68k_reduced`` (700 cells x 765 genes) with integer counts.

    Its ``.raw.X`` is log1p(count * 1e4 / n_counts) rounded to 3 decimals, so the counts come
    back exactly as round(expm1(raw.X) * n_counts / 1e4). Returns an AnnData with the
    counts in ``.X`` (CSR, int64), ``obs`` ``bulk_labels`` (cell types), ``n_counts``,
    ``percent_mito`` and ``log10_n_counts``, and the bundled ``obsm["X_umap"]``.
    """
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    bundled = sc.datasets.pbmc68k_reduced()
    raw = bundled.raw.to_adata()
    logx = raw.X.toarray() if sp.issparse(raw.X) else np.asarray(raw.X)
    counts = np.round(np.expm1(logx) * bundled.obs["n_counts"].to_numpy()[:, None] / 1e4)
    obs = bundled.obs[["bulk_labels", "n_counts", "percent_mito"]].copy()
    obs["log10_n_counts"] = np.log10(obs["n_counts"].to_numpy())
    adata = ad.AnnData(X=sp.csr_matrix(counts.astype(np.int64)), obs=obs, var=raw.var[[]].copy())
    adata.obsm["X_umap"] = np.asarray(bundled.obsm["X_umap"])
    return adata


def de_estimates(adata, group: str, groupby: str = "bulk_labels"):
    """Per-gene difference of mean log1p(counts per 10^4) in ``group`` vs the other cells,
    with its Welch standard error. Returns ``(difference, se, gene names)`` for genes with
    a positive standard error."""
    labels = adata.obs[groupby].astype(str).to_numpy()
    if group not in set(labels):
        known = ", ".join(sorted(set(labels)))
        raise ValueError(f"group {group!r} is not in obs[{groupby!r}]; choose one of: {known}.")
    counts = adata.X.toarray().astype(np.float64)
    lib = counts.sum(1, keepdims=True)
    logn = np.log1p(counts / lib * 1e4)
    inside = labels == group
    a, b = logn[inside], logn[~inside]
    diff = a.mean(0) - b.mean(0)
    se = np.sqrt(a.var(0, ddof=1) / a.shape[0] + b.var(0, ddof=1) / b.shape[0])
    keep = se > 0
    return diff[keep], se[keep], adata.var_names.to_numpy()[keep]
