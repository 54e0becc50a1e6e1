"""The EBNM contract shared by every prior family, and the registry of families by name.

A family solves the empirical Bayes normal means problem

    x_i ~ N(theta_i, s_i^2),   theta_i ~ g  (g in the family),

by maximising the marginal log-likelihood ``sum_i log int N(x_i; theta, s_i^2) g(dtheta)``
over g, and returns posterior summaries of theta under the fitted g.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from .._math import sign_probs
from .._threads import threads_for
from .._validation import (
    check_flags,
    check_mode,
    covariate_matrix,
    observations_and_se,
    real_array,
)


@dataclass
class EBNMResult:
    """Result of one EBNM fit.

    Attributes
    ----------
    mean, mean2, sd, lfsr
        Posterior mean E[theta_i], second moment E[theta_i^2], sd and local false sign rate
        min(P(theta_i <= 0), P(theta_i >= 0)), one entry per observation.
    loglik
        Exact marginal log-likelihood sum_i log p(x_i | g_hat, s_i) at the fitted prior.
    g
        The fitted prior as a dict of str / float / numpy arrays (storable in ``AnnData.uns``);
        ``g["family"]`` names the family.
    state
        What the family needs to warm-start the next fit on similar data.
    """

    mean: Any
    mean2: Any
    sd: Any
    lfsr: Any
    loglik: float
    g: dict[str, Any]
    state: dict[str, Any] | None = field(default=None, repr=False)

    @classmethod
    def from_posterior(cls, post: Any, g: dict[str, Any], state: dict[str, Any]) -> EBNMResult:
        """From posterior summaries (``mean``, ``mean2``, ``sd``, ``lfsr`` and the per
        observation ``log_marginal``, summed here in float64)."""
        return cls(
            mean=post.mean,
            mean2=post.mean2,
            sd=post.sd,
            lfsr=post.lfsr,
            loglik=post.log_marginal.sum(dtype=torch.float64).item(),
            g=g,
            state=state,
        )

    def to_numpy(self) -> EBNMResult:
        """The per-observation summaries as numpy arrays (on the host), in place."""
        for name in ("mean", "mean2", "sd", "lfsr"):
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.detach().cpu().numpy())
        return self


class Prior(ABC):
    """A prior family behind the EBNM contract ``fit(x, s, covariates=None, state=None)``.

    Subclasses set ``name`` and implement :meth:`_fit`, which receives 1-D torch tensors
    of one floating dtype on one device (:meth:`fit` validates and converts other input).
    """

    name: ClassVar[str] = ""
    #: True when the family only puts mass on [mode, inf) (used for sign-aware initialisation).
    nonnegative: ClassVar[bool] = False
    #: True for covariate-moderated families.
    uses_covariates: ClassVar[bool] = False
    #: Keys (besides ``family`` and ``mode``) that a ``g`` of this family must hold.
    g_keys: ClassVar[tuple[str, ...]] = ()
    #: Constructor options that a ``g`` of this family records under their own names (e.g.
    #: ``nonnegative``): :meth:`check_g` refuses a ``g`` whose recorded value differs from
    #: the instance's, as it refuses another family or mode.
    g_options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, mode: float = 0.0) -> None:
        self.mode = check_mode(mode)

    def __repr__(self) -> str:
        """The class and each constructor option whose value is not its default, as
        scikit-learn shows an estimator: ``Cash(nonnegative=True, max_iter=50)``. ``tl.fit``
        records it in ``uns[key]["params"]``, so priors that differ print differently.
        Options kept only through another one (``hidden_layers`` sets ``hidden``) are
        shown through that one."""
        shown = []
        for name, default in _option_defaults(type(self)).items():
            value = getattr(self, name, _UNSET)
            if value is not _UNSET and not _same(value, default):
                shown.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    def fit(
        self,
        x: torch.Tensor,
        s: torch.Tensor,
        covariates: torch.Tensor | None = None,
        state: dict[str, Any] | None = None,
        *,
        g_init: dict[str, Any] | None = None,
        fix_g: bool = False,
        lfsr: bool = True,
    ) -> EBNMResult:
        """Fit the prior to ``(x, s)`` and return posterior summaries.

        Parameters
        ----------
        x, s
            Observations and their standard errors (1-D, same length, s > 0). Torch
            tensors of one floating dtype on one device are used as they are (the engine's
            fast path; results are tensors). Anything else (numpy arrays, sequences, a
            scalar ``s``) is validated as :func:`cebmf.ebnm` does, and numpy input gives
            numpy results.
        covariates
            (n, d) covariates; only covariate-moderated families accept them.
        state
            ``result.state`` of an earlier fit of this family, to warm-start from.
        g_init
            A fitted prior (``result.g``) of this family: the starting point, or with
            ``fix_g=True`` the prior under which posteriors are computed without refitting.
            Its mode and the options it records (:attr:`g_options`, e.g. ``nonnegative``)
            must be this prior's (see :meth:`check_g`).
        fix_g
            Do not fit; requires ``g_init``.
        lfsr
            False skips the local false sign rates (``result.lfsr`` is None; everything
            else is unchanged). The EBMF engine computes them once, at the end of a fit.
        """
        if not (isinstance(x, torch.Tensor) and isinstance(s, torch.Tensor)):
            xt, st, was_numpy = observations_and_se(x, s)
            with torch.no_grad():
                res = self.fit(xt, st, covariates, state, g_init=g_init, fix_g=fix_g, lfsr=lfsr)
            return res.to_numpy() if was_numpy else res
        if covariates is not None and not self.uses_covariates:
            raise ValueError(
                f"prior {self.name!r} does not use covariates, but covariates were given; "
                "pass covariates=None or choose a covariate-moderated prior family."
            )
        if self.uses_covariates:
            covariates = self._check_covariates(covariates, x)
        if g_init is not None:
            self.check_g(g_init, "g_init")
        check_flags(fix_g=fix_g, lfsr=lfsr)
        if fix_g and g_init is None:
            raise ValueError("fix_g=True needs g_init: the prior to compute posteriors under.")
        if state is not None:
            self._check_state(state)
        with threads_for(x.numel(), x.device), sign_probs(lfsr):
            res = self._fit(x, s, covariates=covariates, state=state, g_init=g_init, fix_g=fix_g)
        if not lfsr:
            res.lfsr = None
        if isinstance(res.state, dict):
            res.state.setdefault("family", self.name)
        return res

    def _check_state(self, state: Any) -> None:
        """A ``state`` must be the ``result.state`` dict of an earlier fit of this family
        (its ``family`` entry, when present, names it)."""
        if not isinstance(state, dict):
            raise TypeError(
                f"state must be the `state` dict of an earlier fit (result.state), got "
                f"{type(state).__name__}."
            )
        family = state.get("family", self.name)
        if family != self.name:
            raise ValueError(
                f"state comes from a fit of the {family!r} prior but the prior family is "
                f"{self.name!r}; pass the state of an earlier {self.name!r} fit, or none."
            )

    def _check_covariates(self, covariates, x: torch.Tensor) -> torch.Tensor:
        if covariates is None:
            raise ValueError(
                f"prior {self.name!r} needs covariates (one row per observation): pass "
                "covariates= to cebmf.ebnm, or X_l / X_f to fit_ebmf."
            )
        return covariate_matrix(
            covariates, x.shape[0], "covariates", "observation", x.dtype, x.device
        )

    @abstractmethod
    def _fit(
        self,
        x: torch.Tensor,
        s: torch.Tensor,
        *,
        covariates: torch.Tensor | None,
        state: dict[str, Any] | None,
        g_init: dict[str, Any] | None,
        fix_g: bool,
    ) -> EBNMResult: ...

    def check_g(self, g: dict[str, Any], argname: str = "g") -> None:
        """Raise a clear error unless ``g`` is a fitted prior of this family with this mode
        and the options it records (:attr:`g_options`), holding the family's keys
        (:attr:`g_keys`) with valid values (:meth:`_check_g_entries`).

        Parameters
        ----------
        g
            A fitted prior (``result.g``), possibly read back from an ``.h5ad`` file (tuples
            as arrays, numpy scalars).
        argname
            The argument's name in the messages (``"g_init"``, ``"g"``).
        """
        if not isinstance(g, dict) or "family" not in g:
            raise TypeError(
                f"{argname} must be the `g` dict of an earlier fit (with a 'family' key), "
                f"got {type(g).__name__}."
            )
        if g["family"] != self.name:
            raise ValueError(
                f"{argname} is a {g['family']!r} prior but the prior family is {self.name!r}; "
                f"pass a g of family {self.name!r} or change the prior."
            )
        g_mode = check_mode(g.get("mode", 0.0), f"{argname}['mode']")
        if g_mode != self.mode:
            raise ValueError(
                f"{argname} has mode {g_mode} but mode={self.mode} was requested; "
                f"pass mode={g_mode} or a g_init with mode {self.mode}."
            )
        missing = [k for k in self.g_keys if k not in g]
        if missing:
            raise ValueError(
                f"{argname} lacks the key(s) {missing} of a {self.name!r} prior (it has "
                f"{sorted(g)}); pass the `g` of an earlier fit of this family."
            )
        for key in self.g_options:
            if key not in g:
                continue
            mine = getattr(self, key)
            recorded = _recorded_option(g[key], mine, f"{argname}[{key!r}]")
            if recorded != mine:
                raise ValueError(
                    f"{argname} was fitted with {key}={recorded!r} but this prior has "
                    f"{key}={mine!r}; pass a prior with {key}={recorded!r}, e.g. "
                    f"get_prior({self.name!r}, {key}={recorded!r}), or a {argname} fitted "
                    f"with {key}={mine!r}."
                )
        self._check_g_entries(g, argname)

    def _check_g_entries(self, g: dict[str, Any], argname: str) -> None:
        """Clear errors for invalid values in ``g`` (its keys are present): by default the
        standard entries of :func:`_check_g_values`."""
        _check_g_values(g, argname)


def _recorded_option(value: Any, mine: Any, name: str) -> Any:
    """The value of an option recorded in a ``g`` (``name`` in messages), of the type of
    the instance's value ``mine``: a bool, an integer, or a tuple of integers (numpy
    scalars and arrays, as a ``g`` read back from an ``.h5ad`` file holds them, are
    accepted)."""
    arr = np.asarray(value)
    if isinstance(mine, bool):
        if arr.shape != () or arr.dtype != np.bool_:
            raise TypeError(f"{name} must be True or False, got {value!r}.")
        return bool(arr)
    if isinstance(mine, tuple):
        arr = np.atleast_1d(arr)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise TypeError(f"{name} must be a sequence of integers, got {value!r}.")
        return tuple(int(v) for v in arr)
    if isinstance(mine, int):
        if arr.shape != () or arr.dtype.kind not in "iu":
            raise TypeError(f"{name} must be an integer, got {value!r}.")
        return int(arr)
    return value


def _check_g_values(
    g: dict[str, Any], argname: str, keys: tuple[str, ...] = ("pi0", "mu", "scale", "pi")
) -> None:
    """Clear errors for a plain family's standard entries of ``g`` that are present (of
    those in ``keys``): ``pi0`` in [0, 1], ``mu`` > 0 and ``scale`` >= 0 finite reals; a
    mixture's ``pi`` finite non-negative weights with a positive sum, one per ``scale``."""
    entries = {k: real_array(g[k], f"{argname}[{k!r}]") for k in keys if k in g}
    for key, arr in entries.items():
        name = f"{argname}[{key!r}]"
        if arr.size == 0 or not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} must be finite (and non-empty), got {g[key]!r}.")
        if key == "pi0" and not np.all((arr >= 0) & (arr <= 1)):
            raise ValueError(f"{name} must be in [0, 1], got {g[key]!r}.")
        if key == "mu" and not np.all(arr > 0):
            raise ValueError(f"{name} must be positive, got {g[key]!r}.")
        if key in ("scale", "pi") and not np.all(arr >= 0):
            raise ValueError(f"{name} must be >= 0, got {g[key]!r}.")
    if "pi" in entries:
        pi = entries["pi"]
        if not pi.sum() > 0:
            raise ValueError(f"{argname}['pi'] must have a positive sum, got {g['pi']!r}.")
        if "scale" in entries and pi.size != entries["scale"].size:
            raise ValueError(
                f"{argname}['pi'] has {pi.size} weight(s) but {argname}['scale'] has "
                f"{entries['scale'].size} scale(s); give one weight per scale."
            )


_REGISTRY: dict[str, type[Prior]] = {}
_ALIASES: dict[str, str] = {}


def register_prior(cls: type[Prior] | None = None, *, aliases: tuple[str, ...] = ()):
    """Class decorator: make a prior family available by its ``name`` (and aliases)."""

    def wrap(c: type[Prior]) -> type[Prior]:
        if not c.name:
            raise ValueError(f"{c.__name__} has no name.")
        _REGISTRY[c.name] = c
        for a in aliases:
            _ALIASES[a] = c.name
        return c

    return wrap(cls) if cls is not None else wrap


def available_priors(covariates: bool | None = None) -> list[str]:
    """Names of the registered prior families (aliases excluded), sorted.

    ``covariates=False`` lists the plain families, ``True`` the covariate-moderated ones.
    """
    return sorted(
        name
        for name, cls in _REGISTRY.items()
        if covariates is None or cls.uses_covariates == covariates
    )


def get_prior(prior: str | Prior, **options: Any) -> Prior:
    """A prior instance from a registered name (plus constructor options) or an instance."""
    if isinstance(prior, Prior):
        if options:
            raise TypeError(
                f"options {sorted(options)} were given together with a prior instance; "
                "set them on the instance instead."
            )
        return prior
    if isinstance(prior, type) and issubclass(prior, Prior):
        raise TypeError(
            f"prior is the class {prior.__name__}, not an instance; pass "
            f"{prior.__name__}() (with its options) or the name {prior.name!r}."
        )
    if not isinstance(prior, str):
        raise TypeError(
            f"prior must be a family name or a Prior instance, got {type(prior).__name__}."
        )
    key = _ALIASES.get(prior, prior)
    if key not in _REGISTRY:
        names = ", ".join(available_priors() + sorted(_ALIASES))
        raise ValueError(f"unknown prior {prior!r}; known prior families: {names}.")
    cls = _REGISTRY[key]
    unknown = sorted(set(options) - set(prior_options(cls)))
    if unknown:
        raise TypeError(
            f"prior {key!r} has no option(s) {unknown}; its options are "
            f"{', '.join(prior_options(cls))}."
        )
    return cls(**options)


def prior_options(cls: type[Prior]) -> list[str]:
    """Keyword options of a prior family's constructor, following ``**kwargs`` that a
    class passes on to its parent's constructor."""
    return list(_option_defaults(cls))


_UNSET = object()


def _option_defaults(cls: type[Prior]) -> dict[str, Any]:
    """``{option: default}`` of a prior family's constructor (see :func:`prior_options`);
    an option without a default maps to ``inspect.Parameter.empty``."""
    defaults: dict[str, Any] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[1:]
        for p in params:
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                defaults.setdefault(p.name, p.default)
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return defaults


def _same(value: Any, default: Any) -> bool:
    """Whether an option's ``value`` is its ``default`` (an array is never a default)."""
    if value is default:
        return True
    try:
        return bool(value == default)
    except (TypeError, ValueError):  # an array compared with a scalar default
        return False
