"""The engine on real data (../shared/data) and its memory on large sparse input."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import DEVICES, shared_data
from torch.utils._python_dispatch import TorchDispatchMode

import cebmf


def _hvg_log1p(x, n_genes: int):
    y = cebmf.data.log1p_normalize(x)
    mean = np.asarray(y.mean(0)).ravel()
    var = np.asarray(y.multiply(y).mean(0)).ravel() - mean**2
    return y[:, np.argsort(-var)[:n_genes]]


def test_pbmc_facs_loadings_separate_cell_types():
    import anndata as ad

    adata = ad.read_h5ad(shared_data("pbmc_facs_fasttopics.h5ad"))
    # 1,500 of the 3,774 cells (every type keeps 63 to 306 of them) and the 200 most variable
    # genes: with 500 genes, 1,000 or 1,500 cells support 29 to over 40 factors, depending on
    # the path (random_state), so a cap of 40 would often decide the number; these give 20
    # and 25 factors (random_state 0, 1)
    cells = np.sort(np.random.default_rng(0).choice(adata.n_obs, 1_500, replace=False))
    adata = adata[cells].copy()
    y = _hvg_log1p(adata.X, 200)
    assert sp.issparse(y)
    # greedy + backfit rounds take 660-970 sweeps here; the default budget of 500 could
    # stop them before convergence
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


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_fit_never_allocates_a_dense_matrix(device):
    # 50,000 x 2,000 at 1% density: the dense matrix would take 800 MB, the CSR 12 MB.
    # On the CPU the guard is the process's peak resident memory; on a GPU, torch's peak
    # allocation on the device (the host's resident memory there also counts the CUDA
    # libraries' kernels, loaded as first used)
    code = textwrap.dedent(
        """
        import json, re, sys
        import numpy as np, scipy.sparse as sp, torch
        import cebmf
        torch.set_num_threads(2)
        device = sys.argv[1]
        rng = np.random.default_rng(0)
        n, p = 50_000, 2_000
        y = sp.random(n, p, density=0.01, format="csr", random_state=1,
                      data_rvs=lambda k: rng.poisson(3.0, k) + 1.0)
        # two planted blocks on the stored entries, so that factors are fitted and swept
        r, c = y.nonzero()
        for share_n, share_p in ((0.3, 0.2), (0.2, 0.3)):
            a, b = rng.random(n) < share_n, rng.random(p) < share_p
            y.data[a[r] & b[c]] += 3.0
        y.data = np.log1p(y.data)
        cebmf.fit_ebmf(y[:100], max_factors=1, noise="constant", device=device)  # load all

        def status(key):
            text = open("/proc/self/status").read()
            return int(re.search(rf"^{key}:\\s+(\\d+) kB", text, re.M).group(1)) * 1024

        open("/proc/self/clear_refs", "w").write("5")
        if device == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            before = status("VmRSS")
        res = cebmf.fit_ebmf(y, max_factors=4, max_iter=5, device=device)
        if device == "cuda":
            peak = torch.cuda.max_memory_allocated() - before
        else:
            peak = status("VmHWM") - before
        print(json.dumps({"peak": peak, "k": res.n_factors,
                          "sweeps": res.n_iter,
                          "sparse": y.data.nbytes + y.indices.nbytes + y.indptr.nbytes}))
        """
    )
    if not sys.platform.startswith("linux"):
        pytest.skip("the peak-memory guard reads /proc (Linux only)")
    out = subprocess.run(
        [sys.executable, "-c", code, device], capture_output=True, text=True, check=True
    )
    info = json.loads(out.stdout.strip().splitlines()[-1])
    dense_bytes = 50_000 * 2_000 * 8
    assert info["k"] >= 2 and info["sweeps"] >= 1, info  # the blocks were fitted and swept
    # a dense N x P float64 would alone be 800 MB; the fit stays far below that
    assert info["peak"] < dense_bytes / 8, info
    assert info["peak"] < 4 * info["sparse"] + 100 * 2**20, info


class _LargestTensor(TorchDispatchMode):
    """Records the largest dense (strided) tensor any torch operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided and t.numel() > self.numel:
                self.numel, self.op = t.numel(), str(func)
        return out


@pytest.mark.parametrize("noise", ["constant", "row", "column", "offset"])
def test_sparse_fit_creates_no_tensor_of_the_matrix_size(noise):
    # every torch operation of the fit is watched (the products too, with the torch sparse
    # kernels): with 5% non-zeros, no tensor may reach
    # N P / 10 entries (the largest are the stored values, N P / 20, and the N x K / P x K
    # factor matrices); the implicit column centring is applied inside the products only
    rng = np.random.default_rng(3)
    n, p = 3000, 400
    y = sp.random(
        n,
        p,
        density=0.05,
        format="csr",
        random_state=4,
        data_rvs=lambda k: rng.poisson(3.0, k) + 1.0,
    )
    r, c = y.nonzero()
    block = (rng.random(n) < 0.3)[r] & (rng.random(p) < 0.2)[c]
    y.data = np.log1p(y.data) + 3.0 * block
    data = y
    if noise == "offset":
        base = cebmf.data.as_data_matrix(
            y, dtype=torch.float64, device=torch.device("cpu"), sparse_backend="torch"
        )
        means = torch.as_tensor(np.asarray(y.mean(0)).ravel())
        data = cebmf.data.OffsetData(base, torch.ones(n, 1, dtype=torch.float64), means[:, None])
    watch = _LargestTensor()
    with watch:
        res = cebmf.fit_ebmf(
            data,
            max_factors=5,
            noise="constant" if noise == "offset" else noise,
            sparse_backend="torch",  # the products too run through torch, where they are seen
        )
    assert res.n_factors >= 1 and res.n_iter >= 1
    assert watch.numel < n * p / 10, (watch.numel, watch.op)
