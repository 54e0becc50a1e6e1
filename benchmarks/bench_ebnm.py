"""Speed and memory of ``cebmf.ebnm`` per prior family, size and dtype; EM vs mix-SQP.

Usage::

    python benchmarks/bench_ebnm.py                       # 1e4, 1e5, 1e6; all families
    python benchmarks/bench_ebnm.py --sizes 1e5 --families point_normal,ash --hetero
    python benchmarks/bench_ebnm.py --sizes 1e6 --families normal_scale_mixture \\
        --dtypes float64 --em-max-n 1e6                   # include EM at n = 1e6 (slow)

Every (family, n, dtype) case runs in a fresh Python subprocess, so that its peak memory
is its own and nothing (allocator caches, warm kernels, earlier fits) leaks between cases.
In that subprocess:

* data: theta_i = 0 with probability 0.8, else N(0, 3^2) (|theta_i| for the nonnegative
  families), x_i = theta_i + s_i z_i with s_i = 1 (``--hetero``: s_i ~ U(0.5, 2));
* a small fit (n = 1000) of the same family warms up torch's kernels;
* **cold**: ``--repeats`` fits with no warm state; the median time is reported. The first
  of them is also the memory measurement;
* **warm**: a fit to data of the same distribution drawn with another seed gives
  ``state``; ``--repeats`` fits of the case's data with that state, median time;
* **memory**: the peak resident set size (RSS) of the process during the first cold fit,
  minus the RSS just before it (the data and torch itself are not counted; the returned
  posterior summaries are). On Linux the kernel's high-water mark (VmHWM) is reset through
  ``/proc/self/clear_refs`` just before the fit, so the number is exact; elsewhere the
  increase of ``getrusage`` maxrss is reported, a lower bound. (tracemalloc does not see
  torch's allocations, and sampling RSS with psutil would miss short peaks.)
* **EM vs mix-SQP** (the two mixture families): the mixture-weight problem of the cold fit
  (the same grid, ``g["scale"]``) is solved again by plain EM, as the cebmf_torch research
  code does: pi <- pi * A (1 / A^T pi) / n from uniform weights, until the log-likelihood
  changes by less than 1e-8 * n or 10^4 iterations. The (K, n) likelihood matrix A is
  computed here independently of cebmf, in float64; its log-likelihood at cebmf's fitted
  weights is checked against cebmf's ``loglik``. Reported: EM's solve time (A given), its
  iterations, the time cebmf spends in mix-SQP (median cold fit minus median ``fix_g``
  fit, which computes the same A and posterior without solving), and the gap
  loglik(mix-SQP) - loglik(EM) in nats (positive: EM stopped short of the optimum; mix-SQP
  certifies a gap <= 1e-8 * n to the optimum). EM runs once, on the float64 case only,
  and only for n <= ``--em-max-n`` (it needs minutes at n = 1e6).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

from _memory import PeakMemory

NONNEGATIVE = {"point_exponential", "nonnegative_mixture", "generalized_binary"}
MIXTURES = {"normal_scale_mixture", "nonnegative_mixture"}
EM_TOL_PER_OBS = 1e-8
EM_MAX_ITER = 10_000


# ---------------------------------------------------------------------------- data, memory
def simulate(n: int, seed: int, nonneg: bool, hetero: bool, dtype):
    """theta ~ 0.8 delta_0 + 0.2 N(0, 3^2) (abs for nonnegative families), x = theta + s z."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    theta = np.where(rng.random(n) < 0.8, 0.0, rng.normal(0.0, 3.0, n))
    if nonneg:
        theta = np.abs(theta)
    s = rng.uniform(0.5, 2.0, n) if hetero else np.ones(1)
    x = theta + s * rng.normal(size=n)
    x_t = torch.from_numpy(x).to(dtype)
    s_t = torch.from_numpy(s).to(dtype) if hetero else 1.0
    return x_t, s_t


def likelihood_matrix(family: str, x, s, scales):
    """(K, n) float64 matrix exp(log p_k(x_i) - max_k log p_k(x_i)) and the column maxima.

    Written from the formulas (not from cebmf's code): normal scale mixture components
    N(x; 0, s^2 + sigma_k^2); exponential components with mean a_k,
    exp(-x^2 / (2 s^2)) M(x/s - s/a_k) / a_k with M(u) = exp(u^2/2) Phi(u), and a_0 = 0 the
    point mass N(x; 0, s^2).
    """
    import torch

    x = x.to(torch.float64)[None, :]
    s = torch.as_tensor(s, dtype=torch.float64).reshape(1, -1)
    sc = torch.as_tensor(scales, dtype=torch.float64)[:, None]
    log_2pi = math.log(2.0 * math.pi)
    if family == "normal_scale_mixture":
        var = s * s + sc * sc
        log_l = -0.5 * (log_2pi + torch.log(var) + x * x / var)
    elif family == "nonnegative_mixture":
        slab = sc > 0
        inv = torch.where(slab, 1.0 / torch.where(slab, sc, 1.0), 0.0)
        u = x / s - s * inv
        # log M(u): erfcx form (no overflow, no cancellation) up to 5, direct form above
        small = torch.log(0.5 * torch.special.erfcx(-u.clamp(max=5.0) / math.sqrt(2.0)))
        big = 0.5 * u * u + torch.special.log_ndtr(u.clamp(min=5.0))
        log_m = torch.where(u <= 5.0, small, big)
        expo = torch.log(torch.where(slab, inv, 1.0)) - 0.5 * (x / s) ** 2 + log_m
        point = -0.5 * (log_2pi + torch.log(s * s) + x * x / (s * s))
        log_l = torch.where(slab, expo, point)
    else:
        raise ValueError(family)
    col_max = log_l.max(dim=0).values
    return torch.exp(log_l - col_max), col_max


def em_weights(lik, tol_abs: float, max_iter: int = EM_MAX_ITER):
    """Plain EM for max_pi sum_i log sum_k A_ki pi_k from uniform weights.

    Stops when the log-likelihood changes by less than ``tol_abs`` or after ``max_iter``
    iterations. Returns (pi, sum_i log (A^T pi)_i, iterations).
    """
    import torch

    k, n = lik.shape
    pi = torch.full((k,), 1.0 / k, dtype=lik.dtype)
    u = pi @ lik
    ll = torch.log(u).sum().item()
    for it in range(1, max_iter + 1):
        pi = pi * (lik @ (1.0 / u)) / n
        u = pi @ lik
        new = torch.log(u).sum().item()
        if abs(new - ll) < tol_abs:
            return pi, new, it
        ll = new
    return pi, ll, max_iter


# ------------------------------------------------------------------------------ one case
def run_case(cfg: dict) -> dict:
    import torch

    torch.set_num_threads(cfg["threads"])
    import cebmf

    family, n, repeats = cfg["family"], cfg["n"], cfg["repeats"]
    dtype = getattr(torch, cfg["dtype"])
    nonneg = family in NONNEGATIVE
    x, s = simulate(n, cfg["seed"], nonneg, cfg["hetero"], dtype)
    x_prev, s_prev = simulate(n, cfg["seed"] + 1000, nonneg, cfg["hetero"], dtype)
    x_w, s_w = simulate(1000, cfg["seed"] + 2000, nonneg, cfg["hetero"], dtype)
    cebmf.ebnm(x_w, s_w, family)  # warm-up: load kernels, fill caches
    del x_w, s_w

    def timed(**kw):
        start = time.perf_counter()
        res = cebmf.ebnm(x, s, family, **kw)
        return time.perf_counter() - start, res

    with PeakMemory() as mem:
        t_first, cold = timed()
    cold_times = [t_first] + [timed()[0] for _ in range(repeats - 1)]
    prev = cebmf.ebnm(x_prev, s_prev, family)
    del x_prev, s_prev
    warm_runs = [timed(state=prev.state) for _ in range(repeats)]
    out = {
        **cfg,
        "cold_s": statistics.median(cold_times),
        "warm_s": statistics.median(t for t, _ in warm_runs),
        "peak_bytes": mem.peak_bytes,
        "mem_method": mem.method,
        "loglik": cold.loglik,
        "warm_minus_cold": warm_runs[-1][1].loglik - cold.loglik,
    }
    if family in MIXTURES:
        fixed = [timed(g_init=cold.g, fix_g=True)[0] for _ in range(repeats)]
        out["sqp_s"] = out["cold_s"] - statistics.median(fixed)
        out["K"] = int(cold.g["scale"].size)
        if cfg["em"]:
            del warm_runs, prev
            lik, col_max = likelihood_matrix(family, x, s, cold.g["scale"])
            const = col_max.sum().item()
            pi_sqp = torch.as_tensor(cold.g["pi"], dtype=torch.float64)
            out["check"] = (torch.log(pi_sqp @ lik).sum().item() + const) - cold.loglik
            start = time.perf_counter()
            _, ll_em, iters = em_weights(lik, EM_TOL_PER_OBS * n)
            out["em_s"] = time.perf_counter() - start
            out["em_iter"] = iters
            out["em_gap"] = cold.loglik - (ll_em + const)
    return out


# --------------------------------------------------------------------------------- driver
def _size(text: str) -> int:
    value = float(text)
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"sizes must be positive integers, got {text}")
    return int(value)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--sizes", default="1e4,1e5,1e6", help="comma-separated n (default: %(default)s)"
    )
    p.add_argument("--families", default="all", help="comma-separated names or 'all'")
    p.add_argument("--dtypes", default="float32,float64", help="default: %(default)s")
    p.add_argument("--repeats", type=int, default=3, help="fits per timing; median reported")
    p.add_argument("--hetero", action="store_true", help="s_i ~ U(0.5, 2) instead of s = 1")
    p.add_argument("--em-max-n", type=_size, default=100_000, help="largest n for EM")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def _n_str(n: int) -> str:
    """1e4 for 10000, the digits otherwise."""
    exp = round(math.log10(n))
    return f"1e{exp}" if 10**exp == n and exp > 2 else str(n)


def _fmt_row(r: dict | None, cfg: dict, widths: list[int]) -> str:
    cells = [cfg["family"], _n_str(cfg["n"]), cfg["dtype"]]
    if r is None:
        cells += ["FAILED"] + [""] * (len(widths) - 4)
    else:
        mib = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}"
        cells += [
            f"{r['cold_s']:.3f}",
            f"{r['warm_s']:.3f}",
            mib,
            f"{r['loglik']:.2f}",
            f"{r['warm_minus_cold']:.1e}",
        ]
        if "sqp_s" in r:
            cells += [str(r["K"]), f"{r['sqp_s']:.3f}"]
            if "em_s" in r:
                cells += [f"{r['em_s']:.3f}", str(r["em_iter"]), f"{r['em_gap']:.3g}"]
            else:
                cells += ["-", "-", "-"]
        else:
            cells += ["-"] * 5
    return "  ".join(
        c.rjust(w) if i > 0 else c.ljust(w)
        for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )


HEADER = [
    ("family", 20),
    ("n", 6),
    ("dtype", 7),
    ("cold_s", 8),
    ("warm_s", 8),
    ("peak_MiB", 8),
    ("loglik", 14),
    ("warm-cold", 9),
    ("K", 3),
    ("sqp_s", 7),
    ("em_s", 8),
    ("em_it", 5),
    ("em_gap", 8),
]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.case is not None:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0

    import torch

    import cebmf

    families = (
        cebmf.available_priors(covariates=False)
        if args.families == "all"
        else args.families.split(",")
    )
    for f in families:
        cebmf.priors.get_prior(f)  # fail early on unknown names
    families = [cebmf.priors.get_prior(f).name for f in families]  # resolve aliases
    sizes = [_size(v) for v in args.sizes.split(",")]
    dtypes = args.dtypes.split(",")
    for d in dtypes:
        if d not in ("float32", "float64"):
            raise SystemExit(f"unknown dtype {d!r}; use float32 and/or float64")
    em_dtype = "float64" if "float64" in dtypes else dtypes[0]

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    lines = [
        f"cebmf {cebmf.__version__} EBNM benchmark | torch {torch.__version__} | "
        f"python {platform.python_version()} | {platform.machine()} {platform.system()}",
        f"{os.cpu_count()} CPUs, torch.set_num_threads({args.threads}) | load average at "
        f"start: {'n/a' if load is None else ', '.join(f'{v:.2f}' for v in load)}",
        "data: theta = 0 w.p. 0.8 else N(0, 3^2) (|theta| for nonnegative families); "
        f"x = theta + s z, s = {'U(0.5, 2) per observation' if args.hetero else '1'}",
        f"cold_s / warm_s: median seconds per cebmf.ebnm fit over {args.repeats} repeat(s); "
        "cold = no state, warm = state of a fit to an independent draw of the same "
        "distribution",
        "peak_MiB: peak RSS during the first cold fit minus RSS just before it (fresh "
        "subprocess per case; Linux VmHWM reset via /proc/self/clear_refs, else getrusage "
        "maxrss increase, a lower bound); excludes the inputs, includes the outputs",
        "loglik: cold fit's marginal log-likelihood; warm-cold: loglik(warm) - loglik(cold)",
        "mixtures: K grid components; sqp_s = median cold fit - median fix_g fit (time in "
        "mix-SQP); em_s / em_it: plain EM on the same (K, n) float64 likelihood matrix from "
        f"uniform weights, stop at |dloglik| < 1e-8 n or {EM_MAX_ITER} iterations, one run, "
        f"{em_dtype} case only, n <= {_n_str(args.em_max_n)}; em_gap = loglik(mix-SQP) - "
        "loglik(EM) in nats (> 0: EM short of the optimum)",
        "",
    ]
    print("\n".join(lines))
    print("  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(HEADER)))
    print("  ".join("-" * w for _, w in HEADER), flush=True)
    widths = [w for _, w in HEADER]

    t0 = time.perf_counter()
    results = []
    for n in sizes:
        for family in families:
            for dtype in dtypes:
                cfg = {
                    "family": family,
                    "n": n,
                    "dtype": dtype,
                    "repeats": args.repeats,
                    "hetero": args.hetero,
                    "threads": args.threads,
                    "seed": args.seed,
                    "em": family in MIXTURES and dtype == em_dtype and n <= args.em_max_n,
                }
                cmd = [sys.executable, os.path.abspath(__file__), "--case", json.dumps(cfg)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                res = None
                if proc.returncode == 0:
                    res = json.loads(proc.stdout.strip().splitlines()[-1])
                    results.append(res)
                print(_fmt_row(res, cfg, widths), flush=True)
                if res is None:
                    print(proc.stderr.strip().splitlines()[-1] if proc.stderr else "", flush=True)

    checks = [abs(r["check"]) / r["n"] for r in results if "check" in r]
    methods = sorted({str(r["mem_method"]) for r in results})
    print()
    print(f"memory method used: {', '.join(methods)} (vmhwm = exact peak, maxrss = lower bound)")
    if checks:
        print(
            "EM likelihood matrix vs cebmf: max |loglik at cebmf's weights - cebmf loglik| / n "
            f"= {max(checks):.1e}"
        )
    print(f"total wall time {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
