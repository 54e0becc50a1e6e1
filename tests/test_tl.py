"""cebmf.tl.fit on AnnData / MuData: input kinds, outputs, round trips, real data, errors."""

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import shared_data

import cebmf
from cebmf.datasets import pbmc68k_counts

matplotlib.use("Agg")

FAST = {"n_factors": 4, "max_iter": 30}


@pytest.fixture(scope="module")
def counts():
    a = pbmc68k_counts()[:250].copy()
    keep = np.asarray((a.X > 0).sum(0)).ravel() >= 10
    return a[:, keep].copy()


def _snapshot(x):
    if sp.issparse(x):
        return (type(x), x.dtype, x.data.copy(), x.indices.copy(), x.indptr.copy())
    return (type(x), x.dtype, np.array(x, copy=True))


def _same(x, snap) -> bool:
    if type(x) is not snap[0] or x.dtype != snap[1]:
        return False
    if sp.issparse(x):
        return (
            np.array_equal(x.data, snap[2])
            and np.array_equal(x.indices, snap[3])
            and np.array_equal(x.indptr, snap[4])
        )
    return np.array_equal(np.asarray(x), snap[2])


def _check_outputs(a, key="cebmf"):
    n, p = a.shape
    k = a.obsm[f"X_{key}"].shape[1]
    assert k >= 1
    for name in (f"X_{key}", f"X_{key}_sd", f"X_{key}_lfsr"):
        assert a.obsm[name].shape == (n, k) and a.obsm[name].dtype == np.float64
    for name in (f"{key}_factors", f"{key}_factors_sd", f"{key}_factors_lfsr"):
        assert a.varm[name].shape == (p, k) and a.varm[name].dtype == np.float64
    rec = a.uns[key]
    for field in (
        "params",
        "elbo",
        "pve",
        "noise_sd",
        "converged",
        "n_iter",
        "factor_names",
        "priors",
        "var_mask",
    ):
        assert field in rec, field
    assert len(rec["factor_names"]) == k and rec["pve"].shape == (k,)
    assert set(rec["priors"]) == set(rec["factor_names"])
    assert np.all(np.diff(rec["elbo"]) >= -1e-9 * np.abs(rec["elbo"]).max())
    return k


@pytest.mark.parametrize("kind", ["csr", "csc", "dense", "layer", "logged"])
def test_every_input_kind_fits_and_leaves_the_input_untouched(counts, kind):
    a = counts.copy()
    if kind == "csc":
        a.X = sp.csc_matrix(a.X)
    elif kind == "dense":
        a.X = a.X.toarray()
    elif kind == "layer":
        a.layers["counts"] = a.X.copy()
        a.X = sp.csr_matrix(np.log1p(a.X.toarray().astype(float)))  # something else in X
    elif kind == "logged":
        lib = np.asarray(a.X.sum(1)).ravel()
        a.X = sp.csr_matrix(np.log1p(a.X.toarray() / lib[:, None] * 1e4))
    target = a.layers["counts"] if kind == "layer" else a.X
    snap, x_snap = _snapshot(target), _snapshot(a.X)
    cebmf.tl.fit(a, layer="counts" if kind == "layer" else None, **FAST)
    _check_outputs(a)
    assert _same(target, snap) and _same(a.X, x_snap)
    expected = "none" if kind == "logged" else "log1p_normalize"
    assert a.uns["cebmf"]["params"]["transform"] == expected


@pytest.mark.parametrize("transform", ["auto", "log1p", "binary", "tfidf"])
def test_a_sparse_matrix_with_duplicate_entries_is_fitted_as_its_sum(counts, transform):
    """Each count of 2 or more stored as two entries (c - 1 and 1), as a CSR may hold
    them: the transforms work entry by entry, so the duplicates must be summed first."""
    canon = counts.X.tocsr().astype(np.float32)
    coo = canon.tocoo()
    split = coo.data >= 2
    rows = np.r_[coo.row, coo.row[split]]
    cols = np.r_[coo.col, coo.col[split]]
    vals = np.r_[np.where(split, coo.data - 1, coo.data), np.ones(split.sum())]
    order = np.lexsort((cols, rows))
    indptr = np.r_[0, np.cumsum(np.bincount(rows, minlength=canon.shape[0]))]
    dup = sp.csr_matrix((vals[order].astype(np.float32), cols[order], indptr), shape=canon.shape)
    assert not dup.has_canonical_format and dup.nnz > canon.nnz
    np.testing.assert_array_equal(dup.toarray(), canon.toarray())
    fits = {}
    for name, x in (("dup", dup), ("canon", canon)):
        a = counts.copy()
        a.X = x
        snap = _snapshot(x)
        cebmf.tl.fit(a, transform=transform, **FAST)
        assert _same(a.X, snap)  # the duplicates are summed on a copy
        fits[name] = a
    np.testing.assert_allclose(
        fits["dup"].obsm["X_cebmf"], fits["canon"].obsm["X_cebmf"], rtol=1e-6, atol=1e-9
    )
    assert fits["dup"].uns["cebmf"]["elbo_final"] == pytest.approx(
        fits["canon"].uns["cebmf"]["elbo_final"], rel=1e-9
    )


def test_target_sum_none_is_the_median_library_size(counts):
    a, b = counts.copy(), counts.copy()
    median = float(np.median(np.asarray(counts.X.sum(1)).ravel()))
    cebmf.tl.fit(a, target_sum=None, **FAST)
    cebmf.tl.fit(b, target_sum=median, **FAST)
    assert a.uns["cebmf"]["params"]["target_sum"] == median
    np.testing.assert_array_equal(a.obsm["X_cebmf"], b.obsm["X_cebmf"])


def test_init_and_fixed_factors_are_given_per_cell_and_gene_of_adata(counts):
    """Cells and genes left out of the fit (no signal) are dropped from a user's init."""
    a = counts.copy()
    x = a.X.toarray()
    x[[3, 7]] = 0  # two cells without counts: left out of the fit
    a.X = sp.csr_matrix(x)
    rng = np.random.default_rng(0)
    l0, f0 = rng.normal(size=(a.n_obs, 1)), rng.normal(size=(a.n_vars, 1))
    kept = np.setdiff1d(np.arange(a.n_obs), [3, 7])
    b = a.copy()
    cebmf.tl.fit(a, init=(l0, f0), **FAST)
    cebmf.tl.fit(b, init=(l0[kept], f0), **FAST)  # already in the fitted cells
    np.testing.assert_array_equal(a.obsm["X_cebmf"], b.obsm["X_cebmf"])
    np.testing.assert_array_equal(a.obsm["X_cebmf"][[3, 7]], 0.0)
    with pytest.raises(ValueError, match=r"init\[0\] \(L0\) has 100 rows; give one per cell"):
        cebmf.tl.fit(a, init=(l0[:100], f0), **FAST)
    with pytest.raises(ValueError, match=r"fixed_factors has 5 rows; give one per gene"):
        cebmf.tl.fit(a, fixed_factors=np.ones(5), **FAST)


def test_key_added_never_overwrites_another_tools_results(counts):
    a = counts.copy()
    umap = np.arange(2.0 * a.n_obs).reshape(-1, 2)
    a.obsm["X_umap"] = umap.copy()
    a.uns["umap"] = {"params": {"min_dist": 0.5}}
    with pytest.raises(ValueError, match=r"key_added='umap' would overwrite uns\['umap'\], "):
        cebmf.tl.fit(a, key_added="umap", **FAST)
    a.varm["pca_factors"] = np.ones((a.n_vars, 3))  # no uns["pca"]: still another tool's
    with pytest.raises(ValueError, match=r"overwrite varm\['pca_factors'\], which this package"):
        cebmf.tl.fit(a, key_added="pca", **FAST)
    np.testing.assert_array_equal(a.obsm["X_umap"], umap)
    assert dict(a.uns["umap"]["params"]) == {"min_dist": 0.5}
    cebmf.tl.fit(a, key_added="mine", **FAST)
    cebmf.tl.fit(a, key_added="mine", **FAST)  # a fit of ours may be replaced
    assert "factor_names" in a.uns["mine"]


def test_integer_counts_and_logged_data_give_the_same_fit(counts):
    raw = counts.copy()
    logged = counts.copy()
    lib = np.asarray(counts.X.sum(1)).ravel()
    logged.X = sp.csr_matrix(np.log1p(counts.X.toarray() / lib[:, None] * 1e4))
    cebmf.tl.fit(raw, **FAST)
    cebmf.tl.fit(logged, **FAST)
    np.testing.assert_allclose(raw.obsm["X_cebmf"], logged.obsm["X_cebmf"], atol=1e-8)


def test_sparse_kernels_keep_the_memory_of_a_transformed_copy(counts, monkeypatch):
    """tl.fit's own float64 transform of the counts uses the single-copy scipy kernels (the
    torch ones would add a transposed copy); the caller's float64 matrix, or an explicit
    sparse_backend, gets the default torch kernels."""
    import cebmf.data.convert as convert

    seen = []

    class Spy(convert.SparseData):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self.backend)

    monkeypatch.setattr(convert, "SparseData", Spy)
    raw = counts.copy()
    cebmf.tl.fit(raw, **FAST)
    cebmf.tl.fit(raw.copy(), sparse_backend="torch", **FAST)
    logged = counts.copy()
    lib = np.asarray(counts.X.sum(1)).ravel()
    logged.X = sp.csr_matrix(np.log1p(counts.X.toarray() / lib[:, None] * 1e4))
    cebmf.tl.fit(logged, **FAST)
    assert seen == ["scipy", "torch", "torch"]


def test_h5ad_round_trip_keeps_every_output(counts, tmp_path):
    a = counts.copy()
    a.obs["group"] = pd.Categorical(np.where(np.arange(a.n_obs) % 3 == 0, "x", "y"))
    cebmf.tl.fit(a, obs_covariates=["percent_mito", "group"], **FAST)
    a.write_h5ad(tmp_path / "a.h5ad")
    b = ad.read_h5ad(tmp_path / "a.h5ad")
    for key in ("X_cebmf", "X_cebmf_sd", "X_cebmf_lfsr"):
        np.testing.assert_array_equal(a.obsm[key], b.obsm[key])
    np.testing.assert_array_equal(a.varm["cebmf_factors"], b.varm["cebmf_factors"])
    ra, rb = a.uns["cebmf"], b.uns["cebmf"]
    np.testing.assert_array_equal(ra["elbo"], rb["elbo"])
    g_a = ra["priors"]["factor_1"]["loadings"]
    g_b = rb["priors"]["factor_1"]["loadings"]
    assert g_a["family"] == g_b["family"] == "cash"
    np.testing.assert_array_equal(g_a["pi0"], g_b["pi0"])
    # the stored prior is usable after the round trip
    params = cebmf.priors.get_prior("cash").prior_parameters(g_b, rb["covariates"]["loadings"])
    np.testing.assert_allclose(params["pi"][:, 0], g_a["pi0"], rtol=1e-10)
    assert list(rb["params"]["obs_covariates"]) == ["percent_mito", "group=x", "group=y"]
    # whether the cap set the number of factors: a plain bool, kept by the round trip
    assert isinstance(ra["max_factors_reached"], bool)
    assert bool(rb["max_factors_reached"]) == ra["max_factors_reached"]
    assert ra["max_factors_reached"] == (a.obsm["X_cebmf"].shape[1] == FAST["n_factors"])


def test_a_fit_capped_by_n_factors_is_recorded(counts):
    # the counts' cell groups need more than one factor: with n_factors=1 the cap decides
    a = counts.copy()
    cebmf.tl.fit(a, n_factors=1, max_iter=30)
    assert a.obsm["X_cebmf"].shape[1] == 1
    assert a.uns["cebmf"]["max_factors_reached"] is True


def test_key_added_twice_and_copy(counts):
    a = counts.copy()
    cebmf.tl.fit(a, key_added="first", **FAST)
    first = a.obsm["X_first"].copy()
    cebmf.tl.fit(a, key_added="second", prior_loadings="point_exponential", **FAST)
    np.testing.assert_array_equal(a.obsm["X_first"], first)
    assert a.obsm["X_second"].min() >= 0
    assert a.uns["first"]["params"]["prior_loadings"] == "point_normal"
    assert a.uns["second"]["params"]["prior_loadings"] == "point_exponential"
    b = counts.copy()
    keys_before = (set(b.obsm), set(b.varm), set(b.uns))
    out = cebmf.tl.fit(b, copy=True, **FAST)
    assert (set(b.obsm), set(b.varm), set(b.uns)) == keys_before
    assert "X_cebmf" in out.obsm


def test_a_drawn_seed_is_recorded_and_reproduces_the_fit(counts):
    a = counts.copy()
    cebmf.tl.fit(a, random_state=np.random.default_rng(7), **FAST)
    seed = a.uns["cebmf"]["params"]["random_state"]
    assert seed == int(np.random.default_rng(7).integers(0, 2**63 - 1))
    b = counts.copy()
    cebmf.tl.fit(b, random_state=seed, **FAST)
    np.testing.assert_array_equal(a.obsm["X_cebmf"], b.obsm["X_cebmf"])
    c = counts.copy()
    cebmf.tl.fit(c, random_state=None, **FAST)
    assert isinstance(c.uns["cebmf"]["params"]["random_state"], int)


def test_mask_var_gives_full_length_outputs_with_zero_rows(counts):
    a = counts.copy()
    hv = np.zeros(a.n_vars, dtype=bool)
    hv[::2] = True
    a.var["highly_variable"] = hv
    cebmf.tl.fit(a, **FAST)  # highly_variable is the default mask
    for name in ("cebmf_factors", "cebmf_factors_sd", "cebmf_factors_lfsr"):
        assert np.all(a.varm[name][~hv] == 0)  # zero rows, as DESIGN.md and PCA
    assert np.all(a.uns["cebmf"]["var_mask"] <= hv)
    assert a.uns["cebmf"]["params"]["mask_var"] == "highly_variable"
    # as scanpy: mask_var=None fits every gene, even with a highly_variable column
    cebmf.tl.fit(a, mask_var=None, key_added="all", **FAST)
    assert a.uns["all"]["var_mask"].all() and a.uns["all"]["params"]["mask_var"] is None
    a.var["highly_variable"] = False
    with pytest.raises(ValueError, match=r"selects no genes \(adata.var\['highly_variable'\]"):
        cebmf.tl.fit(a, **FAST)


def test_mudata_joint_fit_and_h5mu_round_trip(counts, tmp_path):
    import mudata as md

    rng = np.random.default_rng(0)
    atac = ad.AnnData(
        sp.csr_matrix(rng.poisson(0.3, (counts.n_obs, 120)).astype(np.int64)),
        obs=pd.DataFrame(index=counts.obs_names),
    )
    mdata = md.MuData({"rna": counts.copy(), "atac": atac})
    mdata.obs["percent_mito"] = counts.obs["percent_mito"].to_numpy()
    cebmf.tl.fit(
        mdata, transform={"atac": "tfidf"}, obs_covariates="percent_mito", **FAST
    )  # rna is left out of the dict: it gets the default, "auto"
    k = mdata.obsm["X_cebmf"].shape[1]
    assert mdata["rna"].varm["cebmf_factors"].shape == (counts.n_vars, k)
    assert mdata["atac"].varm["cebmf_factors"].shape == (120, k)
    pve = mdata.uns["cebmf"]["pve_by_mod"]
    assert set(pve) == {"rna", "atac"} and all(v.shape == (k,) for v in pve.values())
    params = mdata.uns["cebmf"]["params"]
    assert params["transform"] == {"rna": "log1p_normalize", "atac": "tfidf"}
    assert params["mask_var"] == {"rna": None, "atac": None}  # no highly_variable column
    assert params["size_factors"] == {"rna": None, "atac": None}
    assert mdata.uns["cebmf"]["obs_mask"].all()
    mdata.write_h5mu(tmp_path / "m.h5mu")
    back = md.read_h5mu(tmp_path / "m.h5mu")
    np.testing.assert_array_equal(back.obsm["X_cebmf"], mdata.obsm["X_cebmf"])
    np.testing.assert_array_equal(
        back["atac"].varm["cebmf_factors"], mdata["atac"].varm["cebmf_factors"]
    )
    # modalities on different cells are refused
    other = md.MuData({"rna": counts.copy(), "atac": atac[:-5].copy()})
    with pytest.raises(ValueError, match="does not have the MuData's cells"):
        cebmf.tl.fit(other, **FAST)
    # a dense modality with missing values cannot join a sparse one: named, before fitting
    prot = np.log1p(rng.poisson(2.0, (counts.n_obs, 8)).astype(float))
    prot[0, 0] = np.nan
    mixed = md.MuData(
        {"rna": counts.copy(), "prot": ad.AnnData(prot, obs=pd.DataFrame(index=counts.obs_names))}
    )
    with pytest.raises(ValueError, match=r"\[prot\] has missing values \(NaN\)"):
        cebmf.tl.fit(mixed, **FAST)


def test_mudata_init_and_fixed_factors_per_cell_and_feature(counts):
    """A MuData's init / fixed_factors are given per cell and per feature (a dict by
    modality, or the modalities' features stacked); left-out rows are dropped, so the fit
    equals one given the fitted rows directly."""
    import mudata as md

    rng = np.random.default_rng(1)
    rna = counts.copy()
    x = rna.X.toarray()
    x[:, [0, 5]] = 0  # two genes without signal: left out of the fit
    x[4] = 0  # a cell without rna counts: kept, it has atac counts
    rna.X = sp.csr_matrix(x)
    atac_x = rng.poisson(0.3, (counts.n_obs, 60)).astype(np.float64)
    atac_x[:, 2] = 0
    atac = ad.AnnData(sp.csr_matrix(atac_x), obs=pd.DataFrame(index=counts.obs_names))
    p_rna, p_atac = rna.n_vars, atac.n_vars
    keep_rna = np.setdiff1d(np.arange(p_rna), [0, 5])
    keep_atac = np.setdiff1d(np.arange(p_atac), [2])
    l0 = rng.normal(size=(counts.n_obs, 1))
    f_rna, f_atac = rng.normal(size=(p_rna, 1)), rng.normal(size=(p_atac, 1))
    fixed = {"rna": np.abs(rng.normal(size=p_rna)), "atac": np.abs(rng.normal(size=p_atac))}
    given = {
        "dict": ({"rna": f_rna, "atac": f_atac}, fixed),
        "stacked": (np.vstack([f_rna, f_atac]), np.concatenate([fixed["rna"], fixed["atac"]])),
        "fitted rows": (
            np.vstack([f_rna[keep_rna], f_atac[keep_atac]]),
            np.concatenate([fixed["rna"][keep_rna], fixed["atac"][keep_atac]]),
        ),
    }
    fits = {}
    for name, (f0, ff) in given.items():
        mdata = md.MuData({"rna": rna.copy(), "atac": atac.copy()})
        cebmf.tl.fit(mdata, init=(l0, f0), fixed_factors=ff, **FAST)
        fits[name] = mdata
    ref = fits["fitted rows"]
    assert ref.obsm["X_cebmf"].shape[1] >= 2  # the fixed factor and the init
    for name in ("dict", "stacked"):
        np.testing.assert_array_equal(fits[name].obsm["X_cebmf"], ref.obsm["X_cebmf"])
        for m in ("rna", "atac"):
            np.testing.assert_array_equal(
                fits[name][m].varm["cebmf_factors"], ref[m].varm["cebmf_factors"]
            )
    # the fixed factor is the user's, in the features' own rows; left-out ones are zero
    np.testing.assert_allclose(
        ref["atac"].varm["cebmf_factors"][keep_atac, 0], fixed["atac"][keep_atac]
    )
    np.testing.assert_array_equal(ref["rna"].varm["cebmf_factors"][[0, 5]], 0.0)
    mdata = md.MuData({"rna": rna.copy(), "atac": atac.copy()})
    with pytest.raises(
        ValueError,
        match=r"init\[1\] \(F0\)\['atac'\] has 10 rows; give one "
        r"per feature of modality 'atac'",
    ):
        cebmf.tl.fit(mdata, init=(l0, {"rna": f_rna, "atac": f_atac[:10]}), **FAST)
    with pytest.raises(
        ValueError,
        match=r"fixed_factors: a dict needs one entry per fitted "
        r"modality \(rna, atac\)",
    ):
        cebmf.tl.fit(mdata, fixed_factors={"rna": fixed["rna"]}, **FAST)
    with pytest.raises(
        ValueError,
        match=r"fixed_factors has 7 rows; give one per feature of "
        r"the fitted modalities",
    ):
        cebmf.tl.fit(mdata, fixed_factors=np.ones(7), **FAST)
    with pytest.raises(
        ValueError,
        match=r"init\[0\] \(L0\) has 9 rows; give one per cell of "
        r"the MuData",
    ):
        cebmf.tl.fit(mdata, init=(l0[:9], f_rna), **FAST)
    assert "cebmf" not in mdata.uns


def test_mudata_joint_fit_with_feature_covariates_per_modality(counts, tmp_path):
    """var_covariates of a MuData is a dict by modality: the rna factors get a cash prior
    on the rna genes' own covariate, atac keeps its plain prior; each block's prior is the
    one it would get alone (pi0 per fitted rna gene)."""
    import mudata as md

    rng = np.random.default_rng(1)
    atac = ad.AnnData(
        sp.csr_matrix(rng.poisson(0.3, (counts.n_obs, 80)).astype(np.int64)),
        obs=pd.DataFrame(index=counts.obs_names),
    )
    rna = counts.copy()
    rna.var["log_mean"] = np.log1p(np.asarray(rna.X.mean(0)).ravel())
    mdata = md.MuData({"rna": rna, "atac": atac})
    cebmf.tl.fit(mdata, var_covariates={"rna": "log_mean"}, **FAST)
    rec = mdata.uns["cebmf"]
    assert rec["params"]["var_covariates"] == ["rna:log_mean"]
    assert rec["params"]["prior_factors"] == {"rna": "cash", "atac": "point_normal"}
    n_rna = int(rec["var_mask"]["rna"].sum())
    for name in rec["factor_names"]:
        blocks = rec["priors"][name]["factors"]["blocks"]
        assert blocks["rna"]["family"] == "cash" and blocks["rna"]["pi0"].shape == (n_rna,)
        assert blocks["atac"]["family"] == "point_normal"
    # the stored covariates are block-diagonal: the rna genes' log means, zeros for atac
    x_f = rec["covariates"]["factors"]
    assert x_f.shape == (n_rna + int(rec["var_mask"]["atac"].sum()), 1)
    np.testing.assert_allclose(
        x_f[:n_rna, 0], rna.var["log_mean"].to_numpy()[rec["var_mask"]["rna"]]
    )
    assert np.all(x_f[n_rna:] == 0)
    mdata.write_h5mu(tmp_path / "m.h5mu")
    back = md.read_h5mu(tmp_path / "m.h5mu")
    np.testing.assert_array_equal(
        back["rna"].varm["cebmf_factors"], mdata["rna"].varm["cebmf_factors"]
    )
    # the command line names a modality's covariates MOD:COLUMN
    from cebmf.cli import main

    args = ["fit", str(tmp_path / "m.h5mu"), str(tmp_path / "o.h5mu"), "-q", "--n-factors", "3"]
    assert main([*args, "--key-added", "cli", "--var-covariates", "rna:log_mean"]) == 0
    cli = md.read_h5mu(tmp_path / "o.h5mu").uns["cli"]["params"]
    assert list(cli["var_covariates"]) == ["rna:log_mean"]
    with pytest.raises(SystemExit, match="write them MOD:COLUMN"):
        main([*args, "--var-covariates", "log_mean"])
    with pytest.raises(TypeError, match="var_covariates of a MuData fit is a dict"):
        cebmf.tl.fit(mdata, var_covariates="log_mean", key_added="b", **FAST)
    with pytest.raises(ValueError, match=r"var_covariates: \['prot'\] not among"):
        cebmf.tl.fit(mdata, var_covariates={"prot": "x"}, key_added="b", **FAST)
    with pytest.raises(ValueError, match=r"var_covariates\['rna'\]: 'nope'"):
        cebmf.tl.fit(mdata, var_covariates={"rna": "nope"}, key_added="b", **FAST)
    # a misspelt modality in a per-modality dict used to leave the real one on the default
    with pytest.raises(ValueError, match=r"transform: \['rnaa'\] not among the fitted"):
        cebmf.tl.fit(mdata, transform={"rnaa": "log1p"}, key_added="b", **FAST)
    with pytest.raises(ValueError, match=r"prior_factors: \['prot'\] not among the fitted"):
        cebmf.tl.fit(mdata, prior_factors={"prot": "point_exponential"}, key_added="b", **FAST)
    with pytest.raises(ValueError, match="mods is empty; name at least one modality"):
        cebmf.tl.fit(mdata, mods=[], key_added="b", **FAST)
    with pytest.raises(ValueError, match=r"mods names a modality more than once"):
        cebmf.tl.fit(mdata, mods=["rna", "rna"], key_added="b", **FAST)  # was a BlockPrior error
    # one name is one modality (it used to be read as the letters 'r', 'n', 'a')
    cebmf.tl.fit(mdata, mods="rna", key_added="one", **FAST)
    assert list(mdata.uns["one"]["params"]["mods"]) == ["rna"]
    assert mdata["rna"].varm["one_factors"].shape[0] == mdata["rna"].n_vars


def test_bad_inputs_name_the_argument(counts):
    a = counts.copy()
    with pytest.raises(
        ValueError,
        match=r"obs_covariates: 'nope' is neither a column of adata\.obs nor a key",
    ):
        cebmf.tl.fit(a, obs_covariates="nope", **FAST)
    a.obs["with_nan"] = np.where(np.arange(a.n_obs) == 3, np.nan, 1.0 * np.arange(a.n_obs))
    with pytest.raises(
        ValueError,
        match=r"column 'with_nan' has 1 missing / NaN / Inf value\(s\) among the fitted cells; "
        r"impute them .* or subset adata",
    ):
        cebmf.tl.fit(a, obs_covariates="with_nan", **FAST)
    a.var["gc"] = np.where(np.arange(a.n_vars) == 0, np.nan, 1.0)  # gene 0 is fitted
    with pytest.raises(ValueError, match=r"among the fitted genes; .*leave those genes out"):
        cebmf.tl.fit(a, var_covariates="gc", mask_var=None, **FAST)
    with pytest.raises(ValueError, match=r"2 NaN or Inf value\(s\) among the fitted genes"):
        cebmf.tl.fit(a, var_covariates=np.c_[a.var["gc"], a.var["gc"]], mask_var=None, **FAST)
    a.obs["label"] = np.array(["a", "b"] * (a.n_obs // 2))
    with pytest.raises(ValueError, match=r"'label' has dtype object.*astype\('category'\)"):
        cebmf.tl.fit(a, obs_covariates="label", **FAST)
    with pytest.raises(ValueError, match="obs_covariates has 10 rows but there are 250 cells"):
        cebmf.tl.fit(a, obs_covariates=np.ones((10, 2)), **FAST)
    with pytest.raises(ValueError, match="layer='raw' is not a layer"):
        cebmf.tl.fit(a, layer="raw", **FAST)
    with pytest.raises(ValueError, match=r"layer must be the name of a layer .* got \{'rna'"):
        cebmf.tl.fit(a, layer={"rna": "counts"}, **FAST)
    for bad_sum in (np.nan, np.inf, 0, -5.0, "1e4", True):
        with pytest.raises(ValueError, match="target_sum must be a positive finite number"):
            cebmf.tl.fit(a, target_sum=bad_sum, **FAST)
    with pytest.raises(ValueError, match=r"obs_covariates must be a column name, .* got 5\."):
        cebmf.tl.fit(a, obs_covariates=5, **FAST)
    with pytest.raises(ValueError, match=r"obs_covariates must be .*, got a dict\."):
        cebmf.tl.fit(a, obs_covariates={"with_nan": 1}, **FAST)
    with pytest.raises(ValueError, match="obs_covariates has no columns; pass None"):
        cebmf.tl.fit(a, obs_covariates=np.zeros((a.n_obs, 0)), **FAST)
    neg = counts.copy()
    neg.X = neg.X.astype(np.float64)
    neg.X.data[0] = -1.0
    with pytest.raises(ValueError, match="transform='log1p_normalize' needs non-negative"):
        cebmf.tl.fit(neg, transform="log1p_normalize", **FAST)
    with pytest.raises(ValueError, match="mask_var selects no genes"):
        cebmf.tl.fit(a, mask_var=np.zeros(a.n_vars, dtype=bool), **FAST)
    with pytest.raises(ValueError, match="transform='zscore' is not a transform"):
        cebmf.tl.fit(a, transform="zscore", **FAST)
    with pytest.raises(ValueError, match="n_factors must be a positive integer, got 0"):
        cebmf.tl.fit(a, n_factors=0)
    with pytest.raises(ValueError, match="size_factors has 3 entries but the matrix has 250"):
        cebmf.tl.fit(a, size_factors=np.ones(3), **FAST)
    with pytest.raises(ValueError, match="size_factors must be positive and finite; 250 entries"):
        cebmf.tl.fit(a, size_factors=np.zeros(a.n_obs), **FAST)
    for bad_value in (np.nan, np.inf):  # Inf used to zero the cell silently
        with pytest.raises(ValueError, match="must be positive and finite; 1 entries are not"):
            cebmf.tl.fit(a, size_factors=np.r_[bad_value, np.ones(a.n_obs - 1)], **FAST)
    bad = counts.copy()
    bad.X = bad.X.astype(np.float64)
    bad.X.data[5] = np.nan
    with pytest.raises(ValueError, match=r"adata\.X is sparse and contains 1 NaN/Inf stored value"):
        cebmf.tl.fit(bad, **FAST)
    bad.layers["dense"] = np.where(np.arange(a.n_vars) == 2, np.inf, bad.X.toarray())
    with pytest.raises(ValueError, match=r"adata\.layers\['dense'\] contains 250 infinite value"):
        cebmf.tl.fit(bad, layer="dense", **FAST)
    # NaN in a dense layer is a missing entry, not an error
    ok = counts.copy()
    ok.layers["dense"] = np.log1p(ok.X.toarray().astype(np.float64))
    ok.layers["dense"][0, 0] = np.nan
    cebmf.tl.fit(ok, layer="dense", transform=None, **FAST)
    assert np.isfinite(ok.obsm["X_cebmf"]).all()


def test_cells_and_genes_without_signal_are_left_out_and_reported(counts, caplog):
    a = counts.copy()
    x = a.X.tolil()
    x[[3, 7], :] = 0  # two empty cells
    x[:, [0, 5, 9]] = 0  # three empty genes
    a.X = x.tocsr().astype(counts.X.dtype)
    a.X.eliminate_zeros()
    with caplog.at_level("WARNING", logger="cebmf"):
        cebmf.tl.fit(a, noise="row", obs_covariates="percent_mito", **FAST)
    text = caplog.text
    assert "2 of 250 cell(s) have no signal" in text and repr(a.obs_names[3]) in text
    assert "3 of 715 gene(s) have no signal" in text and repr(a.var_names[5]) in text
    rec = a.uns["cebmf"]
    assert rec["obs_mask"].sum() == 248 and not rec["obs_mask"][[3, 7]].any()
    assert rec["var_mask"].sum() == 712 and not rec["var_mask"][[0, 5, 9]].any()
    for name in ("X_cebmf", "X_cebmf_sd", "X_cebmf_lfsr"):
        assert np.all(a.obsm[name][[3, 7]] == 0)
    assert (
        np.isnan(rec["noise_sd"][[3, 7]]).all()
        and np.isfinite(np.delete(rec["noise_sd"], [3, 7])).all()
    )
    assert rec["covariates"]["loadings"].shape[0] == 248
    # the fit equals a fit of the matrix without those cells and genes
    b = a[rec["obs_mask"], rec["var_mask"]].copy()
    cebmf.tl.fit(b, noise="row", obs_covariates="percent_mito", **FAST)
    np.testing.assert_allclose(a.obsm["X_cebmf"][rec["obs_mask"]], b.obsm["X_cebmf"], atol=1e-10)
    cebmf.pl.prior(a, 1, basis="umap", show=False)  # the plot spreads the 248 cells over 250


def test_covariates_from_dataframes_align_on_the_index(counts):
    a = counts[:, :150].copy()
    frame = a.obs[["percent_mito", "n_counts"]].copy()
    cebmf.tl.fit(a, obs_covariates=frame.iloc[::-1], key_added="rev", **FAST)
    cebmf.tl.fit(a, obs_covariates=frame, key_added="fwd", **FAST)
    rev, fwd = a.uns["rev"]["covariates"], a.uns["fwd"]["covariates"]
    np.testing.assert_array_equal(rev["loadings"], frame.to_numpy())  # reordered to obs_names
    np.testing.assert_array_equal(fwd["loadings"], rev["loadings"])
    assert list(a.uns["fwd"]["params"]["obs_covariates"]) == ["percent_mito", "n_counts"]
    cebmf.tl.fit(a, obs_covariates=a.obs["percent_mito"], key_added="ser", **FAST)
    assert list(a.uns["ser"]["params"]["obs_covariates"]) == ["percent_mito"]
    # obsm DataFrames keep their column names; a nullable boolean with NA names its column
    a.obsm["qc"] = frame
    cebmf.tl.fit(a, obs_covariates="qc", key_added="qc", **FAST)
    assert list(a.uns["qc"]["params"]["obs_covariates"]) == ["percent_mito", "n_counts"]
    shifted = frame.set_axis([f"x{i}" for i in range(a.n_obs)], axis=0)
    with pytest.raises(ValueError, match=r"obs_covariates: the index .* does not match"):
        cebmf.tl.fit(a, obs_covariates=shifted, **FAST)
    with pytest.raises(ValueError, match="obs_covariates is an empty list"):
        cebmf.tl.fit(a, obs_covariates=[], **FAST)
    a.obs["flag"] = pd.array([True, None] + [False] * (a.n_obs - 2), dtype="boolean")
    with pytest.raises(ValueError, match="obs_covariates: column 'flag' has 1 missing"):
        cebmf.tl.fit(a, obs_covariates="flag", **FAST)
    with pytest.raises(ValueError, match=r"obs_covariates must be 1- or 2-dimensional"):
        cebmf.tl.fit(a, obs_covariates=np.ones((a.n_obs, 2, 2)), **FAST)
    # a masked entry is missing (its hidden value used to be read as the covariate)
    hidden = np.ma.masked_array(np.ones(a.n_obs), mask=np.arange(a.n_obs) == 3)
    with pytest.raises(ValueError, match=r"obs_covariates contains 1 NaN .*first in fitted row 3"):
        cebmf.tl.fit(a, obs_covariates=hidden, **FAST)
    # a gene left out by mask_var needs no covariate value
    a.var["gc"] = np.where(np.arange(a.n_vars) == 0, np.nan, 0.4 + 0.001 * np.arange(a.n_vars))
    mask = np.arange(a.n_vars) > 0
    cebmf.tl.fit(a, var_covariates="gc", mask_var=mask, key_added="gc", **FAST)
    assert a.uns["gc"]["covariates"]["factors"].shape[0] == a.uns["gc"]["var_mask"].sum()
    with pytest.raises(ValueError, match="var_covariates: column 'gc' has 1 missing"):
        cebmf.tl.fit(a, var_covariates="gc", mask_var=None, **FAST)


def test_auto_transform_of_counts_with_missing_entries():
    # dense counts with NaN: "auto" used to see non-integers and fit the raw counts; it now
    # normalises them, library sizes over the observed counts, the NaN entries missing
    rng = np.random.default_rng(4)
    x = rng.poisson(rng.gamma(2.0, 1.5, (120, 1)) * np.r_[np.ones(20) * 3, np.ones(30)], (120, 50))
    x = x.astype(np.float64)
    x[rng.random(x.shape) < 0.02] = np.nan
    a = ad.AnnData(x.copy())
    cebmf.tl.fit(a, n_factors=3)
    assert a.uns["cebmf"]["params"]["transform"] == "log1p_normalize"
    np.testing.assert_array_equal(np.isnan(a.X), np.isnan(x))  # the input is untouched
    by_hand = np.log1p(x * 1e4 / np.nansum(x, axis=1, keepdims=True))  # NaN stays NaN
    ref = cebmf.fit_ebmf(by_hand, max_factors=3, noise="column")
    assert a.uns["cebmf"]["elbo"][-1] == pytest.approx(ref.elbo, rel=1e-10)
    np.testing.assert_allclose(np.abs(a.obsm["X_cebmf"]), np.abs(ref.L), rtol=1e-6, atol=1e-8)


def test_binary_and_tfidf_of_dense_counts_with_missing_entries():
    from cebmf.tl._inputs import apply_transform

    x = np.array([[0.0, 2.0, np.nan], [1.0, np.nan, 0.0]])
    out, name = apply_transform(x, "binary")
    # missing entries stay missing (they used to become 0: NaN > 0 is False)
    np.testing.assert_array_equal(out, [[0.0, 1.0, np.nan], [1.0, np.nan, 0.0]])
    assert name == "binary"
    with pytest.raises(ValueError, match=r"transform='tfidf' needs every count .* 2 missing"):
        apply_transform(x, "tfidf")


def test_more_bad_inputs_are_refused_before_fitting(counts, tmp_path):
    a = counts[:, :150].copy()
    neg = a.copy()
    neg.X.data[0] = -1  # negative integer "counts" under the default transform
    with pytest.raises(ValueError, match=r"transform='auto': the data are integers, but 1 of"):
        cebmf.tl.fit(neg, **FAST)
    logged = a.copy()
    logged.X = np.log1p(logged.X.astype(np.float64))
    with pytest.raises(ValueError, match="size_factors is used only by the 'log1p_normalize'"):
        cebmf.tl.fit(logged, size_factors="n_counts", **FAST)
    for flag in ("intercept", "copy", "progress"):  # "no" used to count as True
        with pytest.raises(TypeError, match=f"{flag} must be True or False, got 'no'"):
            cebmf.tl.fit(a, **{flag: "no"}, **FAST)
    # options of fit_ebmf that tl.fit sets itself name the tl.fit argument; unknown ones
    # list the options accepted (both used to be Python's bare "multiple values" TypeError)
    for option, own in (("max_factors", "n_factors"), ("X_l", "obs_covariates")):
        with pytest.raises(TypeError, match=f"{option}= is set by tl.fit; pass {own}= instead"):
            cebmf.tl.fit(a, **{option: 3}, **FAST)
    with pytest.raises(TypeError, match=r"unknown option tols=; .* are init, .*, tol, max_iter"):
        cebmf.tl.fit(a, tols=1.0, **FAST)
    assert "X_cebmf" not in a.obsm
    cebmf.tl.fit(a, **FAST)
    with pytest.raises(ValueError, match=r"key_added='cebmf_sd' would overwrite X_cebmf_sd"):
        cebmf.tl.fit(a, key_added="cebmf_sd", **FAST)
    path = tmp_path / "backed.h5ad"
    a.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    with pytest.raises(ValueError, match=r"backed on disk .*to_memory\(\)"):
        cebmf.tl.fit(backed, **FAST)
    backed.file.close()


def test_prior_and_covariate_errors_name_tl_fit_arguments(counts):
    """The engine names its own X_l / X_f; through tl.fit the messages name
    obs_covariates / var_covariates (per modality for a MuData), before any fitting."""
    import mudata as md

    a = counts[:, :150].copy()
    with pytest.raises(
        ValueError,
        match=r"prior_loadings uses the covariate-moderated prior 'cash' but obs_covariates "
        r"is None; pass obs_covariates \(columns of adata\.obs",
    ):
        cebmf.tl.fit(a, prior_loadings="cash", **FAST)
    with pytest.raises(
        ValueError,
        match=r"obs_covariates was given but prior_loadings uses 'point_normal'.*drop "
        r"obs_covariates",
    ):
        cebmf.tl.fit(a, prior_loadings="point_normal", obs_covariates="percent_mito", **FAST)
    with pytest.raises(ValueError, match=r"prior_factors uses .* 'cgb' but var_covariates is"):
        cebmf.tl.fit(a, prior_factors="cgb", **FAST)
    with pytest.raises(ValueError, match=r"prior_factors: unknown prior 'bogus'"):
        cebmf.tl.fit(a, prior_factors="bogus", **FAST)
    mdata = md.MuData({"rna": a[:, :80].copy(), "atac": a[:, 80:].copy()})
    with pytest.raises(
        ValueError,
        match=r"prior_factors\['rna'\] uses the covariate-moderated prior 'cash' but "
        r"var_covariates\['rna'\] is None",
    ):
        cebmf.tl.fit(mdata, prior_factors={"rna": "cash"}, **FAST)
    with pytest.raises(ValueError, match=r"prior_factors: unknown prior 'bogus'"):
        cebmf.tl.fit(mdata, prior_factors="bogus", **FAST)
    with pytest.raises(TypeError, match=r"prior_factors of modality 'rna' is a sequence"):
        cebmf.tl.fit(mdata, prior_factors={"rna": ["point_normal"]}, **FAST)
    assert "X_cebmf" not in a.obsm and "X_cebmf" not in mdata.obsm
    # a categorical or text column, or text values, as size factors: named, not a pandas error
    with pytest.raises(ValueError, match=r"size_factors='bulk_labels' names a column of category"):
        cebmf.tl.fit(a, size_factors="bulk_labels", **FAST)
    with pytest.raises(TypeError, match=r"size_factors must be a column name .* not numbers"):
        cebmf.tl.fit(a, size_factors=["x"] * a.n_obs, **FAST)
    # the transform a fit records for None is accepted back
    b = a.copy()
    b.X = sp.csr_matrix(np.log1p(b.X.astype(np.float64)))
    cebmf.tl.fit(b, transform="none", **FAST)
    assert b.uns["cebmf"]["params"]["transform"] == "none"
    c = a.copy()
    c.X = b.X.copy()
    cebmf.tl.fit(c, transform=None, **FAST)
    np.testing.assert_array_equal(b.obsm["X_cebmf"], c.obsm["X_cebmf"])


def test_mudata_refit_with_fewer_modalities_replaces_the_fit_everywhere(counts):
    """A refit under the same key that leaves a modality out removes the previous joint
    fit's outputs there (they would describe factors the MuData no longer has); a fit of
    that modality on its own under another key is kept."""
    import mudata as md

    a = counts[:, :150].copy()
    mdata = md.MuData({"rna": a[:, :80].copy(), "atac": a[:, 80:].copy()})
    cebmf.tl.fit(mdata["atac"], key_added="own", **FAST)
    own = mdata["atac"].varm["own_factors"].copy()
    cebmf.tl.fit(mdata, **FAST)
    assert "cebmf_factors" in mdata["atac"].varm and "cebmf" in mdata["atac"].uns
    cebmf.tl.fit(mdata, mods=["rna"], n_factors=2, max_iter=30)
    k = mdata.obsm["X_cebmf"].shape[1]
    assert mdata["rna"].varm["cebmf_factors"].shape[1] == k
    for name in ("cebmf_factors", "cebmf_factors_sd", "cebmf_factors_lfsr"):
        assert name not in mdata["atac"].varm
    assert "cebmf" not in mdata["atac"].uns
    np.testing.assert_array_equal(mdata["atac"].varm["own_factors"], own)
    assert "own" in mdata["atac"].uns
    with pytest.raises(ValueError, match=r"uns\['cebmf'\] not found"):
        cebmf.pl.top_genes(mdata["atac"], show=False)


def test_mudata_obs_covariates_of_a_modality_without_pull(counts):
    """ "mod:column" names a modality's cell annotation whether or not the MuData pulled
    it into mdata.obs (mudata's pull_on_update=False), as in cebmf.pl."""
    import mudata as md

    a = counts[:, :150].copy()
    fits = []
    for pull in (False, True):
        with md.set_options(pull_on_update=pull):
            mdata = md.MuData({"rna": a[:, :80].copy(), "atac": a[:, 80:].copy()})
            assert ("rna:percent_mito" in mdata.obs.columns) is pull
            cebmf.tl.fit(mdata, obs_covariates="rna:percent_mito", **FAST)
            assert mdata.uns["cebmf"]["params"]["obs_covariates"] == ["rna:percent_mito"]
            np.testing.assert_array_equal(
                mdata.uns["cebmf"]["covariates"]["loadings"][:, 0],
                a.obs["percent_mito"].to_numpy(),
            )
            fits.append(mdata.obsm["X_cebmf"])
    np.testing.assert_array_equal(fits[0], fits[1])
    with md.set_options(pull_on_update=False):
        mdata = md.MuData({"rna": a[:, :80].copy(), "atac": a[:, 80:].copy()})
        with pytest.raises(ValueError, match=r"'nope' is neither a column of mdata\.obs \(a"):
            cebmf.tl.fit(mdata, obs_covariates="nope", **FAST)


def test_cli_errors_are_one_line_naming_the_option(tmp_path, capsys):
    from cebmf.cli import main

    a = pbmc68k_counts()[:60].copy()
    src = tmp_path / "in.h5ad"
    a.write_h5ad(src)
    with pytest.raises(SystemExit) as err:
        main(["fit", str(src), str(tmp_path / "out.h5ad"), "-q", "--obs-covariates", "nope"])
    message = str(err.value)
    assert message.startswith("cebmf fit: error: --obs-covariates: 'nope' is neither a column")
    assert "Traceback" not in message and not (tmp_path / "out.h5ad").exists()
    # the engine's names of these options are written as the command's
    with pytest.raises(SystemExit, match=r"error: --prior-loadings uses .*'cash' but --obs-cov"):
        main(["fit", str(src), str(tmp_path / "out.h5ad"), "-q", "--prior-loadings", "cash"])
    with pytest.raises(SystemExit, match=r"error: --seed=99999999999999999999999 is outside"):
        main(["fit", str(src), str(tmp_path / "out.h5ad"), "-q", "--seed", "9" * 23])
    garbage = tmp_path / "garbage.h5ad"
    garbage.write_text("not an h5ad file")
    with pytest.raises(SystemExit) as err:
        main(["fit", str(garbage), str(tmp_path / "out.h5ad"), "-q"])
    message = str(err.value)
    assert message.startswith(f"cebmf fit: error: cannot read {garbage} as an AnnData (.h5ad)")
    assert "\n" not in message


def test_cli_fit_on_the_demo_output(tmp_path):
    from cebmf.cli import main
    from cebmf.demo import run_demo

    summary = run_demo(tmp_path / "demo", n_factors=5)
    # the summary says whether the data or the cap set the number of factors (it used to
    # say "chosen by the data" either way): 5 is too few for these cells, so the cap did
    record = ad.read_h5ad(tmp_path / "demo" / "pbmc68k_cebmf.h5ad").uns["cebmf"]
    assert record["max_factors_reached"] and len(record["factor_names"]) == 5
    assert "5 factors: the cap (n_factors=5) set their number" in summary
    assert "chosen by the data" not in summary
    for name in (
        "factors_umap.png",
        "top_genes.png",
        "variance_explained.png",
        "structure.png",
        "elbo.png",
        "prior_percent_mito.png",
    ):
        assert (tmp_path / "demo" / name).stat().st_size > 5_000
    out = tmp_path / "refit.h5ad"
    assert (
        main(
            [
                "fit",
                str(tmp_path / "demo" / "pbmc68k_cebmf.h5ad"),
                str(out),
                "-q",
                "--n-factors",
                "3",
                "--key-added",
                "refit",
                "--obs-covariates",
                "percent_mito",
            ]
        )
        == 0
    )
    b = ad.read_h5ad(out)
    assert "X_refit" in b.obsm and "X_cebmf" in b.obsm
    # an AnnData cannot be written as .h5mu: refused before fitting, naming the file
    src = str(tmp_path / "demo" / "pbmc68k_cebmf.h5ad")
    with pytest.raises(SystemExit, match=r"must end in \.h5ad"):
        main(["fit", src, str(tmp_path / "refit.h5mu"), "-q"])
    assert not (tmp_path / "refit.h5mu").exists()
    assert b.uns["refit"]["params"]["prior_loadings"] == "cash"


# ---- real data (../shared/data) ----------------------------------------------------------


def test_pbmc_facs_through_tl_separates_cell_types():
    a = ad.read_h5ad(shared_data("pbmc_facs_fasttopics.h5ad"))
    y = cebmf.data.log1p_normalize(a.X)
    mean = np.asarray(y.mean(0)).ravel()
    var = np.asarray(y.multiply(y).mean(0)).ravel() - mean**2
    hv = np.zeros(a.n_vars, dtype=bool)
    hv[np.argsort(-var)[:500]] = True
    a.var["highly_variable"] = hv
    cebmf.tl.fit(a, n_factors=40)
    k = _check_outputs(a)
    assert 5 <= k < 40
    means = pd.DataFrame(a.obsm["X_cebmf"]).groupby(a.obs["celltype"].astype(str).to_numpy())
    means = means.mean()
    sd = a.obsm["X_cebmf"].std(0)
    for major in ["CD19+ B", "CD14+ Monocyte", "CD56+ NK", "CD34+"]:
        others = means.drop(index=major)
        best = max(
            float(np.max((s * means.loc[major] - (s * others).max()) / sd)) for s in (1.0, -1.0)
        )
        assert best > 1.0, (major, best)


def test_spatial_coordinates_as_covariates_and_plots(tmp_path):
    a = ad.read_h5ad(shared_data("mouse_olfactory_bulb_st_rep11.h5ad"))
    keep = np.asarray((a.X > 0).sum(0)).ravel() >= 20
    a = a[:, keep].copy()
    cebmf.tl.fit(a, obs_covariates="spatial", n_factors=8)
    k = _check_outputs(a)
    assert a.uns["cebmf"]["params"]["prior_loadings"] == "cash"
    assert a.uns["cebmf"]["covariates"]["loadings"].shape == (a.n_obs, 2)
    fig = cebmf.pl.embedding(a, basis="spatial", show=False, return_fig=True)
    fig.savefig(tmp_path / "spatial.png")
    fig = cebmf.pl.prior(a, factor=k - 1, basis="spatial", show=False, return_fig=True)
    fig.savefig(tmp_path / "prior.png")
    assert (tmp_path / "spatial.png").stat().st_size > 5_000
    assert (tmp_path / "prior.png").stat().st_size > 5_000


def test_technology_is_used_as_a_categorical_covariate():
    a = ad.read_h5ad(shared_data("pbmc_3tech_symphony_1200.h5ad"))
    keep = np.asarray((a.X > 0).sum(0)).ravel() >= 10
    a = a[:, keep].copy()
    a.obs["technology"] = a.obs["technology"].astype("category")
    cebmf.tl.fit(a, obs_covariates=["technology"], n_factors=6)
    _check_outputs(a)
    cats = list(a.obs["technology"].cat.categories)
    labels = list(a.uns["cebmf"]["params"]["obs_covariates"])
    assert labels == [f"technology={c}" for c in cats]
    cov = a.uns["cebmf"]["covariates"]["loadings"]
    np.testing.assert_array_equal(cov.sum(1), 1.0)  # one-hot
    np.testing.assert_array_equal(cov.argmax(1), a.obs["technology"].cat.codes.to_numpy())
