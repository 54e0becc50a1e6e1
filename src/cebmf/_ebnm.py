"""The public EBNM solver ``cebmf.ebnm``."""

from __future__ import annotations

from typing import Any

import torch

from ._validation import check_mode, observations_and_se
from .priors.base import EBNMResult, Prior, get_prior


def ebnm(
    x: Any,
    s: Any = 1.0,
    prior: str | Prior = "point_normal",
    *,
    mode: float | None = None,
    covariates: Any = None,
    g_init: dict[str, Any] | None = None,
    fix_g: bool = False,
    state: dict[str, Any] | None = None,
    **prior_options: Any,
) -> EBNMResult:
    r"""Solve the empirical Bayes normal means problem.

    Model: :math:`x_i \sim N(\theta_i, s_i^2)`, :math:`\theta_i \sim g \in \mathcal{G}`.
    The prior g is the maximiser of the marginal likelihood
    :math:`\sum_i \log \int N(x_i; \theta, s_i^2)\, g(d\theta)` over the family; the result
    holds posterior summaries of each :math:`\theta_i` under the fitted g.

    Parameters
    ----------
    x
        Observations, 1-D (numpy array, torch tensor on any device, or a sequence).
        float32 and float64 are kept; integers and booleans become float64.
    s
        Standard errors: a positive scalar or a 1-D array of x's length.
    prior
        A family name (see :func:`cebmf.priors.available_priors`: ``normal``,
        ``point_normal``, ``point_laplace``, ``point_exponential``,
        ``normal_scale_mixture`` (alias ``ash``), ``nonnegative_mixture``,
        ``generalized_binary``, ``flat``) or a :class:`cebmf.priors.Prior` instance.
    mode
        Location of the prior's mode (point mass / centre / lower end), fixed: a finite
        number (estimating the mode is not supported). None (the default) means 0 for a
        family name and the instance's own mode for a :class:`~cebmf.priors.Prior`
        instance; a number given with an instance must equal its mode.
    covariates
        (n, d) covariates of the observations, for the covariate-moderated families
        (``cash``, ``emdn``, ``spiked_emdn``, ``cgb``).
    g_init
        A fitted prior (``result.g``) of the same family and mode, or with ``fix_g=True``
        the prior under which posteriors are computed. For the parametric families it is
        the starting point of the fit. For the fixed-grid mixtures
        (``normal_scale_mixture``, ``nonnegative_mixture``) it also fixes the grid: the
        weights are refitted on ``g_init['scale']`` (as in R's ebnm), so components it
        lacks cannot be added; pass ``state`` instead to warm-start on a fresh grid.
        Checked before any computation: missing keys or invalid values (e.g. weights
        that are negative, infinite or NaN) raise an error that names them.
    fix_g
        Compute posteriors under ``g_init`` without refitting.
    state
        ``result.state`` of an earlier fit of the same family, to warm-start from.
    **prior_options
        Family options, e.g. ``ratio`` (generalized_binary), ``grid_mult``, ``kl_target``
        or ``scale`` (mixtures).

    Returns
    -------
    EBNMResult
        ``mean``, ``mean2``, ``sd``, ``lfsr`` (same array type, dtype and device as ``x``),
        ``loglik`` (float), ``g`` (dict of floats / numpy arrays) and ``state``.

    Examples
    --------
    >>> import numpy as np, cebmf
    >>> rng = np.random.default_rng(0)
    >>> theta = np.where(rng.random(1000) < 0.8, 0.0, rng.normal(0, 3, 1000))
    >>> res = cebmf.ebnm(theta + rng.normal(size=1000), 1.0, "point_normal")
    >>> round(res.g["pi0"], 1)
    0.8
    """
    xt, st, was_numpy = observations_and_se(x, s)
    if isinstance(prior, Prior):
        if prior_options:
            raise TypeError(
                f"options {sorted(prior_options)} were given with a Prior instance; set them "
                "when constructing the prior instead."
            )
        if mode is not None and check_mode(mode) != prior.mode:
            raise ValueError(
                f"mode={mode} was given but the prior instance has mode={prior.mode}; "
                "leave mode out (the instance's mode is used) or set it on the instance."
            )
        fam = prior
    else:
        fam = get_prior(prior, mode=0.0 if mode is None else check_mode(mode), **prior_options)
    with torch.no_grad():
        res = fam.fit(xt, st, covariates, state=state, g_init=g_init, fix_g=fix_g)
    return res.to_numpy() if was_numpy else res
