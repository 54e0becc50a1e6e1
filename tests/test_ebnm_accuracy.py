"""Accuracy of ``cebmf.ebnm`` against an independent reference (``tests/reference.py``:
scipy quadrature and closed forms; it never imports cebmf).

1. Posterior summaries under a given prior (``fix_g=True``) against quadrature, float64,
   on the grid x/s in {-50, ..., 50} x s in {1e-4, ..., 1e4}, for hand-set priors (point
   masses 0 / 0.3 / 0.9, slab scales far below and above s, mode != 0) and for priors
   fitted to simulated data. Tolerance rule (ref = reference value):

   * mean:    |cebmf - ref| <= 1e-6 * max(|ref|, min(sd_ref, s))   (relative 1e-6; near 0,
     absolute 1e-6 times the posterior sd, never more than 1e-6 * s)
   * mean2:   |cebmf - ref| <= 1e-6 * ref        (mean2 >= posterior variance > 0)
   * sd:      |cebmf - ref| <= 1e-6 * sd_ref
   * lfsr:    |cebmf - ref| <= 1e-6              (absolute)
   * log p(x_i) (``.loglik`` of a one-observation ``fix_g`` call): |cebmf - ref| <= 1e-6
     (i.e. the marginal density to relative 1e-6); the vectorised ``.loglik`` (the sum)
     to 1e-6 * n.

2. The fitted prior is the maximum-likelihood prior: ``.loglik`` is not beaten by more
   than 1e-6 * n by a brute-force maximiser of the independent log-likelihood (grid +
   Nelder-Mead + L-BFGS-B from many starts, boundaries pi0 = 0 / 1 included, for the
   parametric families; long EM on the same grid of scales for the mixtures), and equals
   the independent log-likelihood at ``res.g`` to relative 1e-8.

3. Recovery of a known prior from n = 10,000 simulated observations: parameters within 4
   standard errors (observed Fisher information of the independent log-likelihood at the
   truth; parametric bootstrap of an EM fit on the same grid for the mixtures), and
   posterior-mean RMSE below that of x and within 2 % of the oracle (true-prior) RMSE.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
from scipy import optimize, special

import cebmf

Z_GRID = np.array([-50.0, -20.0, -5.0, -1.0, -0.1, 0.0, 0.1, 1.0, 5.0, 20.0, 50.0])
S_GRID = np.array([1e-4, 1e-2, 1.0, 1e2, 1e4])

TOL_MEAN = 1e-6
TOL_MEAN2 = 1e-6
TOL_SD = 1e-6
TOL_LFSR = 1e-6
TOL_LOGP = 1e-6


def grid_points(mode: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """x = mode + z s over the (z, s) grid, as flat vectors (55 points)."""
    z, s = np.meshgrid(Z_GRID, S_GRID)
    z, s = z.ravel(), s.ravel()
    return mode + z * s, s


def family_options(g: dict) -> dict:
    return {"ratio": g["ratio"]} if g["family"] == "generalized_binary" else {}


def ebnm_fixed(g: dict, x, s):
    return cebmf.ebnm(x, s, g["family"], mode=g["mode"], g_init=g, fix_g=True, **family_options(g))


# ---------------------------------------------------------------------------------------
# Simulation of the "true" priors
# ---------------------------------------------------------------------------------------
TRUE_PRIORS = {
    "normal": {"family": "normal", "mode": 0.0, "scale": 2.0},
    "point_normal": {"family": "point_normal", "mode": 0.0, "pi0": 0.7, "scale": 2.0},
    "point_laplace": {"family": "point_laplace", "mode": 0.0, "pi0": 0.7, "scale": 2.0},
    "point_exponential": {"family": "point_exponential", "mode": 0.0, "pi0": 0.7, "scale": 2.0},
    "generalized_binary": {
        "family": "generalized_binary",
        "mode": 0.0,
        "pi0": 0.7,
        "mu": 3.0,
        "scale": 0.3,
        "ratio": 0.1,
    },
    "normal_scale_mixture": {
        "family": "normal_scale_mixture",
        "mode": 0.0,
        "pi": np.array([0.5, 0.3, 0.2]),
        "scale": np.array([0.0, 1.0, 4.0]),
    },
    "nonnegative_mixture": {
        "family": "nonnegative_mixture",
        "mode": 0.0,
        "pi": np.array([0.6, 0.25, 0.15]),
        "scale": np.array([0.0, 1.0, 5.0]),
    },
}


def sample_prior(g: dict, n: int, rng: np.random.Generator) -> np.ndarray:
    """n draws of theta from the prior g (independent of cebmf)."""
    fam = g["family"]
    mode = float(g.get("mode", 0.0))
    if fam == "normal":
        return mode + rng.normal(0.0, g["scale"], n)
    if fam in ref.MIXTURE_FAMILIES:
        k = rng.choice(len(g["pi"]), size=n, p=np.asarray(g["pi"]) / np.sum(g["pi"]))
        a = np.asarray(g["scale"])[k]
        if fam == "normal_scale_mixture":
            return mode + a * rng.standard_normal(n)
        return mode + a * rng.standard_exponential(n)
    b = float(g["scale"])
    if fam == "point_normal":
        slab = rng.normal(0.0, b, n)
    elif fam == "point_laplace":
        slab = rng.laplace(0.0, b, n)
    elif fam == "point_exponential":
        slab = rng.exponential(b, n)
    elif fam == "generalized_binary":
        mu, sig = float(g["mu"]), float(g["ratio"]) * float(g["mu"])
        # inverse-cdf sampling of N(mu, sig^2) truncated to [0, inf)
        lo = special.ndtr(-mu / sig)
        slab = mu + sig * special.ndtri(lo + (1.0 - lo) * rng.random(n))
    else:
        raise ValueError(fam)
    return mode + np.where(rng.random(n) < g["pi0"], 0.0, slab)


def simulate(family: str, n: int, seed: int, *, hetero: bool, mode: float = 0.0):
    rng = np.random.default_rng(seed)
    g = dict(TRUE_PRIORS[family], mode=mode)
    theta = sample_prior(g, n, rng)
    s = np.exp(rng.uniform(math.log(0.3), math.log(3.0), n)) if hetero else np.ones(n)
    return theta, theta + s * rng.standard_normal(n), s


# ---------------------------------------------------------------------------------------
# 0. The reference itself (so that a failure below points at cebmf, not the reference)
# ---------------------------------------------------------------------------------------
def test_reference_quadrature_matches_closed_forms():
    x, s = grid_points()
    for g in [
        {"family": "point_laplace", "mode": 0.0, "pi0": 0.3, "scale": 1.0},
        {"family": "point_exponential", "mode": -2.0, "pi0": 0.3, "scale": 1e-3},
        {
            "family": "generalized_binary",
            "mode": 0.0,
            "pi0": 0.3,
            "mu": 1e3,
            "scale": 1e2,
            "ratio": 0.1,
        },
        {
            "family": "nonnegative_mixture",
            "mode": 1.0,
            "pi": np.array([0.3, 0.7]),
            "scale": np.array([0.0, 2.0]),
        },
    ]:
        xm = x + g["mode"]
        quad = ref.posterior_quad_many(g, xm, s)["logp"]
        np.testing.assert_allclose(quad, ref.log_marginal(g, xm, s), rtol=1e-11, atol=1e-10)
    # normal prior: the posterior is N(q x, q s^2), q = a^2 / (a^2 + s^2)
    for a in (1e-3, 1.0, 1e3):
        g = {"family": "normal", "mode": 0.0, "scale": a}
        r = ref.posterior_quad_many(g, x, s)
        q = a * a / (a * a + s * s)
        assert np.all(np.abs(r["mean"] - q * x) <= 1e-12 * (np.abs(q * x) + np.sqrt(q) * s))
        np.testing.assert_allclose(r["sd"], np.sqrt(q) * s, rtol=1e-11)
        np.testing.assert_allclose(r["p_le"], special.ndtr(-np.sqrt(q) * x / s), atol=1e-13)


# ---------------------------------------------------------------------------------------
# 1. Posterior summaries under a given prior vs quadrature
# ---------------------------------------------------------------------------------------
def _hand_set_priors() -> list:
    cases = []
    for a in (1e-3, 1.0, 1e3):
        cases.append(
            pytest.param({"family": "normal", "mode": 0.0, "scale": a}, id=f"normal-{a:g}")
        )
    for fam in ("point_normal", "point_laplace", "point_exponential"):
        for pi0 in (0.0, 0.3, 0.9):
            for a in (1e-3, 1.0, 1e3):
                g = {"family": fam, "mode": 0.0, "pi0": pi0, "scale": a}
                cases.append(pytest.param(g, id=f"{fam}-pi0={pi0:g}-scale={a:g}"))
    for pi0 in (0.0, 0.3, 0.9):
        for mu in (1e-3, 1.0, 1e3):
            g = {
                "family": "generalized_binary",
                "mode": 0.0,
                "pi0": pi0,
                "mu": mu,
                "scale": 0.1 * mu,
                "ratio": 0.1,
            }
            cases.append(pytest.param(g, id=f"generalized_binary-pi0={pi0:g}-mu={mu:g}"))
    for ratio in (0.5, 2.0):
        g = {
            "family": "generalized_binary",
            "mode": 0.0,
            "pi0": 0.3,
            "mu": 1.0,
            "scale": ratio,
            "ratio": ratio,
        }
        cases.append(pytest.param(g, id=f"generalized_binary-ratio={ratio:g}"))
    for fam in ref.MIXTURE_FAMILIES:
        cases.append(
            pytest.param(
                {
                    "family": fam,
                    "mode": 0.0,
                    "pi": np.array([0.3, 0.2, 0.2, 0.3]),
                    "scale": np.array([0.0, 1e-3, 1.0, 1e3]),
                },
                id=f"{fam}-spike+3",
            )
        )
        cases.append(
            pytest.param(
                {
                    "family": fam,
                    "mode": 0.0,
                    "pi": np.array([0.0, 0.5, 0.5, 0.0, 0.0]),
                    "scale": np.array([0.0, 1e-2, 1.0, 1e2, 1e4]),
                },
                id=f"{fam}-zero-weights",
            )
        )
    # mode != 0: the prior is shifted, lfsr is still about the sign of theta
    shifted = [
        {"family": "normal", "mode": -1.0, "scale": 1.0},
        {"family": "point_normal", "mode": 1.5, "pi0": 0.3, "scale": 1.0},
        {"family": "point_laplace", "mode": 1.5, "pi0": 0.3, "scale": 1.0},
        {"family": "point_exponential", "mode": -2.0, "pi0": 0.3, "scale": 1.0},
        {
            "family": "generalized_binary",
            "mode": -2.0,
            "pi0": 0.3,
            "mu": 1.0,
            "scale": 0.5,
            "ratio": 0.5,
        },
        {
            "family": "normal_scale_mixture",
            "mode": 1.5,
            "pi": np.array([0.3, 0.2, 0.2, 0.3]),
            "scale": np.array([0.0, 1e-3, 1.0, 1e3]),
        },
        {
            "family": "nonnegative_mixture",
            "mode": -2.0,
            "pi": np.array([0.3, 0.2, 0.2, 0.3]),
            "scale": np.array([0.0, 1e-3, 1.0, 1e3]),
        },
    ]
    for g in shifted:
        cases.append(pytest.param(g, id=f"{g['family']}-mode={g['mode']:g}"))
    # a shift as small as the slab, far below s: the slab's posterior is truncated at
    # alpha ~ s / scale (up to 1e7) and the sign boundary lies only |mode| / s past it
    narrow = [
        {"family": "point_laplace", "mode": 1e-3, "pi0": 0.3, "scale": 1e-3},
        {"family": "point_exponential", "mode": -1e-3, "pi0": 0.3, "scale": 1e-3},
        {
            "family": "generalized_binary",
            "mode": -1e-3,
            "pi0": 0.3,
            "mu": 1e-3,
            "scale": 1e-3,
            "ratio": 1.0,
        },
    ]
    for g in narrow:
        cases.append(pytest.param(g, id=f"{g['family']}-narrow-mode={g['mode']:g}"))
    return cases


def _check_against_reference(g: dict) -> None:
    x, s = grid_points(g["mode"])
    r = ref.posterior_quad_many(g, x, s)
    res = ebnm_fixed(g, x, s)
    logp = np.array([ebnm_fixed(g, x[i : i + 1], s[i : i + 1]).loglik for i in range(x.size)])
    z = (x - g["mode"]) / s
    checks = {
        "mean": (
            res.mean,
            r["mean"],
            TOL_MEAN * np.maximum(np.abs(r["mean"]), np.minimum(r["sd"], s)),
        ),
        "mean2": (res.mean2, r["mean2"], TOL_MEAN2 * r["mean2"]),
        "sd": (res.sd, r["sd"], TOL_SD * r["sd"]),
        "lfsr": (res.lfsr, r["lfsr"], np.full(x.size, TOL_LFSR)),
        "logp": (logp, r["logp"], np.full(x.size, TOL_LOGP)),
    }
    failures = []
    for name, (got, want, tol) in checks.items():
        got = np.asarray(got, dtype=np.float64)
        assert got.shape == want.shape, name
        err = np.abs(got - want)
        bad = ~(err <= tol)
        for i in np.flatnonzero(bad)[:6]:
            failures.append(
                f"{name}: (x-mode)/s={z[i]:g}, s={s[i]:g}: cebmf={got[i]!r} ref={want[i]!r} "
                f"err={err[i]:.3g} tol={tol[i]:.3g}"
            )
        if bad.sum() > 6:
            failures.append(f"{name}: ... {int(bad.sum())} points out of tolerance in total")
    assert not failures, f"{g['family']} g={g}:\n" + "\n".join(failures)
    assert abs(res.loglik - r["logp"].sum()) <= TOL_LOGP * x.size, (res.loglik, r["logp"].sum())


@pytest.mark.parametrize("g", _hand_set_priors())
def test_posterior_matches_quadrature_hand_set_prior(g):
    _check_against_reference(g)


FIT_CASES = [
    ("normal", 0.0),
    ("point_normal", 0.0),
    ("point_laplace", 0.0),
    ("point_laplace", 1.0),
    ("point_exponential", 0.0),
    ("generalized_binary", 0.0),
    ("normal_scale_mixture", 0.0),
    ("normal_scale_mixture", -1.0),
    ("nonnegative_mixture", 0.0),
    ("nonnegative_mixture", -1.0),
]


@pytest.mark.parametrize(
    ("family", "mode"), FIT_CASES, ids=[f"{f}-mode={m:g}" for f, m in FIT_CASES]
)
def test_posterior_matches_quadrature_fitted_prior(family, mode):
    _, x, s = simulate(family, 2000, seed=11, hetero=True, mode=mode)
    g = cebmf.ebnm(x, s, family, mode=mode).g
    assert g["family"] == family and g["mode"] == mode
    _check_against_reference(g)


def test_flat_prior():
    x, s = grid_points()
    res = cebmf.ebnm(x, s, "flat")
    np.testing.assert_array_equal(res.mean, x)
    np.testing.assert_allclose(res.mean2, x * x + s * s, rtol=1e-15)
    np.testing.assert_allclose(res.sd, s, rtol=1e-15)
    np.testing.assert_allclose(res.lfsr, special.ndtr(-np.abs(x) / s), rtol=0, atol=TOL_LFSR)
    assert res.loglik == pytest.approx(-0.5 * x.size * math.log(2 * math.pi), rel=1e-14)


# ---------------------------------------------------------------------------------------
# 2. The fitted prior maximises the marginal likelihood
# ---------------------------------------------------------------------------------------
def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def brute_force_parametric(family: str, x, s, mode: float, ratio: float = 0.1):
    """max over (pi0, scale) of the independent log-likelihood: a grid, then Nelder-Mead
    and L-BFGS-B from the best grid points, with the boundaries pi0 = 0 and 1."""
    xp = x - mode
    has_spike = family != "normal"
    lo = math.log(1e-3 * s.min())
    hi = math.log(10.0 * (np.abs(xp).max() + s.max()))

    def ll(pi0: float, log_a: float) -> float:
        a = math.exp(min(max(log_a, lo - 5.0), hi + 5.0))
        if not has_spike:
            return float(ref.slab_log_marginal("normal", xp, s, a).sum())
        val = ref.spike_slab_log_marginal(family, xp, s, pi0, a, ratio).sum()
        return float(val) if np.isfinite(val) else -np.inf

    pi0s = np.concatenate([[0.0, 1e-4, 1e-3], np.linspace(0.01, 0.99, 50), [0.999, 1.0]])
    if not has_spike:
        pi0s = np.array([0.0])
    log_as = np.linspace(lo, hi, 80)
    spike = ref.log_norm_pdf(xp, s * s)
    table = np.empty((pi0s.size, log_as.size))
    for j, la in enumerate(log_as):
        slab = ref.slab_log_marginal(
            "normal" if not has_spike else family, xp, s, math.exp(la), ratio
        )
        for i, p in enumerate(pi0s):
            if p == 0.0:
                table[i, j] = slab.sum()
            elif p == 1.0:
                table[i, j] = spike.sum()
            else:
                table[i, j] = np.logaddexp(math.log(p) + spike, math.log1p(-p) + slab).sum()
    best = (float(table.max()), None)
    order = np.argsort(table, axis=None)[::-1]
    starts = [np.unravel_index(k, table.shape) for k in order[:3]]
    for i, j in starts:
        p0, la0 = float(pi0s[i]), float(log_as[j])
        if has_spike:
            p0 = min(max(p0, 1e-6), 1 - 1e-6)
            nm = optimize.minimize(
                lambda v: -ll(special.expit(v[0]), v[1]),
                [_logit(p0), la0],
                method="Nelder-Mead",
                options={"xatol": 1e-10, "fatol": 1e-12, "maxfev": 2000},
            )
            cand = [(-nm.fun, (float(special.expit(nm.x[0])), float(nm.x[1])))]
            lb = optimize.minimize(
                lambda v: -ll(v[0], v[1]),
                [p0, la0],
                method="L-BFGS-B",
                bounds=[(0.0, 1.0), (lo - 5.0, hi + 5.0)],
                options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 2000},
            )
            cand.append((-lb.fun, (float(lb.x[0]), float(lb.x[1]))))
        else:
            cand = []
        # pi0 = 0 boundary (and the normal family): one-dimensional search in log scale
        one = optimize.minimize_scalar(
            lambda la: -ll(0.0, la),
            bounds=(la0 - 2.0, la0 + 2.0),
            method="bounded",
            options={"xatol": 1e-12},
        )
        cand.append((-one.fun, (0.0, float(one.x))))
        for val, par in cand:
            if val > best[0]:
                best = (float(val), par)
    return best


BRUTE_CASES = [
    ("normal", "normal", 0.0),
    ("point_normal", "point_normal", 0.0),
    ("point_normal", "null", 0.0),
    ("point_normal", "point_normal", 1.0),
    ("point_laplace", "point_laplace", 0.0),
    ("point_laplace", "null", 0.0),
    ("point_exponential", "point_exponential", 0.0),
    ("point_exponential", "null", 0.0),
    ("point_exponential", "point_exponential", -1.0),
    ("generalized_binary", "generalized_binary", 0.0),
    ("generalized_binary", "point_exponential", 0.0),
]


@pytest.mark.parametrize(
    ("family", "data", "mode"),
    BRUTE_CASES,
    ids=[f"{f}-on-{d}-mode={m:g}" for f, d, m in BRUTE_CASES],
)
def test_parametric_fit_is_the_maximum(family, data, mode):
    n = 4000
    if data == "null":
        rng = np.random.default_rng(5)
        s = np.exp(rng.uniform(math.log(0.3), math.log(3.0), n))
        x = mode + s * rng.standard_normal(n)
    else:
        _, x, s = simulate(data, n, seed=21, hetero=True, mode=mode)
    res = cebmf.ebnm(x, s, family, mode=mode)
    g = res.g
    if family != "normal":
        assert 0.0 <= g["pi0"] <= 1.0
    indep = ref.loglik(g, x, s)
    assert res.loglik == pytest.approx(indep, rel=1e-8, abs=0.0)
    best, par = brute_force_parametric(family, x, s, mode, float(g.get("ratio", 0.1)))
    assert best - res.loglik <= 1e-6 * n, (
        f"brute force beats cebmf by {best - res.loglik:.3g} (> {1e-6 * n:g}): "
        f"cebmf g={g}, loglik={res.loglik!r}; brute force (pi0, log scale)={par}, {best!r}"
    )


MIX_CASES = [
    ("normal_scale_mixture", 0.0, True),
    ("normal_scale_mixture", 0.0, False),
    ("normal_scale_mixture", 0.5, True),
    ("nonnegative_mixture", 0.0, True),
    ("nonnegative_mixture", 0.0, False),
    ("nonnegative_mixture", -1.0, True),
]


@pytest.mark.parametrize(
    ("family", "mode", "hetero"),
    MIX_CASES,
    ids=[f"{f}-mode={m:g}-{'hetero' if h else 'homo'}" for f, m, h in MIX_CASES],
)
def test_mixture_fit_is_the_maximum(family, mode, hetero, monkeypatch):
    # small column chunks (about 12 here), so that the likelihood matrix and the posterior
    # are assembled across chunk boundaries
    import cebmf.priors._posterior as posterior

    monkeypatch.setitem(posterior.CHUNK_ENTRIES, "cpu", 1 << 14)
    n = 5000
    _, x, s = simulate(family, n, seed=31, hetero=hetero, mode=mode)
    res = cebmf.ebnm(x, s, family, mode=mode)
    g = res.g
    pi = np.asarray(g["pi"])
    assert pi.min() >= 0 and pi.sum() == pytest.approx(1.0, abs=1e-12)
    assert g["pi0"] == pytest.approx(pi[np.asarray(g["scale"]) == 0].sum(), abs=1e-15)
    indep = ref.loglik(g, x, s)
    assert res.loglik == pytest.approx(indep, rel=1e-8, abs=0.0)
    comp = ref.component_log_lik(family, g["scale"], x - mode, s)
    pi_em = ref.em_mixture_weights(comp, n_iter=5000)
    best = ref.mixture_loglik(comp, pi_em)
    assert best - res.loglik <= 1e-6 * n, (
        f"EM on the same grid beats cebmf by {best - res.loglik:.3g} (> {1e-6 * n:g})"
    )
    # concavity certificate: no weights on this grid gain more than this over cebmf's
    gap = ref.mixture_gap_bound(comp, pi)
    assert gap <= 1e-6 * n, f"duality-gap bound {gap:.3g} > {1e-6 * n:g}"


# ---------------------------------------------------------------------------------------
# 3. Recovery of a known prior
# ---------------------------------------------------------------------------------------
N_REC = 10_000


def _observed_info_se(f, theta: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Standard errors sqrt(diag(inv(-Hessian))) of the log-likelihood f at theta, by
    central finite differences."""
    k = theta.size
    h = np.zeros((k, k))
    for i in range(k):
        for j in range(k):
            ei = np.eye(k)[i] * steps[i]
            ej = np.eye(k)[j] * steps[j]
            h[i, j] = (
                f(theta + ei + ej) - f(theta + ei - ej) - f(theta - ei + ej) + f(theta - ei - ej)
            ) / (4.0 * steps[i] * steps[j])
    cov = np.linalg.inv(-h)
    assert np.all(np.diag(cov) > 0)
    return np.sqrt(np.diag(cov))


def _rmse(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


PARAMETRIC = ["normal", "point_normal", "point_laplace", "point_exponential", "generalized_binary"]


@pytest.mark.parametrize("family", PARAMETRIC)
def test_recovers_parametric_prior(family):
    truth = TRUE_PRIORS[family]
    theta, x, s = simulate(family, N_REC, seed=41, hetero=False)
    res = cebmf.ebnm(x, s, family)
    g = res.g
    key = "mu" if family == "generalized_binary" else "scale"
    ratio = float(truth.get("ratio", 0.1))
    if family == "normal":

        def f(v):
            return float(ref.slab_log_marginal("normal", x, s, math.exp(v[0])).sum())

        est = np.array([math.log(g["scale"])])
        true = np.array([math.log(truth["scale"])])
        names = ["log scale"]
    else:

        def f(v):
            return float(
                ref.spike_slab_log_marginal(family, x, s, v[0], math.exp(v[1]), ratio).sum()
            )

        est = np.array([g["pi0"], math.log(g[key])])
        true = np.array([truth["pi0"], math.log(truth[key])])
        names = ["pi0", f"log {key}"]
    se = _observed_info_se(f, true, np.full(true.size, 1e-3))
    z = (est - true) / se
    assert np.all(np.abs(z) <= 4.0), (
        f"{family}: estimates {dict(zip(names, est, strict=True))} vs truth "
        f"{dict(zip(names, true, strict=True))}, standard errors {se}, z-scores {z}"
    )
    # posterior means: better than x, and close to the oracle under the true prior
    rmse_fit = _rmse(res.mean, theta)
    rmse_x = _rmse(x, theta)
    rmse_oracle = _rmse(ref.posterior_mean_grid(truth, x, 1.0), theta)
    assert rmse_fit < rmse_x, (rmse_fit, rmse_x)
    assert rmse_fit <= 1.02 * rmse_oracle, (rmse_fit, rmse_oracle)


# Mass near zero, P(|theta| < c): the exponential grid starts at min(s) / 10, so c = 0.1
# is resolved; the normal-scale grid (KL rule, n = 10^4) has no sd between 0 and ~0.6 s,
# so mass below 0.1 is not identifiable there (an independent EM on that grid is biased
# by -0.15 for c = 0.1) and c = 1 (= s) is used instead.
NEAR_ZERO = {"normal_scale_mixture": 1.0, "nonnegative_mixture": 0.1}


def _mixture_functionals(family: str, pi, scale) -> tuple[float, float]:
    """(P(|theta| < c), E[theta^2]) of a mixture prior with mode 0, c = NEAR_ZERO."""
    pi = np.asarray(pi, dtype=np.float64)
    a = np.asarray(scale, dtype=np.float64)
    safe = np.where(a > 0, a, 1.0)
    c = NEAR_ZERO[family]
    if family == "normal_scale_mixture":
        near = np.where(a > 0, special.erf(c / (math.sqrt(2.0) * safe)), 1.0)
        m2 = a * a
    else:
        near = np.where(a > 0, -np.expm1(-c / safe), 1.0)
        m2 = 2.0 * a * a
    return float(pi @ near), float(pi @ m2)


@pytest.mark.parametrize("family", list(ref.MIXTURE_FAMILIES))
def test_recovers_mixture_prior(family):
    truth = TRUE_PRIORS[family]
    theta, x, s = simulate(family, N_REC, seed=51, hetero=False)
    res = cebmf.ebnm(x, s, family)
    scale = np.asarray(res.g["scale"])
    est = np.array(_mixture_functionals(family, res.g["pi"], scale))
    true = np.array(_mixture_functionals(family, truth["pi"], truth["scale"]))
    # parametric bootstrap of an independent fit (EM on the same grid) for the spread
    comp = ref.component_log_lik(family, scale, x, s)
    pi_hat = ref.em_mixture_weights(comp, n_iter=3000)
    rng = np.random.default_rng(52)
    boot = []
    for _ in range(20):
        xb = sample_prior(truth, N_REC, rng) + rng.standard_normal(N_REC)
        cb = ref.component_log_lik(family, scale, xb, s)
        boot.append(_mixture_functionals(family, ref.em_mixture_weights(cb, 1000, pi_hat), scale))
    sd = np.std(np.array(boot), axis=0, ddof=1)
    z = (est - true) / sd
    assert np.all(np.abs(z) <= 4.0), (
        f"{family}: (P(|theta|<{NEAR_ZERO[family]}), E theta^2) estimated {est}, true {true}, "
        f"bootstrap sd {sd}, z {z}"
    )
    rmse_fit = _rmse(res.mean, theta)
    rmse_x = _rmse(x, theta)
    rmse_oracle = _rmse(ref.posterior_mean_grid(truth, x, 1.0), theta)
    assert rmse_fit < rmse_x, (rmse_fit, rmse_x)
    assert rmse_fit <= 1.02 * rmse_oracle, (rmse_fit, rmse_oracle)


def test_normal_sign_probs_with_point_masses():
    """P(theta <= c), P(theta >= c) for N(mean, sd^2), sd = 0 meaning a point mass at the
    mean: the normal entries against scipy's normal cdf (both tails, far tails included),
    the point masses exactly, in one call mixing the two."""
    import torch

    from cebmf._math import normal_sign_probs

    mean = np.array([0.3, -2.0, 40.0, -40.0, 1.0, 0.5, -0.5, 0.5])
    sd = np.array([1.0, 0.5, 1.0, 1.0, 0.0, 0.0, 0.0, 2.0])
    c = 0.5
    p_le, p_ge = (t.numpy() for t in normal_sign_probs(torch.tensor(mean), torch.tensor(sd), c))
    normal = sd > 0
    z = (c - mean[normal]) / sd[normal]
    np.testing.assert_allclose(p_le[normal], special.ndtr(z), rtol=1e-12, atol=0)
    np.testing.assert_allclose(p_ge[normal], special.ndtr(-z), rtol=1e-12, atol=0)
    np.testing.assert_array_equal(p_le[~normal], [0.0, 1.0, 1.0])  # means 1.0, 0.5, -0.5
    np.testing.assert_array_equal(p_ge[~normal], [1.0, 1.0, 0.0])


@pytest.mark.parametrize("on_host", [True, False], ids=["subsets", "where"])
def test_truncnorm_sign_probs_against_mpmath(on_host, monkeypatch):
    """P(theta <= c), P(theta >= c) for N(mean, sd^2) truncated to [0, inf), against
    60-digit mpmath, relative to each probability's own size, where the truncation point
    lies far in either tail (alpha = -mean/sd up to 1e7) and the gap d = c/sd to the sign
    boundary is as small as 1e-12: log Phi differences of size alpha^2/2 cancel there.
    Both ways of computing the special cases: on their own entries (CPU) and on every
    entry selected by torch.where (accelerators, no host sync)."""
    import mpmath as mp
    import torch

    import cebmf._math
    from cebmf._math import truncnorm_sign_probs

    monkeypatch.setattr(cebmf._math, "subset_on_host", lambda device: on_host)

    mp.mp.dps = 60
    alpha = np.array([-1e4, -50.0, -20.0, -1.0, -1e-3, 0.0, 1e-3, 1.0, 5.0, 50.0, 1e4, 1e7])
    gap = np.array([1e-12, 1e-7, 1e-3, 0.3, 2.0])
    a, d = (v.ravel() for v in np.meshgrid(alpha, gap))
    c = 0.5
    sd = c / d
    mean = -a * sd
    p_le, p_ge = (
        t.numpy() for t in truncnorm_sign_probs(torch.tensor(mean), torch.tensor(sd), 0.0, c)
    )

    def upper(t):
        return mp.erfc(t / mp.sqrt(2)) / 2

    for i in range(a.size):
        lo, hi = -mp.mpf(mean[i]) / mp.mpf(sd[i]), (c - mp.mpf(mean[i])) / mp.mpf(sd[i])
        ge = upper(hi) / upper(lo)
        if lo >= 0:
            le = 1 - ge
        else:  # P(lo <= Z <= hi), from the tail on the side where both points lie
            le = (upper(-hi) - upper(-lo) if hi <= 0 else 1 - upper(hi) - upper(-lo)) / upper(lo)
        for got, want in ((p_le[i], float(le)), (p_ge[i], float(ge))):
            # exact zero below ~1e-217 (flushed, as everywhere in cebmf)
            tol = 1e-12 * want if want > 1e-200 else 1e-200
            assert abs(got - want) <= tol, (a[i], d[i], got, want)


@pytest.mark.parametrize(
    "prior, mode",
    [
        ("point_exponential", -0.2),
        ("point_exponential", 0.0),
        ("point_laplace", 0.3),
        ("generalized_binary", 0.0),
        ("nonnegative_mixture", -0.1),
    ],
)
def test_sync_free_special_cases_give_the_cpu_results(prior, mode, monkeypatch):
    """The special cases computed on every entry and selected by torch.where (the path
    taken on accelerators, without host syncs) give the CPU path's fit and posteriors,
    on data reaching every case (tails far beyond the continued-fraction threshold, gaps
    to the mode small and large)."""
    import cebmf._math

    rng = np.random.default_rng(17)
    n = 3000
    theta = np.where(rng.random(n) < 0.6, 0.0, rng.exponential(2.0, n))
    s = np.exp(rng.uniform(np.log(1e-3), np.log(30.0), n))
    x = theta + mode + s * rng.standard_normal(n)
    x[:40] = mode - 400.0 * s[:40]  # alpha far beyond 5 for the truncated normals
    fits = {}
    for on_host in (True, False):
        monkeypatch.setattr(cebmf._math, "subset_on_host", lambda device, v=on_host: v)
        fits[on_host] = cebmf.ebnm(x, s, prior, mode=mode)
    a, b = fits[True], fits[False]
    assert b.loglik == pytest.approx(a.loglik, rel=1e-12)
    for field in ("mean", "sd", "lfsr"):
        np.testing.assert_allclose(getattr(b, field), getattr(a, field), rtol=1e-9, atol=1e-300)


def _exponential_slab_log_marginals(family: str, g: dict, x: np.ndarray, s: np.ndarray):
    """log p(x_i) under g by 50-digit mpmath from the closed forms: exponential slab
    lambda e^{-lambda x + lambda^2 s^2 / 2} Phi(x / s - lambda s) (Laplace: half of it plus
    its mirror), mixed with the point mass at 0; a nonnegative mixture sums the
    exponential components (scale 0 = the point mass)."""
    import mpmath as mp

    mp.mp.dps = 50

    def expo(lam, xi, si):
        return lam * mp.exp(-lam * xi + (lam * si) ** 2 / 2) * mp.ncdf(xi / si - lam * si)

    out = []
    for xi, si in zip(x, s, strict=True):
        xi, si = mp.mpf(float(xi)), mp.mpf(float(si))
        spike = mp.npdf(xi, 0, si)
        if family == "nonnegative_mixture":
            dens = sum(
                mp.mpf(float(w)) * (spike if sc == 0 else expo(1 / mp.mpf(float(sc)), xi, si))
                for w, sc in zip(g["pi"], g["scale"], strict=True)
            )
        else:
            lam = 1 / mp.mpf(g["scale"])
            slab = expo(lam, xi, si)
            if family == "point_laplace":
                slab = (slab + expo(lam, -xi, si)) / 2
            dens = g["pi0"] * spike + (1 - g["pi0"]) * slab
        out.append(float(mp.log(dens)))
    return np.array(out)


@pytest.mark.parametrize("family", ["point_exponential", "point_laplace", "nonnegative_mixture"])
def test_exponential_slab_marginals_far_beyond_the_noise(family):
    """Log marginal likelihoods of exponential slabs under a fixed prior, for |x| / s from
    1e-3 to 1e8, against mpmath: float64 to 1e-9 nats per observation, float32 to 1e-5
    relative (its rounding). The kernel -z^2/2 + log M(z - lambda s) used to subtract two
    terms of size z^2/2: float32 was 0.03 nats off at z = 1e3 and returned 0 for -1 at
    z = 1e8, float64 about 0.5 nats off at z = 1e8."""
    import torch

    if family == "nonnegative_mixture":
        g = {"family": family, "mode": 0.0, "pi": [0.3, 0.5, 0.2], "scale": [0.0, 0.8, 3.0]}
    else:
        g = {"family": family, "mode": 0.0, "pi0": 0.3, "scale": 1.5}
    s = np.geomspace(1e-8, 1e3, 12)
    ratio = np.array([1e-3, 0.7, 3.0, 1e3, 1e8])
    ss, rr = (v.ravel() for v in np.meshgrid(s, ratio))
    keep = np.abs(rr * ss) < 1e6  # x itself within a sensible range
    x, s = (rr * ss)[keep], ss[keep]
    x = np.where(np.arange(x.size) % 3 == 0, -x, x)
    if family != "point_laplace":
        x = np.abs(x)
    x32, s32 = x.astype(np.float32), s.astype(np.float32)
    for xv, sv, dtype, tol in ((x, s, torch.float64, None), (x32, s32, torch.float32, 1e-5)):
        want = _exponential_slab_log_marginals(
            family, g, xv.astype(np.float64), sv.astype(np.float64)
        )
        got = np.array(
            [
                cebmf.ebnm(
                    torch.tensor([xi], dtype=dtype),
                    torch.tensor([si], dtype=dtype),
                    family,
                    g_init=g,
                    fix_g=True,
                ).loglik
                for xi, si in zip(xv, sv, strict=True)
            ]
        )
        bound = 1e-9 + 1e-12 * np.abs(want) if tol is None else tol * np.maximum(np.abs(want), 1.0)
        assert np.all(np.abs(got - want) <= bound), (dtype, np.max(np.abs(got - want) - bound))


# ---------------------------------------------------------------------------------------
# The normal prior: exact maximum-likelihood sigma
# ---------------------------------------------------------------------------------------
def _normal_loglik(tau: float, x: np.ndarray, s: np.ndarray) -> float:
    v = s * s + tau
    return float(-0.5 * np.sum(np.log(2 * np.pi * v) + x * x / v))


def _normal_mle_reference(x: np.ndarray, s: np.ndarray) -> float:
    """argmax over tau = sigma^2 >= 0 of the exact log-likelihood: every local maximum of
    a dense geometric grid of tau, refined by brentq on l'(tau) = 0 to the rounding level
    (tau = 0 when l'(0) <= 0 there), the best kept."""

    def slope(tau: float) -> float:
        v = s * s + tau
        return float(np.sum((x * x / v - 1.0) / v))

    hi = float(np.max(x * x - s * s))
    if hi <= 0:
        return 0.0
    grid = np.concatenate([[0.0], np.geomspace(1e-6 * np.min(s * s), hi, 3000)])
    vals = np.array([_normal_loglik(t, x, s) for t in grid])
    best, best_val = 0.0, vals[0]
    for j in range(grid.size):
        if vals[j] < vals[max(j - 1, 0)] or vals[j] < vals[min(j + 1, grid.size - 1)]:
            continue
        a, b = grid[max(j - 1, 0)], grid[min(j + 1, grid.size - 1)]
        if slope(a) > 0 > slope(b):
            t = optimize.brentq(slope, a, b, xtol=1e-300, rtol=4 * np.finfo(float).eps)
        else:
            t = grid[j]
        if _normal_loglik(t, x, s) > best_val:
            best, best_val = t, _normal_loglik(t, x, s)
    return best


def _point_normal_objective_mp(x, s, pi0, eta):
    """f(pi0, eta) = sum log(pi0 N(x; 0, s^2) + (1 - pi0) N(x; 0, s^2 + e^{2 eta})), its
    gradient and Hessian in (pi0, eta), per observation in 50-digit mpmath."""
    import mpmath as mp

    mp.mp.dps = 50
    s2, pi0 = mp.mpf(s) ** 2, mp.mpf(pi0)
    v = s2 + mp.e ** (2 * mp.mpf(eta))
    q = (v - s2) / v
    f = gp = gpp = ge = gpe = gee = mp.mpf(0)
    for xi in x:
        x2 = mp.mpf(float(xi)) ** 2
        n0 = mp.e ** (-x2 / (2 * s2)) / mp.sqrt(2 * mp.pi * s2)
        n1 = mp.e ** (-x2 / (2 * v)) / mp.sqrt(2 * mp.pi * v)
        p = pi0 * n0 + (1 - pi0) * n1
        r1 = (1 - pi0) * n1 / p
        d1 = q * (x2 / v - 1)  # d log N(x; 0, v) / d eta, and its derivative
        d2 = 2 * q * (x2 / v - 1 - 2 * q * x2 / v + q)
        f += mp.log(p)
        gp += (n0 - n1) / p
        gpp -= ((n0 - n1) / p) ** 2
        ge += r1 * d1
        gpe -= n0 * n1 * d1 / p**2
        gee += r1 * d2 + r1 * (1 - r1) * d1**2
    return (
        float(f),
        np.array([float(gp), float(ge)]),
        np.array([[float(gpp), float(gpe)], [float(gpe), float(gee)]]),
    )


@pytest.mark.parametrize(
    ("scale", "pi0"),
    [(3.0, 0.5), (3.0, 1e-9), (3.0, 1 - 1e-9), (1e-3, 0.5), (1e-3, 1 - 1e-6), (30.0, 0.99)],
)
def test_point_normal_objective_with_one_standard_error_against_mpmath(scale, pi0):
    """With one s for all observations (a fit's loadings under constant or column noise)
    the point-normal objective has a closed form in x^2 / s^2; its value, gradient and
    Hessian match 50-digit arithmetic, including next to the null (sigma << s, where the
    slab and the spike nearly coincide) and at pi0 near 0 and 1."""
    import torch

    from cebmf._math import log_normal_pdf
    from cebmf.priors import PointNormal
    from cebmf.priors._spike_slab import _Data

    rng = np.random.default_rng(3)
    s = 0.7
    x = np.where(rng.random(150) < 0.6, 0.0, rng.normal(0.0, 3.0, 150)) + s * rng.normal(size=150)
    xt, st = torch.tensor(x), torch.tensor([s], dtype=torch.float64)
    data = _Data(xt, st, log_normal_pdf(xt, st * st), x.size)
    eta = math.log(scale)
    f, g, h = PointNormal()._objective(data, pi0, eta, True)
    f_ref, g_ref, h_ref = _point_normal_objective_mp(x, s, pi0, eta)
    assert f == pytest.approx(f_ref, rel=1e-13, abs=1e-11)
    np.testing.assert_allclose(g, g_ref, rtol=1e-9, atol=1e-12 * np.abs(g_ref).max() + 1e-300)
    np.testing.assert_allclose(h, h_ref, rtol=1e-9, atol=1e-12 * np.abs(h_ref).max())
    assert PointNormal()._objective(data, pi0, eta, False)[0] == pytest.approx(f, rel=1e-14)


@pytest.mark.parametrize("mode", [0.0, 0.7, -1.3])
@pytest.mark.parametrize(
    ("s", "scale", "pi0"),
    [
        (1.0, 3.0, 0.5),
        (0.004, 2.7, 0.3),
        (0.004, 2.7, 1 - 1e-9),
        (200.0, 0.2, 0.9),
        (1.0, 3.0, 1e-9),
    ],
)
def test_point_normal_posterior_with_one_standard_error(mode, s, scale, pi0):
    """With one s, the posterior summaries and the log-likelihood come in closed form: they
    match the general mixture path (which the quadrature tests above check) and the
    log-likelihood matches 50-digit arithmetic, also where the slab is 700 times wider
    than s (the spike's and the slab's log marginals, about -x^2 / 2 s^2, are both huge
    there, and their difference must not be formed)."""
    import mpmath as mp
    import torch

    from cebmf._math import log_normal_pdf
    from cebmf.priors import PointNormal
    from cebmf.priors._spike_slab import SpikeSlabPrior, _Data

    rng = np.random.default_rng(4)
    n = 400
    x = np.where(rng.random(n) < 0.5, 0.0, rng.normal(0.0, scale, n)) + s * rng.normal(size=n)
    xt, st = torch.tensor(x), torch.tensor([s], dtype=torch.float64)
    prior, theta = PointNormal(mode=mode), (pi0, math.log(scale))

    def data():
        return _Data(xt, st, log_normal_pdf(xt, st * st), n)

    fast = prior._result(data(), theta)
    general = SpikeSlabPrior._result(prior, data(), theta)
    for name in ("mean", "mean2", "sd", "lfsr"):
        got, want = getattr(fast, name).numpy(), getattr(general, name).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13 * np.abs(want).max())
    assert fast.g == general.g and fast.state == general.state
    mp.mp.dps = 40
    v = mp.mpf(s) ** 2 + mp.mpf(scale) ** 2
    exact = mp.fsum(
        mp.log(pi0 * mp.npdf(xi, 0, s) + (1 - pi0) * mp.npdf(xi, 0, mp.sqrt(v))) for xi in x
    )
    assert fast.loglik == pytest.approx(float(exact), rel=1e-13, abs=1e-10)
    assert prior._objective(data(), pi0, theta[1], False)[0] == pytest.approx(
        fast.loglik, rel=1e-14
    )


@pytest.mark.parametrize("data", ["point_normal", "null"])
def test_point_normal_with_one_standard_error_is_the_maximum(data):
    """A scalar s takes the closed-form objective: the fit is still the brute-force
    maximum and matches the general path (the same s given once per observation)."""
    n = 4000
    rng = np.random.default_rng(8)
    if data == "null":
        x, s = 1.3 * rng.standard_normal(n), 1.3
    else:
        _, x, s_vec = simulate("point_normal", n, seed=22, hetero=False)
        s = float(s_vec[0])
    one = cebmf.ebnm(x, s, "point_normal")
    each = cebmf.ebnm(x, np.full(n, s), "point_normal")
    assert one.loglik == pytest.approx(ref.loglik(one.g, x, np.full(n, s)), rel=1e-10)
    assert one.loglik == pytest.approx(each.loglik, rel=1e-12, abs=1e-9)
    assert one.g["pi0"] == pytest.approx(each.g["pi0"], abs=1e-6)
    np.testing.assert_allclose(one.mean, each.mean, rtol=1e-6, atol=1e-9)
    best, par = brute_force_parametric("point_normal", x, np.full(n, s), 0.0, 0.1)
    assert best - one.loglik <= 1e-6 * n, (best, par, one.g)


def test_normal_prior_is_the_closed_form_with_one_standard_error():
    """One s for all: sigma^2 = mean(x^2) - s^2 exactly; posterior N(q x, q s^2)."""
    rng = np.random.default_rng(5)
    for x, s in [(np.array([4.0, 6.0]), 1.0), (rng.normal(0, 3, 1000), 0.7)]:
        res = cebmf.ebnm(x, s, "normal")
        tau = np.mean(x * x) - s * s
        assert res.g["scale"] == pytest.approx(math.sqrt(tau), rel=1e-14, abs=0)
        q = tau / (tau + s * s)
        np.testing.assert_allclose(res.mean, q * x, rtol=1e-13, atol=0)
        np.testing.assert_allclose(res.sd, math.sqrt(q) * s, rtol=1e-13, atol=0)
        assert res.loglik == pytest.approx(_normal_loglik(tau, x, np.full(x.size, s)), rel=1e-14)


@pytest.mark.parametrize("mode", [0.0, 0.3])
@pytest.mark.parametrize("hetero", [False, True])
def test_normal_prior_sigma_zero_is_a_point_mass_at_the_mode(mode, hetero):
    """Data less spread than their noise: the MLE is sigma = 0 (checked independently),
    the prior the point mass at the mode: mean = mode, sd = 0 exactly, loglik that of
    N(mode, s^2), lfsr 1 at mode 0 (P(theta <= 0) = P(theta >= 0) = 1) and 0 above."""
    rng = np.random.default_rng(6)
    s = rng.uniform(0.9, 1.1, 300) if hetero else np.ones(300)
    x = mode + rng.normal(0, 0.5, 300)
    assert _normal_mle_reference(x - mode, s) == 0.0
    res = cebmf.ebnm(x, s if hetero else 1.0, "normal", mode=mode)
    assert res.g["scale"] == 0.0
    np.testing.assert_array_equal(res.mean, np.full(x.size, mode))
    np.testing.assert_array_equal(res.sd, np.zeros(x.size))
    np.testing.assert_array_equal(res.lfsr, np.full(x.size, 1.0 if mode == 0 else 0.0))
    assert res.loglik == pytest.approx(_normal_loglik(0.0, x - mode, s), rel=1e-14)
    # the fitted g is a valid g_init (scale 0) and reproduces the fit
    again = cebmf.ebnm(x, s, "normal", mode=mode, g_init=res.g, fix_g=True)
    assert again.loglik == res.loglik


def test_normal_prior_with_varying_standard_errors_is_exact():
    """Varying s: sigma^2 to 1e-12 relative of an independent brentq root of l'(sigma^2),
    including profiles with two local maxima (a few wide observations pulling sigma^2 up,
    many precise ones near zero pulling it down, either side winning)."""
    rng = np.random.default_rng(7)
    s = rng.uniform(0.2, 3.0, 200)
    cases = [(rng.normal(size=200) * np.sqrt(4.0 + s * s), s)]
    wide = np.array([-10.0, 9.0, 11.0, -12.0, 8.5])
    for nb in (55, 60):
        precise = 0.03 * np.tile([1.0, -1.3, 0.8, -0.9, 1.2], 12)[:nb]
        cases.append((np.r_[wide, precise], np.r_[np.ones(5), np.full(nb, 0.01)]))
    for x, s in cases:
        tau_ref = _normal_mle_reference(x, s)
        res = cebmf.ebnm(x, s, "normal")
        assert res.g["scale"] ** 2 == pytest.approx(tau_ref, rel=1e-12)
        assert res.loglik >= _normal_loglik(tau_ref, x, s) - 1e-12 * x.size
