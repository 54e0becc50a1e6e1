"""The tutorials run top to bottom and compute what they claim; the docs build cleanly.

The tutorial is executed in-process with ``runpy`` (as ``__main__``, exactly like
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
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory):
    """Run the tutorial once; return its global namespace and its scratch directories."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import pandas as pd

    tmp = tmp_path_factory.mktemp("tutorial_tmp")
    cwd = tmp_path_factory.mktemp("tutorial_cwd")
    mp = pytest.MonkeyPatch()
    mp.setattr(tempfile, "tempdir", str(tmp))
    mp.chdir(cwd)
    try:
        # the tutorial sets pandas display options; restore them afterwards
        with pd.option_context("display.width", 80, "display.precision", 6):
            ns = runpy.run_path(str(TUTORIAL), run_name="__main__")
    finally:
        mp.undo()
    return ns, tmp, cwd


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


def test_tutorial_is_a_jupytext_percent_script():
    text = TUTORIAL.read_text()
    assert text.startswith("# ---\n# jupyter:\n#   jupytext:")
    assert "format_name: percent" in text
    if importlib.util.find_spec("jupytext") is None:
        pytest.skip("jupytext is not installed (it is in the 'doc' extra, not 'test')")
    import jupytext

    nb = jupytext.read(TUTORIAL)
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
    for page in ("index", "ebnm", "api", "tutorials"):
        assert (out / f"{page}.html").exists()
    api = (out / "api.html").read_text()
    for name in (
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
