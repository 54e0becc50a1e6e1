"""The demo behind ``cebmf demo``: EBNM shrinkage of differential-expression estimates.

Data: scanpy's bundled ``pbmc68k_reduced`` (700 cells). Its ``.raw.X`` is
log1p(count * 1e4 / n_counts) rounded to 3 decimals, so the integer counts are recovered
exactly as round(expm1(raw.X) * n_counts / 1e4). For each gene we estimate the difference
in mean log1p(counts per 10^4) between one cell type and the rest, with its Welch
standard error, and shrink the estimates with every EBNM prior family.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def pbmc68k_counts():
    """pbmc68k_reduced with integer counts in ``.X`` (CSR, int64) and cell types in obs."""
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    bundled = sc.datasets.pbmc68k_reduced()
    raw = bundled.raw.to_adata()
    logx = raw.X.toarray() if sp.issparse(raw.X) else np.asarray(raw.X)
    counts = np.round(np.expm1(logx) * bundled.obs["n_counts"].to_numpy()[:, None] / 1e4)
    adata = ad.AnnData(
        X=sp.csr_matrix(counts.astype(np.int64)),
        obs=bundled.obs[["bulk_labels", "n_counts", "percent_mito"]].copy(),
        var=raw.var[[]].copy(),
    )
    return adata


def de_estimates(adata, group: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-gene difference of mean log1p(CP10k) in ``group`` vs the rest, and its SE."""
    labels = adata.obs["bulk_labels"].astype(str).to_numpy()
    if group not in set(labels):
        known = ", ".join(sorted(set(labels)))
        raise ValueError(
            f"group {group!r} is not a cell type of the demo data; choose one of: {known}."
        )
    counts = adata.X.toarray().astype(np.float64)
    lib = counts.sum(1, keepdims=True)
    logn = np.log1p(counts / lib * 1e4)
    inside = labels == group
    a, b = logn[inside], logn[~inside]
    diff = a.mean(0) - b.mean(0)
    se = np.sqrt(a.var(0, ddof=1) / a.shape[0] + b.var(0, ddof=1) / b.shape[0])
    keep = se > 0
    return diff[keep], se[keep], adata.var_names.to_numpy()[keep]


def run_demo(out: Path, group: str = "CD14+ Monocyte") -> str:
    """Run the demo, write ``shrinkage.csv`` and ``shrinkage.png`` to ``out``; return a
    text summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from . import available_priors, ebnm

    out.mkdir(parents=True, exist_ok=True)
    adata = pbmc68k_counts()
    diff, se, genes = de_estimates(adata, group)
    logger.info(
        "%d genes, %d cells in %r",
        genes.size,
        int((adata.obs["bulk_labels"] == group).sum()),
        group,
    )
    table = pd.DataFrame({"gene": genes, "estimate": diff, "se": se})
    lines = [f"cebmf demo: {group} vs rest, {genes.size} genes, pbmc68k_reduced counts", ""]
    lines.append(f"{'prior':<22}{'loglik':>12}{'pi0':>8}{'lfsr<0.05':>11}")
    fits = {}
    for name in available_priors(covariates=False):
        res = ebnm(diff, se, name)
        fits[name] = res
        table[f"{name}_mean"] = res.mean
        table[f"{name}_lfsr"] = res.lfsr
        pi0 = res.g.get("pi0", float("nan"))
        lines.append(f"{name:<22}{res.loglik:>12.1f}{pi0:>8.3f}{int((res.lfsr < 0.05).sum()):>11d}")
    best = max((n for n in fits if n != "flat"), key=lambda n: fits[n].loglik)
    top = table.sort_values(f"{best}_mean", ascending=False).head(10)
    lines += ["", f"best prior by marginal likelihood: {best}; top genes up in {group}:"]
    lines += [
        f"  {g:<12} estimate {e:6.2f}  shrunk {m:6.2f}"
        for g, e, m in zip(top["gene"], top["estimate"], top[f"{best}_mean"], strict=True)
    ]
    table.to_csv(out / "shrinkage.csv", index=False)

    fig, ax = plt.subplots(figsize=(5, 4.5))
    sc = ax.scatter(diff, fits[best].mean, c=fits[best].lfsr, s=6, cmap="viridis_r")
    lim = np.abs(diff).max() * 1.05
    ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("estimated difference (log1p CP10k)")
    ax.set_ylabel(f"posterior mean ({best})")
    ax.set_title(f"{group} vs rest: shrinkage")
    fig.colorbar(sc, ax=ax, label="lfsr")
    fig.tight_layout()
    fig.savefig(out / "shrinkage.png", dpi=120)
    plt.close(fig)
    lines += ["", f"wrote {out / 'shrinkage.csv'} and {out / 'shrinkage.png'}"]
    return "\n".join(lines)
