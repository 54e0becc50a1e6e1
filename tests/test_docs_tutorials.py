"""The tutorials run top to bottom and compute what they claim; the docs build cleanly.

Each tutorial is executed once in-process with ``runpy`` (as ``__main__``, exactly like
``python tutorials/01_ebnm_shrinkage.py``) under the Agg backend, from an empty working
directory and with ``tempfile`` pointed at the test's temporary directory, so that we can
check both its results and that it writes nothing anywhere else.
"""

import importlib.util
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "tutorials" / "01_ebnm_shrinkage.py"
TUTORIAL2 = ROOT / "tutorials" / "02_scverse_cebmf.py"
DOCS = ROOT / "docs"


def _run_tutorial(path, tmp_path_factory, name):
    """Run a tutorial as ``__main__`` from an empty working directory, with ``tempfile``
    pointed at a fresh directory; return its namespace and the two directories."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import pandas as pd

    tmp = tmp_path_factory.mktemp(f"{name}_tmp")
    cwd = tmp_path_factory.mktemp(f"{name}_cwd")
    mp = pytest.MonkeyPatch()
    mp.setattr(tempfile, "tempdir", str(tmp))
    mp.chdir(cwd)
    try:
        # the tutorials set pandas display options; restore them afterwards
        with pd.option_context("display.width", 80, "display.precision", 6):
            ns = runpy.run_path(str(path), run_name="__main__")
    finally:
        mp.undo()
    return ns, tmp, cwd


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory):
    """Run the tutorial once; return its global namespace and its scratch directories."""
    return _run_tutorial(TUTORIAL, tmp_path_factory, "tutorial")


@pytest.fixture(scope="module")
def tutorial2(tmp_path_factory):
    """Run tutorial 02 (cEBMF on AnnData) once."""
    return _run_tutorial(TUTORIAL2, tmp_path_factory, "tutorial2")


def test_tutorial_writes_only_into_a_temp_dir(tutorial):
    ns, tmp, cwd = tutorial
    assert list(cwd.iterdir()) == [], "the tutorial wrote into the working directory"
    figdir = ns["FIGDIR"]
    assert figdir is not None and Path(figdir).parent == tmp
    written = sorted(p.name for p in Path(figdir).iterdir())
    assert written == ["fitted_priors.png", "pbmc_shrinkage.png", "shrinkage.png"]
    assert all((Path(figdir) / name).stat().st_size > 10_000 for name in written)


def test_tutorial_point_normal_recovers_the_simulated_prior(tutorial):
    ns, *_ = tutorial
    g = ns["sim_fits"]["point_normal"].g
    assert abs(g["pi0"] - ns["pi0_true"]) < 0.03
    assert abs(g["scale"] - ns["sd_true"]) < 0.3


def test_tutorial_shrinkage_beats_raw_estimates_and_lfsr_is_calibrated(tutorial):
    ns, *_ = tutorial
    table = ns["sim_table"]
    theta = ns["theta"]
    # shrinkage roughly halves the error of the raw estimates (1.33 -> 0.64 here)
    for family in ("point_normal", "point_laplace", "normal_scale_mixture"):
        assert table.loc[family, "RMSE"] < 0.6 * ns["rmse_raw"]
    assert table.loc["flat", "RMSE"] == pytest.approx(ns["rmse_raw"])
    # the true model and its flexible relatives beat the misspecified families
    best_signed = table.loc[["point_normal", "normal_scale_mixture"], "loglik"].min()
    for family in ("normal", "point_exponential", "nonnegative_mixture", "generalized_binary"):
        assert best_signed > table.loc[family, "loglik"] + 100
    # calls at lfsr < 0.05 rarely have the wrong sign; without shrinkage many do
    best = ns["sim_fits"]["point_normal"]
    called = best.lfsr < 0.05
    assert called.sum() > 100
    wrong = np.mean(np.sign(best.mean[called]) != np.sign(theta[called]))
    assert wrong < 0.05
    assert table.loc["flat", "false signs"] > 10 * table.loc["point_normal", "false signs"]


def test_tutorial_warm_start_and_fixed_prior(tutorial):
    ns, *_ = tutorial
    n = ns["n_genes"]
    for family, row in ns["warm_table"].iterrows():
        # a warm start finds the same optimum (never a worse one beyond tolerance)
        assert row["warm - cold loglik"] > -1e-8 * n, family
        assert row["max |mean diff| warm vs cold"] < 1e-2, family
        # a prior fitted to another replicate is worse on this one, but not by much
        assert -0.01 * n < row["fixed-g - cold loglik"] <= 1e-8 * n, family


def test_tutorial_pbmc_shrinkage_demotes_noisy_genes(tutorial):
    ns, *_ = tutorial
    assert ns["pbmc_best"] != "flat"
    de, top_raw, top_shrunk = ns["de"], ns["top_raw"], ns["top_shrunk"]
    assert len(de) == 765
    # T-cell genes stay at the top of the naive T cell list
    assert {"CD3D", "IL32"} <= set(top_shrunk.index)
    # the genes that leave the top 10 after shrinkage are the uncertain ones
    dropped = top_raw.index.difference(top_shrunk.index)
    kept = top_raw.index.intersection(top_shrunk.index)
    assert len(dropped) > 0
    assert de.loc[dropped, "se"].min() > de.loc[kept, "se"].median()
    # the posterior mean always lies between 0 and the estimate for these symmetric priors
    assert np.all(np.abs(de["shrunk"]) <= np.abs(de["estimate"]) + 1e-9)


# ---- tutorial 02: cEBMF on AnnData -----------------------------------------------------

FIGURES2 = [
    "elbo.png",
    "factors_umap.png",
    "prior.png",
    "structure.png",
    "top_genes.png",
    "variance_explained.png",
]

# well-known markers (present among pbmc68k_reduced's 765 genes, checked below)
MARKERS = {
    "CD56+ NK": {"GNLY", "NKG7"},
    "CD19+ B": {"CD79A", "CD79B", "MS4A1"},
    "CD14+ Monocyte": {"LYZ", "CST3", "S100A8", "S100A9", "FCN1", "AIF1", "LST1", "FCGR3A"},
}


def _specificity(loadings, labels, group):
    """Best (specificity, factor, sign) for a set of cell types, computed here from the
    loadings: how far the group's lowest mean loading lies above the highest mean of any
    other type, in units of the factor's sd over all cells."""
    import pandas as pd

    means = pd.DataFrame(loadings).groupby(labels).mean()
    sd = loadings.std(0)
    best = (-np.inf, -1, 0.0)
    for k in range(loadings.shape[1]):
        for sign in (1.0, -1.0):
            col = sign * means[k]
            score = (col[group].min() - col.drop(index=group).max()) / sd[k]
            best = max(best, (score, k, sign))
    return best


def test_tutorial2_writes_only_into_a_temp_dir(tutorial2):
    ns, tmp, cwd = tutorial2
    assert list(cwd.iterdir()) == [], "the tutorial wrote into the working directory"
    figdir = ns["FIGDIR"]
    assert figdir is not None and Path(figdir).parent == tmp
    assert sorted(p.name for p in Path(figdir).iterdir()) == FIGURES2
    assert all((Path(figdir) / name).stat().st_size > 10_000 for name in FIGURES2)


def test_tutorial2_fit_is_stored_in_the_anndata(tutorial2):
    ns, *_ = tutorial2
    adata, record = ns["adata"], ns["record"]
    k = ns["n_factors_chosen"]
    # the number of factors is chosen by the data, up to the cap
    assert 3 <= k <= ns["N_FACTORS"]
    assert record["max_factors_reached"] == (k == ns["N_FACTORS"])
    assert adata.obsm["X_cebmf"].shape == (700, k)
    assert adata.varm["cebmf_factors"].shape == (765, k)
    assert record["params"]["prior_loadings"] == "cash"
    assert record["params"]["transform"] == "log1p_normalize"
    assert list(record["params"]["obs_covariates"]) == ["percent_mito", "log10_n_counts"]
    assert record["covariates"]["loadings"].shape == (700, 2)
    # variance explained: positive, sorted, and less than everything together
    pve = ns["pve"]
    assert pve.shape == (k,) and np.all(pve > 0)
    assert np.all(np.diff(pve) <= 0)
    assert pve.sum() < 1
    # the first factor is the "average cell": positive loadings everywhere, half the variance
    assert adata.obsm["X_cebmf"][:, 0].min() > 0
    assert 0.3 < pve[0] < 0.7


def test_tutorial2_elbo_traces_never_decrease(tutorial2):
    ns, *_ = tutorial2
    for trace, record in (
        (ns["elbo_trace"], ns["record"]),
        (ns["elbo_trace_plain"], ns["plain_record"]),
    ):
        assert np.all(np.diff(trace) >= -1e-9 * np.abs(trace).max())
        # one entry per accepted greedy factor and per backfit sweep (and nullcheck removal)
        assert trace.size >= len(record["factor_names"]) + record["n_iter"]
        assert record["elbo_final"] == pytest.approx(trace[-1], rel=1e-9)


def test_tutorial2_finds_cell_type_programmes_with_marker_genes(tutorial2):
    ns, *_ = tutorial2
    adata = ns["adata"]
    for markers in MARKERS.values():
        assert markers <= set(adata.var_names)
    loadings = adata.obsm["X_cebmf"]
    factors = adata.varm["cebmf_factors"]
    labels = adata.obs["bulk_labels"].astype(str).to_numpy()
    # NK and B cells have a programme of their own: the type's mean loading is more than
    # one sd above every other type's; monocytes share much of theirs with the cells
    # labelled Dendritic, so their best factor stands out less (half an sd)
    for name, margin in (("CD56+ NK", 1.0), ("CD19+ B", 1.0), ("CD14+ Monocyte", 0.5)):
        score, k, sign = _specificity(loadings, labels, [name])
        assert score > margin, (name, score)
        top = set(adata.var_names[np.argsort(-sign * factors[:, k])[:10]])
        assert len(top & MARKERS[name]) >= 2, (name, sorted(top))
        # the tutorial's own table agrees
        assert ns["specificity"].loc[name, "factor"] == f"factor_{k + 1}"
        assert ns["specificity"].loc[name, "specificity"] == pytest.approx(score)
    # the CD4 / naive T-cell subtypes are not separated in 765 genes and 700 cells
    for hard in (
        "CD4+/CD25 T Reg",
        "CD4+/CD45RA+/CD25- Naive T",
        "CD4+/CD45RO+ Memory",
    ):
        assert _specificity(loadings, labels, [hard])[0] < 1.0, hard


def test_tutorial2_learned_prior_depends_on_the_covariates(tutorial2):
    ns, *_ = tutorial2
    adata, name = ns["adata"], ns["prior_factor"]
    g = dict(ns["record"]["priors"][name]["loadings"])
    assert g["family"] == "cash"
    pi0 = np.asarray(g["pi0"])
    assert pi0.shape == (700,) and np.all((pi0 >= 0) & (pi0 <= 1))
    # the stored pi0 is the network evaluated at each cell's covariates
    x = adata.obs[["percent_mito", "log10_n_counts"]].to_numpy()
    weights = ns["cash"].prior_parameters(g, x)["pi"]
    np.testing.assert_allclose(weights[:, 0], pi0, atol=1e-6)
    np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-9)
    # the prior of this factor really varies from cell to cell, with a covariate
    assert np.ptp(pi0) > 0.5
    assert max(abs(r) for r in ns["prior_correlations"].values()) > 0.5


def test_tutorial2_plain_fit_finds_the_same_programmes(tutorial2):
    ns, *_ = tutorial2
    adata, plain = ns["adata"], ns["plain"]
    # copy=True left the tutorial's AnnData alone and wrote under the new key
    assert "plain" not in adata.uns and "X_plain" not in adata.obsm
    assert "X_plain" in plain.obsm and "plain_factors" in plain.varm
    rec = ns["plain_record"]
    assert rec["params"]["prior_loadings"] == "point_normal"
    assert 3 <= len(rec["factor_names"]) <= ns["N_FACTORS"]
    assert ns["elbo_plain"] == rec["elbo_final"] and ns["elbo_cash"] == ns["record"]["elbo_final"]
    assert np.isfinite(ns["elbo_gain"])
    # what the text says about the programmes of the two fits
    prog = ns["programmes"]
    assert list(prog.index) == ["CD56+ NK", "CD19+ B", "CD14+ Monocyte"]
    assert (prog.loc[["CD56+ NK", "CD19+ B"], ["cEBMF specificity", "EBMF specificity"]] > 1).all(
        axis=None
    )
    assert prog.loc["CD56+ NK", "profile correlation"] > 0.95
    mono = prog.loc["CD14+ Monocyte"]
    assert mono["cEBMF specificity"] > 1 and mono["EBMF specificity"] < mono["cEBMF specificity"]
    assert ns["elbo_gain"] > 0


@pytest.mark.parametrize("path", [TUTORIAL, TUTORIAL2], ids=lambda p: p.stem)
def test_tutorial_is_a_jupytext_percent_script(path):
    text = path.read_text()
    assert text.startswith("# ---\n# jupyter:\n#   jupytext:")
    assert "format_name: percent" in text
    if importlib.util.find_spec("jupytext") is None:
        pytest.skip("jupytext is not installed (it is in the 'doc' extra, not 'test')")
    import jupytext

    nb = jupytext.read(path)
    kinds = [cell.cell_type for cell in nb.cells]
    assert kinds.count("markdown") >= 10 and kinds.count("code") >= 10


def test_docs_build_without_warnings(tmp_path):
    missing = [m for m in ("sphinx", "myst_parser") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} not installed: the docs build needs the 'doc' extra "
            "(pip install '.[doc]'), which the 'test' extra (and CI) does not install"
        )
    out = tmp_path / "html"
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q"]
    cmd += ["-d", str(tmp_path / "doctrees"), str(DOCS), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"sphinx-build failed:\n{proc.stdout}\n{proc.stderr}"
    for page in ("index", "ebnm", "engine", "covariates", "scverse", "api", "tutorials"):
        assert (out / f"{page}.html").exists()
    index = (out / "index.html").read_text()
    for page in ("engine", "covariates", "scverse"):
        assert f'href="{page}.html"' in index, f"{page} is not in the index's table of contents"
    api = (out / "api.html").read_text()
    for name in (
        "cebmf.fit_ebmf",
        "cebmf.tl.fit",
        "cebmf.pl.embedding",
        "cebmf.priors.Cash",
        "cebmf.ebnm",
        "cebmf.EBNMResult",
        "cebmf.available_priors",
        "cebmf.priors.get_prior",
        "cebmf.priors.PointNormal",
        "cebmf.priors.NormalScaleMixture",
        "cebmf.priors.NonnegativeMixture",
        "cebmf.priors.Flat",
    ):
        assert f'id="{name}"' in api, f"autodoc did not document {name}"
