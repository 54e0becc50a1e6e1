"""Mixture weights on large grids (hundreds to thousands of components, from ``scale=`` or
``grid_mult``): mix-SQP must still return the maximum-likelihood weights. The references
are computed here from the formulas: the likelihood matrix in numpy, the duality-gap bound
of the returned weights, and EM iterations started from them."""

import warnings

import numpy as np
import pytest
import torch

import cebmf
from cebmf.priors._mixsqp import mixsqp


def _data(n=3000, seed=5):
    rng = np.random.default_rng(seed)
    theta = np.where(rng.random(n) < 0.5, 0.0, rng.standard_t(3, n) * 2)
    s = np.exp(rng.uniform(np.log(0.1), np.log(10), n))
    return theta + s * rng.normal(size=n), s


def _lik(scale, x, s):
    """(K, n) normal scale mixture likelihoods over their column maxima, from the formula."""
    var = s[None, :] ** 2 + np.asarray(scale)[:, None] ** 2
    log_lik = -0.5 * (np.log(2 * np.pi * var) + x[None, :] ** 2 / var)
    return np.exp(log_lik - log_lik.max(0)), log_lik.max(0)


def _check_ml(res, x, s, em_iter=300):
    """Log-likelihood recomputed here, duality-gap bound n * max_k(grad_k - 1) and the gain
    of ``em_iter`` EM steps from the returned weights."""
    pi = np.asarray(res.g["pi"], dtype=np.float64)
    a, colmax = _lik(res.g["scale"], x, s)
    u = pi @ a
    loglik = float(np.log(u).sum() + colmax.sum())
    bound = x.size * max(0.0, float((a @ (1 / u) / x.size - 1).max()))
    w = pi.copy()
    for _ in range(em_iter):
        w = w * (a @ (1 / (w @ a))) / x.size
    em_gain = float(np.log(w @ a).sum() + colmax.sum()) - loglik
    return loglik, bound, em_gain


def _fit(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a certified fit warns about nothing
        return cebmf.ebnm(*args, **kwargs)


@pytest.mark.parametrize("extra", [600, 1500])
def test_superset_grid_is_never_worse_than_the_default_grid(extra):
    """A ``scale=`` grid that contains the default grid reaches at least the default
    grid's log-likelihood (it lost 125 nats with 630 components, duality-gap bound 1e37)."""
    x, s = _data()
    default = _fit(x, s, "normal_scale_mixture")
    grid = np.union1d(default.g["scale"], np.geomspace(1e-3, 200, extra))
    res = _fit(x, s, "normal_scale_mixture", scale=grid)
    assert len(res.g["scale"]) == grid.size > 500
    loglik, bound, em_gain = _check_ml(res, x, s)
    assert loglik == pytest.approx(res.loglik, rel=1e-10)
    assert res.loglik >= default.loglik - 1e-8 * x.size
    assert bound <= 1e-6 * x.size
    assert em_gain <= 1e-4


@pytest.mark.parametrize("grid_mult", [1.02, 1.01])
def test_fine_grid_mult_reaches_the_ml_weights(grid_mult):
    """``grid_mult`` below the automatic rule gives 600-1200 components; EM from the
    returned weights gained 2.35 nats at 1.02 before."""
    x, s = _data()
    coarse = _fit(x, s, "normal_scale_mixture", grid_mult=1.1)
    res = _fit(x, s, "normal_scale_mixture", grid_mult=grid_mult)
    assert len(res.g["scale"]) > 500
    _, bound, em_gain = _check_ml(res, x, s)
    assert bound <= 1e-6 * x.size
    assert em_gain <= 1e-4
    # a finer grid of the same span is nearly a superset: it cannot lose more than a hair
    assert res.loglik >= coarse.loglik - 0.05


def test_fine_grid_many_observations_subsampled_hessian():
    """n large enough that the Hessian is subsampled, with 400+ components."""
    x, s = _data(n=60_000, seed=11)
    res = _fit(x, s, "normal_scale_mixture", grid_mult=1.03)
    assert len(res.g["scale"]) > 400
    _, bound, em_gain = _check_ml(res, x, s, em_iter=50)
    assert bound <= 1e-6 * x.size
    assert em_gain <= 1e-3


def test_warns_when_the_certificate_cannot_be_reached():
    """Stopped early (one iteration on 150 components), mix-SQP says so; run to the end,
    it meets the KKT conditions and does not warn."""
    x, s = _data()
    a, _ = _lik(np.r_[0.0, np.geomspace(1e-3, 200, 150)], x, s)
    with pytest.warns(RuntimeWarning, match="short of its certificate"):
        mixsqp(torch.tensor(a), max_iter=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = mixsqp(torch.tensor(a)).numpy()
    grad = a @ (1 / (w @ a)) / x.size
    # KKT: gradient <= 1 everywhere, = 1 on the support
    assert grad.max() <= 1 + 1e-8
    assert np.abs(grad[w > 1e-6] - 1).max() <= 1e-6


def test_a_one_hot_warm_start_that_nearly_excludes_an_outlier():
    """A warm start with all weight on a narrow component gives an outlier a likelihood of
    ~1e-200; its 1 / u^2 in the Hessian overflowed (NaN, then a crash inside cash, seen on
    real data). The solver must still reach the maximum: duality-gap bound and EM from
    its result, computed here."""
    rng = np.random.default_rng(3)
    a = rng.uniform(0.01, 1.0, (20, 250))
    a[:10, 7] = 1e-200  # observation 7: only the last ten components explain it
    a[10:, 7] = 1.0
    init = np.zeros(20)
    init[2] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pi = mixsqp(torch.tensor(a), torch.tensor(init)).numpy()
    u = pi @ a
    assert 250 * max(0.0, float((a @ (1 / u) / 250 - 1).max())) < 1e-5
    w = pi.copy()
    for _ in range(2000):
        w = w * (a @ (1 / (w @ a))) / 250
    assert np.log(w @ a).sum() - np.log(u).sum() < 1e-5


def test_an_ebmf_fit_reports_shortfalls_once_against_its_tol(monkeypatch, caplog):
    """Inside fit_ebmf the shortfalls of the mixture updates are collected: an INFO line
    when the largest is below the fit's tol, one RuntimeWarning when it is not (a direct
    mix-SQP call still warns each time)."""
    import logging

    from cebmf.priors import _mixsqp

    rng = np.random.default_rng(2)
    y = np.outer(rng.normal(size=80) * (rng.random(80) < 0.4), rng.normal(size=40)) * 3
    y += rng.normal(size=(80, 40))
    real = _mixsqp._solve
    per_obs = {"gap": 0.0}

    def short(lik, pi_init, tol, max_iter, hessian_budget):
        w, _ = real(lik, pi_init, tol, max_iter, hessian_budget)
        return w, per_obs["gap"]

    monkeypatch.setattr(_mixsqp, "_solve", short)
    kw = dict(prior_loadings="ash", prior_factors="ash", max_factors=2)
    per_obs["gap"] = 1e-7  # above mix-SQP's 1e-8; n * gap <= 8e-6 nats < tol = 4.8e-5
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="cebmf"):
        warnings.simplefilter("error")
        res = cebmf.fit_ebmf(y, **kw)
    assert res.n_factors >= 1
    assert "below the fit's tol" in caplog.text
    count = int(caplog.text.split("certificate in ")[1].split()[0])
    assert count >= 4  # every mixture update of the fit fell short, one line for all
    per_obs["gap"] = 1.0  # n * gap = 40 or 80 nats: above tol
    with pytest.warns(RuntimeWarning, match=r"in \d+ mixture prior update\(s\).*not below") as rec:
        cebmf.fit_ebmf(y, **kw)
    assert sum("mix-SQP" in str(w.message) for w in rec) == 1
    with pytest.warns(RuntimeWarning, match="short of its certificate"):
        cebmf.ebnm(y[:, 0], 1.0, "ash")  # outside a fit: the warning of each call
