"""The sparsity-seeking rotation proposed between greedy and backfit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import cebmf
from cebmf.model.rotation import sparse_rotation, varimax

F64 = torch.float64


def _criterion(lam: np.ndarray) -> float:
    n = lam.shape[0]
    sq = lam * lam
    return float((sq * sq).sum() - (sq.sum(0) ** 2).sum() / n)


def test_varimax_matches_brute_force_over_plane_rotations():
    rng = np.random.default_rng(0)
    # two sparse heavy-tailed columns, mixed by a 0.6 rad rotation
    src = rng.standard_t(3, (500, 2)) * (rng.random((500, 2)) < 0.3)
    c, s = math.cos(0.6), math.sin(0.6)
    a = src @ np.array([[c, -s], [s, c]])
    rot = varimax(torch.tensor(a, dtype=F64)).numpy()
    np.testing.assert_allclose(rot.T @ rot, np.eye(2), atol=1e-12)
    best = max(
        _criterion(a @ np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]]))
        for t in np.linspace(0.0, math.pi / 2, 20001)
    )
    assert _criterion(a @ rot) >= best - 1e-9 * abs(best)


@pytest.mark.parametrize("side", ["loadings", "factors"])
def test_sparse_rotation_keeps_the_product_and_unmixes_planted_sparse_columns(side):
    rng = np.random.default_rng(1)
    n, p, k = 3000, 400, 4
    sparse = rng.normal(size=(n if side == "loadings" else p, k))
    sparse *= rng.random(sparse.shape) < 0.2
    dense = rng.normal(size=(p if side == "loadings" else n, k))
    lo, fa = (sparse, dense) if side == "loadings" else (dense, sparse)
    q = np.linalg.qr(rng.normal(size=(k, k)))[0]
    # mixed columns, with the scale of one factor pushed almost entirely onto F
    scale = np.array([1e-7, 1.0, 1.0, 1.0])
    lm, fm = lo @ q * scale, fa @ q / scale
    t_l, t_f = sparse_rotation(torch.tensor(lm), torch.tensor(fm), side)
    new_l, new_f = lm @ t_l.numpy(), fm @ t_f.numpy()
    np.testing.assert_allclose(new_l @ new_f.T, lo @ fa.T, rtol=1e-9, atol=1e-9)
    found = new_l if side == "loadings" else new_f
    corr = np.abs(np.corrcoef(found.T, sparse.T)[:k, k:])
    # each planted column is matched by one rotated column (not exactly: the planted
    # columns are only nearly orthogonal, sample correlations ~0.1 at p = 400)
    assert np.all(corr.max(0) > 0.98) and np.all(corr.max(1) > 0.98)
    assert np.all(np.sort(corr, 0)[-2] < 0.25)
    np.testing.assert_allclose(np.linalg.norm(new_l, axis=0), np.linalg.norm(new_f, axis=0))


def test_sparse_rotation_declines_rank_deficient_factors():
    rng = np.random.default_rng(2)
    lm = rng.normal(size=(100, 3))
    lm[:, 2] = 2.0 * lm[:, 0]
    fm = rng.normal(size=(50, 3))
    assert sparse_rotation(torch.tensor(lm), torch.tensor(fm), "loadings") is None
    lm[:, 2] = 0.0
    assert sparse_rotation(torch.tensor(lm), torch.tensor(fm), "loadings") is None


@pytest.mark.parametrize("seed", [0, 1])
def test_rotation_saves_backfit_sweeps_on_mixed_greedy_factors(seed):
    # make_data.py's dense design: loadings 80% zeros, Gaussian factors of equal size, so
    # every greedy factor is a mixture of the true ones
    rng = np.random.default_rng(seed)
    n, p, k = 1000, 300, 5
    lo = rng.normal(size=(n, k)) * (rng.random((n, k)) < 0.2)
    fa = rng.normal(size=(p, k))
    y = lo @ fa.T + rng.normal(size=(n, p))
    rotated = cebmf.fit_ebmf(y, noise="constant")
    plain = cebmf.fit_ebmf(y, noise="constant", rotate=False)
    assert rotated.n_factors == plain.n_factors == k
    assert rotated.elbo >= plain.elbo - 1e-6 * abs(plain.elbo)
    assert rotated.n_iter <= plain.n_iter / 3
    assert np.all(np.diff(rotated.elbo_trace) >= -1e-9 * abs(rotated.elbo))
    # the rotated fit finds the planted sparse loadings
    corr = np.abs(np.corrcoef(rotated.L.T, lo.T)[:k, k:])
    assert np.all(corr.max(0) > 0.95)


def test_rotation_leaves_fixed_factors_alone():
    rng = np.random.default_rng(3)
    n, p = 400, 120
    means = rng.normal(3, 1, p)
    lo = rng.normal(size=(n, 3)) * (rng.random((n, 3)) < 0.25)
    fa = rng.normal(size=(p, 3))
    y = means + lo @ fa.T + rng.normal(0, 0.5, (n, p))
    res = cebmf.fit_ebmf(y, fixed_loadings=np.ones(n), noise="constant")
    assert res.fixed[0] == (True, False)
    np.testing.assert_array_equal(res.L[:, 0], 1.0)
    assert np.corrcoef(res.F[:, 0], means)[0, 1] > 0.99
    assert res.n_factors == 4
