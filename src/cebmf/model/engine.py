"""The EBMF state and its exact coordinate updates.

Model: Y = L F^T + E, E_ij ~ N(0, 1/tau_ij), tau_ij = a_i b_j; mean-field
q(L, F) = prod_k q(l_k) q(f_k) with first and second moments (L, L2), (F, F2).

Rank-one update of loadings k (factors are symmetric): with c_k = b^T F2_k and
M = F^T diag(b) F (first moments),

    x_i = [ (Y diag(b) F)_ik - sum_{k' != k} L_ik' M_k'k ] / c_k,   s_i^2 = 1 / (a_i c_k),

then EBNM(x, s) gives g_k and the posterior moments of l_k. With no missing data one
product ``Y @ (b * F)`` serves every k of a sweep; the residual matrix is never formed.
Dense data with missing entries (mask m) keep the masked residual R = m * (Y - L F^T)
instead: x_i = [ (R (b f_k))_i + L_ik (m (b f_k^2))_i ] / (m (b F2_k))_i.

ELBO = sum_ij m_ij [ -1/2 log 2 pi + 1/2 log tau_ij - 1/2 tau_ij E R_ij^2 ]
       + sum_k (KL^l_k + KL^f_k),
KL = log p(x | g, s) - E_q sum_i log N(x_i; theta_i, s_i^2), accumulated in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data.matrix import DataMatrix
from ..priors.base import Prior
from .noise import estimate_precision, uses_rows

_F64 = torch.float64
LOG_2PI = math.log(2.0 * math.pi)


def lfsr_at_end(prior: Prior, self_covariates: bool = False) -> bool:
    """Whether a side with this prior skips the lfsr in its updates and gets it once at the
    end of the fit (:meth:`Engine.final_lfsr`, by ``fix_g`` under the last update's prior
    and covariates): every prior, except a covariate-moderated one under
    ``self_covariates``, whose covariates (the other factors) move after its update."""
    return not (prior.uses_covariates and self_covariates)


@dataclass
class Side:
    """One side (loadings or factors) of every factor: moments, priors and fits."""

    name: str  # "loadings" or "factors"
    mean: torch.Tensor  # (n, K) posterior means
    var: torch.Tensor  # (n, K) posterior variances (kept apart: mean^2 + var loses var)
    lfsr: torch.Tensor  # (n, K)
    priors: list[Prior] = field(default_factory=list)
    states: list[Any] = field(default_factory=list)
    g: list[dict] = field(default_factory=list)
    kl: list[torch.Tensor] = field(default_factory=list)  # 0-dim float64 each
    fixed: list[bool] = field(default_factory=list)
    covariates: torch.Tensor | None = None
    last_x: list[torch.Tensor | None] = field(default_factory=list)
    last_s: list[torch.Tensor | None] = field(default_factory=list)
    # deferred prior refits (Engine.update): updates left to run under the current g, and
    # how many refits in a row gained less than the engine's threshold
    idle: list[int] = field(default_factory=list)
    streak: list[int] = field(default_factory=list)

    @property
    def k(self) -> int:
        return self.mean.shape[1]

    def second_moments(self, cols: torch.Tensor) -> torch.Tensor:
        """Posterior second moments E[theta^2] = mean^2 + var of columns ``cols``."""
        mean = self.mean.index_select(1, cols)
        return mean * mean + self.var.index_select(1, cols)

    def append(self, mean, var, prior: Prior, fixed: bool) -> None:
        self.mean = torch.cat([self.mean, mean[:, None]], 1)
        self.var = torch.cat([self.var, var[:, None]], 1)
        self.lfsr = torch.cat([self.lfsr, torch.ones_like(mean)[:, None]], 1)
        self.priors.append(prior)
        self.states.append(None)
        self.g.append({})
        self.kl.append(torch.zeros((), dtype=_F64, device=mean.device))
        self.fixed.append(fixed)
        self.last_x.append(None)
        self.last_s.append(None)
        self.idle.append(0)
        self.streak.append(0)

    def keep(self, idx: list[int]) -> None:
        sel = torch.as_tensor(idx, dtype=torch.long, device=self.mean.device)
        self.mean = self.mean.index_select(1, sel)
        self.var = self.var.index_select(1, sel)
        self.lfsr = self.lfsr.index_select(1, sel)
        for name in _PER_FACTOR:
            lst = getattr(self, name)
            setattr(self, name, [lst[i] for i in idx])

    def snapshot(self, self_covariates: bool) -> dict:
        # lfsr all left to the end (Engine.final_lfsr): no copy to keep (the inputs it
        # needs, last_x / last_s, are kept by reference)
        lfsr_later = all(lfsr_at_end(p, self_covariates) for p in self.priors)
        return {
            "mean": self.mean.clone(),
            "var": self.var.clone(),
            "lfsr": None if lfsr_later else self.lfsr.clone(),
            **{n: list(getattr(self, n)) for n in _PER_FACTOR},
        }

    def restore(self, snap: dict) -> None:
        """Back to ``snap``, copied: the updates write in place, and the snapshot may be
        needed again (it is the ``prev`` point of the next extrapolation)."""
        for name, value in snap.items():
            if value is None:  # an lfsr left to the end: placeholders of the right shape
                self.lfsr = torch.ones_like(snap["mean"])
                continue
            setattr(self, name, value.clone() if isinstance(value, torch.Tensor) else list(value))


#: The most updates in a row that run under a deferred prior's previous g.
_MAX_DEFERRED = 8

_PER_FACTOR = ("priors", "states", "g", "kl", "fixed", "last_x", "last_s", "idle", "streak")


class ProductCache:
    """Columns of ``Y^T L`` (for side ``factors``) or ``Y F`` (``loadings``) with per-column
    validity, so that an update of factor k only recomputes column k. The n x K values are
    allocated on first use (a fit with column noise never needs ``Y F``)."""

    def __init__(self, n: int, valid: list[bool], values: torch.Tensor | None, dtype, device):
        self.n, self.dtype, self.device = n, dtype, device
        self.valid = valid
        self.values = values

    @classmethod
    def empty(cls, n: int, k: int, dtype, device) -> ProductCache:
        return cls(n, [False] * k, None, dtype, device)

    def writable(self) -> torch.Tensor:
        """The values, allocated (zeros, all stale) if needed."""
        if self.values is None:
            self.values = torch.zeros(self.n, len(self.valid), dtype=self.dtype, device=self.device)
        return self.values

    def copy(self) -> ProductCache:
        values = None if self.values is None else self.values.clone()
        return ProductCache(self.n, list(self.valid), values, self.dtype, self.device)

    def append(self) -> None:
        if self.values is not None:
            self.values = torch.cat([self.values, self.values.new_zeros(self.n, 1)], 1)
        self.valid.append(False)

    def keep(self, idx: list[int]) -> None:
        if self.values is not None:
            sel = torch.as_tensor(idx, dtype=torch.long, device=self.device)
            self.values = self.values.index_select(1, sel)
        self.valid = [self.valid[i] for i in idx]

    def extrapolate(self, prev: ProductCache | None, beta: float, move: list[bool]) -> None:
        """The products of moved columns follow their (linear) extrapolation; columns
        without both values become stale."""
        for k, moved in enumerate(move):
            if not moved:
                continue
            if prev is not None and self.valid[k] and prev.valid[k]:
                cur = self.values[:, k]
                self.values[:, k] = cur + beta * (cur - prev.values[:, k])
            else:
                self.valid[k] = False


def _stepped(cur: torch.Tensor, prev: torch.Tensor, beta: float) -> torch.Tensor:
    """The extrapolated point cur + beta (cur - prev)."""
    return cur + beta * (cur - prev)


def _carries(mean: torch.Tensor, var: torch.Tensor) -> bool:
    """Whether a side of a factor is not exactly zero: a non-zero mean or a positive
    variance (one pass over the means in the usual case, where one is non-zero)."""
    return bool(mean.any()) or bool((var > 0).any())


def expected_loglik_normal(x, s, mean, var) -> torch.Tensor:
    """sum_i E_q log N(x_i; theta_i, s_i^2) in float64 (s may be a 1-element tensor).

    Uses E(theta - x)^2 = var + (mean - x)^2: with x / s large (tiny s), the form
    mean2 - 2 x mean + x^2 cancels catastrophically.
    """
    x, s, mean, var = (t.to(_F64) for t in (x, s, mean, var))
    dev = mean - x
    sq = (var + dev * dev) / (s * s)
    logs = torch.log(s)
    n = x.numel()
    total_logs = logs.sum() if s.numel() == n else n * logs.reshape(())
    return -0.5 * (n * LOG_2PI + 2.0 * total_logs + sq.sum())


class Engine:
    """EBMF state (moments, priors, noise) with exact rank-one and noise updates."""

    def __init__(
        self, data: DataMatrix, noise: str, keep_inputs: bool = False, self_covariates: bool = False
    ) -> None:
        self.data = data
        self.noise = noise
        self.keep_inputs = keep_inputs
        self.self_covariates = self_covariates
        # deferred refits of covariate-moderated priors (see update); the backfit sets
        # refit_threshold (nats) to switch them on
        self.refit_threshold: float | None = None
        self.deferred = False  # an update of the current sweep ran under its previous g
        n, p = data.shape
        dt, dev = data.dtype, data.device
        self.loadings = Side("loadings", *(torch.zeros(n, 0, dtype=dt, device=dev),) * 3)
        self.factors = Side("factors", *(torch.zeros(p, 0, dtype=dt, device=dev),) * 3)
        self.a = torch.ones(n, dtype=_F64, device=dev)
        self.b = torch.ones(p, dtype=_F64, device=dev)
        self.masked = data.mask is not None
        if self.masked:
            self.resid = data.values.clone()  # m * (Y - L F^T); zeros where missing
        # the expected squared residuals of update_noise, reused by the ELBO until the
        # moments change (they do not depend on the precisions)
        self._sq: torch.Tensor | None = None
        # Y^T L (P x K, key "factors") and Y F (N x K, key "loadings"), column-wise validity
        # (float64, as the data operator's products: float32 sums would drown the residual)
        self._cache: dict[str, ProductCache] = {
            "factors": ProductCache.empty(p, 0, _F64, dev),
            "loadings": ProductCache.empty(n, 0, _F64, dev),
        }

    # ---- bookkeeping -----------------------------------------------------------------
    @property
    def k(self) -> int:
        return self.loadings.k

    def side(self, which: str) -> tuple[Side, Side]:
        """``(this side, other side)``."""
        return (
            (self.loadings, self.factors) if which == "loadings" else (self.factors, self.loadings)
        )

    def _weights(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(this side's precision factor, the other side's), in the data dtype."""
        dt = self.data.dtype
        return (
            (self.a.to(dt), self.b.to(dt))
            if which == "loadings"
            else (self.b.to(dt), self.a.to(dt))
        )

    def _weight_facts(self, which: str) -> tuple[bool, bool]:
        """What the noise model says about :meth:`_weights` (no device sync): whether this
        side's weights are all equal, and whether the other side's are all one. ``a`` (rows)
        is all one unless noise is per row; ``b`` (columns) is all one for row noise and
        all equal for constant noise; extrapolation and snapshots keep both properties."""
        row, column = self.noise == "row", self.noise == "column"
        if which == "loadings":
            return not row, row
        return not column, not row

    def add_factor(
        self,
        lm,
        lvar,
        fm,
        fvar,
        prior_l: Prior,
        prior_f: Prior,
        fixed_l: bool = False,
        fixed_f: bool = False,
    ) -> None:
        dt = self.data.dtype
        self.loadings.append(lm.to(dt), lvar.to(dt), prior_l, fixed_l)
        self.factors.append(fm.to(dt), fvar.to(dt), prior_f, fixed_f)
        if self.masked:
            self.resid -= self._mask_outer(lm.to(dt), fm.to(dt))
        for cache in self._cache.values():
            cache.append()
        self._sq = None

    def remove_factors(self, drop: list[int]) -> None:
        if not drop:
            return
        keep = [i for i in range(self.k) if i not in set(drop)]
        if self.masked:
            for i in drop:
                self.resid += self._mask_outer(self.loadings.mean[:, i], self.factors.mean[:, i])
        self.loadings.keep(keep)
        self.factors.keep(keep)
        for cache in self._cache.values():
            cache.keep(keep)
        self._sq = None

    def snapshot(self) -> dict:
        snap = {
            "loadings": self.loadings.snapshot(self.self_covariates),
            "factors": self.factors.snapshot(self.self_covariates),
            "a": self.a.clone(),
            "b": self.b.clone(),
            "cache": {which: cache.copy() for which, cache in self._cache.items()},
        }
        if self.masked:
            snap["resid"] = self.resid.clone()
        return snap

    def restore(self, snap: dict) -> None:
        self.loadings.restore(snap["loadings"])
        self.factors.restore(snap["factors"])
        self.a, self.b = snap["a"], snap["b"]
        if self.masked:
            self.resid = snap["resid"].clone()  # updated in place
        # copies: the snapshot may be restored again or extrapolated from
        self._cache = {which: cache.copy() for which, cache in snap["cache"].items()}
        self._sq = None

    def extrapolate(self, prev: dict, beta: float, cols: list[int] | None = None) -> bool:
        """Move the moments (of factors ``cols``, default all) and the precisions to
        ``cur + beta (cur - prev)`` (Ang and Gillis 2019, as flashier): a starting point
        for the next updates, which then make every touched q an EBNM posterior again.
        Fixed sides stay. False if the shapes differ from ``prev``."""
        for side in (self.loadings, self.factors):
            if prev[side.name]["mean"].shape != side.mean.shape:
                return False
        self._sq = None
        chosen = set(range(self.k)) if cols is None else set(cols)
        for side in (self.loadings, self.factors):
            old = prev[side.name]
            move_list = [k in chosen and not side.fixed[k] for k in range(self.k)]
            moved = [k for k, m in enumerate(move_list) if m]
            if len(moved) == self.k:
                side.mean = _stepped(side.mean, old["mean"], beta)
                side.var = _stepped(side.var, old["var"], beta).clamp(min=0.0)
            elif moved:  # only these columns (a greedy factor)
                sel = torch.as_tensor(moved, dtype=torch.long, device=side.mean.device)
                cur_m, cur_v = side.mean.index_select(1, sel), side.var.index_select(1, sel)
                mean = _stepped(cur_m, old["mean"].index_select(1, sel), beta)
                var = _stepped(cur_v, old["var"].index_select(1, sel), beta).clamp(min=0.0)
                side.mean = side.mean.index_copy(1, sel, mean)
                side.var = side.var.index_copy(1, sel, var)
            # products with this side's means: Y^T L (side loadings) or Y F (factors)
            key = "factors" if side.name == "loadings" else "loadings"
            self._cache[key].extrapolate(prev.get("cache", {}).get(key), beta, move_list)
        self.a = torch.maximum(self.a + beta * (self.a - prev["a"]), 1e-3 * self.a)
        self.b = torch.maximum(self.b + beta * (self.b - prev["b"]), 1e-3 * self.b)
        if self.masked:
            self._recompute_resid()
        return True

    def transform(self, cols: list[int], t_l: torch.Tensor, t_f: torch.Tensor) -> None:
        """Replace factors ``cols`` by linear combinations of themselves: L_c -> L_c T_l,
        F_c -> F_c T_f (posterior variances of the sums of independent terms: var T o T).

        With ``T_l T_f^T = I`` the mean structure L F^T is unchanged. The q's of these
        factors are no longer EBNM posteriors (and their priors are reset for a cold
        start): follow with updates of both sides before reading the ELBO.
        """
        self._sq = None
        sel = torch.as_tensor(cols, dtype=torch.long, device=self.loadings.mean.device)
        for side, t in ((self.loadings, t_l), (self.factors, t_f)):
            t = t.to(side.mean.dtype)
            side.mean = side.mean.index_copy(1, sel, side.mean.index_select(1, sel) @ t)
            side.var = side.var.index_copy(1, sel, side.var.index_select(1, sel) @ (t * t))
            for k in cols:
                side.states[k] = None
                side.idle[k] = side.streak[k] = 0
            # products with this side's means are linear in them
            cache = self._cache["factors" if side.name == "loadings" else "loadings"]
            if cache.values is not None and all(cache.valid[k] for k in cols):
                cache.values = cache.values.index_copy(
                    1, sel, cache.values.index_select(1, sel) @ t.to(cache.values.dtype)
                )
            else:
                for k in cols:
                    cache.valid[k] = False
        if self.masked:
            self._recompute_resid()

    def _recompute_resid(self) -> None:
        """m * (Y - L F^T) from scratch (after moves of many columns at once)."""
        self.resid = (self.data.values - self.loadings.mean @ self.factors.mean.T) * self.data.mask

    def _mask_outer(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.outer(u, v) * self.data.mask

    # ---- products ------------------------------------------------------------------
    def _prod(self, which: str, mat: torch.Tensor) -> torch.Tensor:
        """``Y @ mat`` (which = loadings) or ``Y.T @ mat`` (factors)."""
        return self.data.matmul(mat) if which == "loadings" else self.data.rmatmul(mat)

    def prepare(self, which: str, ks: list[int] | None = None) -> dict:
        """Quantities shared by the updates of side ``which`` for factors ``ks``."""
        ks = list(range(self.k)) if ks is None else ks
        other = self.side(which)[1]
        w_other = self._weights(which)[1]
        cols = torch.as_tensor(ks, dtype=torch.long, device=other.mean.device)
        o_cols = other.mean.index_select(1, cols)
        pre: dict[str, Any] = {"ks": ks}
        if self.masked:
            return pre
        # in float64: the update subtracts L m from Y b, and what is left is the residual
        b = (o_cols * w_other[:, None]).to(_F64)
        yw = self._prod(which, b)
        pre["yprod"] = dict(zip(ks, yw.unbind(1), strict=True))
        pre["m"] = other.mean.to(_F64).T @ b  # (K, |ks|)
        pre["c"] = (w_other[:, None] * other.second_moments(cols)).sum(0, dtype=_F64)
        # with unit weights on the other side the product is a plain Y^T L or Y F: cache it
        if self._weight_facts(which)[1]:
            cache = self._cache[which]
            cache.writable()[:, cols] = yw
            for k in ks:
                cache.valid[k] = True
        return pre

    def _cached_product(self, which: str) -> torch.Tensor:
        """``Y^T L`` (which = factors) or ``Y F`` (loadings), recomputing stale columns."""
        cache = self._cache[which]
        stale = [k for k in range(self.k) if not cache.valid[k]]
        if stale:
            _, other = self.side(which)
            cols = torch.as_tensor(stale, dtype=torch.long, device=cache.device)
            cache.writable()[:, cols] = self._prod(which, other.mean.index_select(1, cols).to(_F64))
            for k in stale:
                cache.valid[k] = True
        return cache.writable()

    def _invalidate(self, which: str, k: int) -> None:
        """Side ``which`` changed in column k: products with it are stale."""
        self._cache["factors" if which == "loadings" else "loadings"].valid[k] = False
        self._sq = None

    # ---- rank-one update -----------------------------------------------------------
    def ebnm_inputs(self, which: str, k: int, pre: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The EBNM problem ``(x, s)`` of side ``which``, factor k."""
        this, other = self.side(which)
        w_this, w_other = self._weights(which)
        if self.masked:
            mask = self.data.mask
            resid = self.resid if which == "loadings" else self.resid.T
            m = mask if which == "loadings" else mask.T
            fk = other.mean[:, k]
            f2k = fk * fk + other.var[:, k]
            prec = m @ (w_other * f2k)
            num = resid @ (w_other * fk) + this.mean[:, k] * (m @ (w_other * fk * fk))
            unseen = prec <= 0
            safe = torch.where(unseen, torch.ones_like(prec), prec)
            x = torch.where(unseen, torch.zeros_like(num), num / safe)
            s = 1.0 / torch.sqrt(w_this * safe)
            if bool(unseen.any()):
                # no information on these entries: posterior = prior (huge s)
                s = torch.where(
                    unseen,
                    s[~unseen].max() * 1e6 if bool((~unseen).any()) else torch.ones_like(s),
                    s,
                )
            return x, s
        j = pre["ks"].index(k)
        m_col = pre["m"][:, j]
        c = pre["c"][j]
        mean = this.mean.to(_F64)  # the subtraction cancels most of yprod: in float64
        num = pre["yprod"][k] - mean @ m_col + mean[:, k] * m_col[k]
        dt = this.mean.dtype
        x = (num / c).to(dt)
        if self._weight_facts(which)[0]:
            w_this = w_this[:1]  # one s for all: a 1-element tensor, not a view of n
        s = (1.0 / torch.sqrt(w_this.to(_F64) * c)).to(dt)
        return x, s

    def update(self, which: str, k: int, pre: dict) -> bool:
        """Rank-one update of side ``which`` of factor k. Returns False when the factor
        carries nothing and should be removed: the other side is exactly zero (then nothing
        is updated), or this side came out exactly zero (mean 0 and variance 0: the prior
        put all its mass on the point at zero), checked on the EBNM result, which is
        contiguous (a column is not)."""
        this, other = self.side(which)
        if this.fixed[k]:
            return True
        if not _carries(other.mean[:, k], other.var[:, k]):
            return False
        x, s = self.ebnm_inputs(which, k, pre)
        prior = this.priors[k]
        lfsr = not lfsr_at_end(prior, self.self_covariates)  # else final_lfsr
        if self.refit_threshold is not None and this.idle[k] > 0:
            # the posterior under the current g: the ELBO still cannot fall
            res = prior.fit(
                x, s, self._covariates(this, k), g_init=this.g[k], fix_g=True, lfsr=lfsr
            )
            res.state = this.states[k]  # the last refit's warm start stays
            this.idle[k] -= 1
            self.deferred = True
        else:
            res = prior.fit(x, s, self._covariates(this, k), this.states[k], lfsr=lfsr)
            self._schedule_refits(this, k, res.state)
        old = this.mean[:, k].clone() if self.masked else None
        var = res.sd * res.sd
        this.mean[:, k] = res.mean
        this.var[:, k] = var
        if res.lfsr is not None:
            this.lfsr[:, k] = res.lfsr
        this.states[k] = res.state
        this.g[k] = res.g
        this.kl[k] = torch.as_tensor(
            res.loglik, dtype=_F64, device=x.device
        ) - expected_loglik_normal(x, s, res.mean, res.sd.to(_F64) ** 2)
        alive = _carries(res.mean, var)
        this.last_x[k], this.last_s[k] = x, s
        if self.masked:
            delta = this.mean[:, k] - old
            outer = (
                self._mask_outer(delta, other.mean[:, k])
                if which == "loadings"
                else self._mask_outer(other.mean[:, k], delta)
            )
            self.resid -= outer
        self._invalidate(which, k)
        return alive

    def _schedule_refits(self, side: Side, k: int, state: Any) -> None:
        """After a refit of a covariate-moderated prior (whose state reports
        ``refit_gain``, the log-likelihood it gained over keeping the previous g): one that
        gained less than ``refit_threshold`` defers the next 1, 2, 4 or 8 refits of this
        prior (doubling with each such refit in a row; the updates in between use the
        current g); any larger gain ends the deferral. Training the prior's network is most
        of such an update's cost, and late in a fit most refits gain nothing."""
        gain = state.get("refit_gain") if isinstance(state, dict) else None
        deferrable = self.refit_threshold is not None and not self.self_covariates
        if deferrable and gain is not None and gain < self.refit_threshold:
            side.streak[k] += 1
            side.idle[k] = min(2 ** (side.streak[k] - 1), _MAX_DEFERRED)
        else:
            side.idle[k] = side.streak[k] = 0

    def wake_priors(self) -> None:
        """Cancel every pending deferral: the next update of each prior refits it."""
        for side in (self.loadings, self.factors):
            side.idle = [0] * side.k

    def final_lfsr(self) -> None:
        """The local false sign rates, from the inputs, covariates and fitted prior of
        each side's last update (``fix_g``: the posterior of that update; the updates skip
        them), except where :func:`lfsr_at_end` says the updates computed them; a fixed
        side's, from its values."""
        for side in (self.loadings, self.factors):
            for k in range(side.k):
                prior, x = side.priors[k], side.last_x[k]
                if side.fixed[k]:
                    # known exactly: min(P(theta <= 0), P(theta >= 0)) is 0 off zero, 1 at 0
                    side.lfsr[:, k] = (side.mean[:, k] == 0).to(side.lfsr.dtype)
                    continue
                if not lfsr_at_end(prior, self.self_covariates) or x is None:
                    continue
                cov = self._covariates(side, k)
                res = prior.fit(x, side.last_s[k], cov, g_init=side.g[k], fix_g=True)
                side.lfsr[:, k] = res.lfsr

    def _covariates(self, side: Side, k: int) -> torch.Tensor | None:
        """The side's covariates for factor k (with self covariates: the other factors'
        posterior means appended); None for plain priors."""
        if not side.priors[k].uses_covariates:
            return None
        if not self.self_covariates or side.k < 2:
            if side.covariates is None and self.self_covariates:
                # the first factor has no other factors yet: a covariate-free (bias-only)
                # network, i.e. the plain prior
                return side.mean.new_zeros((side.mean.shape[0], 0))
            return side.covariates
        others = torch.cat([side.mean[:, :k], side.mean[:, k + 1 :]], dim=1)
        if side.covariates is None:
            return others
        return torch.cat([side.covariates, others], dim=1)

    # ---- noise and ELBO ------------------------------------------------------------
    def expected_sq_resid(self) -> torch.Tensor:
        """sum of E R_ij^2 over observed entries, per row (row noise) or per column.

        E R_ij^2 = (Y_ij - sum_k L_ik F_jk)^2 + sum_k (Lvar_ik F2_jk + L_ik^2 Fvar_jk); the
        variance part is kept apart from the means (mean2 - mean^2 would lose it).
        """
        by_row = uses_rows(self.noise)
        lo, fa = (self.loadings, self.factors) if not by_row else (self.factors, self.loadings)
        L, Lv, F, Fv = (t.to(_F64) for t in (lo.mean, lo.var, fa.mean, fa.var))
        L2sq, F2 = L * L, F * F + Fv
        if self.masked:
            m = self.data.mask.to(_F64)
            r = self.resid.to(_F64)
            if by_row:
                m, r = m.T, r.T
            return (r * r).sum(0) + (F2 * (m.T @ Lv)).sum(1) + (Fv * (m.T @ L2sq)).sum(1)
        sq = self.data.row_sq if by_row else self.data.col_sq
        prod = self._cached_product("loadings" if by_row else "factors").to(_F64)
        return (
            sq
            - 2.0 * (F * prod).sum(1)
            + ((F @ (L.T @ L)) * F).sum(1)
            + F2 @ Lv.sum(0)
            + Fv @ L2sq.sum(0)
        )

    def update_noise(self) -> None:
        by_row = uses_rows(self.noise)
        n_obs = self.data.n_obs_row if by_row else self.data.n_obs_col
        sq = self.data.row_sq if by_row else self.data.col_sq
        self._sq = self.expected_sq_resid()
        self.a, self.b = estimate_precision(
            self.noise, self._sq, n_obs, self.data.shape, sq / n_obs
        )

    def elbo(self) -> float:
        """The ELBO (float64) at the current moments, noise and fitted priors."""
        return float(self.elbo_tensor())

    def elbo_tensor(self) -> torch.Tensor:
        by_row = uses_rows(self.noise)
        sq = self._sq if self._sq is not None else self.expected_sq_resid()
        weights = self.a if by_row else self.b
        data_term = (
            -0.5 * self.data.n_obs * LOG_2PI
            + 0.5
            * (
                (self.data.n_obs_row * torch.log(self.a)).sum()
                + (self.data.n_obs_col * torch.log(self.b)).sum()
            )
            - 0.5 * (weights * sq).sum()
        )
        kl = sum(
            self.loadings.kl + self.factors.kl, torch.zeros((), dtype=_F64, device=data_term.device)
        )
        return data_term + kl

    # ---- residual products for initialisation ---------------------------------------
    def resid_matmul(self, v: torch.Tensor) -> torch.Tensor:
        """(Y - L F^T) @ v (masked: m * (Y - L F^T)), v of shape (P, r)."""
        if self.masked:
            return self.resid @ v.to(self.resid.dtype)
        v = v.to(_F64)
        return self.data.matmul(v) - self.loadings.mean.to(_F64) @ (
            self.factors.mean.to(_F64).T @ v
        )

    def resid_rmatmul(self, u: torch.Tensor) -> torch.Tensor:
        """(Y - L F^T)^T @ u, u of shape (N, r)."""
        if self.masked:
            return (u.to(self.resid.dtype).T @ self.resid).T
        u = u.to(_F64)
        return self.data.rmatmul(u) - self.factors.mean.to(_F64) @ (
            self.loadings.mean.to(_F64).T @ u
        )
