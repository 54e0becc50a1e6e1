"""The public EBNM solver ``cebmf.ebnm``."""

from __future__ import annotations

from typing import Any

import torch

from ._validation import observations_and_se
from .priors.base import EBNMResult, Prior, get_prior


def ebnm(
    x: Any,
    s: Any = 1.0,
    prior: str | Prior = "point_normal",
    *,
    mode: float = 0.0,
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
        Location of the prior's mode (point mass / centre / lower end), fixed.
    covariates
        (n, d) covariates of the observations, for the covariate-moderated families
        (``cash``, ``emdn``, ``spiked_emdn``, ``cgb``).
    g_init
        A fitted prior (``result.g``) of the same family: the starting point of the fit,
        or with ``fix_g=True`` the prior under which posteriors are computed.
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
        if float(mode) != prior.mode:
            raise ValueError(
                f"mode={mode} was given but the prior instance has mode={prior.mode}; "
                "set the mode on the instance."
            )
        fam = prior
    else:
        fam = get_prior(prior, mode=mode, **prior_options)
    with torch.no_grad():
        res = fam.fit(xt, st, covariates, state=state, g_init=g_init, fix_g=fix_g)
    if was_numpy:
        for field in ("mean", "mean2", "sd", "lfsr"):
            setattr(res, field, getattr(res, field).cpu().numpy())
    return res
