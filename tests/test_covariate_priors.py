"""Covariate-moderated priors: exact posteriors per observation, warm starts, no loss
against the matching plain prior, bad input. References are numerical integrations."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats

import cebmf
from cebmf.priors import get_prior

COVARIATE_FAMILIES = ["cash", "emdn", "spiked_emdn", "cgb"]
PLAIN = {
    "cash": "normal_scale_mixture",
    "emdn": "normal_scale_mixture",
    "spiked_emdn": "normal_scale_mixture",
    "cgb": "point_normal",
}


def simulate(n=1500, d=3, seed=0, informative=True, nonneg=False):
    rng = np.random.default_rng(seed)
    cov = rng.normal(size=(n, d))
    p_on = special.expit(3.0 * cov[:, 0]) if informative else np.full(n, 0.5)
    theta = np.where(rng.random(n) < p_on, rng.normal(0, 2, n), 0.0)
    if nonneg:
        theta = np.abs(theta)
    return cov, theta, theta + rng.normal(size=n)


def _mixture_posterior(weights, means, sds, point0, x, s, tn=None):
    """Posterior moments and log marginal of one observation under
    point0 delta_0 + sum_k weights_k N(means_k, sds_k^2) (or a TN slab) by quadrature."""
    lik = lambda t: stats.norm.pdf(x, t, s)  # noqa: E731
    dens = []
    for w, m, sd in zip(weights, means, sds, strict=True):
        if tn is None:
            dens.append((w, lambda t, m=m, sd=sd: stats.norm.pdf(t, m, sd), -np.inf))
        else:
            z = stats.norm.cdf(m / sd)
            dens.append((w, lambda t, m=m, sd=sd, z=z: stats.norm.pdf(t, m, sd) / z, 0.0))
    mass = [point0 * lik(0.0), 0.0, 0.0]
    for w, f, lo in dens:
        lo_t = max(lo, x - 40 * s) if lo == 0.0 else x - 40 * s
        hi_t = x + 40 * s
        pts = [v for v in (0.0,) if lo_t < v < hi_t]
        for j in range(3):
            val = integrate.quad(
                lambda t, j=j, f=f: t**j * f(t) * lik(t),
                lo_t,
                hi_t,
                points=pts or None,
                epsabs=0,
                epsrel=1e-11,
                limit=200,
            )[0]
            mass[j] += w * val
    return math.log(mass[0]), mass[1] / mass[0], mass[2] / mass[0]


@pytest.mark.parametrize("family", COVARIATE_FAMILIES)
def test_posterior_matches_quadrature_per_observation(family):
    cov, _, x = simulate(n=800, seed=1)
    s = np.random.default_rng(2).uniform(0.5, 2.0, x.size)
    res = cebmf.ebnm(x, s, family, covariates=cov)
    prior = get_prior(family)
    params = prior.prior_parameters(res.g, cov)
    for i in np.random.default_rng(3).choice(x.size, 12, replace=False):
        if family == "cash":
            w, sc = params["pi"][i], params["scale"]
            ll, m1, m2 = _mixture_posterior(w[1:], np.zeros(sc.size - 1), sc[1:], w[0], x[i], s[i])
        elif family == "cgb":
            p0 = params["pi0"][i]
            ll, m1, m2 = _mixture_posterior(
                [1 - p0], [params["mu"]], [params["scale"]], p0, x[i], s[i]
            )
        else:
            w, mu, sd = params["pi"][i], params["mu"][i], params["sd"][i]
            p0 = 0.0
            if family == "spiked_emdn":
                p0, w = w[0], w[1:]
            ll, m1, m2 = _mixture_posterior(w, mu, sd, p0, x[i], s[i])
        one = cebmf.ebnm(
            x[i : i + 1], s[i : i + 1], family, covariates=cov[i : i + 1], g_init=res.g, fix_g=True
        )
        assert one.loglik == pytest.approx(ll, rel=1e-6, abs=1e-8)
        assert res.mean[i] == pytest.approx(m1, rel=1e-6, abs=1e-8 * s[i])
        assert res.mean2[i] == pytest.approx(m2, rel=1e-6, abs=1e-8 * s[i] ** 2)


def test_nonnegative_cgb_matches_quadrature():
    cov, _, x = simulate(n=600, seed=4, nonneg=True)
    res = cebmf.ebnm(x, 1.0, "cgb", covariates=cov, nonnegative=True)
    params = get_prior("cgb", nonnegative=True).prior_parameters(res.g, cov)
    assert res.mean.min() >= 0
    for i in range(0, 600, 97):
        p0 = params["pi0"][i]
        ll, m1, m2 = _mixture_posterior(
            [1 - p0], [params["mu"]], [params["scale"]], p0, x[i], 1.0, tn=True
        )
        one = cebmf.ebnm(
            x[i : i + 1],
            1.0,
            "cgb",
            covariates=cov[i : i + 1],
            nonnegative=True,
            g_init=res.g,
            fix_g=True,
        )
        assert one.loglik == pytest.approx(ll, rel=1e-6, abs=1e-8)
        assert res.mean[i] == pytest.approx(m1, rel=1e-6, abs=1e-9)
        assert res.mean2[i] == pytest.approx(m2, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("family", COVARIATE_FAMILIES)
def test_informative_covariates_help_and_warm_starts_never_lose(family):
    cov, theta, x = simulate(seed=5)
    prior = get_prior(family)
    xt, s, ct = torch.tensor(x), torch.ones(1, dtype=torch.float64), torch.tensor(cov)
    first = prior.fit(xt, s, ct)
    plain = cebmf.ebnm(x, 1.0, PLAIN[family])
    # covariates that drive the sparsity raise the marginal likelihood clearly
    assert first.loglik > plain.loglik + 50
    assert np.mean((first.mean.numpy() - theta) ** 2) < np.mean((plain.mean - theta) ** 2)
    again = first
    for _ in range(3):
        nxt = prior.fit(xt, s, ct, state=again.state)
        assert nxt.loglik >= again.loglik - 1e-9 * abs(again.loglik)
        again = nxt


@pytest.mark.parametrize("family", COVARIATE_FAMILIES)
def test_uninformative_covariates_cost_nothing(family):
    cov, _, x = simulate(seed=6, informative=False)
    res = cebmf.ebnm(x, 1.0, family, covariates=cov)
    plain = cebmf.ebnm(x, 1.0, PLAIN[family])
    assert res.loglik >= plain.loglik - 1e-3 * x.size


def test_g_holds_what_plots_need():
    cov, _, x = simulate(n=500, seed=7)
    res = cebmf.ebnm(x, 1.0, "cash", covariates=cov)
    assert res.g["pi0"].shape == (500,)
    assert np.all((res.g["pi0"] >= 0) & (res.g["pi0"] <= 1))
    # sparsity follows the covariate that drives it: more zeros where cov[:, 0] is low
    low, high = cov[:, 0] < -1, cov[:, 0] > 1
    assert res.g["pi0"][low].mean() > res.g["pi0"][high].mean() + 0.3
    assert all(isinstance(v, np.ndarray) for v in res.g["network"].values())
    np.testing.assert_allclose(
        get_prior("cash").prior_parameters(res.g, cov)["pi"][:, 0], res.g["pi0"], rtol=1e-10
    )


def test_covariate_bad_input():
    cov, _, x = simulate(n=100, seed=8)
    with pytest.raises(ValueError, match="needs covariates"):
        cebmf.ebnm(x, 1.0, "cash")
    with pytest.raises(ValueError, match=r"one row per observation \(100\)"):
        cebmf.ebnm(x, 1.0, "cash", covariates=cov[:90])
    bad = cov.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="covariates contains 1 non-finite"):
        cebmf.ebnm(x, 1.0, "cash", covariates=bad)
    with pytest.raises(TypeError, match="covariates must be numeric"):
        cebmf.ebnm(x, 1.0, "cash", covariates=np.array(["a"] * 100))
    # constant columns are dropped (documented), a single row works
    const = np.c_[cov, np.ones(100)]
    a = cebmf.ebnm(x, 1.0, "cgb", covariates=const)
    b = cebmf.ebnm(x, 1.0, "cgb", covariates=cov)
    assert a.g["covariate_stats"]["keep"].tolist() == [True, True, True, False]
    assert a.loglik == pytest.approx(b.loglik, rel=1e-8)
    one = cebmf.ebnm(x[:1], 1.0, "cash", covariates=cov[:1])
    assert np.isfinite(one.mean).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 2.5}, "k must be an integer >= 1, got 2.5"),
        ({"k": 11}, r"k \(11\) must not exceed the number of covariates d \(10\)"),
        ({"sigma": -1.0}, "sigma must be a finite number > 0, got -1.0"),
        ({"beta1": float("nan")}, "beta1 must be a finite number, got nan"),
    ],
)
def test_simulation_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cebmf.datasets.simulate_covariate_sparsity(**kwargs)


def test_low_rank_simulation_arguments_are_checked():
    with pytest.raises(ValueError, match=r"k must be an integer >= 1, got 2\.5"):
        cebmf.datasets.simulate_low_rank(k=2.5)
    with pytest.raises(ValueError, match=r"sigma must be a finite number > 0, got 0\.0"):
        cebmf.datasets.simulate_low_rank(sigma=0.0)
    with pytest.raises(ValueError, match=r"pi0 must lie in \[0, 1\], got 1.5"):
        cebmf.datasets.simulate_low_rank(pi0=1.5)


def test_engine_with_covariate_priors_elbo_never_decreases():
    d = cebmf.datasets.simulate_covariate_sparsity(n=400, p=60, seed=3)
    res = cebmf.fit_ebmf(
        d.Y,
        noise="constant",
        prior_loadings="cash",
        prior_factors="cgb",
        X_l=d.X_l,
        X_f=d.X_f,
        keep_ebnm_inputs=True,
    )
    assert res.n_factors >= 2
    trace = np.asarray(res.elbo_trace)
    assert np.all(np.diff(trace) >= -1e-9 * np.abs(trace).max())
    assert res.priors[0]["loadings"]["family"] == "cash"
    assert res.priors[0]["loadings"]["pi0"].shape == (400,)
    with pytest.raises(ValueError, match="uses the covariate-moderated prior 'cash' but X_l"):
        cebmf.fit_ebmf(d.Y, prior_loadings="cash")


@pytest.mark.parametrize("family", COVARIATE_FAMILIES)
def test_warm_start_follows_the_data_and_never_falls_behind_the_plain_prior(family):
    """Warm starts across data whose standard errors shrink 100-fold (as in a fit): each
    call's log-likelihood is at least the plain prior's fitted afresh to the same data
    (an independent ebnm fit), and cash refines its grid below the saved scales."""
    cov, theta, _ = simulate(seed=8)
    rng = np.random.default_rng(9)
    prior = get_prior(family)
    ct = torch.tensor(cov)
    state = None
    grids = []
    for s in (1.0, 0.1, 0.01):
        x = theta * 0.05 + s * rng.normal(size=theta.size)  # small effects, s shrinking
        res = prior.fit(torch.tensor(x), torch.full((1,), s, dtype=torch.float64), ct, state=state)
        plain = cebmf.ebnm(x, s, PLAIN[family])
        assert res.loglik >= plain.loglik - 1e-6 * abs(plain.loglik), s
        state = res.state
        if family == "cash":
            grids.append(np.asarray(res.g["scale"]))
    if family == "cash":
        smallest = [g[g > 0].min() for g in grids]
        assert smallest[2] < smallest[0] / 20
        assert set(grids[0]) <= set(grids[2])  # never shrinks: the saved prior stays a point


@pytest.mark.parametrize("family", ["emdn", "spiked_emdn"])
def test_emdn_sd_bounds_across_warm_starts(family):
    """The saved network is the same prior only under the same sd bounds. A warm start on
    data 1e4 times larger needs sds beyond them: the bounds widen (the saved network's sds
    lie strictly inside the old ones, so it is still the same prior), the fit does not
    fall behind the plain prior fitted to those data (it fell 314 nats behind when the
    bounds were kept), and g_init + fix_g reproduces the stored loglik. Data within the
    saved bounds keep them exactly."""
    cov, _, x = simulate(seed=10)
    prior = get_prior(family)
    ct, one = torch.tensor(cov), torch.ones(1, dtype=torch.float64)
    first = prior.fit(torch.tensor(x), one, ct)
    same = prior.fit(torch.tensor(0.5 * x), one, ct, state=first.state)
    np.testing.assert_array_equal(same.g["log_sd_bounds"], first.g["log_sd_bounds"])
    x2 = 1e4 * x
    again = prior.fit(torch.tensor(x2), one, ct, state=first.state)
    old_lo, old_hi = first.g["log_sd_bounds"]
    new_lo, new_hi = again.g["log_sd_bounds"]
    assert new_lo == pytest.approx(old_lo, abs=1e-12) and new_hi > old_hi + math.log(1e3)
    plain = cebmf.ebnm(x2, 1.0, "normal_scale_mixture")
    assert again.loglik >= plain.loglik
    fixed = cebmf.ebnm(x2, 1.0, family, covariates=cov, g_init=again.g, fix_g=True)
    assert fixed.loglik == pytest.approx(again.loglik, rel=1e-10)
    # a saved sd held at its upper bound (raw output beyond it): widening would change the
    # saved prior, so the bounds stay, and the fit never falls below that saved prior
    state = {**first.state, "network": dict(first.state["network"])}
    bias = state["network"]["out.bias"].copy()
    bias[-1] = old_hi + 5.0  # the last output is the last component's log sd
    state["network"]["out.bias"] = bias
    held = prior.fit(torch.tensor(x2), one, ct, state=state)
    np.testing.assert_allclose(held.g["log_sd_bounds"], first.g["log_sd_bounds"], atol=1e-12)
    saved = dict(first.g, network=state["network"])
    before = cebmf.ebnm(x2, 1.0, family, covariates=cov, g_init=saved, fix_g=True)
    assert held.loglik >= before.loglik


def _plain_mixture_loglik(plain: dict, unit: float, x: np.ndarray, s: float) -> float:
    """Exact log-likelihood (numpy) of a saved plain mixture, given in units of ``unit``."""
    w, mu, sd = (np.asarray(plain[k], dtype=np.float64) for k in ("w", "mu", "sd"))
    comps = [
        np.log(np.maximum(w, 1e-300))
        + stats.norm.logpdf(x[:, None], mu * unit, np.sqrt((sd * unit) ** 2 + s * s))
    ]
    w0 = float(np.asarray(plain["w0"]))
    if not math.isnan(w0):
        comps.append(np.log(max(w0, 1e-300)) + stats.norm.logpdf(x, 0.0, s)[:, None])
    return float(special.logsumexp(np.hstack(comps), axis=1).sum())


@pytest.mark.parametrize("family", ["emdn", "spiked_emdn"])
def test_emdn_state_keeps_the_plain_mixture_in_its_units(family):
    """Each call saves the plain mixture it started from (in the call's units), and the
    next call adds it to the scale-mixture starts. In data units (numpy), that mixture is
    at least as likely as the scale mixture's five heaviest components renormalised (the
    cold start's guarantee) and within 1e-3 per observation of the scale mixture itself,
    on the first call and on a warm call with data 1e4 times larger; carried into other
    units with the network, it is the same prior."""
    cov, _, x = simulate(seed=12)
    prior = get_prior(family)
    ct, one = torch.tensor(cov), torch.ones(1, dtype=torch.float64)
    spiked = family == "spiked_emdn"
    first = None
    for scale in (1.0, 1e4):
        xs = scale * x
        res = prior.fit(torch.tensor(xs), one, ct, state=None if first is None else first.state)
        plain = res.state["plain_mixture"]
        assert math.isnan(float(plain["w0"])) != spiked
        got = _plain_mixture_loglik(plain, float(res.state["unit"]), xs, 1.0)
        ash = cebmf.ebnm(xs, 1.0, "normal_scale_mixture")
        pi, sc = np.asarray(ash.g["pi"]), np.asarray(ash.g["scale"])
        top = np.argsort(-pi)[:5]
        top = top[pi[top] > 0]
        log_w = np.log(pi[top] / pi[top].sum())
        sd = np.sqrt(sc[top] ** 2 + 1.0)
        heavy = special.logsumexp(log_w + stats.norm.logpdf(xs[:, None], 0.0, sd), axis=1).sum()
        assert got >= heavy - 1e-9 * abs(heavy), (scale, got, heavy)
        assert got >= ash.loglik - 1e-3 * xs.size, (scale, got, ash.loglik)
        first = first or res
    ratio = 37.0
    moved = prior._state_in_units(first.state, ratio)["plain_mixture"]
    unit = float(first.state["unit"])
    np.testing.assert_allclose(
        _plain_mixture_loglik(moved, unit / ratio, x, 1.0),
        _plain_mixture_loglik(first.state["plain_mixture"], unit, x, 1.0),
        rtol=1e-12,
    )


@pytest.mark.parametrize("with_x", [False, True])
def test_self_covariates(with_x):
    """Other factors' loadings as covariates, with or without X_l: the fit runs, each
    factor's network sees (d +) K - 1 inputs, and the signal is recovered about as well
    as with X_l alone."""
    d = cebmf.datasets.simulate_covariate_sparsity(n=400, p=60, seed=4)
    kw = {"X_l": d.X_l} if with_x else {}
    res = cebmf.fit_ebmf(
        d.Y, noise="constant", prior_loadings="cash", self_covariates=True, max_factors=4, **kw
    )
    assert res.n_factors >= 2
    d_in = (d.X_l.shape[1] if with_x else 0) + res.n_factors - 1
    for j in range(res.n_factors):
        w = np.asarray(res.priors[j]["loadings"]["network"]["hidden.0.weight"])
        assert w.shape[1] == d_in
    err = np.sqrt(np.mean((res.fitted() - d.signal) ** 2))
    svd = np.linalg.svd(d.Y, full_matrices=False)
    trunc = (svd[0][:, :2] * svd[1][:2]) @ svd[2][:2]
    assert err < np.sqrt(np.mean((trunc - d.signal) ** 2))


def test_block_prior_with_a_covariate_block_is_the_separate_fits():
    """A BlockPrior with a cash block (its own covariate columns) and a point-normal block
    gives exactly the two separate EBNM fits: the block sees only its rows and columns.
    The block-diagonal layout of a joint fit puts other blocks' covariates in the other
    columns; they must not leak in."""
    from cebmf.priors.block import BlockPrior

    cov_a, _, x_a = simulate(n=600, seed=8)
    _, _, x_b = simulate(n=300, seed=9, informative=False)
    x = torch.tensor(np.concatenate([x_a, x_b]))
    layout = np.zeros((900, 5))
    layout[:600, 1:4] = cov_a
    layout[600:, 4] = 7.0  # a column of the other block, ignored by the cash block
    block = BlockPrior(
        [600, 300],
        ["cash", "point_normal"],
        names=["rna", "atac"],
        covariate_columns=[[1, 2, 3], None],
    )
    assert block.uses_covariates
    s = torch.ones(1, dtype=torch.float64)
    res = block.fit(x, s, torch.tensor(layout))
    alone_a = get_prior("cash").fit(x[:600], s, torch.tensor(cov_a))
    alone_b = get_prior("point_normal").fit(x[600:], s)
    np.testing.assert_array_equal(res.mean[:600].numpy(), alone_a.mean.numpy())
    np.testing.assert_array_equal(res.mean[600:].numpy(), alone_b.mean.numpy())
    assert res.loglik == alone_a.loglik + alone_b.loglik
    assert res.g["blocks"]["rna"]["pi0"].shape == (600,)
    assert res.g["blocks"]["atac"]["family"] == "point_normal"
    # covariates that drive the rna sparsity: the cash block beats a plain block
    plain = BlockPrior([600, 300], ["point_normal", "point_normal"]).fit(x, s)
    assert res.loglik > plain.loglik + 10
    with pytest.raises(ValueError, match="needs covariates"):
        block.fit(x, s)
    with pytest.raises(ValueError, match="block 'atac' has covariate columns"):
        BlockPrior(
            [600, 300],
            ["cash", "point_normal"],
            names=["rna", "atac"],
            covariate_columns=[[0], [1]],
        )
    with pytest.raises(ValueError, match="one entry per block"):
        BlockPrior([600, 300], ["cash", "point_normal"], covariate_columns=[[0]])
    with pytest.raises(ValueError, match="asks for covariate column 9"):
        BlockPrior([600, 300], ["cash", "point_normal"], covariate_columns=[[9], None]).fit(
            x, s, torch.tensor(layout)
        )


def test_block_prior_without_lfsr_matches_its_blocks_fitted_alone():
    """``lfsr=False`` (how the EBMF engine calls priors) skips the lfsr of every block,
    including point-normal's closed-form path, and changes nothing else: means, sds,
    log-likelihood and prior equal those of each block fitted alone; with ``lfsr=True``
    the lfsr is the blocks' own, side by side."""
    from cebmf.priors.block import BlockPrior

    rng = np.random.default_rng(3)
    theta = np.where(rng.random(900) < 0.7, 0.0, rng.normal(0, 3, 900))
    x = torch.tensor(theta + rng.normal(size=900))
    s = torch.ones(1, dtype=torch.float64)  # one s for all: point-normal's fast path
    block = BlockPrior([600, 300], ["point_normal", "point_laplace"], names=["a", "b"])
    quiet = block.fit(x, s, lfsr=False)
    full = block.fit(x, s)
    alone_a = get_prior("point_normal").fit(x[:600], s)
    alone_b = get_prior("point_laplace").fit(x[600:], s)
    assert quiet.lfsr is None
    for res in (quiet, full):
        np.testing.assert_array_equal(res.mean[:600].numpy(), alone_a.mean.numpy())
        np.testing.assert_array_equal(res.sd[600:].numpy(), alone_b.sd.numpy())
        assert res.loglik == alone_a.loglik + alone_b.loglik
        assert res.g["blocks"]["a"]["pi0"] == alone_a.g["pi0"]
    expected = np.concatenate([alone_a.lfsr.numpy(), alone_b.lfsr.numpy()])
    np.testing.assert_array_equal(full.lfsr.numpy(), expected)
    assert get_prior("point_normal").fit(x, s, lfsr=False).lfsr is None
    # a fit that asks for its lfsr inside one that does not (a family built on another's
    # fit) still gets it: the innermost request decides
    from cebmf._math import sign_probs

    with sign_probs(False):
        inner = get_prior("point_normal").fit(x[:600], s)
    np.testing.assert_array_equal(inner.lfsr.numpy(), alone_a.lfsr.numpy())


def test_cash_warm_starts_its_plain_mixture_on_the_current_grid():
    """Each cash call fits the plain mixture on its grid (the start of a cold fit, and the
    candidate a warm start must not fall behind). The weights are kept in the state and
    seed the next call's mix-SQP, laid on that call's grid with zeros on the scales it
    gained; the warm-started weights must still reach the optimum, checked on the mixture
    log-likelihood computed here with scipy against a cold solve."""
    from cebmf.priors._mixsqp import mixsqp
    from cebmf.priors.cash import _saved_plain_weights

    cov, theta, _ = simulate(seed=10)
    rng = np.random.default_rng(11)
    prior = get_prior("cash")
    ct = torch.tensor(cov)
    fits = []
    state = None
    for s in (1.0, 0.01):  # the grid grows below the saved scales at the second call
        x = theta * 0.05 + s * rng.normal(size=theta.size)
        res = prior.fit(torch.tensor(x), torch.full((1,), s, dtype=torch.float64), ct, state=state)
        state = res.state
        grid = np.asarray(res.g["scale"])
        pi = np.asarray(state["plain_pi"])
        assert pi.shape == grid.shape and pi.min() >= 0 and pi.sum() == pytest.approx(1.0)
        lik = stats.norm.pdf(x[:, None], 0.0, np.sqrt(s**2 + grid[None, :] ** 2))
        cold = mixsqp(torch.tensor(lik.T), None).numpy()

        def objective(w, lik=lik):
            return np.mean(np.log(lik @ w))

        assert objective(pi) >= objective(cold) - 1e-10
        fits.append((grid, pi))
    (grid1, pi1), (grid2, _) = fits
    assert grid2.size > grid1.size
    rows = np.searchsorted(grid2, grid1)
    laid = _saved_plain_weights({"plain_pi": pi1}, None, grid2, rows, "cpu").numpy()
    np.testing.assert_array_equal(laid[rows], pi1)
    assert np.all(np.delete(laid, rows) == 0)
    # a user's g_init (no saved plain weights) or a grid of another size: no warm start
    assert _saved_plain_weights({"plain_pi": pi1}, {"scale": grid1}, grid2, rows, "cpu") is None
    assert _saved_plain_weights({"plain_pi": pi1[:-1]}, None, grid1, None, "cpu") is None


def test_row_logsumexp_and_its_gradient_match_scipy():
    """The training loss's row log-sum-exp (value and gradient = softmax) against scipy,
    with -inf entries and entries of very different sizes."""
    from cebmf._math import logsumexp_rows

    rng = np.random.default_rng(4)
    a = rng.normal(scale=30.0, size=(200, 9))
    a[:, 0] = -np.inf
    a[5] = [-np.inf] * 8 + [1e6]
    a[6, 3] = -1e300
    t = torch.tensor(a, requires_grad=True)
    w = torch.tensor(rng.normal(size=200))
    value = logsumexp_rows(t)
    np.testing.assert_allclose(value.detach().numpy(), special.logsumexp(a, axis=1), rtol=1e-14)
    (value * w).sum().backward()
    grad = special.softmax(a, axis=1) * w.numpy()[:, None]
    np.testing.assert_allclose(t.grad.numpy(), grad, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("family", ["cash", "emdn", "cgb"])
def test_fit_leaves_the_global_random_state_alone_and_starts_from_torchs_default(family):
    """The network starts from PyTorch's default nn.Linear initialisation seeded with
    ``seed`` (rebuilt here by torch.manual_seed + nn.Linear), drawn from a private
    generator: the global random state is the same before and after a fit."""
    cov, _, x = simulate(n=300, d=2, nonneg=family == "cgb")
    prior = get_prior(family, seed=7)
    net = prior._build(2, 5, torch.float64, torch.device("cpu"))
    torch.manual_seed(7)
    sizes = [2, *prior.hidden]
    ref = [torch.nn.Linear(a, b) for a, b in itertools.pairwise(sizes)]
    ref.append(torch.nn.Linear(sizes[-1], 5))
    built = [*net.hidden, net.out]
    assert len(built) == len(ref)
    for layer, want in zip(built, ref, strict=True):
        torch.testing.assert_close(layer.weight, want.weight.double(), rtol=0, atol=0)
        torch.testing.assert_close(layer.bias, want.bias.double(), rtol=0, atol=0)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    prior.fit(torch.tensor(x), torch.ones(1, dtype=torch.float64), covariates=torch.tensor(cov))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("family", COVARIATE_FAMILIES)
@pytest.mark.parametrize("c", [1e-100, 1e-3, 1e3, 1e100])
def test_common_rescaling_is_exact(family, c):
    """(x, s, theta) -> (c x, c s, c theta) maps the EBNM problem onto itself: the fit on
    rescaled data must be the same prior, rescaled (the prior's means and sds times c, its
    weights unchanged), with posterior means and sds times c, the same lfsr and a
    log-likelihood lower by exactly n log c. Before the fit worked in the data's own units,
    emdn, spiked_emdn and cgb lost 12-45 nats at c = 1e-3 .. 1e12 and failed at 1e100."""
    cov, _, x = simulate(n=500, seed=6)
    s = np.random.default_rng(7).uniform(0.5, 2.0, x.size)
    unit = cebmf.ebnm(x, s, family, covariates=cov)
    big = cebmf.ebnm(c * x, c * s, family, covariates=cov)
    assert big.loglik == pytest.approx(unit.loglik - x.size * math.log(c), rel=1e-10, abs=1e-7)
    np.testing.assert_allclose(big.mean / c, unit.mean, rtol=1e-7, atol=1e-9 * s.max())
    np.testing.assert_allclose(big.sd / c, unit.sd, rtol=1e-7, atol=1e-9 * s.max())
    np.testing.assert_allclose(big.lfsr, unit.lfsr, rtol=1e-7, atol=1e-12)
    prior = get_prior(family)
    p_unit, p_big = prior.prior_parameters(unit.g, cov), prior.prior_parameters(big.g, cov)
    for key, value in p_unit.items():
        scaled = key in ("mu", "sd", "scale")
        np.testing.assert_allclose(
            np.asarray(p_big[key]) / (c if scaled else 1.0), value, rtol=1e-7, atol=1e-10
        )
    # the rescaled fit's g, given back, is the same prior on the rescaled data
    again = cebmf.ebnm(c * x, c * s, family, covariates=cov, g_init=big.g, fix_g=True)
    assert again.loglik == pytest.approx(big.loglik, rel=1e-12)


def test_covariates_in_any_units_sparse_or_named():
    """Standardisation is the same in any units (columns of size 1e-300 or 1e300 vary as
    much as at size 1: kept, same z; a constant or all-zero column is dropped); sparse
    covariates are the dense ones; non-numeric DataFrame columns, 3-D arrays and float32
    overflow get errors that name the argument and the fix."""
    import pandas as pd
    import scipy.sparse as sp

    from cebmf.priors._covariates import standardize

    rng = np.random.default_rng(12)
    cov = rng.normal(size=(80, 3))
    want = (cov - cov.mean(0)) / cov.std(0)
    for c in (1e-300, 1.0, 1e300):
        z, stats = standardize(torch.tensor(cov * c))
        assert stats["keep"].all()
        np.testing.assert_allclose(z.numpy(), want, rtol=1e-12, atol=1e-12)
    _, stats = standardize(torch.tensor(np.c_[np.full(80, 5.0), np.zeros(80), cov[:, 0]]))
    assert stats["keep"].tolist() == [False, False, True]

    y = np.outer(rng.normal(size=80), rng.normal(size=25)) * 2 + rng.normal(size=(80, 25))
    onehot = (rng.random((80, 4)) < 0.3).astype(float)
    dense = cebmf.fit_ebmf(y, max_factors=2, prior_loadings="cgb", X_l=onehot)
    sparse = cebmf.fit_ebmf(y, max_factors=2, prior_loadings="cgb", X_l=sp.csr_matrix(onehot))
    assert sparse.elbo == dense.elbo
    one = cebmf.ebnm(y[:, 0], 1.0, "cash", covariates=sp.csc_matrix(onehot))
    assert one.loglik == cebmf.ebnm(y[:, 0], 1.0, "cash", covariates=onehot).loglik
    frame = pd.DataFrame({"x": cov[:, 0], "batch": pd.Categorical(["a", "b"] * 40)})
    with pytest.raises(
        TypeError, match=r"X_l has non-numeric column\(s\) \['batch'\].*get_dummies"
    ):
        cebmf.fit_ebmf(y, prior_loadings="cash", X_l=frame)
    with pytest.raises(ValueError, match=r"X_f must be 1-D or 2-D"):
        cebmf.fit_ebmf(y, prior_factors="cash", X_f=np.zeros((25, 2, 1)))
    big = f"{np.abs(cov * 1e300).max():.3g}".replace("+", r"\+")
    with pytest.raises(
        ValueError, match=rf"X_l's largest absolute value, {big}, overflows float32"
    ):
        cebmf.fit_ebmf(y, prior_loadings="cash", X_l=cov * 1e300, dtype="float32")


def test_lbfgs_step_overflow_keeps_the_best_point(monkeypatch):
    """A strong-Wolfe search whose step outgrows float32 (seen with a nonnegative cgb in
    EBMF: the truncated slab's mean runs off) raises an overflow error inside L-BFGS;
    training stops there and keeps the best point evaluated, never below the start. Here
    L-BFGS is made to fail after a few evaluations; then a real nonnegative cgb fit."""
    cov, _, x = simulate(n=400, seed=13, nonneg=True)
    plain = cebmf.ebnm(x, 1.0, "generalized_binary")
    real_step = torch.optim.LBFGS.step

    def failing_step(self, closure):
        calls = {"n": 0}

        def counted():
            calls["n"] += 1
            if calls["n"] > 3:
                raise RuntimeError("value cannot be converted to type float without overflow")
            return closure()

        return real_step(self, counted)

    monkeypatch.setattr(torch.optim.LBFGS, "step", failing_step)
    res = cebmf.ebnm(x, 1.0, "cgb", covariates=cov, nonnegative=True)
    assert np.isfinite(res.loglik) and res.loglik >= plain.loglik - 1e-6 * x.size
    monkeypatch.setattr(torch.optim.LBFGS, "step", real_step)

    rng = np.random.default_rng(0)
    n, p = 120, 40
    loadings = np.abs(rng.normal(size=(n, 2))) * (rng.random((n, 2)) < 0.4)
    y = loadings @ np.abs(rng.normal(size=(p, 2))).T * 3 + rng.normal(size=(n, p))
    fit = cebmf.fit_ebmf(
        y,
        max_factors=4,
        prior_loadings=get_prior("cgb", nonnegative=True),
        X_l=rng.normal(size=(n, 2)),
    )
    assert fit.n_factors >= 2 and np.all(fit.L >= 0)
    assert np.all(np.diff(fit.elbo_trace) >= -1e-9 * abs(fit.elbo))


@pytest.mark.parametrize("family", ["emdn", "spiked_emdn", "cgb"])
def test_warm_start_on_data_of_another_scale_moves_to_its_units(family):
    """A saved prior re-expressed in units 1e4 times smaller or larger is the same prior
    (g_init + fix_g give the same log-likelihood, to rounding); a warm start on data
    1e-4 or 1e4 times the saved fit's works in the new data's units, ends within a few
    nats of a cold fit (it was 31-353 nats behind for emdn in the saved units), and never
    below the saved prior on those data."""
    cov, _, x = simulate(n=600, seed=3)
    s = np.ones_like(x)
    prior = get_prior(family)
    first = cebmf.ebnm(x, s, family, covariates=cov)
    for c in (1e-4, 1e4):
        moved = prior._state_in_units(first.state, 1.0 / c)
        g = dict(first.g, network=moved["network"], extra=moved["extra"], unit=first.g["unit"] * c)
        if "log_sd_bounds" in moved:
            g["log_sd_bounds"] = moved["log_sd_bounds"] + math.log(first.g["unit"] * c)
        same = cebmf.ebnm(x, s, family, covariates=cov, g_init=g, fix_g=True)
        assert same.loglik == pytest.approx(first.loglik, rel=1e-11)
        cold = cebmf.ebnm(c * x, c * s, family, covariates=cov)
        warm = cebmf.ebnm(c * x, c * s, family, covariates=cov, state=first.state)
        saved = cebmf.ebnm(c * x, c * s, family, covariates=cov, g_init=first.g, fix_g=True)
        assert warm.g["unit"] == pytest.approx(cold.g["unit"], rel=1e-12)
        assert warm.loglik >= saved.loglik
        assert warm.loglik >= cold.loglik - 5.0


def _plain_normal_mixture_optimum(x, s, k, spiked, starts=4):
    """Best log-likelihood of the constant prior sum_k w_k N(0, sd_k^2) (+ w0 delta_0):
    emdn's family with constant network outputs and means 0, by scipy from several
    starts (independent of cebmf)."""
    from scipy import optimize

    def negll(v):
        lw = v[: k + spiked] - special.logsumexp(v[: k + spiked])
        var = np.exp(2 * v[k + spiked :])[None, :] + (s * s)[:, None]
        comp = -0.5 * (np.log(2 * np.pi * var) + (x * x)[:, None] / var)
        if spiked:
            comp = np.c_[stats.norm.logpdf(x, 0, s), comp]
        return -special.logsumexp(comp + lw, axis=1).sum()

    best = -np.inf
    for seed in range(starts):
        rng = np.random.default_rng(100 + seed)
        v0 = np.r_[np.zeros(k + spiked), np.sort(rng.uniform(np.log(1e-3), np.log(300), k))]
        res = optimize.minimize(negll, v0, method="L-BFGS-B", options={"maxiter": 3000})
        best = max(best, -res.fun)
    return best


@pytest.mark.parametrize("family", ["emdn", "spiked_emdn"])
def test_emdn_reaches_its_own_plain_optimum_on_wide_data(family):
    """Effects spread over 1e-2..1e2 and s over 1e-2..10, uninformative covariates: a cold
    emdn fit is at least the best plain mixture of its own family (constant outputs, here
    with means 0, fitted by scipy). It was 36 nats below it (emdn) before, from a start
    that kept the five heaviest ash components and 100 L-BFGS iterations."""
    rng = np.random.default_rng(0)
    n = 2000
    scale = np.exp(rng.uniform(np.log(1e-2), np.log(1e2), n))
    theta = np.where(rng.random(n) < 0.5, 0.0, rng.normal(size=n) * scale)
    s = np.exp(rng.uniform(np.log(1e-2), np.log(1e1), n))
    x = theta + s * rng.normal(size=n)
    cov = np.random.default_rng(1).normal(size=(n, 2))
    res = cebmf.ebnm(x, s, family, covariates=cov)
    best = _plain_normal_mixture_optimum(x, s, 5, int(family == "spiked_emdn"))
    assert res.loglik >= best - 1e-6 * n


@pytest.mark.parametrize("family", COVARIATE_FAMILIES)
def test_warm_training_stops_when_the_loglik_stops_rising(family, monkeypatch):
    """L-BFGS follows the penalised loss, but only the point of highest log-likelihood is
    kept: a warm-started call's training ends once _PATIENCE evaluations in a row found
    none higher (counted by wrapping the training loss). A cold fit searches on (its dips
    can end higher), and a warm call still never loses log-likelihood."""
    from cebmf.priors import _covariates

    cov, _, x = simulate(n=3000, seed=21)
    xt, s, ct = torch.tensor(x), torch.ones(1, dtype=torch.float64), torch.tensor(cov)
    values = []
    real = _covariates.logsumexp_rows

    def counted(a):
        out = real(a)
        if a.requires_grad:  # the training closure (not the exact evaluations)
            values.append(float(out.detach().sum(dtype=torch.float64)))
        return out

    monkeypatch.setattr(_covariates, "logsumexp_rows", counted)
    prior = get_prior(family)
    cold = prior.fit(xt, s, ct)
    n_cold = len(values)
    monkeypatch.setattr(_covariates, "_PATIENCE", 10**9)
    values.clear()
    assert prior.fit(xt, s, ct).loglik == cold.loglik  # patience leaves cold fits alone
    assert len(values) == n_cold
    monkeypatch.setattr(_covariates, "_PATIENCE", 4)
    rng = np.random.default_rng(3)
    moved = xt + torch.tensor(0.3 * rng.normal(size=x.size))  # the next sweep's data
    values.clear()
    warm = prior.fit(moved, s, ct, state=cold.state)
    trace = np.array(values)
    best_at = int(np.argmax(trace))
    assert len(trace) - 1 - best_at <= 4  # at most 4 evaluations after the best one
    if len(trace) < 2 * prior.warm_iter:  # stopped before L-BFGS's own budget
        assert len(trace) - 1 - best_at == 4
    saved = prior.fit(moved, s, ct, g_init=cold.g, fix_g=True)  # the start, not refitted
    assert warm.loglik >= saved.loglik - 1e-9 * abs(saved.loglik)


@pytest.mark.parametrize("family", COVARIATE_FAMILIES)
def test_a_warm_refit_reports_what_it_gained_over_the_saved_prior(family):
    """state["refit_gain"] of a warm-started call is its log-likelihood less that of the
    saved prior on the same data (computed here by fix_g); a cold fit reports none."""
    cov, _, x = simulate(n=2000, seed=5, nonneg=family == "cgb")
    xt, s, ct = torch.tensor(x), torch.ones(1, dtype=torch.float64), torch.tensor(cov)
    prior = get_prior(family)
    cold = prior.fit(xt, s, ct)
    assert "refit_gain" not in cold.state
    rng = np.random.default_rng(4)
    for shift in (0.0, 0.5):  # the same data (nothing to gain) and data that moved
        moved = xt + torch.tensor(shift * rng.normal(size=x.size))
        warm = prior.fit(moved, s, ct, state=cold.state)
        saved = prior.fit(moved, s, ct, g_init=cold.g, fix_g=True)
        gain = warm.state["refit_gain"]
        assert gain >= 0.0
        assert gain == pytest.approx(warm.loglik - saved.loglik, abs=1e-7 * abs(saved.loglik))


def test_backfit_defers_refits_that_gain_nothing_and_converges_as_without(monkeypatch):
    """Covariate priors whose refits stop gaining are updated under their current g for a
    while (fix_g: no training). A converged backfit still means what it means without
    deferral: at its end, a sweep that refits every prior gains less than tol (checked by
    running one); the ELBO never decreases; and the lfsr (computed at the end, under the
    last update's prior and covariates) are those of a direct EBNM call on the last
    inputs."""
    from cebmf.model import fit as fit_module
    from cebmf.priors._covariates import CovariatePrior

    calls = {"refit": 0, "fixed": 0}
    real_fit = CovariatePrior._fit

    def counted(self, x, s, **kw):
        calls["fixed" if kw["fix_g"] else "refit"] += 1
        return real_fit(self, x, s, **kw)

    # seed 5: without the confirming sweep this backfit would stop where a full sweep
    # still gains about 250 x tol
    d = cebmf.datasets.simulate_covariate_sparsity(n=600, p=80, k=3, d=3, seed=5)
    tol = 600 * 80 * np.sqrt(np.finfo(float).eps)
    gains = []  # of a sweep refitting every prior, at the end of each converged backfit
    real_backfit = fit_module._backfit

    def backfit(engine, *args):
        out = real_backfit(engine, *args)
        assert engine.refit_threshold is None  # deferral is off outside the backfit
        if out[0]:
            snap, before = engine.snapshot(), engine.elbo()
            fixed_before = calls["fixed"]
            fit_module._sweep(engine)
            assert calls["fixed"] == fixed_before  # every prior was refitted
            gains.append(engine.elbo() - before)
            engine.restore(snap)
        return out

    monkeypatch.setattr(CovariatePrior, "_fit", counted)
    monkeypatch.setattr(fit_module, "_backfit", backfit)
    res = cebmf.fit_ebmf(
        d.Y, prior_loadings="cash", X_l=d.X_l, noise="constant", keep_ebnm_inputs=True
    )
    assert res.converged and res.n_factors >= 2
    assert calls["fixed"] > 0  # refits were deferred
    assert gains and all(g < tol for g in gains)
    trace = np.asarray(res.elbo_trace)
    assert np.all(np.diff(trace) >= -1e-9 * np.abs(trace).max())
    for k in range(res.n_factors):
        x, s = res.ebnm_inputs[k]["loadings"]
        direct = cebmf.ebnm(
            x, s, prior="cash", covariates=d.X_l, g_init=res.priors[k]["loadings"], fix_g=True
        )
        np.testing.assert_allclose(res.L_lfsr[:, k], direct.lfsr, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(res.L[:, k], direct.mean, rtol=1e-10, atol=1e-12)


def test_a_block_prior_reports_a_refit_gain_only_when_every_block_does():
    """refit_gain of a BlockPrior is the sum of its blocks' when all blocks are
    warm-refitted covariate priors (each checked against a fix_g call under the saved
    block prior); a plain block has no such gain, so neither has the BlockPrior."""
    from cebmf.priors.block import BlockPrior

    cov_a, _, x_a = simulate(n=600, seed=8)
    cov_b, _, x_b = simulate(n=400, seed=9)
    x = torch.tensor(np.concatenate([x_a, x_b]))
    layout = np.zeros((1000, 6))
    layout[:600, :3], layout[600:, 3:] = cov_a, cov_b
    cov, s = torch.tensor(layout), torch.ones(1, dtype=torch.float64)
    moved = x + torch.tensor(0.3 * np.random.default_rng(2).normal(size=1000))
    both = BlockPrior([600, 400], ["cash", "cgb"], covariate_columns=[[0, 1, 2], [3, 4, 5]])
    cold = both.fit(x, s, cov)
    assert "refit_gain" not in cold.state
    warm = both.fit(moved, s, cov, state=cold.state)
    saved = both.fit(moved, s, cov, g_init=cold.g, fix_g=True)
    gain = warm.state["refit_gain"]
    assert gain == pytest.approx(warm.loglik - saved.loglik, abs=1e-7 * abs(saved.loglik))
    assert gain == pytest.approx(sum(b["refit_gain"] for b in warm.state["blocks"]), rel=1e-12)
    mixed = BlockPrior([600, 400], ["cash", "point_normal"], covariate_columns=[[0, 1, 2], None])
    first = mixed.fit(x, s, cov)
    assert "refit_gain" not in mixed.fit(moved, s, cov, state=first.state).state


# ---- g_init / state / covariates checks of the covariate families --------------------
# the fits are small and short (n = 40, 5 L-BFGS iterations): only their g and state matter
_SMALL = {
    "cash": ("cash", {}),
    "cash_nonneg": ("cash", {"nonnegative": True}),
    "cgb": ("cgb", {}),
    "cgb_nonneg": ("cgb", {"nonnegative": True}),
    "emdn": ("emdn", {"n_components": 3}),
    "spiked_emdn": ("spiked_emdn", {"n_components": 3}),
    "cash_linear": ("cash", {"hidden_layers": 0}),
}


@pytest.fixture(scope="module")
def small_fits():
    """{key: (prior, x, cov, result)} of each entry of ``_SMALL``, 3 covariates."""
    cov, _, x = simulate(n=40, d=3, seed=21, nonneg=True)
    fits = {}
    for key, (family, options) in _SMALL.items():
        prior = get_prior(family, max_iter=5, **options)
        fits[key] = (prior, x, cov, cebmf.ebnm(x, 1.0, prior, covariates=cov))
    return fits


def _h5ad_round_trip(g: dict, path) -> dict:
    """``g`` as cebmf.tl stores it in ``uns`` and reads it back from an .h5ad file."""
    import anndata

    from cebmf.tl._results import h5_safe

    adata = anndata.AnnData(np.zeros((1, 1)))
    adata.uns["g"] = h5_safe(g)
    adata.write_h5ad(path)
    return anndata.read_h5ad(path).uns["g"]


@pytest.mark.parametrize("family", ["cash", "cgb"])
def test_g_init_of_a_nonnegative_fit_is_refused_by_the_real_line_prior(
    family, small_fits, tmp_path
):
    """A nonnegative fit's g (exponential grid / truncated slab) given to the real-line
    prior used to be read as that prior's (grid means as sds; posterior means < 0). It is
    refused, naming both values; the nonnegative prior takes it back, also after an .h5ad
    round trip (numpy bools and arrays), with the same log-likelihood."""
    prior, x, cov, res = small_fits[f"{family}_nonneg"]
    with pytest.raises(
        ValueError,
        match=r"g_init was fitted with nonnegative=True but this prior has nonnegative=False",
    ):
        cebmf.ebnm(x, 1.0, family, covariates=cov, g_init=res.g, fix_g=True)
    back = _h5ad_round_trip(res.g, tmp_path / "g.h5ad")
    again = cebmf.ebnm(x, 1.0, prior, covariates=cov, g_init=back, fix_g=True)
    assert again.loglik == res.loglik
    with pytest.raises(ValueError, match=r"g_init was fitted with nonnegative=True"):
        cebmf.ebnm(x, 1.0, family, covariates=cov, g_init=back, fix_g=True)
    flipped = dict(res.g, nonnegative=np.bool_(False))  # numpy bool, as the default prior
    with pytest.raises(ValueError, match=r"fitted with nonnegative=False but this prior has"):
        cebmf.ebnm(x, 1.0, prior, covariates=cov, g_init=flipped, fix_g=True)
    with pytest.raises(TypeError, match=r"g_init\['nonnegative'\] must be True or False"):
        cebmf.ebnm(x, 1.0, prior, covariates=cov, g_init=dict(res.g, nonnegative="yes"))


@pytest.mark.parametrize("family", ["emdn", "spiked_emdn"])
def test_emdn_g_init_or_state_of_another_n_components_is_refused(family, small_fits):
    """A g_init (or state) of n_components=3 given to an n_components=5 prior had its
    network's outputs truncated or padded (logits read as means, means as log sds): a
    garbage prior. Refused, naming the argument and both values; n_components=3 takes it."""
    prior, x, cov, res = small_fits[family]
    five = get_prior(family, max_iter=5)
    with pytest.raises(
        ValueError, match=r"g_init was fitted with n_components=3 but this prior has n_compon"
    ):
        cebmf.ebnm(x, 1.0, five, covariates=cov, g_init=res.g, fix_g=True)
    n_out = 9 + (family == "spiked_emdn")
    with pytest.raises(
        ValueError,
        match=rf"state\['network'\] has {n_out} outputs, those of n_components=3, but this "
        r"prior has n_components=5",
    ):
        cebmf.ebnm(x, 1.0, five, covariates=cov, state=res.state)
    same = cebmf.ebnm(x, 1.0, prior, covariates=cov, g_init=res.g, fix_g=True)
    assert same.loglik == res.loglik


def test_cash_g_init_with_a_grid_of_another_size_than_its_network_is_refused(small_fits):
    """One network output per grid scale: a g_init whose grid lost a scale had its output
    layer truncated silently. (A warm state on data that grow the grid still pads the
    saved network: see test_cash_warm_starts_its_plain_mixture_on_the_current_grid.)"""
    prior, x, cov, res = small_fits["cash"]
    short = dict(res.g, scale=res.g["scale"][:-1])
    k = res.g["scale"].size
    with pytest.raises(
        ValueError,
        match=rf"g_init\['network'\] has {k} outputs but g_init\['scale'\] has {k - 1} scales",
    ):
        cebmf.ebnm(x, 1.0, prior, covariates=cov, g_init=short, fix_g=True)


@pytest.mark.parametrize(
    "key, missing",
    [
        ("cash", "network"),
        ("cash", "covariate_stats"),
        ("cash", "scale"),
        ("cash", "nonnegative"),
        ("cgb", "network"),
        ("cgb", "mu"),
        ("cgb", "scale"),
        ("cgb", "unit"),
        ("emdn", "covariate_stats"),
        ("emdn", "log_sd_bounds"),
        ("spiked_emdn", "n_components"),
    ],
)
def test_covariate_g_init_without_a_key_names_it(key, missing, small_fits):
    """A covariate prior's g_init lacking an entry the fit reads used to be accepted (no
    network: the posteriors of a freshly fitted plain prior; no covariate_stats: the
    covariates standardised on the new data, ...): refused as for the plain families."""
    prior, x, cov, res = small_fits[key]
    g = {k: v for k, v in res.g.items() if k != missing}
    with pytest.raises(ValueError, match=rf"g_init lacks the key\(s\) \['{missing}'\]"):
        cebmf.ebnm(x, 1.0, prior, covariates=cov, g_init=g, fix_g=True)


def _edited(g: dict, path: tuple, value) -> dict:
    """A deep copy of ``g`` with the entry at ``path`` (keys, then an array index) set."""
    import copy

    g = copy.deepcopy(g)
    *keys, last = path
    target = g
    for k in keys:
        target = target[k]
    target[last] = value
    return g


@pytest.mark.parametrize(
    "key, path, value, match",
    [
        (
            "cash",
            ("network", "out.bias", 0),
            np.nan,
            r"g_init\['network'\]\['out.bias'\] must be fin",
        ),
        ("cgb", ("network", "hidden.0.weight", 0), np.inf, r"\['hidden.0.weight'\] must be finite"),
        ("emdn", ("network", "out.bias", 2), np.nan, r"g_init\['network'\]\['out.bias'\] must be"),
        ("cash", ("scale", 1), -1.0, r"g_init\['scale'\] must be >= 0"),
        ("cgb", ("scale",), -1.0, r"g_init\['scale'\] must be a finite number > 0, got -1.0"),
        ("cgb", ("mu",), np.nan, r"g_init\['mu'\] must be a finite number, got nan"),
        ("cgb", ("unit",), 0.0, r"g_init\['unit'\] must be a finite number > 0"),
        ("cash", ("covariate_stats", "sd", 0), 0.0, r"\['covariate_stats'\]\['sd'\] must be > 0"),
        ("emdn", ("log_sd_bounds",), np.array([1.0, -1.0]), r"\['log_sd_bounds'\] must be two"),
    ],
)
def test_covariate_g_init_with_an_invalid_value_names_it(key, path, value, match, small_fits):
    """Invalid values in a covariate prior's g_init (a NaN network weight gave loglik NaN
    silently; a negative grid scale or slab sd was accepted) are refused before any
    computation, naming the entry."""
    prior, x, cov, res = small_fits[key]
    with pytest.raises(ValueError, match=match):
        cebmf.ebnm(x, 1.0, prior, covariates=cov, g_init=_edited(res.g, path, value), fix_g=True)


def test_cgb_g_init_slab_is_its_mu_and_scale(small_fits):
    """``g["mu"]`` and ``g["scale"]`` (documented, returned by prior_parameters) define the
    slab of a cgb g_init; ``g["extra"]`` (the same parameters as the fit holds them) is
    used only while it agrees with them. An edited scale or mu used to be ignored: the
    log-likelihood under fix_g is checked against the prior evaluated here with scipy."""
    prior, x, cov, res = small_fits["cgb"]
    pi0 = prior.prior_parameters(res.g, cov)["pi0"]

    def loglik(mu, sd):
        slab = stats.norm.logpdf(x, mu, math.sqrt(1.0 + sd * sd))
        return special.logsumexp(
            np.c_[np.log(pi0) + stats.norm.logpdf(x), np.log1p(-pi0) + slab], axis=1
        ).sum()

    same = cebmf.ebnm(x, 1.0, prior, covariates=cov, g_init=res.g, fix_g=True)
    assert same.loglik == res.loglik  # the saved g, reused exactly
    assert res.loglik == pytest.approx(loglik(res.g["mu"], res.g["scale"]), rel=1e-6)
    for edit in ({"scale": 3.0 * res.g["scale"]}, {"mu": res.g["mu"] + 1.5}, {"extra": {}}):
        g = dict(res.g, **edit)
        fixed = cebmf.ebnm(x, 1.0, prior, covariates=cov, g_init=g, fix_g=True)
        assert fixed.loglik == pytest.approx(loglik(g["mu"], g["scale"]), rel=1e-9)
    # an edited extra alone (the internal copy) does not change the prior
    g = dict(res.g, extra={"mu": 5.0, "log_sd": 2.0})
    fixed = cebmf.ebnm(x, 1.0, prior, covariates=cov, g_init=g, fix_g=True)
    assert fixed.loglik == res.loglik


def test_g_init_or_state_of_other_hidden_layers_is_refused(small_fits):
    """A g_init or state whose network has other hidden layers crashed with a bare
    KeyError 'hidden.0.weight' (or blamed the covariates): refused, naming the argument
    and both architectures, whether g_init records `hidden` or not."""
    deep, x, cov, res = small_fits["cash"]
    _, _, _, lin = small_fits["cash_linear"]
    linear = get_prior("cash", hidden_layers=0, max_iter=5)
    with pytest.raises(
        ValueError, match=r"g_init was fitted with hidden=\(16,\) but this prior has hidden=\(\)"
    ):
        cebmf.ebnm(x, 1.0, linear, covariates=cov, g_init=res.g, fix_g=True)
    without = {k: v for k, v in res.g.items() if k != "hidden"}
    with pytest.raises(
        ValueError, match=r"g_init\['network'\] has hidden layers \(16,\) but this prior has hid"
    ):
        cebmf.ebnm(x, 1.0, linear, covariates=cov, g_init=without, fix_g=True)
    with pytest.raises(
        ValueError, match=r"state\['network'\] has hidden layers \(16,\) but this prior has hidd"
    ):
        cebmf.ebnm(x, 1.0, linear, covariates=cov, state=res.state)
    with pytest.raises(
        ValueError, match=r"g_init was fitted with hidden=\(\) but this prior has hidden=\(16,\)"
    ):
        cebmf.ebnm(x, 1.0, deep, covariates=cov, g_init=lin.g, fix_g=True)
    with pytest.raises(ValueError, match=r"state\['network'\] has hidden layers \(\) but"):
        cebmf.ebnm(x, 1.0, deep, covariates=cov, state=lin.state)


@pytest.mark.parametrize("key", ["cash", "cgb", "spiked_emdn"])
def test_prior_parameters_check_their_covariates(key, small_fits):
    """prior_parameters / network_outputs took covariates of another width (a torch
    IndexError about a 'mask') and NaN covariates (NaN weights, silently): refused as
    fix_g refuses them, naming g / covariates."""
    prior, _, cov, res = small_fits[key]
    with pytest.raises(ValueError, match=r"g was fitted to 3 covariates, but 2 are given"):
        prior.prior_parameters(res.g, cov[:, :2])
    with pytest.raises(ValueError, match=r"g was fitted to 3 covariates, but 4 are given"):
        prior.network_outputs(res.g, np.c_[cov, cov[:, :1]])
    bad = cov[:5].copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"covariates contains 1 non-finite value"):
        prior.prior_parameters(res.g, bad)
    # the same values from any array type
    np.testing.assert_array_equal(
        prior.network_outputs(res.g, torch.tensor(cov[:5], dtype=torch.float32)).numpy(),
        prior.network_outputs(res.g, cov[:5].astype(np.float32)).numpy(),
    )
