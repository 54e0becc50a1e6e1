"""``cash``: covariate-moderated adaptive shrinkage.

g(theta; x_i) = sum_k pi_k(x_i) g_k(theta) on a fixed grid of components (zero-centred
normals with a point mass, as ``normal_scale_mixture``; or with ``nonnegative=True`` a
point mass and exponentials, as ``nonnegative_mixture``), with
pi(x_i) = softmax(net(x_i)). The log-likelihood matrix of the components is computed once
per call; only the weights depend on the network.
"""

from __future__ import annotations

import numpy as np
import torch

from .._math import exp_flushed
from .._validation import check_flags
from ._covariates import CovariatePrior
from ._mixsqp import mixsqp
from .base import _check_g_values, register_prior
from .nonnegative_mixture import NonnegativeMixture
from .scale_mixture import NormalScaleMixture

_MIN_LOG_WEIGHT = -30.0  # output bias of a component the plain fit gave no weight


@register_prior
class Cash(CovariatePrior):
    """``cash``: pi_k(x) = softmax(net(x))_k over a grid of scales.

    ``g`` holds ``scale`` (the grid), ``pi0`` (per observation), ``pi_mean`` (mean weights),
    the network weights and the covariate standardisation.

    Parameters
    ----------
    nonnegative
        Use the point mass + exponential grid (nonnegative loadings / factors).
    grid_mult, kl_target
        Grid rule of the underlying plain mixture (see ``normal_scale_mixture``).
    hidden, hidden_layers, weight_decay, max_iter, warm_iter, tol, seed
        Network options (see :class:`~cebmf.priors._covariates.CovariatePrior`);
        ``hidden_layers=0`` is a multinomial-logistic (linear) model.
    """

    name = "cash"
    normalise_units = False  # logits on a data-scaled grid: already unit-free
    g_keys = ("network", "covariate_stats", "scale", "nonnegative")  # no unit
    g_options = (*CovariatePrior.g_options, "nonnegative")

    def __init__(
        self,
        mode: float = 0.0,
        *,
        nonnegative: bool = False,
        grid_mult: float | None = None,
        kl_target: float | None = None,
        **network,
    ) -> None:
        super().__init__(mode, **network)
        check_flags(nonnegative=nonnegative)
        self.nonnegative = bool(nonnegative)
        base_cls = NonnegativeMixture if nonnegative else NormalScaleMixture
        self.base = base_cls(grid_mult=grid_mult, kl_target=kl_target)

    @property
    def grid_mult(self) -> float | None:
        """The grid spacing option (kept by the plain mixture behind the grid)."""
        return self.base.grid_mult

    @property
    def kl_target(self) -> float | None:
        """The grid's KL target option (kept by the plain mixture behind the grid)."""
        return self.base.kl_target

    def _check_g_entries(self, g, argname):
        # the grid first: the network has one output per scale
        scale = np.asarray(g["scale"])
        if scale.ndim != 1:
            raise ValueError(
                f"{argname}['scale'] must be the 1-D grid of scales, got shape {scale.shape}."
            )
        _check_g_values(g, argname, ("scale",))
        super()._check_g_entries(g, argname)

    def _check_outputs(self, n_out, saved, argname):
        if "scale" not in saved:
            return
        n_scales = np.asarray(saved["scale"]).size
        if n_out != n_scales:
            raise ValueError(
                f"{argname}['network'] has {n_out} outputs but {argname}['scale'] has "
                f"{n_scales} scales (one output per scale); pass the {argname} of an "
                "earlier cash fit unmodified."
            )

    def _setup(self, x, s, warm, g_init):
        saved_rows = None
        if warm is not None and "scale" in warm:
            grid = np.asarray(warm["scale"], dtype=np.float64)
            if g_init is None:
                # never shrink; extend at the top (larger effects) and refine at the bottom
                # (smaller standard errors) with the fresh grid's scales outside the saved
                # range (inside it, the saved spacing already meets the grid rule)
                fresh = self.base._fresh_grid(x, s)
                lo = grid[grid > 0].min() if (grid > 0).any() else np.inf
                add = fresh[((fresh > 0) & (fresh < lo)) | (fresh > grid[-1])]
                if add.size:
                    merged = np.union1d(grid, add)
                    saved_rows = np.searchsorted(merged, grid)
                    grid = merged
        else:
            grid = self.base._fresh_grid(x, s)
        scale_t = torch.as_tensor(grid, dtype=x.dtype, device=x.device)[:, None]
        # each row less its maximum (added back to the likelihoods by the base class): the
        # float32 training then sees differences of O(1) instead of values whose size
        # (-log s, -x^2 / 2 s^2) costs them their last digits
        loglik = self.base._component_loglik(x, s, scale_t).T
        offset = loglik.max(dim=1).values
        return {
            "scale": grid,
            "scale_t": scale_t,
            "loglik_nk": (loglik - offset[:, None]).contiguous(),
            "offset_nk": offset,
            "saved_rows": saved_rows,
            "plain_init": _saved_plain_weights(warm, g_init, grid, saved_rows, x.device),
        }

    def _n_outputs(self, setup):
        return setup["scale"].size

    def _plain_start(self, x, s, setup):
        # warm-started from the previous call's plain weights (the optimum is the same,
        # mix-SQP needs fewer iterations: the demo's ~7 per call drop to ~2)
        # the rows of loglik_nk are already less their maximum (a copy: exp is in place)
        lik = exp_flushed(setup["loglik_nk"].T.to(torch.float64, copy=True))
        pi = mixsqp(lik, setup["plain_init"])
        setup["plain_pi"] = pi
        bias = torch.log(pi).clamp(min=_MIN_LOG_WEIGHT).to(x.dtype)
        return bias, {}

    def _log_weights(self, out, extra, x, s, setup):
        return torch.log_softmax(out, dim=1) + setup["loglik_nk"]

    def _posterior_pieces(self, out, extra, x, s, setup, c, used):
        return self.base._component_posterior(x, s, setup["scale_t"][used], c)

    def _g_entries(self, out, extra, setup):
        pi = torch.softmax(out, dim=1)
        has_point = setup["scale"][0] == 0
        return {
            "scale": setup["scale"],
            "pi0": (pi[:, 0] if has_point else torch.zeros_like(pi[:, 0])).cpu().numpy(),
            "pi_mean": pi.mean(0).cpu().numpy(),
            "nonnegative": self.nonnegative,
        }

    def _state_entries(self, setup):
        entries = {"scale": setup["scale"]}
        if "plain_pi" in setup:
            entries["plain_pi"] = setup["plain_pi"].cpu().numpy()
        return entries

    def prior_parameters(self, g: dict, covariates) -> dict:
        """The prior of each observation: ``pi`` (n, K) weights on the grid ``scale``."""
        return {
            "pi": torch.softmax(self.network_outputs(g, covariates), 1).numpy(),
            "scale": np.asarray(g["scale"]),
        }


def _saved_plain_weights(warm, g_init, grid, saved_rows, device) -> torch.Tensor | None:
    """The plain mixture weights of the previous call (kept in its state), laid on the
    current grid (zero on scales the grid gained); None without a usable state."""
    if warm is None or g_init is not None or "plain_pi" not in warm:
        return None
    saved = np.asarray(warm["plain_pi"], dtype=np.float64)
    if saved_rows is not None and saved.size == saved_rows.size:
        full = np.zeros(grid.size)
        full[saved_rows] = saved
    elif saved_rows is None and saved.size == grid.size:
        full = saved
    else:
        return None
    return torch.as_tensor(full, dtype=torch.float64, device=device)
