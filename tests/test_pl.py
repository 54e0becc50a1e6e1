"""Tests of cebmf.pl on synthetic AnnData objects with the layout cebmf.tl.fit writes."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from matplotlib import pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

import cebmf
from cebmf import pl

pytestmark = pytest.mark.filterwarnings("ignore:The set_bad function:PendingDeprecationWarning")

K = 4
NAMES = np.array([f"factor_{i + 1}" for i in range(K)])


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


@pytest.fixture(scope="module")
def fitted_priors():
    """Covariate priors fitted by cebmf.ebnm on 700 cells / the genes of pbmc68k_reduced."""
    base = sc.datasets.pbmc68k_reduced()
    rng = np.random.default_rng(0)
    n = base.n_obs
    cov_l = np.column_stack(
        [np.asarray(base.obs["percent_mito"]), np.log1p(np.asarray(base.obs["n_counts"]))]
    )
    z = (cov_l[:, 1] - cov_l[:, 1].mean()) / cov_l[:, 1].std()
    theta = np.where(rng.random(n) < _sigmoid(3 * z), rng.normal(0, 3, n), 0.0)
    x_l = theta + rng.normal(size=n)
    mask = rng.random(base.n_vars) < 0.9
    mask[:20] = True
    cov_f = np.asarray(base.var["means"], dtype=np.float64)[mask][:, None]
    zf = (cov_f[:, 0] - cov_f.mean()) / cov_f.std()
    p = int(mask.sum())
    x_f = np.where(rng.random(p) < _sigmoid(2 * zf), rng.normal(0, 2, p), 0.0) + rng.normal(size=p)
    return {
        "cov_l": cov_l,
        "cov_f": cov_f,
        "mask": mask,
        "x_l": x_l,
        "cash": cebmf.ebnm(x_l, 1.0, "cash", covariates=cov_l).g,
        "emdn": cebmf.ebnm(x_l, 1.0, "emdn", covariates=cov_l, n_components=2).g,
        "cgb": cebmf.ebnm(x_f, 1.0, "cgb", covariates=cov_f).g,
        "point_normal": cebmf.ebnm(x_l, 1.0, "point_normal").g,
    }


def make_adata(fitted, key="cebmf", nonnegative=False, seed=1):
    """pbmc68k_reduced plus a synthetic cebmf result in the layout of cebmf.tl.fit."""
    adata = sc.datasets.pbmc68k_reduced()
    adata.obsm["spatial"] = np.random.default_rng(5).uniform(0, 100, (adata.n_obs, 2))
    adata.var["symbol"] = ["sym_" + g for g in adata.var_names]
    rng = np.random.default_rng(seed)
    n, p = adata.shape
    mask = fitted["mask"]
    L = rng.normal(size=(n, K))
    L[:, 0] = fitted["x_l"]
    # factor 2 differs by cell type, so that group means are informative
    codes = adata.obs["bulk_labels"].cat.codes.to_numpy()
    L[:, 1] += codes
    F = rng.normal(size=(p, K))
    if nonnegative:
        L, F = np.abs(L), np.abs(F)
    F[~mask] = 0.0
    adata.obsm[f"X_{key}"] = L
    adata.obsm[f"X_{key}_sd"] = np.full((n, K), 0.1)
    adata.obsm[f"X_{key}_lfsr"] = np.full((n, K), 0.5)
    adata.varm[f"{key}_factors"] = F
    adata.varm[f"{key}_factors_sd"] = np.where(mask[:, None], 0.2, 0.0) * np.ones((p, K))
    adata.varm[f"{key}_factors_lfsr"] = np.full((p, K), 0.5)
    elbo = -1e5 + np.cumsum(1e4 * 0.3 ** np.arange(12))
    point = {"family": "point_normal", "pi0": 0.5, "scale": 1.0, "mode": 0.0}
    priors = {name: {"loadings": dict(point), "factors": dict(point)} for name in NAMES}
    priors["factor_1"] = {"loadings": fitted["cash"], "factors": fitted["cgb"]}
    priors["factor_2"]["loadings"] = fitted["point_normal"]
    priors["factor_3"]["loadings"] = fitted["emdn"]
    priors["factor_4"] = {"loadings": {}, "factors": dict(point)}  # fixed loadings
    adata.uns[key] = {
        "factor_names": NAMES.copy(),
        "pve": np.array([0.3, 0.2, 0.05, 0.01]),
        "elbo": elbo,
        "converged": True,
        "n_iter": 12,
        "noise_sd": 1.0,
        "params": {"obs_covariates": ["percent_mito", "n_counts"], "var_covariates": ["means"]},
        "var_mask": mask.copy(),
        "priors": priors,
        "covariates": {
            "loadings": fitted["cov_l"],
            "loadings_names": np.array(["percent_mito", "log1p(n_counts)"], dtype=object),
            "factors": fitted["cov_f"],
        },
    }
    return adata


def snapshot(adata):
    return {
        "obs": adata.obs.copy(),
        "var": adata.var.copy(),
        "obsm": sorted(adata.obsm.keys()),
        "varm": sorted(adata.varm.keys()),
        "uns": sorted(adata.uns.keys()),
        "uns_key": {k: sorted(v.keys()) for k, v in adata.uns.items() if isinstance(v, dict)},
        "L": adata.obsm["X_cebmf"].copy() if "X_cebmf" in adata.obsm else None,
    }


def assert_unchanged(adata, before):
    after = snapshot(adata)
    pd.testing.assert_frame_equal(after["obs"], before["obs"])
    pd.testing.assert_frame_equal(after["var"], before["var"])
    for name in ("obsm", "varm", "uns", "uns_key"):
        assert after[name] == before[name], name
    if before["L"] is not None:
        np.testing.assert_array_equal(after["L"], before["L"])


def assert_png(path):
    assert path.exists()
    assert path.stat().st_size > 5000


@pytest.fixture
def adata(fitted_priors):
    return make_adata(fitted_priors)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ---- embedding ------------------------------------------------------------------------
@pytest.mark.parametrize("basis", ["umap", "X_umap", "spatial"])
def test_embedding_renders_all_factors(adata, tmp_path, basis):
    before = snapshot(adata)
    out = tmp_path / f"emb_{basis}.png"
    axs = pl.embedding(adata, basis=basis, save=str(out), show=False)
    assert isinstance(axs, list) and len(axs) == K
    assert all(isinstance(a, Axes) for a in axs)
    assert_png(out)
    assert [a.get_title() for a in axs] == list(NAMES)
    # signed loadings: diverging map with limits symmetric around 0
    clim = axs[0].collections[0].get_clim()
    assert clim[0] == pytest.approx(-clim[1])
    assert clim[1] == pytest.approx(np.abs(adata.obsm["X_cebmf"][:, 0]).max())
    assert axs[0].collections[0].get_cmap().name == "RdBu_r"
    assert_unchanged(adata, before)


def test_embedding_single_factor_and_return_fig(adata, fitted_priors, tmp_path):
    a = pl.embedding(adata, factors="factor_2", show=False)
    assert isinstance(a, Axes)
    values = np.sort(np.asarray(a.collections[0].get_array()))
    np.testing.assert_allclose(values, np.sort(adata.obsm["X_cebmf"][:, 1]))
    fig = pl.embedding(adata, factors=[0, 3], return_fig=True)
    assert isinstance(fig, Figure)
    fig.savefig(tmp_path / "fig.png")
    assert_png(tmp_path / "fig.png")
    _, ax = plt.subplots()
    assert pl.embedding(adata, factors=0, ax=ax, show=False) is ax
    nonneg = make_adata(fitted_priors, nonnegative=True)
    a = pl.embedding(nonneg, factors=1, show=False)
    assert a.collections[0].get_cmap().name == "viridis"


def test_embedding_custom_key(fitted_priors, tmp_path):
    adata = make_adata(fitted_priors, key="run2")
    before = snapshot(adata)
    axs = pl.embedding(adata, "umap", key="run2", save=str(tmp_path / "k.png"), show=False)
    assert len(axs) == K
    assert_png(tmp_path / "k.png")
    assert_unchanged(adata, before)
    with pytest.raises(ValueError, match=r"key_added='cebmf'"):
        pl.embedding(adata)


def test_embedding_bad_arguments(adata):
    before = snapshot(adata)
    with pytest.raises(ValueError, match=r"basis 'tsne' not found"):
        pl.embedding(adata, basis="tsne")
    with pytest.raises(ValueError, match=r"unknown factor name 'factor_9'"):
        pl.embedding(adata, factors="factor_9")
    with pytest.raises(ValueError, match=r"factors=7 is out of range"):
        pl.embedding(adata, factors=[0, 7])
    with pytest.raises(ValueError, match=r"run cebmf.tl.fit\(adata, key_added='nope'\)"):
        pl.embedding(adata, key="nope")
    with pytest.raises(ValueError, match=r"ax= can only be used with a single factor"):
        pl.embedding(adata, ax=plt.subplots()[1])
    with pytest.raises(TypeError, match="AnnData"):
        pl.embedding(adata.obsm["X_cebmf"])
    with pytest.raises(ValueError, match="ncols must be a positive integer, got 0"):
        pl.embedding(adata, ncols=0)  # was a ZeroDivisionError inside scanpy
    assert_unchanged(adata, before)


# ---- top genes ------------------------------------------------------------------------
def test_top_genes_picks_largest_abs_values(adata, tmp_path):
    before = snapshot(adata)
    F = adata.varm["cebmf_factors"]
    mask = adata.uns["cebmf"]["var_mask"]
    # a huge value on a gene outside the fitted mask must be ignored
    outside = np.flatnonzero(~mask)[0]
    F[outside, 0] = 100.0
    axs = pl.top_genes(adata, n_genes=7, save=str(tmp_path / "top.png"), show=False)
    assert len(axs) == K
    assert_png(tmp_path / "top.png")
    for k, a in enumerate(axs):
        score = np.where(mask, np.abs(F[:, k]), -np.inf)
        expected = list(adata.var_names[np.argsort(-score, kind="stable")[:7]])
        assert [t.get_text() for t in a.get_yticklabels()] == expected
        widths = [bar.get_width() for bar in a.patches]
        np.testing.assert_allclose(widths, F[np.argsort(-score, kind="stable")[:7], k])
    assert adata.var_names[outside] not in [t.get_text() for t in axs[0].get_yticklabels()]
    assert_unchanged(adata, before)


def test_top_genes_options(adata):
    F = adata.varm["cebmf_factors"]
    a = pl.top_genes(adata, "factor_2", 5, gene_symbols="symbol", sign="negative", show=False)
    assert isinstance(a, Axes)
    labels = [t.get_text() for t in a.get_yticklabels()]
    expected = ["sym_" + g for g in adata.var_names[np.argsort(F[:, 1], kind="stable")[:5]]]
    assert labels == expected
    assert all(bar.get_width() < 0 for bar in a.patches)
    fig = pl.top_genes(adata, factors=[0], return_fig=True)
    assert isinstance(fig, Figure)
    with pytest.raises(ValueError, match=r"gene_symbols='gene_name' is not a column"):
        pl.top_genes(adata, gene_symbols="gene_name")
    with pytest.raises(ValueError, match=r"n_genes must be a positive integer"):
        pl.top_genes(adata, n_genes=0)
    with pytest.raises(ValueError, match=r"sign must be one of"):
        pl.top_genes(adata, sign="up")
    del adata.varm["cebmf_factors"]
    with pytest.raises(ValueError, match=r"varm\['cebmf_factors'\] not found"):
        pl.top_genes(adata)


# ---- variance explained and ELBO ------------------------------------------------------
def test_variance_explained(adata, tmp_path):
    before = snapshot(adata)
    a = pl.variance_explained(adata, save=str(tmp_path / "pve.png"), show=False)
    assert isinstance(a, Axes)
    assert_png(tmp_path / "pve.png")
    np.testing.assert_allclose(a.lines[0].get_ydata(), adata.uns["cebmf"]["pve"])
    assert [t.get_text() for t in a.get_xticklabels()] == list(NAMES)
    a = pl.variance_explained(adata, log=True, n_factors=2, show=False)
    assert a.get_yscale() == "log"
    np.testing.assert_allclose(a.lines[0].get_ydata(), [0.3, 0.2])
    assert isinstance(pl.variance_explained(adata, return_fig=True), Figure)
    assert_unchanged(adata, before)
    del adata.uns["cebmf"]["pve"]
    with pytest.raises(ValueError, match=r"no 'pve' entry"):
        pl.variance_explained(adata)


def test_elbo(adata, tmp_path):
    before = snapshot(adata)
    trace = adata.uns["cebmf"]["elbo"]
    a = pl.elbo(adata, save=str(tmp_path / "elbo.png"), show=False)
    assert_png(tmp_path / "elbo.png")
    assert a.get_yscale() == "symlog"
    np.testing.assert_allclose(a.lines[0].get_ydata(), trace.max() - trace)
    assert "converged" in a.get_title()
    a = pl.elbo(adata, relative=False, show=False)
    np.testing.assert_allclose(a.lines[0].get_ydata(), trace)
    assert not a.collections  # no decrease marked
    adata.uns["cebmf"]["elbo"] = np.array([-10.0, -5.0, -6.0, -4.0])
    a = pl.elbo(adata, show=False)
    np.testing.assert_allclose(a.collections[0].get_offsets()[:, 0], [3.0])
    assert_unchanged(adata, before)
    with pytest.raises(ValueError, match=r"run cebmf.tl.fit"):
        pl.elbo(adata, key="other")


# ---- structure ------------------------------------------------------------------------
def test_structure_heatmap_values_are_group_means(adata, tmp_path):
    before = snapshot(adata)
    a = pl.structure(adata, "bulk_labels", save=str(tmp_path / "s.png"), show=False)
    assert_png(tmp_path / "s.png")
    expected = (
        pd.DataFrame(adata.obsm["X_cebmf"], columns=NAMES, index=adata.obs_names)
        .groupby(adata.obs["bulk_labels"], observed=True)
        .mean()
    )
    np.testing.assert_allclose(np.asarray(a.images[0].get_array()), expected.to_numpy())
    assert [t.get_text() for t in a.get_yticklabels()] == list(expected.index.astype(str))
    assert [t.get_text() for t in a.get_xticklabels()] == list(NAMES)
    lo, hi = a.images[0].get_clim()
    assert lo == pytest.approx(-hi)
    # standardize: each factor's loadings divided by its largest absolute value
    a = pl.structure(adata, "bulk_labels", standardize=True, factors=[1, 2], show=False)
    L = adata.obsm["X_cebmf"][:, [1, 2]]
    scaled = pd.DataFrame(L / np.abs(L).max(0), index=adata.obs_names)
    expected = scaled.groupby(adata.obs["bulk_labels"], observed=True).mean()
    np.testing.assert_allclose(np.asarray(a.images[0].get_array()), expected.to_numpy())
    assert_unchanged(adata, before)


def test_structure_by_a_boolean_column(adata):
    b = adata.copy()
    b.obs["even"] = np.arange(b.n_obs) % 2 == 0
    a = pl.structure(b, "even", show=False)
    L = b.obsm["X_cebmf"]
    expected = np.stack([L[1::2].mean(0), L[::2].mean(0)])  # False, then True
    np.testing.assert_allclose(np.asarray(a.images[0].get_array()), expected)
    assert [t.get_text() for t in a.get_yticklabels()] == ["False", "True"]


def test_structure_bars(adata, fitted_priors, tmp_path):
    nonneg = make_adata(fitted_priors, nonnegative=True)
    before = snapshot(nonneg)
    fig = pl.structure(nonneg, "bulk_labels", kind="bars", return_fig=True)
    assert isinstance(fig, Figure)
    fig.savefig(tmp_path / "bars.png")
    assert_png(tmp_path / "bars.png")
    a = fig.axes[0]
    means = (
        pd.DataFrame(nonneg.obsm["X_cebmf"], index=nonneg.obs_names)
        .groupby(nonneg.obs["bulk_labels"], observed=True)
        .mean()
        .to_numpy()
    )
    g = means.shape[0]
    heights = np.array([p.get_height() for p in a.patches]).reshape(K, g).T
    np.testing.assert_allclose(heights, means)
    bottoms = np.array([p.get_y() for p in a.patches]).reshape(K, g).T
    np.testing.assert_allclose(bottoms[:, 1], means[:, 0])  # stacked
    assert_unchanged(nonneg, before)
    # signed loadings: grouped bars around 0
    a = pl.structure(adata, "louvain", kind="bars", show=False)
    assert min(p.get_y() + min(p.get_height(), 0) for p in a.patches) < 0
    assert all(p.get_y() == 0 for p in a.patches)


def test_structure_bad_arguments(adata):
    with pytest.raises(ValueError, match=r"groupby='cell_type' is not a column of adata.obs"):
        pl.structure(adata, "cell_type")
    with pytest.raises(ValueError, match=r"groupby='percent_mito' is a numeric"):
        pl.structure(adata, "percent_mito")
    with pytest.raises(ValueError, match=r"kind must be one of"):
        pl.structure(adata, "bulk_labels", kind="pie")
    with pytest.raises(ValueError, match=r"unknown factor name"):
        pl.structure(adata, "bulk_labels", factors=["factor_1", "topic_2"])


# ---- prior ----------------------------------------------------------------------------
def test_prior_against_covariates(adata, fitted_priors, tmp_path):
    before = snapshot(adata)
    g = fitted_priors["cash"]
    a = pl.prior(adata, "factor_1", covariate="n_counts", save=str(tmp_path / "p.png"), show=False)
    assert_png(tmp_path / "p.png")
    assert isinstance(a, Axes)
    xy = a.collections[0].get_offsets()
    np.testing.assert_allclose(xy[:, 0], adata.obs["n_counts"])
    np.testing.assert_allclose(xy[:, 1], 1.0 - g["pi0"])
    # the prior learned that cells with many counts are more often non-zero
    assert np.corrcoef(xy[:, 0], xy[:, 1])[0, 1] > 0.5
    # default: one panel per stored covariate column, labelled by covariates["loadings_names"]
    axs = pl.prior(adata, 0, show=False)
    assert [x.get_xlabel() for x in axs] == ["percent_mito", "log1p(n_counts)"]
    np.testing.assert_allclose(
        axs[1].collections[0].get_offsets()[:, 0], fitted_priors["cov_l"][:, 1]
    )
    a = pl.prior(adata, 0, covariate="bulk_labels", show=False)  # categorical: box plot
    assert [t.get_text() for t in a.get_xticklabels()][:2] == list(
        adata.obs["bulk_labels"].cat.categories[:2]
    )
    assert_unchanged(adata, before)


def test_prior_on_embedding_and_factor_side(adata, fitted_priors, tmp_path):
    before = snapshot(adata)
    a = pl.prior(adata, "factor_1", basis="spatial", save=str(tmp_path / "sp.png"), show=False)
    assert_png(tmp_path / "sp.png")
    values = np.sort(np.asarray(a.collections[0].get_array()))
    np.testing.assert_allclose(values, np.sort(1.0 - fitted_priors["cash"]["pi0"]))
    fig = pl.prior(adata, "factor_1", side="factors", covariate="means", return_fig=True)
    assert isinstance(fig, Figure)
    xy = fig.axes[0].collections[0].get_offsets()
    mask = fitted_priors["mask"]
    np.testing.assert_allclose(xy[:, 0], adata.var["means"][mask])
    np.testing.assert_allclose(xy[:, 1], 1.0 - fitted_priors["cgb"]["pi0"])
    a = pl.prior(adata, "factor_1", side="factors", covariate=0, show=False)
    assert a.get_xlabel() == "means"
    assert_unchanged(adata, before)


def test_prior_mean_and_sd_from_network(adata, fitted_priors):
    cov = fitted_priors["cov_l"]
    sd = pl.prior(adata, 0, covariate=1, quantity="sd", show=False).collections[0].get_offsets()
    par = cebmf.priors.get_prior("cash").prior_parameters(fitted_priors["cash"], cov)
    np.testing.assert_allclose(sd[:, 1], np.sqrt(par["pi"] @ par["scale"] ** 2), rtol=1e-6)
    mean = pl.prior(adata, 0, covariate=1, quantity="mean", show=False)
    np.testing.assert_allclose(mean.collections[0].get_offsets()[:, 1], 0.0)  # symmetric
    # emdn: no point mass, but its sd depends on the covariates
    with pytest.raises(ValueError, match=r"'emdn' prior has no point mass"):
        pl.prior(adata, "factor_3", covariate=0)
    a = pl.prior(adata, "factor_3", covariate=1, quantity="sd", show=False)
    assert np.isfinite(a.collections[0].get_offsets()).all()


def test_prior_survives_h5ad_roundtrip(adata, fitted_priors, tmp_path):
    adata.write_h5ad(tmp_path / "fit.h5ad")
    back = ad.read_h5ad(tmp_path / "fit.h5ad")
    for quantity in ("nonzero", "sd"):
        a = pl.prior(back, "factor_1", covariate=1, quantity=quantity, show=False)
        assert np.isfinite(a.collections[0].get_offsets()).all()
    a = pl.prior(back, "factor_1", side="factors", covariate="means", quantity="mean", show=False)
    assert np.isfinite(a.collections[0].get_offsets()).all()


def test_prior_bad_arguments(adata):
    before = snapshot(adata)
    with pytest.raises(ValueError, match=r"'point_normal', which does not depend on covariates"):
        pl.prior(adata, "factor_2", covariate="n_counts")
    with pytest.raises(ValueError, match=r"factor 'factor_4' have no fitted prior"):
        pl.prior(adata, "factor_4")
    with pytest.raises(ValueError, match=r"either covariate= .* or basis="):
        pl.prior(adata, 0, covariate="n_counts", basis="umap")
    with pytest.raises(ValueError, match=r"basis= shows cells on an embedding"):
        pl.prior(adata, 0, side="factors", basis="umap")
    with pytest.raises(ValueError, match=r"covariate='age' is not a column of adata.obs"):
        pl.prior(adata, 0, covariate="age")
    with pytest.raises(ValueError, match=r"covariate=5 is out of range"):
        pl.prior(adata, 0, covariate=5)
    with pytest.raises(ValueError, match=r"basis 'tsne' not found"):
        pl.prior(adata, 0, basis="tsne")
    with pytest.raises(ValueError, match=r"factor=10 is out of range"):
        pl.prior(adata, 10)
    with pytest.raises(ValueError, match=r"side must be one of"):
        pl.prior(adata, 0, side="cells")
    assert_unchanged(adata, before)


def test_plots_of_factors_on_a_fit_with_no_factors():
    """A fit with K = 0 has nothing to plot: every plot of factors says so alike (prior used
    to say "factor=0 is out of range ... (indices 0 to -1; names )")."""
    n, p = 20, 10
    obs = pd.DataFrame({"group": pd.Categorical(["a", "b"] * (n // 2))})
    obs.index = obs.index.astype(str)
    adata = ad.AnnData(np.ones((n, p)), obs=obs)
    adata.obsm["X_umap"] = np.random.default_rng(0).normal(size=(n, 2))
    adata.obsm["X_cebmf"] = np.zeros((n, 0))
    adata.varm["cebmf_factors"] = np.zeros((p, 0))
    adata.uns["cebmf"] = {
        "factor_names": np.array([], dtype=object),
        "pve": np.zeros(0),
        "elbo": np.array([-3.0, -2.0]),
        "priors": {},
    }
    plots = {
        "embedding": lambda: pl.embedding(adata, basis="umap", show=False),
        "top_genes": lambda: pl.top_genes(adata, show=False),
        "structure": lambda: pl.structure(adata, "group", show=False),
        "prior": lambda: pl.prior(adata, 0, show=False),
        "prior by name": lambda: pl.prior(adata, "factor_1", show=False),
        "variance_explained": lambda: pl.variance_explained(adata, show=False),
    }
    message = "the result has no factors (K = 0): there is nothing to plot."
    for name, plot in plots.items():
        with pytest.raises(ValueError) as err:
            plot()
        assert str(err.value) == message, name


# ---- scanpy save conventions and silence ----------------------------------------------
@pytest.fixture
def figdir(tmp_path):
    old = sc.settings.figdir, sc.settings.file_format_figs
    sc.settings.figdir, sc.settings.file_format_figs = tmp_path / "figs", "png"
    yield tmp_path / "figs"
    sc.settings.figdir, sc.settings.file_format_figs = old


def test_save_conventions(adata, tmp_path, figdir, capsys):
    assert pl.elbo(adata, save=True, show=False) is not None
    assert_png(tmp_path / "figs" / "cebmf_elbo.png")
    pl.variance_explained(adata, save="_run1.pdf", show=False)
    assert (tmp_path / "figs" / "cebmf_variance_explained_run1.pdf").stat().st_size > 1000
    pl.structure(adata, "bulk_labels", save=tmp_path / "nested" / "s.png", show=False)
    assert_png(tmp_path / "nested" / "s.png")
    n_open = len(plt.get_fignums())
    with pytest.raises(ValueError, match=r"unsupported figure format 'docx'"):
        pl.top_genes(adata, save=str(tmp_path / "x.docx"))
    assert len(plt.get_fignums()) == n_open  # nothing drawn
    assert capsys.readouterr().out == ""


def test_all_plots_on_a_real_tl_fit(tmp_path):
    """End to end on what cebmf.tl.fit writes (skipped while cebmf.tl is unavailable)."""
    tl = pytest.importorskip("cebmf.tl")
    adata = sc.datasets.pbmc68k_reduced()[:300, :200].copy()
    prior_l = cebmf.priors.get_prior("cgb", hidden_layers=0, max_iter=10, warm_iter=5)
    tl.fit(
        adata,
        obs_covariates=["percent_mito"],
        n_factors=2,
        prior_loadings=prior_l,
        transform=None,
        max_iter=5,
    )
    before = snapshot(adata)
    names = list(adata.uns["cebmf"]["factor_names"])
    assert len(pl.embedding(adata, save=str(tmp_path / "e.png"), show=False)) == len(names)
    pl.top_genes(adata, save=str(tmp_path / "t.png"), show=False)
    pl.variance_explained(adata, save=str(tmp_path / "v.png"), show=False)
    pl.elbo(adata, save=str(tmp_path / "l.png"), show=False)
    pl.structure(adata, "bulk_labels", save=str(tmp_path / "s.png"), show=False)
    a = pl.prior(adata, names[0], save=str(tmp_path / "p.png"), show=False)
    assert a.get_xlabel() == "percent_mito"
    pi0 = adata.uns["cebmf"]["priors"][names[0]]["loadings"]["pi0"]
    np.testing.assert_allclose(a.collections[0].get_offsets()[:, 1], 1.0 - pi0)
    pl.prior(adata, names[0], quantity="sd", basis="umap", show=False)
    with pytest.raises(ValueError, match="does not depend on covariates"):
        pl.prior(adata, names[0], side="factors", covariate="means")
    for name in ("e", "t", "v", "l", "s", "p"):
        assert_png(tmp_path / f"{name}.png")
    assert_unchanged(adata, before)


# ---- MuData ---------------------------------------------------------------------------
def _mudata_snapshot(mdata):
    return {
        "obs": mdata.obs.copy(),
        "obsm": sorted(mdata.obsm.keys()),
        "uns": sorted(mdata.uns.keys()),
        "record": sorted(mdata.uns["cebmf"].keys()),
        "L": np.array(mdata.obsm["X_cebmf"]),
        "mods": {
            m: (sorted(a.obsm.keys()), sorted(a.varm.keys()), a.var.copy())
            for m, a in mdata.mod.items()
        },
    }


def test_plots_of_a_joint_mudata_fit(tmp_path):
    """Every plot reads a joint MuData fit: cells from the MuData, features from the chosen
    modality (mod=), the record cut down to that modality; the MuData is not modified."""
    import mudata as md

    rna = sc.datasets.pbmc68k_reduced()[:300, :200].copy()
    rna.var["log_mean"] = np.log1p(np.abs(np.asarray(rna.X)).mean(0))
    rng = np.random.default_rng(0)
    atac = ad.AnnData(
        rng.poisson(0.4, (rna.n_obs, 60)).astype(float), obs=pd.DataFrame(index=rna.obs_names)
    )
    atac.var_names = [f"peak_{j}" for j in range(atac.n_vars)]
    mdata = md.MuData({"rna": rna, "atac": atac})
    mdata.obs["pm"] = rna.obs["percent_mito"].to_numpy()
    cebmf.tl.fit(
        mdata,
        transform={"rna": None, "atac": "log1p_normalize"},
        obs_covariates="pm",
        var_covariates={"rna": "log_mean"},
        n_factors=3,
        max_iter=5,
    )
    rec = mdata.uns["cebmf"]
    names = list(rec["factor_names"])
    L = np.asarray(mdata.obsm["X_cebmf"])
    before = _mudata_snapshot(mdata)

    # cells: the MuData's loadings, an embedding found in the rna modality, mdata.obs groups
    axs = pl.embedding(mdata, save=str(tmp_path / "e.png"), show=False)
    assert [a.get_title() for a in axs] == names
    assert_png(tmp_path / "e.png")
    np.testing.assert_allclose(
        np.sort(np.asarray(axs[1].collections[0].get_array())), np.sort(L[:, 1])
    )
    a = pl.structure(mdata, "rna:bulk_labels", show=False)
    expected = (
        pd.DataFrame(L, index=mdata.obs_names)
        .groupby(mdata.obs["rna:bulk_labels"], observed=True)
        .mean()
    )
    np.testing.assert_allclose(np.asarray(a.images[0].get_array()), expected.to_numpy())
    # a modality's cell annotation that the MuData has not pulled is found as "mod:column"
    mdata["rna"].obs["half"] = pd.Categorical(np.arange(rna.n_obs) % 2)
    before = _mudata_snapshot(mdata)
    assert "rna:half" not in mdata.obs.columns
    a = pl.structure(mdata, "rna:half", show=False)
    np.testing.assert_allclose(
        np.asarray(a.images[0].get_array()), [L[::2].mean(0), L[1::2].mean(0)]
    )

    # variance explained: the fit's, plus one line per modality; or one modality's
    a = pl.variance_explained(mdata, show=False)
    assert [line.get_label() for line in a.lines] == ["all", "rna", "atac"]
    for line, want in zip(a.lines, [rec["pve"], *rec["pve_by_mod"].values()], strict=True):
        np.testing.assert_allclose(line.get_ydata(), want)
    a = pl.variance_explained(mdata, mod="atac", show=False)
    assert len(a.lines) == 1 and "atac" in a.get_title()
    np.testing.assert_allclose(a.lines[0].get_ydata(), rec["pve_by_mod"]["atac"])
    pl.elbo(mdata, show=False)

    # features of one modality: ranked among its fitted features only
    for mod in ("rna", "atac"):
        F = np.asarray(mdata[mod].varm["cebmf_factors"])
        mask = np.asarray(rec["var_mask"][mod], dtype=bool)
        axs = pl.top_genes(mdata, mod=mod, n_genes=5, show=False)
        for k, a in enumerate(axs):
            order = np.argsort(-np.where(mask, np.abs(F[:, k]), -np.inf), kind="stable")[:5]
            assert [t.get_text() for t in a.get_yticklabels()] == list(mdata[mod].var_names[order])
    # the modality on its own still draws its genes (not its cells)
    a = pl.top_genes(mdata["rna"], factors=0, n_genes=5, show=False)
    F = np.asarray(mdata["rna"].varm["cebmf_factors"])
    assert [t.get_text() for t in a.get_yticklabels()] == list(
        rna.var_names[np.argsort(-np.abs(F[:, 0]), kind="stable")[:5]]
    )

    # the rna block of the factors' cash prior against the rna genes' own covariate
    used = np.flatnonzero(rec["var_mask"]["rna"])
    block = rec["priors"][names[0]]["factors"]["blocks"]["rna"]
    a = pl.prior(mdata, 0, side="factors", mod="rna", show=False)
    assert a.get_xlabel() == "log_mean"
    xy = a.collections[0].get_offsets()
    np.testing.assert_allclose(xy[:, 0], rna.var["log_mean"].to_numpy()[used], rtol=1e-6)
    np.testing.assert_allclose(xy[:, 1], 1.0 - np.asarray(block["pi0"]))
    a = pl.prior(mdata, names[0], side="factors", covariate="log_mean", mod="rna", show=False)
    np.testing.assert_allclose(a.collections[0].get_offsets()[:, 1], 1.0 - block["pi0"])
    assert _mudata_snapshot_equal(mdata, before)

    # after an h5mu round trip (dicts come back with sorted keys): the same plots
    mdata.write_h5mu(tmp_path / "m.h5mu")
    back = md.read_h5mu(tmp_path / "m.h5mu")
    a = pl.variance_explained(back, show=False)
    assert [line.get_label() for line in a.lines] == ["all", "rna", "atac"]
    a = pl.prior(back, 0, side="factors", mod="rna", show=False)
    np.testing.assert_allclose(a.collections[0].get_offsets()[:, 1], 1.0 - block["pi0"])

    # errors that name the fix
    with pytest.raises(ValueError, match=r"several modalities .* pass mod="):
        pl.top_genes(mdata)
    with pytest.raises(ValueError, match=r"mod='prot' is not a modality of the MuData"):
        pl.top_genes(mdata, mod="prot")
    with pytest.raises(
        ValueError, match="in modality 'atac' is 'point_normal', which does not depend"
    ):
        pl.prior(mdata, 0, side="factors", mod="atac")
    with pytest.raises(ValueError, match=r"a joint MuData fit: .* Pass the MuData itself"):
        pl.embedding(mdata["rna"])
    with pytest.raises(ValueError, match="drop mod="):
        pl.embedding(rna, mod="rna")
    with pytest.raises(ValueError, match=r"mdata.uns\['other'\] not found"):
        pl.embedding(mdata, key="other")

    # a modality fitted on its own (key "alone") is plotted through mod=; a joint fit of
    # rna only refuses atac
    cebmf.tl.fit(mdata["rna"], transform=None, n_factors=2, max_iter=3, key_added="alone")
    a = pl.variance_explained(mdata, key="alone", mod="rna", show=False)
    np.testing.assert_allclose(a.lines[0].get_ydata(), mdata["rna"].uns["alone"]["pve"])
    cebmf.tl.fit(mdata, mods=["rna"], transform=None, n_factors=2, max_iter=3, key_added="r")
    pl.top_genes(mdata, key="r", show=False)  # the one fitted modality needs no mod=
    with pytest.raises(ValueError, match=r"mod='atac' was not part of the fit 'r'"):
        pl.top_genes(mdata, key="r", mod="atac")


def _mudata_snapshot_equal(mdata, before) -> bool:
    after = _mudata_snapshot(mdata)
    pd.testing.assert_frame_equal(after["obs"], before["obs"])
    for name in ("obsm", "uns", "record"):
        assert after[name] == before[name], name
    np.testing.assert_array_equal(after["L"], before["L"])
    for m, (obsm, varm, var) in before["mods"].items():
        assert after["mods"][m][:2] == (obsm, varm), m
        pd.testing.assert_frame_equal(after["mods"][m][2], var)
    return True
