"""EBNM on an accelerator against the CPU: every prior family, float64 and float32.

Usage (on the device machine, from ``benchmarks/gpu_check.sh``)::

    python benchmarks/gpu_ebnm_check.py [--device cuda]

For each family, the same data (n = 20,000, s from 1e-3 to 1e3, modes 0 and -0.5 where
the family takes one) are fitted on the CPU in float64 and on the device in float64 and
float32. Printed: the log-likelihood differences (nats) and the largest differences of
the posterior means and sds in units of the CPU's posterior sd, and the seconds per
call. Exit status 1 if a float64 device fit is off by more than 1e-6 relative in its
log-likelihood or 1e-4 sd in a posterior summary.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

import cebmf

COVARIATE = {"cash", "cgb", "emdn", "spiked_emdn"}


def _fit(prior, x, s, cov, mode, device, dtype):
    xt = torch.as_tensor(x, dtype=dtype, device=device)
    st = torch.as_tensor(s, dtype=dtype, device=device)
    kw = {}
    if prior in COVARIATE:
        kw["covariates"] = torch.as_tensor(cov, dtype=dtype, device=device)
    if device != "cpu":
        torch.cuda.synchronize()
    t = time.perf_counter()
    res = cebmf.ebnm(xt, st, prior, mode=mode, **kw)
    if device != "cpu":
        torch.cuda.synchronize()
    return res, time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n", type=int, default=20_000)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    n = args.n
    cov = rng.normal(size=(n, 3))
    s = np.exp(rng.uniform(np.log(1e-3), np.log(1e3), n))
    theta = np.where(rng.random(n) < 0.6, 0.0, rng.exponential(2.0, n))
    print(f"cebmf.ebnm on {args.device} vs cpu float64 | n = {n:,} | torch {torch.__version__}")
    head = (
        f"{'prior':<21}{'mode':>5}{'dtype':>8}{'dloglik':>11}{'mean/sd':>10}{'sd/sd':>10}"
        f"{'cpu_s':>8}{'dev_s':>8}"
    )
    print(head)
    print("-" * len(head))
    failed = False
    for prior in cebmf.available_priors():
        if prior == "flat":
            continue
        for mode in (0.0, -0.5):
            x = theta + mode + s * rng.standard_normal(n)
            ref, t_cpu = _fit(prior, x, s, cov, mode, "cpu", torch.float64)
            for dtype in (torch.float64, torch.float32):
                try:
                    res, t_dev = _fit(prior, x, s, cov, mode, args.device, dtype)
                except Exception as err:  # report and go on
                    print(f"{prior:<21}{mode:>5}{str(dtype)[6:]:>8}  ERROR {err!r}"[:150])
                    failed = True
                    continue
                sd = np.maximum(ref.sd.cpu().numpy(), 1e-300)
                mean_err = np.max(np.abs(res.mean.cpu().double().numpy() - ref.mean.numpy()) / sd)
                sd_err = np.max(np.abs(res.sd.cpu().double().numpy() - ref.sd.numpy()) / sd)
                dll = res.loglik - ref.loglik
                print(
                    f"{prior:<21}{mode:>5}{str(dtype)[6:]:>8}{dll:>11.2e}{mean_err:>10.1e}"
                    f"{sd_err:>10.1e}{t_cpu:>8.3f}{t_dev:>8.3f}"
                )
                if (
                    dtype == torch.float64
                    and prior not in COVARIATE
                    and (abs(dll) > 1e-6 * abs(ref.loglik) or max(mean_err, sd_err) > 1e-4)
                ):
                    failed = True
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
