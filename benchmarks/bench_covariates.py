"""Covariate-moderated priors: accuracy on the cEBMF paper's design, and speed.

Usage::

    python benchmarks/bench_covariates.py                 # everything (~10 min on 2 cores)
    python benchmarks/bench_covariates.py --part paper --seeds 5
    python benchmarks/bench_covariates.py --part speed

Parts:

* **paper**: ``cebmf.datasets.simulate_covariate_sparsity`` (N = 2000, P = 100, K = 2,
  10 covariates per side, beta0 = 0, beta1 = 3 informative or 0 uninformative) for
  sigma in {0.5, 1, 2} and ``--seeds`` seeds; one fit each of plain EBMF (point_normal
  on both sides) and cEBMF (``cash`` on both sides with X_l, X_f), constant noise.
  Reported: mean and sd over seeds of RMSE(Lbar Fbar^T, L F^T), and the mean relative
  change of cEBMF against EBMF (negative = better). Seeds run in 2 worker processes.
* **speed**: (a) one ``cash`` EBNM call on 10^5 observations with 10 covariates, cold and
  warm-started (state of a fit to another draw), float64 and float32; (b) a 1,000 x 200
  matrix whose loadings' sparsity follows two cell coordinates (three spatial bumps),
  ``cash`` loadings on the coordinates and point_normal factors, at most 20 backfit sweeps,
  one thread, against the reference implementation's ~100 s for that task (issue 4), with
  the RMSE of both cEBMF and plain EBMF.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import numpy as np


def _rmse(res, truth) -> float:
    return float(np.sqrt(np.mean((res.fitted() - truth) ** 2)))


def paper_case(args: tuple) -> tuple:
    seed, sigma, beta1 = args
    import torch

    import cebmf

    torch.set_num_threads(1)
    d = cebmf.datasets.simulate_covariate_sparsity(beta1=beta1, sigma=sigma, seed=seed)
    truth = d.signal
    ebmf = cebmf.fit_ebmf(d.Y, noise="constant")
    cebmf_fit = cebmf.fit_ebmf(
        d.Y, noise="constant", prior_loadings="cash", prior_factors="cash", X_l=d.X_l, X_f=d.X_f
    )
    return seed, sigma, beta1, _rmse(ebmf, truth), _rmse(cebmf_fit, truth)


def run_paper(seeds: int) -> None:
    cases = [
        (seed, sigma, beta1)
        for beta1 in (3.0, 0.0)
        for sigma in (0.5, 1.0, 2.0)
        for seed in range(seeds)
    ]
    start = time.perf_counter()
    with mp.get_context("spawn").Pool(2) as pool:
        rows = pool.map(paper_case, cases)
    print(
        f"\npaper design: N=2000, P=100, K=2, 10 covariates/side, {seeds} seeds, "
        f"{time.perf_counter() - start:.0f} s"
    )
    head = (
        f"{'beta1':>6}{'sigma':>7}{'EBMF mean':>12}{'EBMF sd':>10}{'cEBMF mean':>12}"
        f"{'cEBMF sd':>10}{'change':>9}{'better in':>11}"
    )
    print(head)
    print("-" * len(head))
    for beta1 in (3.0, 0.0):
        for sigma in (0.5, 1.0, 2.0):
            sel = [r for r in rows if r[1] == sigma and r[2] == beta1]
            e = [r[3] for r in sel]
            c = [r[4] for r in sel]
            change = statistics.mean(ci / ei - 1 for ci, ei in zip(c, e, strict=True))
            better = sum(ci < ei for ci, ei in zip(c, e, strict=True))
            print(
                f"{beta1:>6.0f}{sigma:>7.1f}{statistics.mean(e):>12.4f}"
                f"{statistics.pstdev(e):>10.4f}{statistics.mean(c):>12.4f}"
                f"{statistics.pstdev(c):>10.4f}{100 * change:>8.1f}%"
                f"{better:>6d}/{len(sel)}"
            )


def spatial_data(n=1000, p=200, seed=0):
    rng = np.random.default_rng(seed)
    coords = rng.random((n, 2))
    centres = np.array([[0.25, 0.25], [0.75, 0.3], [0.5, 0.8]])
    k = centres.shape[0]
    dist = np.linalg.norm(coords[:, None, :] - centres[None], axis=2)
    p_on = 1.0 / (1.0 + np.exp(-(4.0 - 25.0 * dist)))
    lo = np.where(rng.random((n, k)) < p_on, rng.normal(0, 1.5, (n, k)), 0.0)
    fa = rng.normal(size=(p, k)) * (rng.random((p, k)) < 0.5)
    y = lo @ fa.T + rng.normal(size=(n, p))
    return y, lo @ fa.T, coords


def run_speed() -> None:
    import torch

    import cebmf
    from cebmf.priors import get_prior

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    n = 100_000
    cov = rng.normal(size=(n, 10))
    on = rng.random(n) < 1.0 / (1.0 + np.exp(-3.0 * cov[:, 0]))
    print(f"\none cash EBNM call, n = {n:,}, 10 covariates, 2 threads")
    print(f"{'dtype':>8}{'cold_s':>9}{'warm_s':>9}{'grid K':>8}")
    for dt in (torch.float64, torch.float32):
        draws = [
            torch.tensor(np.where(on, rng.normal(0, 2, n), 0.0) + rng.normal(size=n), dtype=dt)
            for _ in range(2)
        ]
        s = torch.ones(1, dtype=dt)
        c = torch.tensor(cov, dtype=dt)
        prior = get_prior("cash")
        start = time.perf_counter()
        first = prior.fit(draws[0], s, c)
        cold = time.perf_counter() - start
        warm = []
        for _ in range(3):
            start = time.perf_counter()
            prior.fit(draws[1], s, c, state=first.state)
            warm.append(time.perf_counter() - start)
        print(
            f"{str(dt).split('.')[-1]:>8}{cold:>9.2f}{statistics.median(warm):>9.2f}"
            f"{len(first.g['scale']):>8}"
        )

    torch.set_num_threads(1)
    y, truth, coords = spatial_data()
    start = time.perf_counter()
    fit = cebmf.fit_ebmf(y, noise="constant", prior_loadings="cash", X_l=coords, max_iter=20)
    t_c = time.perf_counter() - start
    start = time.perf_counter()
    plain = cebmf.fit_ebmf(y, noise="constant", max_iter=20)
    t_p = time.perf_counter() - start
    print("\n1,000 x 200, cash loadings on 2 cell coordinates, <= 20 backfit sweeps, 1 thread")
    print(f"{'method':<22}{'seconds':>9}{'sweeps':>8}{'K':>4}{'RMSE':>9}{'vs ref 100 s':>14}")
    print(
        f"{'cEBMF (cash)':<22}{t_c:>9.2f}{fit.n_iter:>8}{fit.n_factors:>4}"
        f"{_rmse(fit, truth):>9.4f}{100.0 / t_c:>13.0f}x"
    )
    print(
        f"{'EBMF (point_normal)':<22}{t_p:>9.2f}{plain.n_iter:>8}{plain.n_factors:>4}"
        f"{_rmse(plain, truth):>9.4f}{'-':>14}"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["all", "paper", "speed"], default="all")
    ap.add_argument("--seeds", type=int, default=20)
    args = ap.parse_args(argv)
    if args.part in ("all", "speed"):
        run_speed()
    if args.part in ("all", "paper"):
        run_paper(args.seeds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
