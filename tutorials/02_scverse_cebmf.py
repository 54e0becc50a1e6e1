# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.16.0
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Matrix factorisation of single-cell counts with cell covariates (cEBMF on AnnData)
#
# A matrix factorisation writes the expression matrix (cells x genes) as a sum of a few
# rank-one "programmes": $Y \approx L F^\top$, where column $k$ of the **factors** $F$
# says which genes belong to programme $k$ and column $k$ of the **loadings** $L$ how
# strongly each cell uses it. **Empirical Bayes matrix factorisation** (EBMF) learns the
# priors of $L$ and $F$ from the data, so it learns how sparse each programme is, and it
# chooses the number of programmes itself: it adds factors one at a time and stops when a
# new one no longer improves the fit.
#
# **Covariate-moderated** EBMF (cEBMF) goes one step further: the prior of a cell's
# loading may depend on what we know about the cell. Here we use two cell covariates, the
# fraction of mitochondrial counts and the log library size. The `cash` prior turns them
# into each cell's prior probability of a non-zero loading (and the spread of the
# non-zero ones) through a small neural network, learned together with the factorisation.
#
# This tutorial runs the scverse path on scanpy's bundled PBMC data:
#
# 1. load the counts and fit cEBMF with `cebmf.tl.fit`;
# 2. look at the number of factors, the variance explained, the loadings by cell type and
#    the top genes of cell-type programmes;
# 3. look at the learned prior against a covariate;
# 4. compare with plain EBMF (the same prior for every cell) through the ELBO;
# 5. draw everything with `cebmf.pl`.
#
# Run it as a script (`MPLBACKEND=Agg python tutorials/02_scverse_cebmf.py`; figures are
# then saved to a temporary folder) or open it as a notebook with jupytext. It takes
# well under a minute on a laptop CPU.

# %%
import tempfile
import time
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats

import cebmf
from cebmf.datasets import pbmc68k_counts

pd.set_option("display.width", 120)
pd.set_option("display.precision", 3)

# In Jupyter the figures are displayed; as a script with a non-interactive backend
# (MPLBACKEND=Agg) they are written to a fresh temporary folder instead.
INTERACTIVE = matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo")
FIGDIR = None if INTERACTIVE else Path(tempfile.mkdtemp(prefix="cebmf-tutorial-"))


def show(fig, name):
    """Display ``fig`` (notebook) or save it as ``name``.png in FIGDIR (script)."""
    if FIGDIR is None:
        plt.show()
    else:
        fig.savefig(FIGDIR / f"{name}.png", dpi=100, bbox_inches="tight")
        plt.close(fig)


print("cebmf", cebmf.__version__)

# %% [markdown]
# ## 1. The data
#
# `cebmf.datasets.pbmc68k_counts()` returns scanpy's `pbmc68k_reduced` (700 blood cells,
# 765 genes) with its **integer counts** recovered exactly, as a sparse matrix in `.X`,
# together with the cell-type labels (`bulk_labels`), the library size (`n_counts`), the
# mitochondrial fraction (`percent_mito`), `log10_n_counts` and the bundled UMAP.

# %%
adata = pbmc68k_counts()
print(adata)
print(type(adata.X).__name__, adata.X.dtype, f"{adata.X.nnz / np.prod(adata.shape):.0%} non-zero")
print(adata.obs["bulk_labels"].value_counts().to_string())

COVARIATES = ["percent_mito", "log10_n_counts"]
print(adata.obs[COVARIATES].describe().loc[["mean", "std", "min", "max"]])

# %% [markdown]
# ## 2. Fit cEBMF
#
# One call. `cebmf.tl.fit` sees integer counts and applies the default transform
# (`transform="auto"`: counts per 10 000 then log1p, on the stored non-zeros only, so the
# matrix stays sparse). Because `obs_covariates` is given, the loadings get the
# covariate-moderated `cash` prior; the factors (genes) keep the default `point_normal`
# prior. `n_factors` is an upper bound: factors are added while they improve the fit. We
# cap it at 10 to keep this tutorial fast; `uns["cebmf"]["max_factors_reached"]` says
# whether the cap, rather than the data, set the number of factors (a larger `n_factors`
# then lets the data choose).

# %%
N_FACTORS = 10
start = time.perf_counter()
cebmf.tl.fit(adata, obs_covariates=COVARIATES, n_factors=N_FACTORS)
fit_seconds = time.perf_counter() - start

record = adata.uns["cebmf"]
n_factors_chosen = len(record["factor_names"])
print(f"fit in {fit_seconds:.1f} s")
print(
    f"factors: {n_factors_chosen} (at most {N_FACTORS}; "
    f"set by the cap: {record['max_factors_reached']})"
)
print(
    f"priors: loadings {record['params']['prior_loadings']!r}, factors "
    f"{record['params']['prior_factors']!r}; transform {record['params']['transform']!r}"
)
print(
    f"converged: {record['converged']} after {record['n_iter']} backfit sweeps; "
    f"final ELBO {record['elbo_final']:.1f}"
)

# %% [markdown]
# The results are in the AnnData, with scanpy's conventions: loadings in
# `obsm["X_cebmf"]` (cells x factors), factors in `varm["cebmf_factors"]` (genes x
# factors), their posterior sds and local false sign rates next to them, and the rest
# (ELBO trace, variance explained, fitted priors, parameters) in `uns["cebmf"]`.

# %%
print({k: adata.obsm[k].shape for k in adata.obsm if "cebmf" in k})
print({k: adata.varm[k].shape for k in adata.varm})
print(sorted(record))

# %% [markdown]
# When the number of factors reaches `n_factors`, every factor the fit was allowed improved
# it, and the data may well support more; a larger `n_factors` (e.g. the 20 of
# `cebmf demo`) lets the fit look for them, at a higher cost. The factors are named by
# their rank in variance explained.
#
# ## 3. Variance explained
#
# `uns["cebmf"]["pve"]` is each factor's share of the variance (as in flashier:
# $d_k^2 / (\sum_k d_k^2 + \text{total noise variance})$ with $d_k$ the product of the
# norms of loading and factor $k$). Factors are sorted by it.

# %%
pve = np.asarray(record["pve"])
print(pd.Series(pve, index=record["factor_names"], name="pve").to_string())
show(cebmf.pl.variance_explained(adata, show=False, return_fig=True), "variance_explained")

# %% [markdown]
# The first factor explains about half of the variance on its own. Its loadings are
# positive in every cell and its top genes are broadly expressed ones: it is the "average
# cell" (the log-normalised data are not centred, so the mean expression is a factor).
# The others are much smaller and describe how cells differ.

# %%
first = adata.obsm["X_cebmf"][:, 0]
first_genes = adata.var_names[np.argsort(-np.abs(adata.varm["cebmf_factors"][:, 0]))[:8]]
print(f"factor_1 loadings from {first.min():.2f} to {first.max():.2f}; top genes:", *first_genes)

# %% [markdown]
# ## 4. Loadings by cell type
#
# The mean loading of each factor in each annotated cell type (`cebmf.pl.structure`
# draws the same table as a heatmap):

# %%
loadings = adata.obsm["X_cebmf"]
cell_types = adata.obs["bulk_labels"].astype(str).to_numpy()
cell_means = pd.DataFrame(loadings, columns=record["factor_names"]).groupby(cell_types).mean()
print(cell_means.T.round(2).to_string())
show(cebmf.pl.structure(adata, "bulk_labels", show=False, return_fig=True), "structure")

# %% [markdown]
# Which factor is most specific to a cell type? The loadings are signed and their scale
# differs between factors, so for factor $k$, sign $\pm$ and a set of cell types $S$ we
# measure how far the mean loadings in $S$ lie above the highest mean of any *other* cell
# type, in units of the factor's standard deviation over all cells:
#
# $$
# \text{specificity}(S, k, \pm) =
# \frac{\min_{c \in S} \pm\bar L_{c,k} - \max_{c' \notin S} \pm\bar L_{c',k}}{\mathrm{sd}(L_k)}.
# $$
#
# For each cell type ($S$ = that type alone), and for the two myeloid types together, we
# keep the best factor and sign and list the genes with the largest factor values of that
# sign.


# %%
def most_specific(group, means=None, sd=None):
    """(specificity, factor index, sign) of the factor most specific to ``group``
    (default: in the cEBMF fit's cell-type means ``cell_means``, loading sds ``loading_sd``)."""
    means = cell_means if means is None else means
    sd = loading_sd if sd is None else sd
    best = (-np.inf, 0, 1.0)
    for k, name in enumerate(means.columns):
        for sign in (1.0, -1.0):
            col = sign * means[name]
            inside = col[list(group)].min()
            outside = col.drop(index=list(group)).max()
            best = max(best, ((inside - outside) / sd[k], k, sign))
    return best


loading_sd = loadings.std(0)
factors = adata.varm["cebmf_factors"]
groups = {c: [c] for c in cell_means.index}
groups["myeloid (CD14+ Monocyte, Dendritic)"] = ["CD14+ Monocyte", "Dendritic"]
rows, top_genes = [], {}
for label, group in groups.items():
    score, k, sign = most_specific(group)
    top_genes[label] = list(adata.var_names[np.argsort(-sign * factors[:, k])[:10]])
    rows.append(
        {
            "cells": label,
            "factor": cell_means.columns[k],
            "sign": "+" if sign > 0 else "-",
            "specificity": score,
            "top genes": ", ".join(top_genes[label]),
        }
    )
specificity = pd.DataFrame(rows).set_index("cells").sort_values("specificity", ascending=False)
print(specificity.to_string(max_colwidth=60, float_format=lambda v: f"{v:.2f}"))

# %% [markdown]
# Cell types with a programme of their own stand out by more than one standard deviation,
# and the top genes of their factors are textbook markers:
#
# * **NK cells** (`CD56+ NK`): *GNLY*, *NKG7*, granzymes (*GZMB*, *GZMA*, *GZMH*),
#   perforin (*PRF1*);
# * **B cells** (`CD19+ B`): *CD79A*, *MS4A1* and the HLA class II genes;
# * **progenitors** (`CD34+`): *PRSS57*, *CYTL1*, *SPINK2*;
# * **monocytes** (`CD14+ Monocyte`): *FCGR3A*, *CFD*, *AIF1*, *CTSS*, *PSAP*; they share
#   much of their programme (*CST3*, *LYZ*, HLA class II genes) with the cells labelled
#   `Dendritic` (the myeloid factor above), so their own factor stands out less sharply
#   than that of NK cells.
#
# The T-cell subtypes (naive, memory, regulatory) are much harder to tell apart in 765
# genes and 700 cells; their specificities are low.
#
# `cebmf.pl.top_genes` draws the top genes of chosen factors (both signs, with posterior
# sds as error bars), and `cebmf.pl.embedding` colours the UMAP by the loadings:

# %%
marker_factors = [
    specificity.loc[label, "factor"] for label in ("CD56+ NK", "CD19+ B", "CD14+ Monocyte")
]
marker_factors = list(dict.fromkeys(marker_factors))  # drop repeats, keep the order
print("factors of NK cells, B cells and monocytes:", marker_factors)
show(
    cebmf.pl.top_genes(adata, factors=marker_factors, n_genes=12, show=False, return_fig=True),
    "top_genes",
)
show(
    cebmf.pl.embedding(adata, basis="umap", factors=marker_factors, show=False, return_fig=True),
    "factors_umap",
)

# %% [markdown]
# ## 5. The learned prior against a covariate
#
# For every factor, the `cash` prior of the loadings gives each cell its own prior
# probability of a zero loading, $\pi_0(x_i)$, from its covariates $x_i$. It is stored in
# `uns["cebmf"]["priors"][factor]["loadings"]["pi0"]`. We pick the factor whose $\pi_0$
# varies most across cells and ask how it depends on the two covariates (Spearman
# correlation of the prior probability of a non-zero loading, $1 - \pi_0$, with each).

# %%
priors = record["priors"]
pi0 = {name: np.asarray(priors[name]["loadings"]["pi0"]) for name in record["factor_names"]}
pi0_spread = pd.Series({name: v.std() for name, v in pi0.items()}, name="sd of pi0")
print(pi0_spread.round(3).to_string())
prior_factor = pi0_spread.idxmax()
nonzero = 1.0 - pi0[prior_factor]
prior_correlations = {
    cov: stats.spearmanr(nonzero, adata.obs[cov].to_numpy())[0] for cov in COVARIATES
}
print(f"\n{prior_factor}: P(non-zero loading) from {nonzero.min():.2f} to {nonzero.max():.2f}")
for cov, rho in prior_correlations.items():
    print(f"  Spearman correlation with {cov}: {rho:+.2f}")

# %% [markdown]
# The prior of this factor's loadings is far from the same for every cell: the network has
# learned from the data how the chance that a cell uses the programme depends on its
# covariates (the signs and sizes of the correlations above say which covariate matters
# and in which direction). The factors whose `pi0` barely varies (here the large, dense
# ones, whose loadings are practically never zero) give every cell the same prior
# probability of a zero loading.
#
# The fitted network can also be evaluated at covariate values of our choosing
# (`prior_parameters`; `cash` returns the mixture weights of every cell on its grid of
# scales, the first of which is the point mass at zero). Here along the range of the
# mitochondrial fraction, at the median library size:

# %%
cash = cebmf.priors.get_prior("cash")
g = dict(priors[prior_factor]["loadings"])
mito_grid = np.quantile(adata.obs["percent_mito"], [0.05, 0.25, 0.5, 0.75, 0.95])
at = np.column_stack([mito_grid, np.full(5, adata.obs["log10_n_counts"].median())])
weights = cash.prior_parameters(g, at)["pi"]
print(pd.DataFrame({"percent_mito": mito_grid, "P(non-zero)": 1.0 - weights[:, 0]}).to_string())

# %% [markdown]
# `cebmf.pl.prior` draws $1 - \pi_0$ per cell against a covariate (or `quantity="mean"` /
# `"sd"` for the prior's mean and sd, evaluated from the network):

# %%
fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.2), layout="constrained")
for ax, cov in zip(axes, COVARIATES, strict=True):
    cebmf.pl.prior(adata, factor=prior_factor, covariate=cov, ax=ax, show=False)
show(fig, "prior")

# %% [markdown]
# ## 6. Do the covariates help? Compare with plain EBMF
#
# Plain EBMF gives all cells the same prior. Both fits use the same data, transform and
# noise model, so their ELBOs (lower bounds on the log-likelihood of the data) can be
# compared directly: the higher, the better the model explains the data. `copy=True`
# returns a new AnnData and `key_added` keeps the two results apart.

# %%
start = time.perf_counter()
plain = cebmf.tl.fit(adata, n_factors=N_FACTORS, key_added="plain", copy=True)
plain_seconds = time.perf_counter() - start
plain_record = plain.uns["plain"]
elbo_cash = float(record["elbo_final"])
elbo_plain = float(plain_record["elbo_final"])
comparison = pd.DataFrame(
    {
        "loading prior": [
            record["params"]["prior_loadings"],
            plain_record["params"]["prior_loadings"],
        ],
        "factors": [n_factors_chosen, len(plain_record["factor_names"])],
        "backfit sweeps": [record["n_iter"], plain_record["n_iter"]],
        "ELBO": [elbo_cash, elbo_plain],
        "seconds": [fit_seconds, plain_seconds],
    },
    index=["cEBMF (cash, covariates)", "EBMF (point_normal)"],
)
print(comparison.to_string(float_format=lambda v: f"{v:.1f}"))
elbo_gain = elbo_cash - elbo_plain
better = "cEBMF" if elbo_gain > 0 else "plain EBMF"
print(f"\nELBO difference (cEBMF - EBMF): {elbo_gain:+.1f} nats: {better} explains the data better")
print(f"per observation: {elbo_gain / np.prod(adata.shape):+.2e} nats")

# %% [markdown]
# The difference is small next to the size of the data (535 500 observations): the
# mitochondrial fraction and the library size say something about which cells use a
# programme, but most of the structure is in the expression itself. Two caveats when
# reading such a comparison: each fit is a local optimum of its own ELBO (found from the
# same kind of starting points), and `cash` costs more time (a small network is refitted
# for every factor at every sweep). Do both fits find the same programmes? For NK cells,
# B cells and monocytes we take each fit's most specific factor (as in section 4) and
# compare their specificities and gene profiles.

# %%
plain_loadings = plain.obsm["X_plain"]
plain_factors = plain.varm["plain_factors"]
plain_means = (
    pd.DataFrame(plain_loadings, columns=plain_record["factor_names"]).groupby(cell_types).mean()
)
rows = []
for label in ("CD56+ NK", "CD19+ B", "CD14+ Monocyte"):
    score, k, sign = most_specific([label])
    score_p, k_p, sign_p = most_specific([label], plain_means, plain_loadings.std(0))
    rows.append(
        {
            "cells": label,
            "cEBMF factor": cell_means.columns[k],
            "cEBMF specificity": score,
            "EBMF factor": plain_means.columns[k_p],
            "EBMF specificity": score_p,
            # both oriented towards the cell type, so the sign of the correlation matters
            "profile correlation": np.corrcoef(
                sign * factors[:, k], sign_p * plain_factors[:, k_p]
            )[0, 1],
        }
    )
programmes = pd.DataFrame(rows).set_index("cells")
print(programmes.to_string(float_format=lambda v: f"{v:.2f}"))

# %% [markdown]
# Both fits single out NK cells and B cells, and their NK programmes are the same. They
# differ on the myeloid side: the cEBMF fit has a factor specific to monocytes, while the
# plain fit's closest factor contrasts monocytes with B cells and singles them out much
# less. Each fit is a local optimum of its own ELBO; the higher ELBO of the cEBMF fit
# says that the data support its split better.

# %% [markdown]
# ## 7. The ELBO trace
#
# The fit records the ELBO after each added factor and each sweep over all factors; it
# never decreases. `cebmf.pl.elbo` plots the distance to the best (here the final) value
# on a symmetric-log axis, so the small late improvements stay visible:

# %%
elbo_trace = np.asarray(record["elbo"])
elbo_trace_plain = np.asarray(plain_record["elbo"])
print(f"{elbo_trace.size} steps; smallest step-to-step change {np.diff(elbo_trace).min():.3g}")
show(cebmf.pl.elbo(adata, show=False, return_fig=True), "elbo")

# %% [markdown]
# ## Summary
#
# * `cebmf.tl.fit(adata, obs_covariates=[...])` fits covariate-moderated EBMF to the counts
#   in an AnnData (sparse, transformed on the fly) and writes loadings to `obsm`, factors
#   to `varm` and everything else to `uns`; the number of factors is chosen by the data
#   up to `n_factors` (`uns["cebmf"]["max_factors_reached"]` tells when the cap chose it).
# * Cell-type programmes show up as factors with marker genes on top; the learned prior
#   tells how the chance that a cell uses a programme depends on its covariates.
# * The ELBO compares models fitted to the same data, e.g. with and without covariates.
# * `cebmf.pl` draws the fit: `embedding`, `top_genes`, `structure`,
#   `variance_explained`, `prior` and `elbo`.
# * From the command line: `cebmf fit in.h5ad out.h5ad --obs-covariates percent_mito`.

# %%
if FIGDIR is not None:
    print("figures written to", FIGDIR)
