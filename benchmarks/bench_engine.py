"""Speed and memory of ``cebmf.fit_ebmf``: the peer cases and large sparse matrices.

Usage::

    python benchmarks/bench_engine.py                    # everything (about 10 minutes)
    python benchmarks/bench_engine.py --cases peer       # the two make_data.py cases
    python benchmarks/bench_engine.py --cases peer --seeds 0,1,2,3,4,5   # seed spread
    python benchmarks/bench_engine.py --cases sparse --sizes 1e4,1e5
    python benchmarks/bench_engine.py --cases peer --device cuda --dtype float32   # a GPU

Cases (each runs in a fresh subprocess so its peak memory is its own):

* **peer-dense / peer-counts**: the matrices of ``../shared/bench/make_data.py`` with its
  defaults and ``--mode dense --n 5000 --p 1000 --k 5 --seed 1`` and
  ``--mode counts --n 20000 --p 2000 --k 5 --seed 1 --density 0.05``, read back from the
  ``.mtx`` files, fitted with point-normal priors on both sides, constant noise, at most
  10 factors, greedy + backfit + nullcheck to convergence (default tol). The reference is
  R's flashier on this CPU (from the issue): 24 s / ELBO -7,140,394.34 and 170 s /
  ELBO 19,824,353.26. ``--seeds`` fits them once per ``random_state`` (default 0, the
  default of ``fit_ebmf``): the counts case has many near-equal local optima, and which
  one a fit lands on depends on the seed of the initialisations.
* **tl-N**: ``cebmf.tl.fit`` on an AnnData of raw counts (float32 CSR, N = the largest
  ``--sizes``), transform ``auto`` (library-size normalisation + log1p), column noise, at
  most 10 factors and ``--max-sweeps`` sweeps: the memory of the whole scverse path
  (x_sparse is relative to the AnnData's count matrix). After library-size
  normalisation these simulated counts carry weak structure (one factor at N = 2 x 10^4,
  ten at 2 x 10^5); **tl-log-N** also fits the log1p data of the sparse cases (float32
  CSR, ``transform=None``), where all 10 factors are used at every N.
* **sparse-N**: N x 2,000 with 5% non-zeros at random positions whose values carry a
  rank-5 nonnegative signal (log1p of Poisson counts with a low-rank mean), column noise,
  at most 10 factors, ``--max-sweeps`` backfit sweeps at most. Peer in the same process:
  ``scanpy.pp.pca`` (10 components) of the same sparse matrix.

Columns: total seconds, backfit sweeps, seconds per sweep (backfit only), peak memory of
the fit (peak RSS minus RSS before the fit; Linux VmHWM, see ``_memory.py``) and its
ratio to the size of the sparse matrix (data + indices + indptr), final ELBO, factors.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _memory import PeakMemory

MAKE_DATA = Path(__file__).resolve().parents[2] / "shared" / "bench" / "make_data.py"
PEERS = {
    "peer-dense": {
        "args": ["--mode", "dense", "--n", "5000", "--p", "1000", "--k", "5", "--seed", "1"],
        "ref_s": 24.0,
        "ref_elbo": -7_140_394.34,
    },
    "peer-counts": {
        "args": [
            "--mode",
            "counts",
            "--n",
            "20000",
            "--p",
            "2000",
            "--k",
            "5",
            "--seed",
            "1",
            "--density",
            "0.05",
        ],
        "ref_s": 170.0,
        "ref_elbo": 19_824_353.26,
    },
}


def sparse_counts(n: int, p: int, density: float, seed: int, raw: bool = False):
    """CSR at ~density*n*p random positions with a rank-5 mean: log1p(1 + Poisson(mean))
    (float64), or with ``raw`` the integer counts 1 + Poisson(mean) (float32, as in most
    h5ad files)."""
    import numpy as np
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    k = 5
    lo = rng.gamma(0.5, 2.0, (n, k)) * (rng.random((n, k)) < 0.3)
    fa = rng.gamma(0.5, 2.0, (p, k))
    per_row = round(density * p)
    blocks = []
    for start in range(0, n, 20_000):
        stop = min(start + 20_000, n)
        m = stop - start
        cols = np.sort(rng.random((m, p)).argpartition(per_row, axis=1)[:, :per_row], axis=1)
        rows = np.repeat(np.arange(m), per_row)
        mean = np.einsum("ik,ik->i", lo[start + rows], fa[cols.ravel()])
        vals = (
            (1.0 + rng.poisson(mean)).astype(np.float32) if raw else np.log1p(1 + rng.poisson(mean))
        )
        blocks.append(sp.csr_matrix((vals, (rows, cols.ravel())), shape=(m, p)))
    return sp.vstack(blocks, format="csr")


def run_case(cfg: dict) -> dict:
    import numpy as np
    import scipy.io
    import scipy.sparse as sp
    import torch

    import cebmf

    torch.set_num_threads(cfg["threads"])
    dev = {"device": cfg.get("device", "auto"), "dtype": cfg.get("dtype")}
    if cfg["kind"] == "peer":
        y = scipy.io.mmread(cfg["path"])
        y = y.tocsr() if sp.issparse(y) else np.ascontiguousarray(y)
        opts = {"noise": "constant"}
    elif cfg["kind"] == "tl":
        return run_tl_case(cfg)
    else:
        y = sparse_counts(cfg["n"], cfg["p"], 0.05, seed=1)
        opts = {"noise": "column", "max_iter": cfg["max_sweeps"]}
    size = y.data.nbytes + y.indices.nbytes + y.indptr.nbytes if sp.issparse(y) else y.nbytes
    warm = np.random.default_rng(0).normal(size=(50, 20))
    cebmf.fit_ebmf(warm, max_factors=2, **dev)  # warm-up (and CUDA context)
    _reset_gpu_peak()
    with PeakMemory() as mem:
        start = time.perf_counter()
        res = cebmf.fit_ebmf(y, max_factors=10, random_state=cfg.get("seed", 0), **opts, **dev)
        seconds = time.perf_counter() - start  # the result is on the host: no sync needed
    out = {
        "seconds": seconds,
        "sweeps": res.n_iter,
        "per_sweep": res.timing["backfit_s"] / max(res.n_iter, 1),
        "greedy_s": res.timing["greedy_s"],
        "peak": mem.peak_bytes,
        "method": mem.method,
        "size": size,
        "elbo": res.elbo,
        "k": res.n_factors,
        "converged": res.converged,
        "nnz": int(y.nnz) if sp.issparse(y) else int(y.size),
        "gpu_peak": _gpu_peak(),
    }
    if cfg["kind"] == "sparse" and cfg["pca"]:
        import anndata as ad
        import scanpy as sc

        adata = ad.AnnData(y)
        start = time.perf_counter()
        sc.pp.pca(adata, n_comps=10)
        out["pca_s"] = time.perf_counter() - start
    return out


def run_tl_case(cfg: dict) -> dict:
    """cebmf.tl.fit on an AnnData of raw counts (float32 CSR), transform="auto"."""
    import anndata as ad
    import numpy as np

    import cebmf

    raw = cfg.get("transform", "auto") == "auto"
    y = sparse_counts(cfg["n"], cfg["p"], 0.05, seed=1, raw=raw)
    if not raw:
        y = y.astype(np.float32)  # the log1p data of the sparse cases, stored as float32
    size = y.data.nbytes + y.indices.nbytes + y.indptr.nbytes
    adata = ad.AnnData(y)
    warm = ad.AnnData(np.random.default_rng(0).poisson(2.0, (60, 30)).astype(np.float32))
    dev = {"device": cfg.get("device", "auto")}
    if cfg.get("dtype"):
        dev["dtype"] = cfg["dtype"]
    cebmf.tl.fit(warm, n_factors=2, **dev)
    transform = "auto" if raw else None
    _reset_gpu_peak()
    with PeakMemory() as mem:
        start = time.perf_counter()
        cebmf.tl.fit(adata, n_factors=10, max_iter=cfg["max_sweeps"], transform=transform, **dev)
        seconds = time.perf_counter() - start
    rec = adata.uns["cebmf"]
    return {
        "seconds": seconds,
        "sweeps": int(rec["n_iter"]),
        "per_sweep": rec["timing"]["backfit_s"] / max(int(rec["n_iter"]), 1),
        "greedy_s": rec["timing"]["greedy_s"],
        "peak": mem.peak_bytes,
        "method": mem.method,
        "size": size,
        "elbo": float(rec["elbo_final"]),
        "k": len(rec["pve"]),
        "converged": bool(rec["converged"]),
        "nnz": int(y.nnz),
        "gpu_peak": _gpu_peak(),
    }


def _reset_gpu_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _gpu_peak() -> int | None:
    """Peak bytes allocated on the GPU by torch since the last reset (None without CUDA)."""
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="peer,sparse,tl", help="peer, sparse and/or tl")
    ap.add_argument("--sizes", default="1e4,1e5,2e5", help="N of the sparse cases")
    ap.add_argument("--p", type=int, default=2000)
    ap.add_argument("--max-sweeps", type=int, default=20, help="backfit sweeps, sparse cases")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seeds", default="0", help="random_state values of the peer cases")
    ap.add_argument("--no-pca", action="store_true", help="skip scanpy's PCA peer")
    ap.add_argument("--device", default="auto", help="fit_ebmf's device: auto, cpu, cuda")
    ap.add_argument("--dtype", default=None, help="fit_ebmf's dtype (default: its own)")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "cebmf-bench"))
    ap.add_argument("--make-data", default=str(MAKE_DATA), help="path of make_data.py")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    return ap.parse_args(argv)


def _mib(b):
    return "-" if b is None else f"{b / 2**20:.0f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    cases = []
    wanted = set(args.cases.split(","))
    if "peer" in wanted:
        Path(args.cache).mkdir(parents=True, exist_ok=True)
        for name, spec in PEERS.items():
            path = Path(args.cache) / f"{name}.mtx"
            if not path.exists():
                subprocess.run(
                    [sys.executable, args.make_data, *spec["args"], "--out", str(path)],
                    check=True,
                    capture_output=True,
                )
            seeds = [int(v) for v in args.seeds.split(",")]
            for seed in seeds:
                label = name if len(seeds) == 1 else f"{name}/s{seed}"
                cases.append((label, {"kind": "peer", "path": str(path), "seed": seed}, spec))
    if "sparse" in wanted:
        for n in (int(float(v)) for v in args.sizes.split(",")):
            cfg = {
                "kind": "sparse",
                "n": n,
                "p": args.p,
                "max_sweeps": args.max_sweeps,
                "pca": not args.no_pca,
            }
            cases.append((f"sparse-{n:.0e}".replace("+0", ""), cfg, None))
    if "tl" in wanted:
        n = max(int(float(v)) for v in args.sizes.split(","))
        for transform in ("auto", "none"):
            cfg = {
                "kind": "tl",
                "n": n,
                "p": args.p,
                "max_sweeps": args.max_sweeps,
                "transform": transform,
            }
            label = "tl-" if transform == "auto" else "tl-log-"
            cases.append((f"{label}{n:.0e}".replace("+0", ""), cfg, None))
    import torch

    print(
        f"cebmf fit_ebmf benchmark | torch {torch.__version__} | {platform.machine()} "
        f"{platform.system()} | {os.cpu_count()} CPUs, {args.threads} threads | "
        f"load {os.getloadavg()[0]:.2f} | device {args.device}, dtype {args.dtype or 'default'}"
    )
    print(
        "peak_MiB: peak RSS during the fit minus RSS before it; x_sparse: peak / size of "
        "the sparse matrix (data+indices+indptr); gpu_MiB: torch's peak GPU allocation"
    )
    head = (
        f"{'case':<16}{'N x P':>14}{'nnz':>11}{'K':>4}{'total_s':>9}{'greedy_s':>9}"
        f"{'sweeps':>7}{'s/sweep':>9}{'peak_MiB':>9}{'x_sparse':>9}{'ELBO':>17}"
        f"{'ref_ELBO':>17}{'ref_s':>7}{'speedup':>8}{'pca_s':>7}{'gpu_MiB':>8}"
    )
    print(head)
    print("-" * len(head))
    for name, cfg, spec in cases:
        cfg["threads"] = args.threads
        cfg["device"], cfg["dtype"] = args.device, args.dtype
        cmd = [sys.executable, __file__, "--case", json.dumps(cfg)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(f"{name:<16} failed:\n{proc.stderr[-2000:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        dims = (
            f"{cfg.get('n', '')}x{cfg.get('p', '')}"
            if cfg["kind"] in ("sparse", "tl")
            else {"peer-dense": "5000x1000", "peer-counts": "20000x2000"}[name.split("/")[0]]
        )
        ref_elbo = f"{spec['ref_elbo']:,.2f}" if spec else "-"
        ref_s = f"{spec['ref_s']:.0f}" if spec else "-"
        speed = f"{spec['ref_s'] / r['seconds']:.1f}x" if spec else "-"
        ratio = f"{r['peak'] / r['size']:.2f}" if r["peak"] is not None else "-"
        pca = f"{r['pca_s']:.2f}" if "pca_s" in r else "-"
        conv = "" if r["converged"] else "*"
        print(
            f"{name:<16}{dims:>14}{r['nnz']:>11,}{r['k']:>4}{r['seconds']:>9.2f}"
            f"{r['greedy_s']:>9.2f}{r['sweeps']:>6}{conv:1}{r['per_sweep']:>9.3f}"
            f"{_mib(r['peak']):>9}{ratio:>9}{r['elbo']:>17,.2f}{ref_elbo:>17}{ref_s:>7}"
            f"{speed:>8}{pca:>7}{_mib(r.get('gpu_peak')):>8}"
        )
    print("* backfit stopped at --max-sweeps before converging (time per sweep is exact)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
