"""Shared machinery of the covariate-moderated prior families.

A covariate prior g(theta; x_i) is a small network of the (standardised) covariates x_i
whose outputs parametrise a mixture. Its parameters maximise the same marginal
log-likelihood as the plain families,

    l(params) = sum_i log int N(y_i; theta, s_i^2) g(theta; x_i, params) dtheta,

by full-batch L-BFGS on the data's device. The network starts either from the warm state
of the previous call, or (cold) from a plain prior's fit (the matching plain family; for
emdn the best plain mixture of its own family), with output weights 0 and output biases
reproducing that prior exactly, so the fit is never worse than that plain prior. The best
parameters seen (by exact log-likelihood) are returned, so a warm-started call never
lowers the log-likelihood of its starting point.
"""

from __future__ import annotations

import itertools
import logging
import math
import warnings
from abc import abstractmethod
from typing import Any

import numpy as np
import torch
from torch import nn

from .._math import exp_flushed, logsumexp_rows
from .._validation import (
    check_count,
    check_positive,
    covariate_matrix,
    real_array,
    resolve_seed,
)
from ._posterior import chunked, combine
from .base import EBNMResult, Prior

logger = logging.getLogger("cebmf")


class CovariateNet(nn.Module):
    """MLP: d covariates -> ``hidden`` tanh layers -> ``out`` outputs (linear if none),
    with parameters of type ``dtype`` on ``device`` (default: float32, CPU)."""

    def __init__(
        self,
        d: int,
        hidden: tuple[int, ...],
        out: int,
        generator: torch.Generator | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        sizes = [d, *hidden]
        self.hidden = nn.ModuleList(
            _linear(a, b, generator, dtype, device) for a, b in itertools.pairwise(sizes)
        )
        self.out = _linear(sizes[-1], out, generator, dtype, device)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            z = torch.tanh(layer(z))
        return self.out(z)


def _linear(
    d_in: int, d_out: int, generator: torch.Generator | None, dtype=None, device=None
) -> nn.Linear:
    """``nn.Linear`` with PyTorch's default initialisation, weights and bias drawn from
    U(-1/sqrt(d_in), 1/sqrt(d_in)) (zeros when d_in = 0) in float32 on the CPU, taken from
    ``generator`` so that the global random state is left alone, then converted to
    ``dtype`` on ``device``; None leaves the values uninitialised (for a network about to
    be loaded). Built from its tensors: a covariate prior builds one network per call, and
    ``nn.Linear``'s own initialisation (or ``skip_init``) costs ten times as much."""
    with warnings.catch_warnings():
        # d_in = 0 (no covariate left): a bias-only model with zero-input layers
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")
        layer = nn.Linear(d_in, d_out, device="meta")  # no memory, no values
    weight, bias = torch.empty(d_out, d_in), torch.empty(d_out)
    if generator is not None:
        bound = 1.0 / math.sqrt(d_in) if d_in > 0 else 0.0
        weight.uniform_(-bound, bound, generator=generator)
        bias.uniform_(-bound, bound, generator=generator)
    layer.weight = nn.Parameter(weight.to(device=device, dtype=dtype))
    layer.bias = nn.Parameter(bias.to(device=device, dtype=dtype))
    return layer


def _copy_network(net: CovariateNet, dtype: torch.dtype) -> CovariateNet:
    """A copy of ``net`` with parameters of type ``dtype``, on the same device."""
    first = net.hidden[0] if len(net.hidden) else net.out
    widths = tuple(layer.out_features for layer in net.hidden)
    copy = CovariateNet(
        first.in_features, widths, net.out.out_features, dtype=dtype, device=first.weight.device
    )
    copy.load_state_dict({k: v.to(dtype) for k, v in net.state_dict().items()})
    return copy


def standardize(cov: torch.Tensor, stats: dict | None = None):
    """Centre and scale covariates; constant columns are dropped (they carry nothing).

    Returns ``(z, stats)`` with stats = {"mean", "sd", "keep"} (numpy) for reuse.
    """
    if stats is None:
        # moments of each column over its largest magnitude (squares of covariates near
        # 1e300 would overflow); a column whose sd is below 1e-12 of that magnitude is
        # constant, whatever its units (values of size 1e-300 still vary)
        c64 = cov.to(torch.float64)
        big = c64.abs().amax(0) if cov.shape[0] > 0 else c64.new_zeros(cov.shape[1])
        big = torch.where(big > 0, big, torch.ones_like(big))
        unit = c64 / big
        mean = unit.mean(0) * big
        sd = (
            unit.std(0, unbiased=False)
            if cov.shape[0] > 1 and cov.shape[1] > 0
            else torch.zeros_like(mean)
        )
        keep = (sd > 1e-12).cpu().numpy()
        sd = sd * big
        stats = {"mean": mean.cpu().numpy(), "sd": sd.cpu().numpy(), "keep": keep}
        if not keep.all():
            logger.info("covariates: %d constant column(s) dropped", int((~keep).sum()))
    keep = torch.as_tensor(stats["keep"], device=cov.device)
    mean = torch.as_tensor(stats["mean"], dtype=cov.dtype, device=cov.device)[keep]
    sd = torch.as_tensor(stats["sd"], dtype=cov.dtype, device=cov.device)[keep]
    return (cov[:, keep] - mean) / sd, stats


def _fits(weights: dict, d: int) -> bool:
    """True when saved network weights take d inputs."""
    first = weights.get("hidden.0.weight", weights.get("out.weight"))
    return first is not None and np.asarray(first).shape[1] == d


def _network_layout(weights: Any, name: str) -> tuple[int, tuple[int, ...], int]:
    """``(inputs, hidden widths, outputs)`` of saved network weights (``name`` in messages:
    e.g. ``"g_init['network']"``), or a clear error unless they are the finite weights of
    a :class:`CovariateNet` (layers ``hidden.0`` ... and ``out``, of matching shapes)."""
    if not isinstance(weights, dict):
        raise TypeError(
            f"{name} must be the dict of network weights of an earlier fit, got "
            f"{type(weights).__name__}."
        )
    n_hidden = 0
    while f"hidden.{n_hidden}.weight" in weights:
        n_hidden += 1
    layers = [f"hidden.{i}" for i in range(n_hidden)] + ["out"]
    expected = {f"{layer}.{p}" for layer in layers for p in ("weight", "bias")}
    if set(weights) != expected:
        missing = sorted(expected - set(weights))
        unknown = sorted(set(weights) - expected)
        raise ValueError(
            f"{name} is not the network of a covariate prior (missing {missing}, "
            f"unexpected {unknown}); pass the network of an earlier fit unmodified."
        )
    sizes: list[int] = []
    for layer in layers:
        w = real_array(weights[f"{layer}.weight"], f"{name}['{layer}.weight']")
        b = real_array(weights[f"{layer}.bias"], f"{name}['{layer}.bias']")
        if w.ndim != 2 or b.shape != (w.shape[0],) or (sizes and w.shape[1] != sizes[-1]):
            after = f" after a layer of width {sizes[-1]}" if len(sizes) > 1 else ""
            raise ValueError(
                f"{name} has layers of mismatched shapes ({layer}.weight {w.shape}, "
                f"{layer}.bias {b.shape}{after}); pass the network of an earlier fit "
                "unmodified."
            )
        for key, arr in ((f"{layer}.weight", w), (f"{layer}.bias", b)):
            bad = int(np.count_nonzero(~np.isfinite(arr)))
            if bad:
                raise ValueError(
                    f"{name}[{key!r}] must be finite, got {bad} NaN or infinite value(s); "
                    "pass the network of an earlier fit."
                )
        if not sizes:
            sizes.append(w.shape[1])
        sizes.append(w.shape[0])
    return sizes[0], tuple(sizes[1:-1]), sizes[-1]


def _kept_covariates(stats: Any, name: str) -> int:
    """The number of columns that saved covariate standardisation (``covariate_stats``:
    ``mean``, ``sd``, ``keep``; ``name`` in messages) keeps, or a clear error unless it
    holds one finite mean, one finite sd (> 0 where kept) and one boolean per column."""
    if not isinstance(stats, dict) or not {"mean", "sd", "keep"} <= set(stats):
        raise ValueError(
            f"{name} must be the covariate standardisation of an earlier fit, a dict with "
            f"'mean', 'sd' and 'keep', got {stats!r}."
        )
    keep = np.asarray(stats["keep"])
    if keep.ndim != 1 or keep.dtype != np.bool_:
        raise TypeError(f"{name}['keep'] must be a 1-D boolean array, got {stats['keep']!r}.")
    for key in ("mean", "sd"):
        arr = real_array(stats[key], f"{name}[{key!r}]")
        if arr.shape != keep.shape or not np.all(np.isfinite(arr)):
            raise ValueError(
                f"{name}[{key!r}] must hold one finite value per covariate ({keep.size}), "
                f"got {stats[key]!r}."
            )
        if key == "sd" and not np.all(arr[keep] > 0):
            raise ValueError(f"{name}['sd'] must be > 0 for kept covariates, got {stats[key]!r}.")
    return int(keep.sum())


def _check_covariate_count(stats: dict, d: int, argname: str) -> None:
    """A clear error unless covariates of ``d`` columns are those that the prior ``argname``
    (its ``covariate_stats``) was fitted to."""
    d_fit = np.asarray(stats["keep"]).size
    if d_fit != d:
        raise ValueError(
            f"{argname} was fitted to {d_fit} covariates, but {d} are given; pass covariates "
            f"with the {d_fit} columns it was fitted to, in the same order."
        )


def _load_network(net: CovariateNet, weights: dict, positions: np.ndarray | None = None) -> None:
    """Load saved weights into ``net``, whose output layer may have more rows (components
    added to a grid since). ``positions[i]`` is the new row of saved output row i (default:
    the saved rows come first). Each added row copies the nearest saved row with its bias
    lowered by 40 (a logit 40 below an existing one for every covariate value, i.e. a prior
    weight below e^-40)."""
    ref = net.state_dict()
    if set(weights) != set(ref):
        raise ValueError(
            f"the saved network has the layers {sorted(weights)}, but this prior's network "
            f"has {sorted(ref)}: the hidden layers differ."
        )
    new = {}
    for key, value in weights.items():
        v = torch.as_tensor(np.asarray(value), dtype=ref[key].dtype, device=ref[key].device)
        if v.shape != ref[key].shape:
            if not key.startswith("out.") or v.shape[1:] != ref[key].shape[1:]:
                raise ValueError(
                    f"the saved network does not fit these covariates ({key}: "
                    f"{tuple(v.shape)} vs {tuple(ref[key].shape)})."
                )
            n_new = ref[key].shape[0]
            pos = np.arange(v.shape[0]) if positions is None else np.asarray(positions)
            added = np.setdiff1d(np.arange(n_new), pos)
            # nearest saved row of every row (saved rows map to themselves)
            near = np.abs(np.arange(n_new)[:, None] - pos[None, :]).argmin(axis=1)
            full = v[torch.as_tensor(near, device=v.device)].clone()
            if key == "out.bias":
                full[torch.as_tensor(added, device=v.device)] -= 40.0
            v = full
        new[key] = v
    net.load_state_dict(new)


def net_to_numpy(net: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in net.state_dict().items()}


class CovariatePrior(Prior):
    """Base class: a network of the covariates parametrises a mixture prior.

    Subclasses define the number of network outputs, the plain prior that initialises a
    cold fit (:meth:`_plain_start`), the (K, n) log weights and posterior pieces given the
    outputs (:meth:`_pieces`), and any global parameters (:meth:`_extra_params`).

    Parameters
    ----------
    hidden
        Sizes of the hidden layers; ``()`` (``hidden_layers=0``) is a linear model.
    weight_decay
        L2 penalty on the network weights (not the biases), per observation.
    max_iter, warm_iter
        L-BFGS iterations of a cold and of a warm-started call.
    tol
        Stop when an iteration gains less than ``tol * n`` log-likelihood.
    seed
        Seed of the initial network weights (the fit itself is deterministic).
    """

    uses_covariates = True
    #: ``unit`` (the units the network works in) only where :attr:`normalise_units`
    g_keys = ("network", "covariate_stats", "unit")
    g_options = ("hidden",)
    #: Fit on (x - mode) / u and s / u for a data scale u (kept in ``g["unit"]`` and the
    #: state, so that warm starts keep the network's units): families whose network or
    #: global parameters carry the data's units (means, sds) are then equivariant under a
    #: common rescaling of x and s, and their optimiser sees O(1) parameters. A family
    #: whose parameters are all unit-free (``cash``: logits on a data-scaled grid) sets
    #: this False.
    normalise_units: bool = True

    def __init__(
        self,
        mode: float = 0.0,
        *,
        hidden: tuple[int, ...] | int = (16,),
        hidden_layers: int | None = None,
        weight_decay: float = 1e-2,
        max_iter: int = 100,
        warm_iter: int = 10,
        tol: float = 1e-9,
        seed: int = 0,
    ) -> None:
        super().__init__(mode)
        if isinstance(hidden, int | np.integer) and not isinstance(hidden, bool):
            hidden = (hidden,)
        try:
            hidden = tuple(hidden)
        except TypeError:
            raise ValueError(
                f"hidden must be a layer size or a sequence of them, got {hidden!r}."
            ) from None
        if hidden_layers is not None:
            hidden_layers = check_count(hidden_layers, "hidden_layers", 0)
            width = hidden[0] if hidden else 16
            hidden = (width,) * hidden_layers
        self.hidden = tuple(check_count(h, "hidden layer size") for h in hidden)
        self.weight_decay = check_positive(weight_decay, "weight_decay", zero_ok=True)
        self.max_iter = check_count(max_iter, "max_iter")
        self.warm_iter = check_count(warm_iter, "warm_iter")
        self.tol = check_positive(tol, "tol", zero_ok=True)
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
            raise ValueError(f"seed must be an integer, got {seed!r}.")
        self.seed = resolve_seed(seed, "seed")

    # ---- family hooks ----------------------------------------------------------------
    @abstractmethod
    def _n_outputs(self, setup: dict) -> int:
        """Number of network outputs."""

    @abstractmethod
    def _setup(self, x, s, state, g_init) -> dict:
        """Fixed quantities of this call (grid, component log-likelihoods, ...)."""

    @abstractmethod
    def _plain_start(self, x, s, setup: dict) -> tuple[torch.Tensor, dict]:
        """Output biases (and global parameters) reproducing the matching plain prior."""

    @abstractmethod
    def _log_weights(self, out: torch.Tensor, extra: dict, x, s, setup: dict) -> torch.Tensor:
        """(n, K) log prior weight + log marginal of each piece, from network outputs, less
        a per-observation constant ``setup["offset_nk"]`` where the family keeps one (added
        back to every likelihood; the training loss does without it)."""

    @abstractmethod
    def _posterior_pieces(self, out, extra, x, s, setup, c: float, used) -> tuple:
        """``(mean, var, p_le, p_ge)`` of the pieces ``used`` (indices), each
        (len(used), n) or broadcastable."""

    @abstractmethod
    def _g_entries(self, out, extra, setup) -> dict[str, Any]:
        """Family-specific entries of the fitted ``g``."""

    @abstractmethod
    def _check_outputs(self, n_out: int, saved: dict, argname: str) -> None:
        """A clear error unless ``n_out`` (the number of outputs of the network of a saved
        ``g`` or ``state`` of this family, ``argname``) is what this prior's network has
        for it (e.g. one per grid scale)."""

    def _check_g_entries(self, g: dict[str, Any], argname: str) -> None:
        """The values that a fit reads from a ``g`` of this family: finite network weights
        of this prior's architecture (:attr:`hidden`) and outputs (:meth:`_check_outputs`)
        whose inputs are the covariates that ``covariate_stats`` keeps, and a finite
        positive ``unit`` (where the family keeps one); subclasses add their entries."""
        name = f"{argname}['network']"
        d_in, hidden, n_out = _network_layout(g["network"], name)
        self._check_hidden(hidden, name, argname)
        self._check_outputs(n_out, g, argname)
        d_kept = _kept_covariates(g["covariate_stats"], f"{argname}['covariate_stats']")
        if d_in != d_kept:
            raise ValueError(
                f"{name} takes {d_in} inputs but {argname}['covariate_stats'] keeps "
                f"{d_kept} covariate column(s); pass the g of an earlier fit unmodified."
            )
        if "unit" in g:
            unit = real_array(g["unit"], f"{argname}['unit']")
            if unit.size != 1 or not (np.isfinite(unit) & (unit > 0)).all():
                raise ValueError(
                    f"{argname}['unit'] must be a finite number > 0, got {g['unit']!r}."
                )

    def _check_hidden(self, hidden: tuple[int, ...], where: str, argname: str) -> None:
        """A clear error unless a saved network's hidden layer widths (of ``where``, e.g.
        ``"state['network']"``) are this prior's."""
        if hidden != self.hidden:
            raise ValueError(
                f"{where} has hidden layers {hidden} but this prior has hidden={self.hidden}; "
                f"pass a prior with hidden={hidden} (hidden=() for none), or a {argname} "
                f"fitted with hidden={self.hidden}."
            )

    def _check_state(self, state: Any) -> None:
        """As :meth:`Prior._check_state`, and a saved network must be finite, of this
        prior's architecture and outputs (its covariates may differ: then the call starts
        cold, e.g. self covariates after the number of factors changed)."""
        super()._check_state(state)
        if "network" in state:
            _, hidden, n_out = _network_layout(state["network"], "state['network']")
            self._check_hidden(hidden, "state['network']", "state")
            self._check_outputs(n_out, state, "state")

    def _extra_init(self, setup: dict, start: dict) -> dict[str, torch.Tensor]:
        """Global (non-network) parameters, as tensors to optimise."""
        return {}

    def _widen_setup(self, setup: dict, net: CovariateNet, z, x, s) -> dict:
        """A warm start's setup, widened where the data now need it, provided the saved
        network's prior stays the same under the wider setup (the warm start must still
        be able to return it)."""
        return setup

    def _state_in_units(self, state: dict, ratio: float) -> dict | None:
        """The warm-start ``state`` re-expressed for units ``ratio`` times smaller (values
        in the old units times ``ratio``; logs of scales plus log ``ratio``): the same
        prior, for a network that works in the new units. None if the family cannot."""
        return None

    def _g_to_data_units(self, g: dict[str, Any], unit: float) -> dict[str, Any]:
        """The entries of a fitted ``g`` that carry units, from the fit's internal units
        (data / ``unit``) to the data's (``g`` is modified and returned)."""
        return g

    def _g_from_data_units(self, g: dict[str, Any], unit: float) -> dict[str, Any]:
        """Inverse of :meth:`_g_to_data_units`, on a copy (for ``g_init``)."""
        return g

    @staticmethod
    def _unit(xs: torch.Tensor, s: torch.Tensor, warm: dict | None) -> float:
        """The data scale u of this call: the warm start's (its network works in those
        units; see ``_REUNIT_RATIO``), else the root mean square of x - mode (of s when x
        is all zero)."""
        if warm is not None and "unit" in warm:
            return float(np.asarray(warm["unit"]))
        if warm is not None and "network" in warm:
            return 1.0  # a network fitted before units were kept: it works in the data's
        rms = torch.stack([(xs * xs).mean(dtype=torch.float64), (s * s).mean(dtype=torch.float64)])
        mx, ms = rms.sqrt().tolist()
        return mx if mx > 0 else ms

    # ---- fitting --------------------------------------------------------------------
    def _build(self, d: int, k: int, dtype, device) -> CovariateNet:
        """A fresh network, initialised from ``seed`` (the global random state untouched)."""
        gen = torch.Generator().manual_seed(self.seed)
        return CovariateNet(d, self.hidden, k, gen, dtype=dtype, device=device)

    def _fit(self, x, s, *, covariates, state, g_init, fix_g) -> EBNMResult:
        cov = covariates
        xs = x - self.mode if self.mode != 0.0 else x
        unit = 1.0
        if self.normalise_units:
            if g_init is not None:
                g_init = self._g_from_data_units(dict(g_init), float(np.asarray(g_init["unit"])))
            unit = self._unit(xs, s, g_init if g_init is not None else state)
            if g_init is None and state is not None and "unit" in state and not fix_g:
                # data that moved far from the saved units: the saved prior, expressed in
                # the units of these data, keeps the optimiser's parameters of order one
                fresh = self._unit(xs, s, None)
                ratio = unit / fresh
                moved = not 1.0 / _REUNIT_RATIO <= ratio <= _REUNIT_RATIO
                rescaled = self._state_in_units(state, ratio) if moved else None
                if rescaled is not None:
                    state, unit = rescaled, fresh
            if unit != 1.0:
                xs, s = xs / unit, s / unit
        warm = g_init if g_init is not None else state
        saved = None if warm is None else warm.get("covariate_stats")
        if g_init is not None:
            _check_covariate_count(saved, cov.shape[1], "g_init")
        elif saved is not None and np.asarray(saved["keep"]).size != cov.shape[1]:
            warm = None  # e.g. self covariates after the number of factors changed
        setup = self._setup(xs, s, warm, g_init)
        z, stats = standardize(cov, None if warm is None else warm.get("covariate_stats"))
        n_out = self._n_outputs(setup)
        net = self._build(z.shape[1], n_out, x.dtype, x.device)
        if warm is not None and "network" in warm and not _fits(warm["network"], z.shape[1]):
            if g_init is not None:
                raise ValueError(
                    "g_init's network was fitted to a different number of covariates "
                    f"than the {z.shape[1]} given."
                )
            warm = None
            z, stats = standardize(cov)
        saved_ll = None  # a warm refit's log-likelihood at the saved prior, these data
        if warm is not None and "network" in warm:
            _load_network(net, warm["network"], setup.get("saved_rows"))
            extra = {
                k: torch.as_tensor(v, dtype=x.dtype, device=x.device).clone()
                for k, v in warm.get("extra", {}).items()
            }
            n_iter, patience = self.warm_iter, _PATIENCE
            if g_init is None and not fix_g:
                setup = self._widen_setup(setup, net, z, xs, s)
                net, extra, fresh, saved_ll = self._best_start(net, extra, z, xs, s, setup)
                if fresh:  # the plain prior won: a cold fit
                    n_iter, patience = self.max_iter, None
        else:
            net, extra = self._plain_network(net, xs, s, setup)
            n_iter, patience = self.max_iter, None
        final_ll = None
        if not fix_g:
            final_ll = self._train(net, extra, z, xs, s, setup, n_iter, patience)
        with torch.no_grad():
            out = net(z)
            log_w = self._log_weights(out, extra, xs, s, setup).T
            c = -self.mode / unit
            s_full = s.expand_as(x)
            n = x.numel()

            def part(i: int, j: int):
                lw = log_w[:, i:j]
                log_marginal = torch.logsumexp(lw, dim=0)
                resp = exp_flushed(lw - log_marginal)
                if "offset_nk" in setup:
                    log_marginal = log_marginal + setup["offset_nk"][i:j]
                # pieces nobody is responsible for (resp < 1e-15 everywhere) are dropped
                used = torch.nonzero(resp.max(dim=1).values > 1e-15).ravel()
                pieces = self._posterior_pieces(
                    out[i:j], extra, xs[i:j], s_full[i:j], _slice_setup(setup, i, j), c, used
                )
                return combine(
                    resp[used], *pieces, log_marginal=log_marginal, shift=self.mode, scale=unit
                )

            post = chunked(part, n, log_w.shape[0], x.device)
        g = {"family": self.name, "mode": self.mode}
        g.update(self._g_entries(out.detach(), extra, setup))
        g["network"] = net_to_numpy(net)
        g["extra"] = {k: v.detach().cpu().numpy().copy() for k, v in extra.items()}
        g["covariate_stats"] = stats
        g["hidden"] = np.asarray(self.hidden, dtype=np.int64)
        state_out = {k: g[k] for k in ("network", "extra", "covariate_stats")}
        state_out.update(self._state_entries(setup))
        if saved_ll is not None:
            # what refitting gained over keeping the saved prior (the EBMF engine defers
            # the next refits of a prior whose refits stop gaining)
            state_out["refit_gain"] = final_ll - saved_ll
        if self.normalise_units:
            g = self._g_to_data_units(g, unit)
            g["unit"] = state_out["unit"] = unit
        return EBNMResult.from_posterior(post, g, state_out)

    def _state_entries(self, setup: dict) -> dict:
        return {}

    def _plain_network(self, net, x, s, setup) -> tuple[CovariateNet, dict]:
        """``net`` set to the matching plain prior (zero output weights, biases from the
        plain fit) and its global parameters."""
        bias, start = self._plain_start(x, s, setup)
        with torch.no_grad():
            net.out.weight.zero_()
            net.out.bias.copy_(bias)
        return net, self._extra_init(setup, start)

    def _best_start(self, net, extra, z, x, s, setup):
        """The start of a warm-started call: the saved network; the saved network
        re-centred on the matching plain prior fitted to these data (output biases shifted
        so that the mean output over the observations equals the plain prior's, global
        parameters from the plain fit: keeps the covariate effects, follows the data's
        drift); or that plain prior itself, whichever has the highest exact
        log-likelihood here. The saved network is always a candidate, so the chosen start
        never loses likelihood; the others keep the covariate prior from falling behind
        the plain prior when the data moved (e.g. standard errors shrank below the saved
        grid). Returns ``(net, extra, fresh, saved log-likelihood)``: a plain start
        (``fresh``) gets a cold fit's iterations. The outputs of the three candidates
        differ only in the output biases, so one forward pass serves all of them."""
        bias, start = self._plain_start(x, s, setup)
        plain_extra = self._extra_init(setup, start)
        with torch.no_grad():
            out = net(z)
            shift = bias - out.mean(0)
            cands = [(out, extra), (out + shift, plain_extra), (bias.expand_as(out), plain_extra)]
            lls = [self._loglik_of(o, e, x, s, setup) for o, e in cands]
            best = max(range(len(cands)), key=lambda i: (lls[i], -i))
            if best == 1:
                net.out.bias.add_(shift)
            elif best == 2:
                net.out.weight.zero_()
                net.out.bias.copy_(bias)
        logger.debug(
            "%s warm start: %s (log-likelihoods %s)",
            self.name,
            ("saved", "re-centred", "plain")[best],
            [round(v, 3) for v in lls],
        )
        return net, cands[best][1], best == 2, lls[0]

    def network_outputs(self, g: dict, covariates) -> torch.Tensor:
        """Raw network outputs of a fitted prior at the given covariates.

        Parameters
        ----------
        g
            A fitted prior of this family (``result.g``), checked as a ``g_init`` is.
        covariates
            (n, d) covariates (1-D: one covariate), finite, with the columns ``g`` was
            fitted to.

        Returns
        -------
        torch.Tensor
            (n, outputs) float64 outputs, on the CPU.
        """
        self.check_g(g, "g")
        shape = np.shape(covariates)
        cov = covariate_matrix(
            covariates,
            shape[0] if shape else 1,  # a scalar: one observation of one covariate
            "covariates",
            "observation",
            torch.float64,
            torch.device("cpu"),
        )
        _check_covariate_count(g["covariate_stats"], cov.shape[1], "g")
        z, _ = standardize(cov, g["covariate_stats"])
        weights = g["network"]
        n_out = np.asarray(weights["out.bias"]).shape[0]
        net = self._build(z.shape[1], n_out, torch.float64, torch.device("cpu"))
        _load_network(net, weights)
        with torch.no_grad():
            return net(z)

    def _loglik_of(self, out, extra, x, s, setup) -> float:
        """Exact log-likelihood (summed in float64) of the prior with network outputs
        ``out``."""
        log_w = self._log_weights(out, extra, x, s, setup)
        total = torch.logsumexp(log_w, dim=1).sum(dtype=torch.float64)
        if "offset_nk" in setup:
            total = total + setup["offset_nk"].sum(dtype=torch.float64)
        return float(total)

    def _exact_loglik(self, net, extra, z, x, s, setup) -> float:
        with torch.no_grad():
            return self._loglik_of(net(z), extra, x, s, setup)

    def _train(self, net, extra, z, x, s, setup, n_iter: int, patience: int | None = None) -> float:
        """Full-batch L-BFGS on -loglik/n + penalty, in float32 (a copy of the problem when
        the data are float64); every evaluated point is a candidate and the best is kept.
        The result replaces the start only if its exact (float64) log-likelihood is not
        lower, so a warm start is never made worse. With ``patience``, training ends once
        that many evaluations in a row found no higher log-likelihood (warm starts).
        Returns the exact log-likelihood of the network kept."""
        start_ll = self._exact_loglik(net, extra, z, x, s, setup)
        start = _snapshot(net, extra)
        work_net, work_extra = net, extra
        wz, wx, ws, wsetup = z, x, s, setup
        if x.dtype == torch.float64:
            work_net = _copy_network(net, torch.float32)
            work_extra = {k: v.detach().float() for k, v in extra.items()}
            wz, wx, ws = z.float(), x.float(), s.float()
            wsetup = {
                k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                for k, v in setup.items()
            }
        params = [*work_net.parameters(), *work_extra.values()]
        for p in params:
            p.requires_grad_(True)
        weights = [m.weight for m in [*work_net.hidden, work_net.out]]
        n = x.numel()
        best = {"loglik": -math.inf, "state": None, "misses": 0}

        def closure():
            if patience is not None and best["misses"] >= patience:
                raise _NoProgress
            opt.zero_grad()
            log_w = self._log_weights(work_net(wz), work_extra, wx, ws, wsetup)
            loglik = logsumexp_rows(log_w).sum(dtype=torch.float64)
            value = float(loglik.detach())
            if math.isfinite(value) and value > best["loglik"]:
                best["loglik"], best["state"] = value, _snapshot(work_net, work_extra)
                best["misses"] = 0
            else:
                best["misses"] += 1
            loss = -loglik / n
            if self.weight_decay:
                loss = loss + self.weight_decay * sum((w * w).sum() for w in weights)
            loss.backward()
            return loss

        opt = torch.optim.LBFGS(
            params,
            lr=1.0,
            max_iter=n_iter,
            max_eval=2 * n_iter,
            history_size=20,
            tolerance_grad=1e-10,
            tolerance_change=self.tol,
            line_search_fn="strong_wolfe",
        )
        try:
            opt.step(closure)
        except _NoProgress:
            pass
        except RuntimeError as err:
            # the strong-Wolfe search can grow its step past what float32 parameters take
            # (a direction along which the loss keeps falling, e.g. a truncated slab's mean
            # running off to -inf); every point it evaluated is a candidate, so stop here
            if "overflow" not in str(err):
                raise
            logger.debug("%s: L-BFGS stopped, step overflow (%s)", self.name, err)
        for p in params:
            p.requires_grad_(False)
        if best["state"] is None:
            return start_ll
        _restore(net, extra, best["state"])
        final_ll = self._exact_loglik(net, extra, z, x, s, setup)
        if not final_ll >= start_ll:
            _restore(net, extra, start)
            return start_ll
        return final_ll


#: A warm-started call's training stops once this many evaluations in a row found no
#: higher log-likelihood than the best so far (early stopping on the marginal likelihood:
#: the penalised loss that L-BFGS follows leads away from it in most warm calls, and only
#: the best point is kept). In `cebmf demo` 448 of 2,045 warm calls found a higher point
#: (891 nats in all) in 60 of the fit's 128 s. Cold fits search on: their dips can end in
#: higher points (emdn, n = 3000: 14 nats)
_PATIENCE = 4


class _NoProgress(Exception):
    """Raised by the training closure to end L-BFGS early."""


#: A warm start is re-expressed in the units of its data when they differ from the saved
#: units by more than this factor either way.
_REUNIT_RATIO = 10.0


def _snapshot(net, extra):
    return (
        {k: v.detach().clone() for k, v in net.state_dict().items()},
        {k: v.detach().clone() for k, v in extra.items()},
    )


def _restore(net, extra, state) -> None:
    ref = net.state_dict()
    net.load_state_dict({k: v.to(ref[k].dtype) for k, v in state[0].items()})
    for k, v in state[1].items():
        extra[k].data.copy_(v)


def _slice_setup(setup: dict, i: int, j: int) -> dict:
    """Per-observation arrays of a setup (keys ending in ``_nk``) restricted to rows i:j."""
    return {
        k: (v[i:j] if isinstance(v, torch.Tensor) and k.endswith("_nk") else v)
        for k, v in setup.items()
    }
