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
# # Shrinking noisy effect estimates with empirical Bayes (EBNM)
#
# In a differential-expression analysis we get one estimate per gene (say a log fold
# change) and its standard error. Some estimates are large because the gene really
# changed, others only because the gene was measured with few cells or low counts. Taken
# one at a time, the two cases are hard to tell apart; taken together, the thousands of
# estimates tell us what true effects typically look like (how many genes are unaffected,
# how big the real changes are).
#
# **Empirical Bayes normal means (EBNM)** does exactly this. It assumes
#
# * estimate = true effect + noise, with the noise's sd equal to the standard error:
#   $x_i \sim N(\theta_i, s_i^2)$,
# * the true effects $\theta_i$ are drawn from an unknown distribution $g$ (the *prior*),
#
# learns $g$ from all genes at once, and then reports for every gene
#
# * a **posterior mean**: the estimate shrunk towards what is typical, more so when it is
#   noisy;
# * a **local false sign rate (lfsr)**: the probability that we have the *sign* of the
#   effect wrong (or that it is zero). Genes with lfsr < 0.05 are confident calls.
#
# `cebmf.ebnm(x, s, prior)` solves this problem for several families of priors. This
# tutorial simulates data where we know the truth, compares the families, shows two
# speed/reuse features (warm starts and fixed priors), and finally shrinks real
# differential-expression estimates from a small PBMC data set that ships with scanpy.
#
# Run it as a script (`MPLBACKEND=Agg python tutorials/01_ebnm_shrinkage.py`; figures are
# then saved to a temporary folder) or open it as a notebook with jupytext.

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
        fig.savefig(FIGDIR / f"{name}.png", dpi=100)
        plt.close(fig)


print(
    "cebmf",
    cebmf.__version__,
    "| prior families:",
    ", ".join(cebmf.available_priors(covariates=False)),
)

# %% [markdown]
# ## 1. Simulated data: sparse effects with gene-specific noise
#
# 10 000 "genes": 80% are unaffected ($\theta = 0$); the other 20% have effects drawn from
# a normal distribution with sd 2. Every gene has its own standard error between 0.5 and 2
# (think: well- and poorly-measured genes), and the estimate is the effect plus noise.

# %%
rng = np.random.default_rng(1)
n_genes = 10_000
pi0_true, sd_true = 0.8, 2.0

affected = rng.random(n_genes) > pi0_true
theta = np.where(affected, rng.normal(0.0, sd_true, n_genes), 0.0)  # true effects
s = rng.uniform(0.5, 2.0, n_genes)  # standard errors
x = theta + s * rng.normal(size=n_genes)  # noisy estimates

print(f"{affected.sum()} affected genes; estimates range from {x.min():.1f} to {x.max():.1f}")

# %% [markdown]
# ## 2. Fit every prior family
#
# One call per family. Each returns an `EBNMResult` with `mean`, `sd`, `lfsr` (one value
# per gene), the fitted prior `g` (a dict) and `loglik`, the log-likelihood of all the
# estimates under the fitted prior. Higher `loglik` = the family describes the data better,
# so it is a principled way to choose a family (with one exception, `flat`, see below).
#
# We also measure the error of the posterior means against the truth (RMSE), which we can
# only do because the data are simulated.


# %%
def rmse(estimate):
    return float(np.sqrt(np.mean((estimate - theta) ** 2)))


sim_fits = {}
rows = []
for family in cebmf.available_priors(covariates=False):
    start = time.perf_counter()
    res = cebmf.ebnm(x, s, prior=family)
    seconds = time.perf_counter() - start
    sim_fits[family] = res
    calls = res.lfsr < 0.05
    wrong = calls & (np.sign(res.mean) != np.sign(theta))  # wrong sign, or truly zero
    rows.append(
        {
            "family": family,
            "loglik": res.loglik,
            "pi0": res.g.get("pi0", np.nan),
            "RMSE": rmse(res.mean),
            "lfsr<0.05": int(calls.sum()),
            "false signs": int(wrong.sum()),
            "seconds": seconds,
        }
    )
sim_table = pd.DataFrame(rows).set_index("family").sort_values("loglik", ascending=False)
rmse_raw = rmse(x)
print(f"RMSE of the raw estimates: {rmse_raw:.3f}")
print(sim_table)

# %% [markdown]
# What to read from this table:
#
# * The **point-normal** prior is the true model here; it has (one of) the highest
#   log-likelihoods and its fitted `pi0` is close to the true 0.8. The adaptive
#   `normal_scale_mixture` (`ash`) is as good: it is flexible enough to mimic a point-normal.
#   `point_laplace` is a close third.
# * Every shrinkage prior has a **much lower RMSE** than the raw estimates: shrinking noise
#   towards zero is what makes estimates more accurate on average.
# * Among the genes called at lfsr < 0.05 by a shrinkage prior, only a handful have the
#   wrong sign or are truly null. Without shrinkage (`flat`, where the lfsr is a one-sided
#   p-value) hundreds of the calls are wrong, mostly null genes with a lucky z-score.
# * The **nonnegative** families (`point_exponential`, `nonnegative_mixture`,
#   `generalized_binary`) assume effects are never negative, which is wrong here: they
#   fit badly. Use them for nonnegative quantities (e.g. loadings of NMF-like factors).
# * `flat` does no shrinkage (posterior mean = raw estimate). Its log-likelihood follows a
#   convention (see the documentation's maths page) and must **not** be compared with the
#   other families'.

# %% [markdown]
# ### The fitted priors
#
# The fitted prior `g` is a small dict. For the spike-and-slab families it holds `pi0`
# (the fraction of null genes) and `scale`; for the mixture families, the grid of
# component scales and their weights `pi`.

# %%
for family in ("normal", "point_normal", "point_laplace", "normal_scale_mixture"):
    g = sim_fits[family].g
    summary = {k: v for k, v in g.items() if not isinstance(v, np.ndarray)}
    print(
        f"{family:<22}", {k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items()}
    )
g_ash = sim_fits["normal_scale_mixture"].g
print(f"ash grid: {g_ash['scale'].size} sds from 0 to {g_ash['scale'].max():.1f}")
heavy = g_ash["pi"] > 0.01
print("components with weight > 1% (sd: weight):")
for sd, w in zip(g_ash["scale"][heavy], g_ash["pi"][heavy], strict=True):
    print(f"   {sd:6.2f}: {w:.3f}")


# %% [markdown]
# To compare priors of different shapes, plot their cumulative distribution functions
# (CDFs): the jump at zero is the point mass `pi0`, the spread of the curve the size of the
# real effects.


# %%
def prior_cdf(g, t):
    """P(theta <= t) under a fitted prior of the symmetric families used here."""
    t = np.asarray(t, dtype=float)
    step = (t >= g["mode"]).astype(float)
    z = t - g["mode"]
    family = g["family"]
    if family == "normal":
        return stats.norm.cdf(z / g["scale"])
    if family == "point_normal":
        return g["pi0"] * step + (1 - g["pi0"]) * stats.norm.cdf(z / g["scale"])
    if family == "point_laplace":
        return g["pi0"] * step + (1 - g["pi0"]) * stats.laplace.cdf(z / g["scale"])
    if family == "normal_scale_mixture":
        cdf = np.zeros_like(t)
        for sd, w in zip(g["scale"], g["pi"], strict=True):
            cdf += w * (step if sd == 0 else stats.norm.cdf(z / sd))
        return cdf
    raise ValueError(f"no CDF written for {family}")


grid = np.linspace(-6, 6, 601)
fig, ax = plt.subplots(figsize=(6, 4))
truth = pi0_true * (grid >= 0) + (1 - pi0_true) * stats.norm.cdf(grid / sd_true)
ax.plot(grid, truth, color="black", lw=3, alpha=0.3, label="true prior")
for family in ("normal", "point_normal", "point_laplace", "normal_scale_mixture"):
    ax.plot(grid, prior_cdf(sim_fits[family].g, grid), lw=1.2, label=family)
ax.set_xlabel(r"effect $\theta$")
ax.set_ylabel(r"prior CDF  $P(\theta \leq t)$")
ax.set_title("Fitted priors")
ax.legend(frameon=False, fontsize=8)
show(fig, "fitted_priors")

# %% [markdown]
# The `normal` prior has no point mass: to fit 80% zeros and 20% large effects with one
# normal it must compromise, which is why its log-likelihood and RMSE are worse.

# %% [markdown]
# ## 3. Raw versus shrunk estimates, and the lfsr
#
# Left: each gene's posterior mean against its raw estimate (point-normal prior). Points
# on the dashed diagonal are not shrunk at all. Small estimates are pulled to zero; large
# ones keep most of their size. Colour is the lfsr. Middle: the lfsr against the z-score
# $x/s$: it depends on the z-score *and* on the prior. Right: the posterior means are much
# closer to the true effects than the raw estimates.

# %%
best = sim_fits["point_normal"]
fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
ax = axes[0]
points = ax.scatter(x, best.mean, c=best.lfsr, s=3, cmap="viridis_r", vmin=0, vmax=0.5)
lim = np.abs(x).max()
ax.plot([-lim, lim], [-lim, lim], ls="--", color="grey", lw=0.8)
ax.set_xlabel("raw estimate x")
ax.set_ylabel("posterior mean")
ax.set_title("Shrinkage (point_normal)")
fig.colorbar(points, ax=ax, label="lfsr")

ax = axes[1]
ax.scatter(x / s, best.lfsr, s=3, c=np.where(affected, "tab:red", "tab:grey"))
ax.axhline(0.05, ls="--", color="black", lw=0.8)
ax.set_xlabel("z-score x / s")
ax.set_ylabel("lfsr")
ax.set_title("lfsr (red: truly affected genes)")

ax = axes[2]
ax.scatter(theta, x, s=3, alpha=0.3, color="tab:grey", label=f"raw (RMSE {rmse_raw:.2f})")
ax.scatter(theta, best.mean, s=3, alpha=0.5, label=f"shrunk (RMSE {rmse(best.mean):.2f})")
ax.set_xlabel(r"true effect $\theta$")
ax.set_ylabel("estimate")
ax.set_title("Accuracy")
ax.legend(frameon=False, markerscale=4)
fig.tight_layout()
show(fig, "shrinkage")

# %% [markdown]
# How well does the lfsr work as an error rate? Among all genes with lfsr below a
# threshold, the average lfsr estimates the fraction of wrong signs. With simulated data
# we can check it against the truth:

# %%
for threshold in (0.01, 0.05, 0.1):
    called = best.lfsr < threshold
    wrong = np.sign(best.mean[called]) != np.sign(theta[called])
    print(
        f"lfsr < {threshold:<4}: {called.sum():5d} genes called, "
        f"estimated false sign rate {best.lfsr[called].mean():.3f}, true {wrong.mean():.3f}"
    )

# %% [markdown]
# The estimated and true rates are both small and of the same order; with only a few
# wrong calls among a few hundred, they cannot agree more closely in a single data set.

# %% [markdown]
# ## 4. Nonnegative effects
#
# If effects can only be positive (e.g. a gene's loading on an expression program), use a
# nonnegative family. Here the same simulation with $|\theta|$ instead of $\theta$:

# %%
theta_plus = np.abs(theta)
x_plus = theta_plus + s * rng.normal(size=n_genes)
rows = []
for family in ("point_normal", "point_exponential", "nonnegative_mixture", "generalized_binary"):
    res = cebmf.ebnm(x_plus, s, prior=family)
    err = float(np.sqrt(np.mean((res.mean - theta_plus) ** 2)))
    rows.append({"family": family, "loglik": res.loglik, "pi0": res.g["pi0"], "RMSE": err})
print(pd.DataFrame(rows).set_index("family").sort_values("loglik", ascending=False))
print(f"RMSE of the raw estimates: {np.sqrt(np.mean((x_plus - theta_plus) ** 2)):.3f}")

# %% [markdown]
# The nonnegative families now beat the symmetric point-normal, which wastes prior mass on
# negative effects. (`generalized_binary` assumes the non-null effects cluster around one
# typical size, which is not true of $|N(0, 2^2)|$; the data say so through its lower
# log-likelihood.)

# %% [markdown]
# ## 5. Reusing a fit: warm starts and fixed priors
#
# In a matrix factorisation the same EBNM problem is solved again and again on slightly
# different data. Two options make this cheaper:
#
# * `state=previous.state` **warm-starts** the fit from an earlier solution. The result is
#   the same optimum (never a worse one); it is just found faster.
# * `g_init=previous.g, fix_g=True` **does not fit** at all: it computes posteriors for new
#   data under a prior learned earlier (for example, score a replicate experiment under the
#   prior learned from the first one).
#
# We simulate a second "replicate" from the same distribution.

# %%
rng2 = np.random.default_rng(2)
theta2 = np.where(rng2.random(n_genes) > pi0_true, rng2.normal(0.0, sd_true, n_genes), 0.0)
s2 = rng2.uniform(0.5, 2.0, n_genes)
x2 = theta2 + s2 * rng2.normal(size=n_genes)

warm_rows = []
for family in ("point_normal", "normal_scale_mixture"):
    first = sim_fits[family]
    start = time.perf_counter()
    cold = cebmf.ebnm(x2, s2, prior=family)
    t_cold = time.perf_counter() - start
    start = time.perf_counter()
    warm = cebmf.ebnm(x2, s2, prior=family, state=first.state)
    t_warm = time.perf_counter() - start
    fixed = cebmf.ebnm(x2, s2, prior=family, g_init=first.g, fix_g=True)
    warm_rows.append(
        {
            "family": family,
            "cold loglik": cold.loglik,
            "warm - cold loglik": warm.loglik - cold.loglik,
            "fixed-g - cold loglik": fixed.loglik - cold.loglik,
            "max |mean diff| warm vs cold": float(np.abs(cold.mean - warm.mean).max()),
            "cold seconds": t_cold,
            "warm seconds": t_warm,
        }
    )
warm_table = pd.DataFrame(warm_rows).set_index("family")
print(warm_table.T.to_string(float_format=lambda v: f"{v:.6g}"))

# %% [markdown]
# The warm-started fit reaches the same log-likelihood and the same posterior means as the
# cold fit, up to the solvers' tolerances (for `ash` the warm fit's grid is the union of the
# old and the fresh grid, so it can even be marginally higher). The fixed prior gives a
# slightly lower log-likelihood: it was fitted to the first replicate, not to this one, but
# it is close because the two replicates come from the same distribution.
#
# A prior family can also be configured once and reused, e.g. an `ash` prior with a coarser
# grid (fewer components, faster, slightly less flexible):

# %%
coarse_ash = cebmf.priors.get_prior("normal_scale_mixture", grid_mult=4.0)
coarse = cebmf.ebnm(x, s, prior=coarse_ash)
print(
    f"{coarse_ash!r}: {coarse.g['scale'].size} components, loglik {coarse.loglik:.1f} "
    f"(default grid: {g_ash['scale'].size} components, "
    f"loglik {sim_fits['normal_scale_mixture'].loglik:.1f})"
)

# %% [markdown]
# ## 6. Real data: differential expression in PBMCs
#
# scanpy ships `pbmc68k_reduced`, 700 peripheral blood cells and 765 genes with cell-type
# labels. `cebmf.datasets.pbmc68k_counts()` recovers its integer counts, and
# `cebmf.datasets.de_estimates(adata, group)` computes, for every gene, the difference in mean
# log-normalised expression (log1p of counts per 10 000) between one cell type and all
# other cells, with its standard error.
#
# We take the rarest cell type, the 8 naive CD4 T cells: with so few cells, the
# estimates of many genes rest on a handful of counts and are very noisy.

# %%
from cebmf.datasets import de_estimates, pbmc68k_counts  # noqa: E402

adata = pbmc68k_counts()
print(adata)
print(adata.obs["bulk_labels"].value_counts().to_string())

group = "CD4+/CD45RA+/CD25- Naive T"
diff, se, genes = de_estimates(adata, group)
print(f"\n{genes.size} genes; standard errors from {se.min():.3f} to {se.max():.2f}")

# %%
pbmc_fits = {}
rows = []
for family in ("normal", "point_normal", "point_laplace", "normal_scale_mixture", "flat"):
    res = cebmf.ebnm(diff, se, prior=family)
    pbmc_fits[family] = res
    rows.append(
        {
            "family": family,
            "loglik": res.loglik,
            "pi0": res.g.get("pi0", np.nan),
            "lfsr<0.05": int((res.lfsr < 0.05).sum()),
        }
    )
print(pd.DataFrame(rows).set_index("family"))
pbmc_best = max((f for f in pbmc_fits if f != "flat"), key=lambda f: pbmc_fits[f].loglik)
print("best family by log-likelihood:", pbmc_best)

# %% [markdown]
# Most genes differ somewhat between naive T cells and the rest of the blood, so the fitted
# `pi0` is small (here zero). Now compare the gene rankings before and after shrinkage:

# %%
res = pbmc_fits[pbmc_best]
de = pd.DataFrame({"estimate": diff, "se": se, "shrunk": res.mean, "lfsr": res.lfsr}, index=genes)
top_raw = de.sort_values("estimate", ascending=False).head(10)
top_shrunk = de.sort_values("shrunk", ascending=False).head(10)
print("Top 10 genes up in naive T cells by the raw estimate:")
print(top_raw)
print("\nTop 10 by the posterior mean:")
print(top_shrunk)
dropped = top_raw.index.difference(top_shrunk.index)
print("\nin the raw top 10 but not after shrinkage:", ", ".join(dropped) or "none")
print(de.loc[dropped])

# %% [markdown]
# Genes whose large raw difference comes with a large standard error (they are expressed
# in one or two of the 8 cells) are shrunk hardest and drop out of the top of the list;
# genes with the same difference but a small standard error keep their place. For example,
# an immunoglobulin gene such as *IGJ* (a plasma-cell gene) can look "up" in 8 naive T
# cells by chance; its estimate is far less certain than that of *CD3D* or *IL32*, T-cell
# genes that rank high either way.

# %%
fig, ax = plt.subplots(figsize=(6, 5))
points = ax.scatter(diff, res.mean, c=res.lfsr, s=10 + 40 * se / se.max(), cmap="viridis_r")
lim = np.abs(diff).max() * 1.05
ax.plot([-lim, lim], [-lim, lim], ls="--", color="grey", lw=0.8)
for gene in top_shrunk.index[:5].union(dropped):  # the top 5, and the genes that dropped
    ax.annotate(gene, (de.loc[gene, "estimate"], de.loc[gene, "shrunk"]), fontsize=7)
ax.set_xlabel("estimated difference (log1p CP10k)")
ax.set_ylabel(f"posterior mean ({pbmc_best})")
ax.set_title(f"{group} vs rest\n(marker size: standard error)", fontsize=10)
fig.colorbar(points, ax=ax, label="lfsr")
fig.tight_layout()
show(fig, "pbmc_shrinkage")

# %% [markdown]
# ## Summary
#
# * `cebmf.ebnm(x, s, prior)` learns the distribution of effects from all genes and
#   returns shrunk estimates (`mean`), uncertainties (`sd`) and sign error rates (`lfsr`).
# * Compare families by `loglik` (not `flat`); `point_normal`, `point_laplace` and
#   `normal_scale_mixture` are good defaults for signed effects, the nonnegative families
#   for nonnegative ones.
# * Reuse work with `state=` (warm start) and `g_init=..., fix_g=True` (fixed prior).

# %%
if FIGDIR is not None:
    print("figures written to", FIGDIR)
