"""The engine on real data (../shared/data) and its memory on large sparse input."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import shared_data

import cebmf


def _hvg_log1p(x, n_genes: int):
    y = cebmf.data.log1p_normalize(x)
    mean = np.asarray(y.mean(0)).ravel()
    var = np.asarray(y.multiply(y).mean(0)).ravel() - mean**2
    return y[:, np.argsort(-var)[:n_genes]]


def test_pbmc_facs_loadings_separate_cell_types():
    import anndata as ad

    adata = ad.read_h5ad(shared_data("pbmc_facs_fasttopics.h5ad"))
    y = _hvg_log1p(adata.X, 500)
    assert sp.issparse(y)
    # greedy + backfit rounds take ~1,200 sweeps here (32 factors); the default budget
    # of 500 would stop them before convergence
    res = cebmf.fit_ebmf(y, noise="column", max_factors=40, max_iter=2000)
    # the number of factors is the data's choice, not the cap
    assert 5 <= res.n_factors < 40
    assert res.converged
    celltype = adata.obs["celltype"].astype(str).to_numpy()
    means = pd.DataFrame(res.L).groupby(celltype).mean()
    sd = res.L.std(0)
    for major in ["CD19+ B", "CD14+ Monocyte", "CD56+ NK", "CD34+"]:
        others = means.drop(index=major)
        # factor signs are arbitrary (l f^T = (-l)(-f)^T): look at both
        margins = [(sign * means.loc[major] - (sign * others).max()) / sd for sign in (1.0, -1.0)]
        best = float(np.max(np.maximum(*margins)))
        assert best > 1.0, (major, best)


def test_sparse_fit_never_allocates_a_dense_matrix():
    # 50,000 x 2,000 at 1% density: the dense matrix would take 800 MB, the CSR 12 MB.
    code = textwrap.dedent(
        """
        import json, re, sys
        import numpy as np, scipy.sparse as sp, torch
        import cebmf
        torch.set_num_threads(2)
        rng = np.random.default_rng(0)
        n, p = 50_000, 2_000
        y = sp.random(n, p, density=0.01, format="csr", random_state=1,
                      data_rvs=lambda k: rng.poisson(3.0, k) + 1.0)
        y.data = np.log1p(y.data)
        cebmf.fit_ebmf(y[:100], max_factors=1, noise="constant")  # load every module

        def status(key):
            text = open("/proc/self/status").read()
            return int(re.search(rf"^{key}:\\s+(\\d+) kB", text, re.M).group(1)) * 1024

        open("/proc/self/clear_refs", "w").write("5")
        before = status("VmRSS")
        res = cebmf.fit_ebmf(y, max_factors=4, max_iter=5)
        print(json.dumps({"peak": status("VmHWM") - before, "k": res.n_factors,
                          "sparse": y.data.nbytes + y.indices.nbytes + y.indptr.nbytes}))
        """
    )
    if not sys.platform.startswith("linux"):
        pytest.skip("the peak-memory guard reads /proc (Linux only)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    dense_bytes = 50_000 * 2_000 * 8
    assert info["k"] >= 0
    # a dense N x P float64 would alone be 800 MB; the fit stays far below that
    assert info["peak"] < dense_bytes / 8, info
    assert info["peak"] < 4 * info["sparse"] + 100 * 2**20, info
