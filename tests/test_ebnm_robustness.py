"""EBNM solvers: extreme inputs, dtypes, devices, warm starts and the contract.

Reference values here come from independent computations (mpmath differentiation and
quadrature), never from the code under test.
"""

import math

import mpmath as mp
import numpy as np
import pytest
import torch

import cebmf
from cebmf.priors import available_priors, get_prior
from cebmf.priors.base import prior_options

FAMILIES = available_priors(covariates=False)
SPIKE_SLAB = ["normal", "point_normal", "point_laplace", "point_exponential", "generalized_binary"]
NONNEG = {"point_exponential", "nonnegative_mixture", "generalized_binary"}


def _sim(n, seed=0, nonneg=False):
    rng = np.random.default_rng(seed)
    theta = np.where(rng.random(n) < 0.7, 0.0, rng.normal(0, 3, n))
    if nonneg:
        theta = np.abs(theta)
    return theta, theta + rng.normal(size=n)


def _all_finite(res):
    return all(
        np.all(np.isfinite(np.asarray(getattr(res, f)))) for f in ("mean", "mean2", "sd", "lfsr")
    ) and math.isfinite(res.loglik)


@pytest.mark.parametrize("family", FAMILIES)
def test_extreme_ratios_and_scales_stay_finite(family):
    # |x|/s up to 1e3 with s from 1e-8 to 1e8, all in one vector
    s = np.geomspace(1e-8, 1e8, 17)
    z = np.array([-1e3, -50.0, -1.0, 0.0, 1.0, 50.0, 1e3])
    x = (z[:, None] * s[None, :]).ravel()
    ss = np.tile(s, z.size)
    res = cebmf.ebnm(x, ss, family)
    assert _all_finite(res)
    assert np.all(res.mean2 >= res.mean**2 * (1 - 1e-12))
    assert np.all((res.lfsr >= 0) & (res.lfsr <= 1))
    assert np.all(res.sd >= 0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("x", [np.zeros(50), np.zeros(1), np.array([3.0]), np.array([-1e3])])
def test_degenerate_inputs(family, x):
    res = cebmf.ebnm(x, 1.0, family)
    assert _all_finite(res)
    if family != "flat" and np.all(x == 0):
        # all-zero data: every shrinkage family puts its mass at (or next to) zero
        assert np.all(np.abs(res.mean) < 1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_all_zero_data_choose_the_null(family):
    res = cebmf.ebnm(np.zeros(200), 1.0, family)
    if "pi0" in res.g and family != "flat":
        assert res.g["pi0"] > 0.99
    # the exact marginal of all-zero data under the null is n log N(0; 0, 1)
    null = 200 * (-0.5 * math.log(2 * math.pi))
    if family in ("normal", "flat"):
        return
    assert res.loglik >= null - 1e-6


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "flat"])
def test_float32_matches_float64(family):
    _, x = _sim(3000, seed=3, nonneg=family in NONNEG)
    s = np.random.default_rng(4).uniform(0.5, 2.0, x.size)
    r64 = cebmf.ebnm(x, s, family)
    r32 = cebmf.ebnm(x.astype(np.float32), s.astype(np.float32), family)
    assert r32.mean.dtype == np.float32
    scale = np.abs(r64.mean).max()
    np.testing.assert_allclose(r32.mean, r64.mean, rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_allclose(r32.sd, r64.sd, rtol=1e-4, atol=1e-4 * r64.sd.max())
    assert abs(r32.loglik - r64.loglik) <= 1e-4 * abs(r64.loglik)


@pytest.mark.parametrize("family", FAMILIES)
def test_return_type_follows_input(family):
    _, x = _sim(100, nonneg=family in NONNEG)
    r_np = cebmf.ebnm(x, 1.0, family)
    assert isinstance(r_np.mean, np.ndarray) and r_np.mean.dtype == np.float64
    xt = torch.tensor(x, dtype=torch.float32)
    r_t = cebmf.ebnm(xt, torch.tensor(1.0), family)
    assert isinstance(r_t.mean, torch.Tensor) and r_t.mean.dtype == torch.float32
    assert r_t.mean.shape == (100,)
    np.testing.assert_allclose(r_t.mean.numpy(), r_np.mean, rtol=1e-4, atol=1e-4)
    # lists and integer arrays are accepted as float64
    r_int = cebmf.ebnm(np.round(x).astype(np.int64).tolist(), 1, family)
    assert r_int.mean.dtype == np.float64


def test_inputs_are_not_modified():
    _, x = _sim(500)
    s = np.full(500, 1.0)
    x0, s0 = x.copy(), s.copy()
    for fam in FAMILIES:
        cebmf.ebnm(x, s, fam, mode=0.0)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(s, s0)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "flat"])
def test_warm_start_never_lowers_loglik(family):
    # a fit warm-started from another data set's state is at least as good as the
    # earlier prior evaluated on the new data (the engine's ELBO relies on this)
    prior = get_prior(family)
    _, x1 = _sim(2000, seed=10, nonneg=family in NONNEG)
    _, x2 = _sim(2000, seed=11, nonneg=family in NONNEG)
    x2 = 1.3 * x2
    s = torch.ones(1, dtype=torch.float64)
    t1, t2 = torch.tensor(x1), torch.tensor(x2)
    first = prior.fit(t1, s)
    at_old = prior.fit(t2, s, g_init=first.g, fix_g=True).loglik
    warm = prior.fit(t2, s, state=first.state)
    assert warm.loglik >= at_old - 1e-9 * abs(at_old)
    # and warm-starting from a converged state on the same data changes nothing material
    again = prior.fit(t2, s, state=warm.state)
    assert again.loglik >= warm.loglik - 1e-9 * abs(warm.loglik)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "flat"])
def test_fix_g_reproduces_the_fit(family):
    _, x = _sim(1000, seed=5, nonneg=family in NONNEG)
    res = cebmf.ebnm(x, 1.0, family)
    again = cebmf.ebnm(x, 1.0, family, g_init=res.g, fix_g=True)
    np.testing.assert_allclose(again.mean, res.mean, rtol=1e-12, atol=1e-12)
    assert again.loglik == pytest.approx(res.loglik, rel=1e-12)
    assert again.g["family"] == family


@pytest.mark.parametrize("family", ["point_normal", "point_laplace", "normal_scale_mixture"])
def test_mode_shifts_the_problem(family):
    _, x = _sim(1500, seed=6)
    res0 = cebmf.ebnm(x, 1.0, family)
    res5 = cebmf.ebnm(x + 5.0, 1.0, family, mode=5.0)
    np.testing.assert_allclose(res5.mean, res0.mean + 5.0, rtol=1e-6, atol=1e-6)
    assert res5.loglik == pytest.approx(res0.loglik, rel=1e-9)
    assert res5.g["mode"] == 5.0
    # posterior mass now sits near 5, so almost no sign uncertainty for most observations
    assert np.median(res5.lfsr) < np.median(res0.lfsr)


@pytest.mark.parametrize("family", SPIKE_SLAB)
def test_slab_derivatives_match_high_precision_differentiation(family):
    prior = get_prior(family)
    xs = [-56.0, -3.0, -0.2, 0.0, 0.7, 4.0, 60.0]
    ss = [0.07, 1.0, 2.5]
    x = torch.tensor([a for a in xs for _ in ss], dtype=torch.float64)
    s = torch.tensor([b for _ in xs for b in ss], dtype=torch.float64)
    mp.mp.dps = 40
    for eta in (-1.5, 0.0, 1.2):
        l1, d1, d2 = prior._slab_derivs(x, s, torch.tensor(eta, dtype=torch.float64))
        for i in range(x.numel()):
            f = _mp_slab(family, float(x[i]), float(s[i]), prior)
            ref0 = f(eta)
            ref1 = mp.diff(f, eta)
            ref2 = mp.diff(f, eta, 2)
            assert float(l1[i]) == pytest.approx(float(ref0), rel=1e-10, abs=1e-10)
            assert float(d1[i]) == pytest.approx(float(ref1), rel=1e-7, abs=1e-8)
            assert float(d2[i]) == pytest.approx(float(ref2), rel=1e-6, abs=1e-7)


def _mp_slab(family, x, s, prior):
    """log int N(x; theta, s^2) slab(theta; eta) dtheta in mpmath, closed forms."""
    x, s = mp.mpf(x), mp.mpf(s)

    def npdf(v, var):
        return mp.exp(-v * v / (2 * var)) / mp.sqrt(2 * mp.pi * var)

    def f(eta):
        eta = mp.mpf(eta)
        if family in ("normal", "point_normal"):
            return mp.log(npdf(x, s * s + mp.e ** (2 * eta)))
        lam = mp.e ** (-eta)
        if family == "point_exponential":
            return mp.log(lam * mp.e ** (-lam * x + lam**2 * s**2 / 2) * mp.ncdf(x / s - lam * s))
        if family == "point_laplace":
            pos = mp.e ** (-lam * x + lam**2 * s**2 / 2) * mp.ncdf(x / s - lam * s)
            neg = mp.e ** (lam * x + lam**2 * s**2 / 2) * mp.ncdf(-x / s - lam * s)
            return mp.log(lam / 2 * (pos + neg))
        r = mp.mpf(prior.ratio)
        mu = mp.e**eta
        sig2 = (r * mu) ** 2
        tot = sig2 + s * s
        m = (x * sig2 + mu * s * s) / tot
        v = sig2 * s * s / tot
        return mp.log(npdf(x - mu, tot) * mp.ncdf(m / mp.sqrt(v)) / mp.ncdf(1 / r))

    return f


# ---- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "s", "match"),
    [
        (np.array([1.0, np.nan]), 1.0, r"x contains 1 non-finite"),
        (np.array([1.0, np.inf]), 1.0, r"x contains 1 non-finite"),
        (np.array([1.0, 2.0]), np.array([1.0, np.nan]), r"s contains 1 non-finite"),
        (np.array([1.0, 2.0]), np.array([1.0, 0.0]), r"s must be strictly positive"),
        (np.array([1.0, 2.0]), -1.0, r"s must be strictly positive"),
        (np.array([1.0, 2.0]), np.ones(3), r"s has length 3 but x has length 2"),
        (np.ones((2, 2)), 1.0, r"x must be 1-dimensional"),
        (np.array([]), 1.0, r"x is empty"),
        (np.array(["a", "b"]), 1.0, r"x must be numeric"),
        # a masked entry used to be read as data (its hidden value)
        (np.ma.masked_array([1.0, 9.0], [False, True]), 1.0, r"x is a masked array with 1 m"),
        (np.ones(2), np.ma.masked_array([1.0, 1.0], [True, True]), r"s is a masked array wi"),
    ],
)
def test_bad_inputs_name_the_argument(x, s, match):
    with pytest.raises((ValueError, TypeError), match=match):
        cebmf.ebnm(x, s, "point_normal")


def test_masked_arrays_without_masked_entries_are_plain_data():
    x = np.array([0.5, -2.0, 4.0])
    a = cebmf.ebnm(np.ma.masked_array(x, mask=False), np.ma.masked_array(np.ones(3)))
    b = cebmf.ebnm(x, 1.0)
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-12)
    assert a.loglik == pytest.approx(b.loglik, rel=1e-12)


def test_unknown_prior_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown prior 'pointnormal'.*point_normal.*ash"):
        cebmf.ebnm(np.ones(3), 1.0, "pointnormal")


def test_g_init_of_the_wrong_family():
    res = cebmf.ebnm(np.arange(10.0), 1.0, "point_laplace")
    with pytest.raises(
        ValueError,
        match=r"g_init is a 'point_laplace' prior but the prior family is 'point_normal'",
    ):
        cebmf.ebnm(np.arange(10.0), 1.0, "point_normal", g_init=res.g)
    with pytest.raises(TypeError, match=r"g_init must be the `g` dict"):
        cebmf.ebnm(np.arange(10.0), 1.0, "point_normal", g_init={"pi0": 0.5})
    with pytest.raises(ValueError, match=r"fix_g=True needs g_init"):
        cebmf.ebnm(np.arange(10.0), 1.0, "point_normal", fix_g=True)
    with pytest.raises(ValueError, match=r"g_init\['pi0'\] must be in \[0, 1\]"):
        cebmf.ebnm(
            np.arange(10.0),
            1.0,
            "point_normal",
            g_init={"family": "point_normal", "pi0": 1.5, "scale": 1.0},
            fix_g=True,
        )


def test_covariates_are_refused_by_plain_priors():
    prior = get_prior("point_normal")
    x = torch.zeros(5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"prior 'point_normal' does not use covariates"):
        prior.fit(x, torch.ones(1, dtype=torch.float64), covariates=torch.zeros(5, 2))


@pytest.mark.parametrize("presolve", [True, False])
def test_mixsqp_reaches_the_kkt_point_on_many_observations(presolve, monkeypatch):
    """mix-SQP on 250,000 observations (a cold start pre-solves a subsample unless
    disabled): the returned weights satisfy the optimality conditions of
    max_{pi in simplex} sum_i log (A^T pi)_i, checked here with numpy — the gradient
    (1/n) A (1 / A^T pi) is <= 1 (+tol) everywhere and = 1 on the support — and match
    a long EM run's log-likelihood."""
    import cebmf.priors._mixsqp as ms

    if not presolve:
        monkeypatch.setattr(ms, "_PRESOLVE_N", 10**9)
    rng = np.random.default_rng(5)
    n = 250_000
    scales = np.array([0.0, 0.3, 0.7, 1.5, 3.0, 6.0])
    theta = np.where(rng.random(n) < 0.6, 0.0, rng.normal(0, 2.0, n))
    x = theta + rng.normal(size=n)
    sd = np.sqrt(1.0 + scales[:, None] ** 2)
    lik = np.exp(-0.5 * (x / sd) ** 2) / sd
    pi = ms.mixsqp(torch.tensor(lik), None, tol=1e-8).numpy()
    assert pi.min() >= 0 and pi.sum() == pytest.approx(1.0, abs=1e-12)
    grad = lik @ (1.0 / (pi @ lik)) / n
    assert grad.max() <= 1.0 + 1e-7
    support = pi > 1e-6
    np.testing.assert_allclose(grad[support], 1.0, atol=1e-5)
    em = np.full(scales.size, 1.0 / scales.size)
    for _ in range(300):
        em = em * (lik @ (1.0 / (em @ lik))) / n
    ll = np.log(pi @ lik).sum()
    assert ll >= np.log(em @ lik).sum() - 1e-6 * n


@pytest.mark.parametrize("family", ["normal_scale_mixture", "nonnegative_mixture"])
def test_mixture_posterior_when_the_fitted_weights_drop_the_only_plausible_component(
    family, monkeypatch
):
    """The posterior reuses the likelihood matrix built for mix-SQP, whose entries below
    e^-500 of their column's maximum are flushed to 0. If the weights drop the component
    that dominates an observation (here forced: x = 1000 is plausible only under scale
    2000, whose weight is set to 0), all its kept entries are flushed; that observation
    must still get the exact posterior of the fitted g (closed form and quadrature)."""
    from reference import log_marginal, posterior_quad_many

    import cebmf.priors._mixture as mixture

    forced = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    monkeypatch.setattr(mixture, "mixsqp", lambda lik, warm, tol: forced.to(lik.device))
    rng = np.random.default_rng(3)
    x = np.concatenate([np.abs(rng.normal(size=5000)), [1000.0, 2.5]])
    s = np.ones_like(x)
    res = cebmf.ebnm(x, s, prior=get_prior(family, scale=[0.0, 0.5, 1.0, 2000.0]))
    np.testing.assert_array_equal(res.g["pi"], forced.numpy())
    assert _all_finite(res)
    assert res.loglik == pytest.approx(np.sum(log_marginal(res.g, x, s)), rel=1e-12)
    ref = posterior_quad_many(res.g, x[-2:], s[-2:])
    for key in ("mean", "sd", "lfsr"):
        np.testing.assert_allclose(np.asarray(getattr(res, key))[-2:], ref[key], rtol=1e-7)


def test_mixsqp_recovers_from_a_warm_start_that_rules_out_an_observation():
    """A warm start with all its weight on the point mass gives x = 40 (s = 1) zero
    likelihood (e^-800, flushed); mix-SQP must still reach the optimum, checked by its
    optimality conditions in numpy and against EM."""
    import cebmf.priors._mixsqp as ms

    rng = np.random.default_rng(8)
    x = np.concatenate([rng.normal(size=3000), [40.0]])
    scales = np.array([0.0, 1.0, 5.0, 50.0])
    sd = np.sqrt(1.0 + scales[:, None] ** 2)
    log_lik = -0.5 * (x / sd) ** 2 - np.log(sd)
    lik = np.exp(log_lik - log_lik.max(0))
    lik[log_lik - log_lik.max(0) < -500] = 0.0
    assert lik[0, -1] == 0.0
    warm = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    pi = ms.mixsqp(torch.tensor(lik), warm, tol=1e-10).numpy()
    n = x.size
    grad = lik @ (1.0 / (pi @ lik)) / n
    assert grad.max() <= 1.0 + 1e-8
    np.testing.assert_allclose(grad[pi > 1e-6], 1.0, atol=1e-6)
    em = np.full(scales.size, 0.25)
    for _ in range(3000):
        em = em * (lik @ (1.0 / (em @ lik))) / n
    assert np.log(pi @ lik).sum() >= np.log(em @ lik).sum() - 1e-8 * n


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("dtype", "c"),
    [
        (torch.float64, 1e-100),
        (torch.float64, 1e100),
        (torch.float32, 1e-12),
        (torch.float32, 1e12),
    ],
)
def test_common_rescaling_is_exact_up_to_the_representable_range(family, dtype, c):
    """x_i ~ N(theta_i, s_i^2) is equivariant under (x, s, theta) -> (c x, c s, c theta):
    the posterior means and sds multiply by c, the lfsr is unchanged and the
    log-likelihood moves by exactly -n log c (the density's Jacobian; the improper flat
    prior's log-likelihood is a constant by convention). Checked near the edges of the
    range ebnm accepts (|x| up to 1e3 c here), up to the solvers' optimisation tolerance
    (the likelihood is flat near its optimum, so g may move by ~1e-4 within it)."""
    rng = np.random.default_rng(11)
    n = 400
    theta = np.where(rng.random(n) < 0.7, 0.0, rng.normal(0, 3, n))
    if family in NONNEG:
        theta = np.abs(theta)
    s = rng.uniform(0.5, 2.0, n)
    x = theta + s * rng.normal(size=n)
    x[:2] = [1e3, -1e3] if family not in NONNEG else [1e3, 0.0]
    unit = cebmf.ebnm(torch.tensor(x, dtype=dtype), torch.tensor(s, dtype=dtype), family)
    big = cebmf.ebnm(torch.tensor(c * x, dtype=dtype), torch.tensor(c * s, dtype=dtype), family)
    f64 = dtype == torch.float64
    shift = 0.0 if family == "flat" else -n * math.log(c)
    # float32 terms carry ~1e-7 relative error each, of size |log c| here
    tol = 1e-6 * n if f64 else 1e-3 * n + 1e-5 * abs(shift)
    assert abs(big.loglik - (unit.loglik + shift)) <= tol
    for key in ("mean", "sd"):
        np.testing.assert_allclose(
            getattr(big, key).double().numpy() / c,
            getattr(unit, key).double().numpy(),
            rtol=1e-3,
            atol=1e-3 * float(unit.sd.max()),
        )
    np.testing.assert_allclose(big.lfsr.double().numpy(), unit.lfsr.double().numpy(), atol=1e-3)


@pytest.mark.parametrize(
    ("x", "s", "dtype", "match"),
    [
        (1e140, 1.0, torch.float64, r"x's largest absolute value is 1e\+140"),
        (1.0, 1e140, torch.float64, r"s's largest value is 1e\+140"),
        (1.0, 1e-140, torch.float64, r"s's smallest value is 1e-140"),
        (1e18, 1.0, torch.float32, r"x's largest .* or compute in float64"),
        (1.0, 1e-20, torch.float32, r"s's smallest value .* or compute in float64"),
    ],
)
def test_ebnm_refuses_magnitudes_its_arithmetic_cannot_hold(x, s, dtype, match):
    xs = torch.tensor([x, 0.5 * x, 0.0], dtype=dtype)
    with pytest.raises(ValueError, match=match) as err:
        cebmf.ebnm(xs, torch.full((3,), s, dtype=dtype), "point_normal")
    assert "rescale x and s together" in str(err.value)


def test_prior_instance_uses_its_own_mode():
    """A Prior instance with mode 2 needs no mode= (the default means "the instance's");
    the fit is the point-normal MLE around 2: its loglik is the independent closed form
    at the returned g, and a name with mode=2.0 gives the same fit."""
    x = np.array([2.5, 1.0, 4.0, 2.0, 7.0, 2.2])
    prior = get_prior("point_normal", mode=2.0)
    res = cebmf.ebnm(x, 1.0, prior)
    g = res.g
    assert g["mode"] == 2.0
    d = x - 2.0
    v = 1.0 + g["scale"] ** 2
    dens = g["pi0"] * np.exp(-0.5 * d * d) / math.sqrt(2 * math.pi) + (1 - g["pi0"]) * np.exp(
        -0.5 * d * d / v
    ) / math.sqrt(2 * math.pi * v)
    assert res.loglik == pytest.approx(float(np.sum(np.log(dens))), rel=1e-13)
    by_name = cebmf.ebnm(x, 1.0, "point_normal", mode=2.0)
    assert by_name.loglik == pytest.approx(res.loglik, rel=1e-13)
    assert cebmf.ebnm(x, 1.0, prior, mode=2.0).loglik == res.loglik  # the same mode: fine
    with pytest.raises(ValueError, match=r"mode=0.0 was given but the prior instance has mode"):
        cebmf.ebnm(x, 1.0, prior, mode=0.0)
    # a name without mode= is centred at 0
    assert cebmf.ebnm(x, 1.0, "point_normal").g["mode"] == 0.0


_PN = {"family": "point_normal", "mode": 0.0}
_ASH = {"family": "normal_scale_mixture", "mode": 0.0}


@pytest.mark.parametrize(
    ("prior", "kwargs", "match"),
    [
        ("point_normal", {"mode": "estimate"}, r"mode='estimate' .*estimating the mode is not"),
        ("point_normal", {"mode": [1.0]}, r"mode must be a finite number, got list"),
        ("point_normal", {"mode": True}, r"mode must be a finite number, got True"),
        ("point_normal", {"mode": math.nan}, r"mode must be a finite number, got nan"),
        ("point_normal", {"g_init": {**_PN, "pi0": 0.5}}, r"g_init lacks the key\(s\) \['scale'\]"),
        (
            "point_normal",
            {"g_init": {**_PN, "scale": 1.0}, "fix_g": True},
            r"g_init lacks the key\(s\) \['pi0'\]",
        ),
        ("normal", {"g_init": {"family": "normal"}}, r"g_init lacks the key\(s\) \['scale'\]"),
        (
            "point_laplace",
            {"g_init": {"family": "point_laplace", "scale": 1.0}},
            r"g_init lacks the key\(s\) \['pi0'\]",
        ),
        (
            "generalized_binary",
            {"g_init": {"family": "generalized_binary", "pi0": 0.5, "scale": 0.1}},
            r"g_init lacks the key\(s\) \['mu'\]",
        ),
        (
            "ash",
            {"g_init": {**_ASH, "scale": [0.0, 1.0, 2.0]}, "fix_g": True},
            r"g_init lacks the key\(s\) \['pi'\]",
        ),
        (
            "ash",
            {"g_init": {**_ASH, "pi": [np.inf, 0.5, 0.5], "scale": [0, 1, 2]}, "fix_g": True},
            r"g_init\['pi'\] must be finite",
        ),
        (
            "ash",
            {"g_init": {**_ASH, "pi": [np.nan, 0.5, 0.5], "scale": [0, 1, 2]}},
            r"g_init\['pi'\] must be finite",
        ),
        (
            "ash",
            {"g_init": {**_ASH, "pi": [-0.5, 1.0, 0.5], "scale": [0, 1, 2]}, "fix_g": True},
            r"g_init\['pi'\] must be >= 0",
        ),
        (
            "ash",
            {"g_init": {**_ASH, "pi": [0.0, 0.0], "scale": [0, 1]}, "fix_g": True},
            r"g_init\['pi'\] must have a positive sum",
        ),
        (
            "nonnegative_mixture",
            {
                "g_init": {"family": "nonnegative_mixture", "pi": [0.5, 0.5], "scale": [0, 1, 2]},
                "fix_g": True,
            },
            r"g_init\['pi'\] has 2 weight\(s\) but g_init\['scale'\] has 3",
        ),
        (
            "point_normal",
            {"g_init": {**_PN, "pi0": "a", "scale": 1.0}},
            r"g_init\['pi0'\] must be real",
        ),
        ("point_normal", {"g_init": {**_PN, "pi0": math.nan, "scale": 1.0}}, r"g_init\['pi0'\]"),
        ("point_normal", {"g_init": {**_PN, "pi0": 0.5, "scale": -1.0}}, r"g_init\['scale'\]"),
        ("point_normal", {"state": {"pi0_eta": (2.0, 0.0)}}, r"state\['pi0_eta'\] must be"),
    ],
)
def test_bad_g_init_mode_and_state_name_the_argument(prior, kwargs, match):
    """Each refused before any computation with an error naming the argument (and key)."""
    with pytest.raises((ValueError, TypeError), match=match):
        cebmf.ebnm(np.array([1.0, -2.0, 0.5]), 1.0, prior, **kwargs)


def test_mode_none_means_the_default_and_prior_refuses_it():
    x = np.array([1.0, -2.0, 0.5])
    assert cebmf.ebnm(x, 1.0, "point_normal", mode=None).g["mode"] == 0.0
    with pytest.raises(TypeError, match=r"mode must be a finite number, got None"):
        get_prior("point_normal", mode=None)


def test_state_of_another_family_is_refused_and_own_state_warm_starts():
    """A state names its family; another family's state (or a non-dict) is refused with
    an error naming ``state``, while the family's own state reaches the same optimum."""
    rng = np.random.default_rng(3)
    x = np.where(rng.random(400) < 0.7, 0.0, rng.normal(0, 3, 400)) + rng.normal(size=400)
    ash = cebmf.ebnm(x, 1.0, "ash")
    pn = cebmf.ebnm(x, 1.0, "point_normal")
    assert ash.state["family"] == "normal_scale_mixture"
    assert pn.state["family"] == "point_normal"
    with pytest.raises(ValueError, match=r"state comes from a fit of the 'normal_scale_mixture'"):
        cebmf.ebnm(x, 1.0, "point_normal", state=ash.state)
    with pytest.raises(TypeError, match=r"state must be the `state` dict"):
        cebmf.ebnm(x, 1.0, "point_normal", state=[0.3, 1.0])
    warm = cebmf.ebnm(x, 1.0, "point_normal", state=pn.state)
    assert warm.loglik == pytest.approx(pn.loglik, abs=1e-6)
    assert warm.g["pi0"] == pytest.approx(pn.g["pi0"], abs=1e-5)


@pytest.mark.parametrize(
    "prior, typo, listed",
    [
        ("ash", "gridmult", "grid_mult"),
        ("emdn", "n_component", "n_components"),
        ("emdn", "hiden", "weight_decay"),
        ("point_normal", "maxiter", "max_iter"),
    ],
)
def test_unknown_prior_option_names_the_prior_and_its_options(prior, typo, listed):
    """A misspelt option is refused naming the family and listing its real options (those
    a family passes on to its parent's constructor included)."""
    with pytest.raises(
        TypeError, match=rf"has no option\(s\) \['{typo}'\]; its options .*{listed}"
    ):
        cebmf.ebnm(np.array([1.0, -2.0, 0.5]), 1.0, prior, **{typo: 1})


@pytest.mark.parametrize(
    "prior, options, match",
    [
        ("point_normal", {"max_iter": 0}, "max_iter must be an integer >= 1, got 0"),
        ("generalized_binary", {"max_iter": 2.5}, "max_iter must be an integer >= 1, got 2.5"),
        ("ash", {"tol": float("nan")}, "tol must be a finite number > 0, got nan"),
        ("ash", {"grid_mult": float("inf")}, "grid_mult must be a finite number > 0, got inf"),
        ("ash", {"grid_mult": 1.0}, "grid_mult must be > 1, got 1.0"),
        ("nonnegative_mixture", {"max_k": 2}, "max_k must be an integer >= 3, got 2"),
        ("nonnegative_mixture", {"kl_target": 0}, "kl_target must be a finite number > 0"),
        ("cash", {"max_iter": 0}, "max_iter must be an integer >= 1, got 0"),
        ("cash", {"warm_iter": -1}, "warm_iter must be an integer >= 1, got -1"),
        ("cash", {"weight_decay": float("nan")}, "weight_decay must be a finite number >= 0"),
        ("cash", {"tol": -1.0}, "tol must be a finite number >= 0, got -1.0"),
        ("cash", {"hidden": 2.5}, "hidden must be a layer size or a sequence of them"),
        ("cash", {"hidden": (8, 0)}, "hidden layer size must be an integer >= 1, got 0"),
        ("cash", {"hidden_layers": -1}, "hidden_layers must be an integer >= 0, got -1"),
        ("cash", {"seed": 2**70}, r"seed=1180591620717411303424 is outside the seeds"),
        ("cash", {"nonnegative": "yes"}, "nonnegative must be True or False, got 'yes'"),
        ("cgb", {"nonnegative": 1}, "nonnegative must be True or False, got 1"),
        ("emdn", {"n_components": 1.5}, "n_components must be an integer >= 1, got 1.5"),
    ],
)
def test_bad_prior_options_are_refused_when_the_prior_is_made(prior, options, match):
    """Options are checked in the constructor, naming the option: they used to be truncated
    (2.5 iterations -> 2), let NaN through, or fail deep inside a fit (max_iter=0)."""
    with pytest.raises((ValueError, TypeError), match=match):
        get_prior(prior, **options)


# a value other than the default of every family's option, and how the repr shows it
_OTHER_VALUES = {
    "mode": (0.5, "mode=0.5"),
    "nonnegative": (True, "nonnegative=True"),
    "grid_mult": (2, "grid_mult=2.0"),
    "kl_target": (0.1, "kl_target=0.1"),
    "hidden": (8, "hidden=(8,)"),
    "hidden_layers": (2, "hidden=(16, 16)"),  # kept as the layers it makes
    "weight_decay": (0.5, "weight_decay=0.5"),
    "max_iter": (7, "max_iter=7"),
    "warm_iter": (3, "warm_iter=3"),
    "tol": (1e-3, "tol=0.001"),
    "seed": (5, "seed=5"),
    "n_components": (3, "n_components=3"),
    "scale": ([1.0, 0], "scale=array([0., 1.])"),
    "max_k": (10, "max_k=10"),
    "ratio": (0.3, "ratio=0.3"),
}


@pytest.mark.parametrize("family", [f for f in available_priors() if f != "block"])
def test_prior_repr_shows_every_option_that_is_not_its_default(family):
    """``repr`` (recorded by ``tl.fit`` in ``uns[key]["params"]``) names the class and each
    option set away from its default: it used to drop most of them, so ``Cash()`` and
    ``Cash(nonnegative=True)`` printed the same."""
    cls = type(get_prior(family))
    plain = repr(get_prior(family))
    assert plain == f"{cls.__name__}()"
    options = [o for o in prior_options(cls) if not (family == "flat" and o == "mode")]
    assert set(options) <= set(_OTHER_VALUES), "a new option needs a value in _OTHER_VALUES"
    for option in options:
        value, shown = _OTHER_VALUES[option]
        assert repr(get_prior(family, **{option: value})) == f"{cls.__name__}({shown})"
    both = {o: _OTHER_VALUES[o][0] for o in options[:2]}
    assert repr(get_prior(family, **both)) == (
        f"{cls.__name__}({', '.join(_OTHER_VALUES[o][1] for o in options[:2])})"
    )


def test_prior_fit_accepts_what_ebnm_accepts():
    """``Prior.fit`` on numpy input (it used to fail on ``x.numel()``) validates as
    ``cebmf.ebnm`` does and returns numpy arrays, equal to the tensor path's."""
    _, x = _sim(300)
    by_ebnm = cebmf.ebnm(x, 1.0, "point_normal")
    by_fit = get_prior("point_normal").fit(x, 1.0)
    tensors = get_prior("point_normal").fit(torch.tensor(x), torch.ones(1, dtype=torch.float64))
    assert isinstance(by_fit.mean, np.ndarray) and isinstance(tensors.mean, torch.Tensor)
    assert by_fit.loglik == by_ebnm.loglik == tensors.loglik
    for name in ("mean", "sd", "lfsr"):
        np.testing.assert_array_equal(getattr(by_fit, name), getattr(by_ebnm, name))
        np.testing.assert_array_equal(getattr(by_fit, name), getattr(tensors, name).numpy())
    assert get_prior("point_normal").fit(list(x), np.ones(300), lfsr=False).lfsr is None
    with pytest.raises(ValueError, match="x contains 1 non-finite value"):
        get_prior("point_normal").fit(np.r_[x, np.nan], 1.0)
    with pytest.raises(ValueError, match="s must be strictly positive"):
        get_prior("point_normal").fit(x, 0.0)
    cov = np.random.default_rng(1).normal(size=(300, 2))
    numpy_cov = get_prior("cash").fit(x, np.ones(300), covariates=cov)
    torch_cov = cebmf.ebnm(torch.tensor(x), 1.0, "cash", covariates=torch.tensor(cov))
    assert numpy_cov.loglik == pytest.approx(torch_cov.loglik, rel=1e-12)


def test_a_prior_class_is_refused_with_the_instance_to_pass():
    with pytest.raises(TypeError, match=r"class PointNormal, not an instance; pass PointNormal"):
        cebmf.ebnm(np.ones(3), 1.0, cebmf.priors.PointNormal)
    with pytest.raises(TypeError, match=r"prior_factors: prior is the class PointExponential"):
        cebmf.fit_ebmf(np.eye(4), prior_factors=cebmf.priors.PointExponential)


_LFSR_CASES = [(f, 0.0) for f in (*FAMILIES, "cash", "cgb", "emdn")] + [
    (f, 0.7)
    for f in FAMILIES
    if f != "flat"  # flat takes no mode
]


@pytest.mark.parametrize(("family", "mode"), _LFSR_CASES)
def test_skipping_the_lfsr_changes_nothing_else_and_fix_g_restores_it(family, mode):
    # the EBMF engine's updates fit with lfsr=False and recompute the lfsr at the end from
    # the fitted g (fix_g): both steps must reproduce the plain fit
    _, x = _sim(400, seed=7, nonneg=family in NONNEG)
    x = torch.as_tensor(x + mode)
    s = torch.as_tensor(np.random.default_rng(8).uniform(0.5, 2.0, 400))
    cov = torch.as_tensor(np.random.default_rng(9).normal(size=(400, 2)))
    prior = get_prior(family, mode=mode) if mode else get_prior(family)
    kw = {"covariates": cov} if prior.uses_covariates else {}
    torch.manual_seed(0)
    full = prior.fit(x, s, **kw)
    torch.manual_seed(0)
    lean = prior.fit(x, s, lfsr=False, **kw)
    assert lean.lfsr is None
    for name in ("mean", "mean2", "sd"):
        torch.testing.assert_close(getattr(lean, name), getattr(full, name), rtol=0, atol=0)
    assert lean.loglik == full.loglik
    if mode and family in NONNEG:  # theta >= 0.7: never at or below 0
        assert float(full.lfsr.max()) == 0.0
    else:
        assert float(full.lfsr.min()) < 0.05 and float(full.lfsr.max()) > 0.3
    if not prior.uses_covariates:
        again = prior.fit(x, s, g_init=full.g, fix_g=True, **kw)
        torch.testing.assert_close(again.lfsr, full.lfsr, rtol=1e-9, atol=1e-12)


def _ascent_step_by_eigh(grad, hess, free):
    """The modified Newton step from numpy's (LAPACK) eigendecomposition of -H on the free
    coordinates: sum_i v_i (v_i . g) / max(|lambda_i|, 1e-10 max_j |lambda_j|)."""
    idx = np.flatnonzero(free)
    w, vecs = np.linalg.eigh(-np.asarray(hess)[np.ix_(idx, idx)])
    w = np.maximum(np.abs(w), 1e-10 * max(np.abs(w).max(), 1e-300))
    step = np.zeros(2)
    step[idx] = vecs @ ((vecs.T @ np.asarray(grad)[idx]) / w)
    return step


def test_two_parameter_newton_step_matches_an_eigendecomposition():
    from cebmf.priors._spike_slab import _ascent_step

    rng = np.random.default_rng(3)
    for trial in range(3000):
        a = rng.normal(size=(2, 2)) * 10.0 ** rng.uniform(-6, 6, size=(2, 2))
        hess = (a + a.T) / 2  # definite or indefinite, scales apart by up to 1e12
        if trial % 5 == 0:
            hess[0, 1] = hess[1, 0] = 0.0
        grad = rng.normal(size=2) * 10.0 ** rng.uniform(-4, 4)
        free = [[True, True], [True, False], [False, True]][trial % 3]
        got = np.array(_ascent_step(grad.tolist(), hess.tolist(), free))
        want = _ascent_step_by_eigh(grad, hess, free)
        # both round at the condition number of -H (floored at 1e10)
        w = np.abs(np.linalg.eigvalsh(hess))
        cond = min(w.max() / max(w.min(), 1e-300), 1e10) if all(free) else 1.0
        scale = np.abs(want).max()
        assert np.abs(got - want).max() <= 1e-13 * cond * scale, (trial, hess, grad, free)
        # an ascent direction whenever the gradient is not zero on the free coordinates
        assert float(grad @ got) > 0
    assert not np.isfinite(_ascent_step([1.0, 1.0], [[np.nan, 0.0], [0.0, -1.0]], [True] * 2)).all()
