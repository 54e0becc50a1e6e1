"""``fit_ebmf``: greedy addition, backfitting and nullcheck (the flashier algorithm)."""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .._validation import check_flags, covariate_matrix, refuse_masked, resolve_seed
from ..data.convert import as_data_matrix, resolve_device, resolve_dtype
from ..priors._mixsqp import collect_shortfalls
from ..priors.base import Prior, get_prior
from .engine import Engine
from .init import InitBasis, leading_pair
from .noise import check_noise, uses_rows
from .result import EBMFResult
from .rotation import sparse_rotation

logger = logging.getLogger("cebmf")

PriorSpec = str | Prior | Sequence[str | Prior]


class PriorChoice:
    """Prior of factor k from a single spec or a per-factor sequence (the last entry
    serves every later factor)."""

    def __init__(self, spec: PriorSpec, argname: str) -> None:
        if isinstance(spec, str | Prior | type):  # a class gets get_prior's message
            spec = [spec]
        elif not isinstance(spec, Sequence):
            raise TypeError(
                f"{argname} must be a prior name, a Prior instance or a sequence of them (one "
                f"per factor), got {type(spec).__name__}."
            )
        spec = list(spec)
        if not spec:
            raise ValueError(f"{argname} is an empty sequence; give a prior name or instance.")
        self.priors = []
        for item in spec:
            try:
                self.priors.append(get_prior(item))
            except (ValueError, TypeError) as err:
                raise type(err)(f"{argname}: {err}") from err
            if self.priors[-1].name == "flat":
                raise ValueError(
                    f"{argname}: the flat prior cannot serve learned factors. Nothing pins "
                    "the split of a factor's scale between its loadings and factors, and the "
                    "flat ELBO convention keeps rewarding a larger flat side, so the split "
                    "drifts (for weak factors, to overflow). Use 'normal' for dense values "
                    "without sparsity; flat is what the free side of fixed_loadings / "
                    "fixed_factors gets."
                )
        self.argname = argname

    def __getitem__(self, k: int) -> Prior:
        return self.priors[min(k, len(self.priors) - 1)]


def check_prior_covariates(
    priors: Sequence[Prior],
    has_covariates: bool,
    *,
    prior_arg: str,
    covariates_arg: str,
    what: str,
    self_covariates: bool = False,
) -> None:
    """Refuse covariates given to a plain prior, and a covariate-moderated prior without
    covariates (unless ``self_covariates``). The messages name ``prior_arg`` and
    ``covariates_arg``, the caller's own argument names (``tl.fit`` has its own); ``what``
    says what the covariates are (e.g. "one row per row of Y")."""
    plain = [pr.name for pr in priors if not pr.uses_covariates]
    moderated = [pr.name for pr in priors if pr.uses_covariates]
    if has_covariates and plain:
        raise ValueError(
            f"{covariates_arg} was given but {prior_arg} uses {plain[0]!r}, which does not "
            f"use covariates; choose a covariate-moderated prior (cash, emdn, spiked_emdn, "
            f"cgb) or drop {covariates_arg}."
        )
    if not has_covariates and moderated and not self_covariates:
        raise ValueError(
            f"{prior_arg} uses the covariate-moderated prior {moderated[0]!r} but "
            f"{covariates_arg} is None; pass {covariates_arg} ({what}) or "
            "self_covariates=True."
        )


def _as_covariates(x, n: int, argname: str, dtype, device) -> torch.Tensor | None:
    if x is None:
        return None
    rows = f"{'row' if argname == 'X_l' else 'column'} of Y"
    return covariate_matrix(x, n, argname, rows, dtype, device)


def _check_zero_lines(data, noise: str) -> None:
    """Rows (row noise) or columns (column noise) without signal have no noise variance."""
    checks = [("column", data.col_sq, data.n_obs_col, "columns")]
    if uses_rows(noise):
        checks = [("row", data.row_sq, data.n_obs_row, "rows")]
    if noise == "constant":
        if not float(data.row_sq.sum()) > 0:
            raise ValueError("Y is all zero: there is nothing to factorise.")
        checks = []
    for what, sq, nobs, plural in checks:
        bad = torch.nonzero((sq <= 0) | (nobs <= 0)).ravel().cpu().numpy()
        if bad.size:
            first = ", ".join(map(str, bad[:5]))
            raise ValueError(
                f"Y has {bad.size} {what}(s) that are all zero or unobserved (first: {first}); "
                f"with noise={noise!r} their noise variance would be 0. Drop those {plural} "
                f"or use noise='constant'."
            )
    nobs_lines = [(data.n_obs_row, "row"), (data.n_obs_col, "column")]
    for nobs, what in nobs_lines:
        empty = torch.nonzero(nobs <= 0).ravel().cpu().numpy()
        if empty.size:
            raise ValueError(
                f"Y has {empty.size} {what}(s) with every entry missing (first: {empty[0]}); "
                f"drop them."
            )


def _as_matrix(x, n: int, argname: str, dtype, device) -> torch.Tensor:
    refuse_masked(x, argname, "give every entry a value")
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise TypeError(f"{argname} must be numeric, got dtype {arr.dtype}.")
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] != n:
        raise ValueError(f"{argname} must have {n} rows, got shape {arr.shape}.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{argname} contains NaN or Inf.")
    return torch.as_tensor(arr, dtype=dtype, device=device)


def _check_init_scale(l0: torch.Tensor, f0: torch.Tensor, n: int, p: int) -> None:
    """Refuse starting factors whose squares (the engine's Gram matrices and expected
    residuals) or products L0 F0^T overflow float64."""
    a = l0.to(torch.float64).abs().amax(0)
    b = f0.to(torch.float64).abs().amax(0)
    big = (
        ~torch.isfinite(a * a * n)
        | ~torch.isfinite(b * b * p)
        | ~torch.isfinite((a * b) ** 2 * n * p)
    )
    if bool(big.any()):
        j = int(torch.nonzero(big)[0])
        raise ValueError(
            f"init column {j} is too large (|L0| up to {float(a[j]):.3g}, |F0| up to "
            f"{float(b[j]):.3g}): its squares or products overflow; rescale init to the "
            "scale of the data."
        )


def fit_ebmf(
    Y: Any,
    *,
    max_factors: int = 50,
    prior_loadings: PriorSpec = "point_normal",
    prior_factors: PriorSpec = "point_normal",
    noise: str = "column",
    X_l: Any = None,
    X_f: Any = None,
    init: tuple[Any, Any] | None = None,
    fixed_loadings: Any = None,
    fixed_factors: Any = None,
    greedy: bool = True,
    backfit: bool = True,
    nullcheck: bool = True,
    rotate: bool = True,
    tol: float | None = None,
    max_iter: int = 500,
    device: str | torch.device = "auto",
    dtype: Any = None,
    sparse_backend: str = "auto",
    random_state: int | np.random.Generator | None = 0,
    progress: bool = False,
    keep_ebnm_inputs: bool = False,
    self_covariates: bool = False,
) -> EBMFResult:
    r"""Empirical Bayes matrix factorisation Y ~ L F^T + E.

    Factors are added greedily (each initialised from the leading singular pair of the
    implicit residual, sign-aware for nonnegative priors, then iterated alone until a step
    gains less than max(tol, 1e-4 x its gain so far); kept only if non-zero and the ELBO
    rises), then all are refined by backfitting sweeps until the ELBO changes by less than
    ``tol``, and factors whose removal does not lower the ELBO are dropped (nullcheck).
    The greedy stage then tries again on the backfitted residual; rounds of greedy +
    backfit + nullcheck go on until an addition fails right after a backfit (or
    ``max_factors`` / ``max_iter`` is reached), so the number of factors does not hang on
    one early failed addition.

    Parameters
    ----------
    Y
        N x P data: dense numpy / torch (NaN or a masked entry of a numpy masked array =
        missing), scipy sparse, or torch sparse. Never modified; sparse input is never
        densified. Its largest absolute value must lie within about 1e-138 to 5e138
        (float64) or 8e-18 to 2e17 (float32), where squares stay representable.
    max_factors
        Upper bound on the number of factors added greedily (capped at min(N, P)).
    prior_loadings, prior_factors
        Prior family name or :class:`~cebmf.priors.Prior`, or a sequence giving the k-th
        learned factor (``init`` columns first, then greedy additions; fixed factors do not
        count) its k-th entry (the last entry serves every later factor).
    noise
        ``"column"`` (default: one variance per gene), ``"row"`` or ``"constant"``.
    X_l, X_f
        Row (cell) and column (gene) covariates, N x d and P x e, passed to the priors;
        only covariate-moderated prior families accept them.
    init
        ``(L0, F0)``, N x K0 and P x K0 starting factors (refined like the others).
    fixed_loadings, fixed_factors
        N x r (P x r) columns fixed as loadings (factors) of r extra factors whose other
        side is learned with a ``flat`` prior (e.g. ``fixed_loadings=np.ones(N)`` is an
        intercept: gene means).
    greedy, backfit, nullcheck
        Which stages to run.
    rotate
        Before backfitting, propose the varimax rotations of the learned factors that make
        the loadings, or the factors, sparsest (L F^T unchanged), each followed by one
        sweep; the better is kept only if it raises the ELBO. Greedy factors of similar
        size are mixtures of the true ones, which backfitting alone untangles slowly.
    tol
        Convergence tolerance on the ELBO; default N P sqrt(float64 eps) (flashier's).
    max_iter
        Maximum backfit sweeps in total (and iterations per greedy factor).
    device, dtype
        ``"auto"`` picks CUDA when available. dtype None: float32 on GPU, float64 on CPU;
        the dtype of the moments and the EBNM solvers. Products with Y and reductions
        (updates' residual projections, ELBO, noise) are float64 either way.
    sparse_backend
        Kernels of the sparse products (see :class:`~cebmf.data.SparseData`): ``"torch"``
        (multi-threaded; holds a transposed copy, so the matrix twice), ``"scipy"`` (CPU
        only, single-threaded, no copy) or ``"auto"`` (``"torch"`` unless the values would
        need a converted copy on the CPU: float32 values, since products accumulate in
        float64).
    random_state
        Seed of the initialisations: an int, None (a fresh seed from the operating system)
        or a numpy random generator (a seed is drawn from it).
    progress
        Show a progress bar (tqdm) on stderr; logging goes to the ``cebmf`` logger.
    keep_ebnm_inputs
        Keep the (x, s) of each factor's last EBNM problem in ``result.ebnm_inputs``.
    self_covariates
        For covariate-moderated priors, append the other factors' current posterior means
        on the same side (e.g. the other loadings of each cell) to the covariates. The
        priors then change with the other factors, so the ELBO is no longer guaranteed
        to rise at every update (it is a different objective at every sweep).

    Returns
    -------
    EBMFResult
    """
    check_flags(
        greedy=greedy,
        backfit=backfit,
        nullcheck=nullcheck,
        rotate=rotate,
        progress=progress,
        keep_ebnm_inputs=keep_ebnm_inputs,
        self_covariates=self_covariates,
    )
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    check_noise(noise)
    if isinstance(max_factors, bool) or not isinstance(max_factors, int | np.integer):
        raise TypeError(f"max_factors must be an integer, got {type(max_factors).__name__}.")
    if max_factors < 1:
        raise ValueError(f"max_factors must be at least 1, got {max_factors}.")
    if isinstance(max_iter, bool) or not (isinstance(max_iter, int | np.integer) and max_iter >= 1):
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}.")
    if tol is not None and (
        isinstance(tol, bool) or not isinstance(tol, int | float | np.integer | np.floating)
    ):
        raise TypeError(f"tol must be a positive number (or None), got {tol!r}.")
    data = as_data_matrix(Y, dtype=dt, device=dev, sparse_backend=sparse_backend)
    n, p = data.shape
    _check_zero_lines(data, noise)
    if tol is None:
        tol = n * p * math.sqrt(np.finfo(np.float64).eps)
    if not (tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a positive finite number, got {tol}.")
    choose_l = PriorChoice(prior_loadings, "prior_loadings")
    choose_f = PriorChoice(prior_factors, "prior_factors")
    cov_l = _as_covariates(X_l, n, "X_l", dt, dev)
    cov_f = _as_covariates(X_f, p, "X_f", dt, dev)
    for choice, cov, argname in ((choose_l, cov_l, "X_l"), (choose_f, cov_f, "X_f")):
        check_prior_covariates(
            choice.priors,
            cov is not None,
            prior_arg=choice.argname,
            covariates_arg=argname,
            what=f"one row per {'row' if argname == 'X_l' else 'column'} of Y",
            self_covariates=self_covariates,
        )
    gen = torch.Generator().manual_seed(resolve_seed(random_state))

    engine = Engine(data, noise, keep_inputs=keep_ebnm_inputs, self_covariates=self_covariates)
    engine.loadings.covariates, engine.factors.covariates = cov_l, cov_f
    engine.update_noise()
    trace: list[float] = []
    flat = get_prior("flat")

    # fixed factors, then user-supplied starting factors
    for arr, fixed_side, argname in (
        (fixed_loadings, "loadings", "fixed_loadings"),
        (fixed_factors, "factors", "fixed_factors"),
    ):
        if arr is None:
            continue
        cols = _as_matrix(arr, n if fixed_side == "loadings" else p, argname, dt, dev)
        for j in range(cols.shape[1]):
            v = cols[:, j]
            if not bool((v != 0).any()):
                raise ValueError(
                    f"{argname} column {j} is all zero: that fixed factor would carry "
                    "nothing. Drop the column."
                )
            if fixed_side == "loadings":
                engine.add_factor(
                    v,
                    torch.zeros_like(v),
                    torch.zeros(p, dtype=dt, device=dev),
                    torch.ones(p, dtype=dt, device=dev),
                    flat,
                    flat,
                    fixed_l=True,
                )
            else:
                engine.add_factor(
                    torch.zeros(n, dtype=dt, device=dev),
                    torch.ones(n, dtype=dt, device=dev),
                    v,
                    torch.zeros_like(v),
                    flat,
                    flat,
                    fixed_f=True,
                )
            k = engine.k - 1
            engine.update(
                "factors" if fixed_side == "loadings" else "loadings",
                k,
                engine.prepare("factors" if fixed_side == "loadings" else "loadings", [k]),
            )
    if init is not None:
        if not (isinstance(init, tuple | list) and len(init) == 2):
            raise TypeError("init must be a pair (L0, F0) of N x K0 and P x K0 arrays.")
        l0 = _as_matrix(init[0], n, "init[0] (L0)", dt, dev)
        f0 = _as_matrix(init[1], p, "init[1] (F0)", dt, dev)
        if l0.shape[1] != f0.shape[1]:
            raise ValueError(
                f"init has {l0.shape[1]} loading columns but {f0.shape[1]} factor columns."
            )
        if l0.shape[1] > min(n, p):
            raise ValueError(
                f"init has {l0.shape[1]} factors but a {n} x {p} matrix allows at most "
                f"{min(n, p)}; drop columns of init."
            )
        _check_init_scale(l0, f0, n, p)
        for j in range(l0.shape[1]):
            kk = _n_learned(engine)
            engine.add_factor(
                l0[:, j],
                torch.zeros_like(l0[:, j]),
                f0[:, j],
                torch.zeros_like(f0[:, j]),
                choose_l[kk],
                choose_f[kk],
            )
    if engine.k:
        engine.update_noise()
    init_dropped = 0
    if init is not None and l0.shape[1]:
        # the starting factors get their priors and posteriors (one update of each side):
        # until then their KL terms are missing and the ELBO would not be that of q
        dead = _sweep(engine)
        trace.append(engine.elbo())  # the first ELBO of the fit: the starting factors'
        init_dropped = len(dead)
        if dead:
            logger.info(
                "init: %d starting factor(s) became zero in their first update and were dropped",
                len(dead),
            )

    bar = _progress(progress)
    cap = min(int(max_factors), n, p)
    if cap < max_factors:
        logger.info(
            "max_factors=%d is more than a %d x %d matrix allows: at most %d factors are added",
            max_factors,
            n,
            p,
            cap,
        )

    with collect_shortfalls() as shortfalls:
        converged, stop, n_iter, timing, capped = _fit_stages(
            engine,
            choose_l=choose_l,
            choose_f=choose_f,
            gen=gen,
            tol=tol,
            max_iter=max_iter,
            cap=cap,
            greedy=greedy,
            backfit=backfit,
            rotate=rotate,
            nullcheck=nullcheck,
            trace=trace,
            bar=bar,
            had_factors=engine.k > 0 or init_dropped > 0,
        )
        bar.close()
        res = _result(engine, trace, converged, stop, n_iter)
    _report_shortfalls(shortfalls, tol)
    res.timing = timing
    res.max_factors_reached = capped
    return res


def _report_shortfalls(shortfalls: list[tuple[int, int, float]], tol: float) -> None:
    """One message for the mixture updates whose mix-SQP stopped short of its certificate
    (each would warn on its own in a direct EBNM call): a warning when the largest possible
    log-likelihood shortfall reaches the fit's tol, an INFO log line otherwise."""
    if not shortfalls:
        return
    worst = max(gap for *_, gap in shortfalls)
    msg = (
        f"mix-SQP stopped short of its optimality certificate in {len(shortfalls)} mixture "
        f"prior update(s); the largest possible log-likelihood shortfall was {worst:.3g} nats"
    )
    if worst >= tol:
        warnings.warn(
            f"{msg}, not below the fit's tol ({tol:.3g}): the ELBO may be that far from a "
            "local optimum; a coarser grid (a larger grid_mult) or a larger tol avoids it.",
            RuntimeWarning,
            stacklevel=3,
        )
    else:
        logger.info("%s, below the fit's tol (%.3g).", msg, tol)


def _fit_stages(
    engine: Engine,
    *,
    choose_l,
    choose_f,
    gen,
    tol: float,
    max_iter: int,
    cap: int,
    greedy: bool,
    backfit: bool,
    rotate: bool,
    nullcheck: bool,
    trace: list,
    bar,
    had_factors: bool,
) -> tuple[bool, str, int, dict[str, float], bool]:
    """Greedy additions, rotation proposal, backfit and nullcheck, in rounds. Returns
    ``(converged, stop_reason, backfit sweeps, timing, whether the greedy additions ended
    at the cap)``. ``had_factors``: the fit had factors before the stages (kept or removed
    by the first sweep of ``init``), so that ending with none is "no factors left"."""

    def n_learned() -> int:
        return _n_learned(engine)

    timing = {"greedy_s": 0.0, "rotate_s": 0.0, "backfit_s": 0.0, "nullcheck_s": 0.0}
    converged, stop, n_iter = True, "greedy only", 0
    basis = InitBasis()  # the initialiser's warm start, from one greedy addition to the next
    for round_ in range(_MAX_ROUNDS):
        # greedy additions until one fails; after a backfit (rounds > 0) the residual has
        # changed, so the failed addition is tried again
        clock = time.perf_counter()
        added, k_start = 0, engine.k
        while greedy and n_learned() < cap:
            ok, elbo = _greedy_add(engine, choose_l, choose_f, gen, tol, max_iter, trace, basis)
            bar.update(1)
            if not ok:
                break
            added += 1
            had_factors = True
            logger.info("greedy: factor %d added, ELBO %.6g", engine.k, elbo)
        timing["greedy_s"] += time.perf_counter() - clock
        if round_ and not added:
            break
        clock = time.perf_counter()
        if backfit and rotate and n_iter + 1 < max_iter and _rotate(engine, trace):
            n_iter += 1
        timing["rotate_s"] += time.perf_counter() - clock
        while True:
            clock = time.perf_counter()
            if backfit and engine.k:
                if n_iter < max_iter:
                    converged, stop, sweeps = _backfit(engine, tol, max_iter - n_iter, trace, bar)
                    n_iter += sweeps
                else:
                    converged, stop = False, "max_iter"
            timing["backfit_s"] += time.perf_counter() - clock
            clock = time.perf_counter()
            dropped = nullcheck and _nullcheck(engine, trace)
            timing["nullcheck_s"] += time.perf_counter() - clock
            if dropped and backfit and n_iter >= max_iter:
                # the backfit after the drop had no budget left: not converged
                converged, stop = False, "max_iter"
            if not dropped or not backfit or n_iter >= max_iter:
                break
        # retry the greedy addition only if a backfit moved the residual and budget is left;
        # with no factor left the residual is Y: retried unless the greedy addition just
        # failed on Y itself (factors that the rotation, backfit or nullcheck removed, e.g.
        # a user's init, leave a residual the greedy stage has not seen)
        failed_on_y = engine.k == 0 and k_start == 0 and not added
        if not (greedy and backfit) or failed_on_y or n_learned() >= cap or n_iter >= max_iter:
            break
    if engine.k == 0 and had_factors:
        # the backfit, the rotation or the nullcheck removed every factor
        converged, stop = True, "no factors left"
    capped = greedy and n_learned() >= cap
    if capped:
        logger.info(
            "the fit ended with %d learned factors, the cap (max_factors): the cap, not the "
            "data, set their number; a larger max_factors lets the data choose",
            cap,
        )
    return converged, stop, n_iter, timing, capped


def _n_learned(engine: Engine) -> int:
    """The number of learned factors (those with neither side fixed)."""
    fixed = zip(engine.loadings.fixed, engine.factors.fixed, strict=True)
    return engine.k - sum(any(fx) for fx in fixed)


def _progress(enabled: bool):
    if enabled:
        from tqdm.auto import tqdm

        return tqdm(desc="cebmf", unit="step", leave=False, mininterval=0.5)

    class _Silent:
        def update(self, *_):
            pass

        def set_postfix_str(self, *_):
            pass

        def close(self):
            pass

    return _Silent()


def _greedy_add(engine: Engine, choose_l, choose_f, gen, tol, max_iter, trace, basis):
    """Add one factor from the residual's leading pair and iterate it alone; keep it if it
    is non-zero and raises the ELBO. ``basis`` warm-starts the initialiser (init.py)."""
    k, learned = engine.k, _n_learned(engine)
    prior_l, prior_f = choose_l[learned], choose_f[learned]
    elbo_before = engine.elbo()
    pair = leading_pair(
        engine, gen, nonneg_l=prior_l.nonnegative, nonneg_f=prior_f.nonnegative, basis=basis
    )
    if pair is None:
        return False, elbo_before
    snap = engine.snapshot()
    l0, f0 = pair
    engine.add_factor(l0, torch.zeros_like(l0), f0, torch.zeros_like(f0), prior_l, prior_f)

    def step() -> list[int]:
        for which in ("loadings", "factors"):
            if not engine.update(which, k, engine.prepare(which, [k])):
                return [k]
        engine.update_noise()
        return []

    # iterated until a step gains less than max(tol, _GREEDY_REL_TOL x the factor's gain so
    # far): the rotation and the backfit refine every factor afterwards, so polishing a
    # large greedy factor to tol only spends products, while small factors (whose
    # acceptance is at stake) still converge to tol
    _, _, _, elbo, dead = _iterate(
        engine, step, tol, max_iter, cols=[k], rel_tol=_GREEDY_REL_TOL, gain_from=elbo_before
    )
    if dead or not elbo > elbo_before:
        engine.restore(snap)
        return False, elbo_before
    trace.append(elbo)
    return True, elbo


def _rotate(engine: Engine, trace) -> bool:
    """Try the sparsest-loadings and sparsest-factors rotations of the learned factors,
    one sweep each; keep the better if its ELBO beats the current one. True if kept."""
    learned = [
        k for k in range(engine.k) if not (engine.loadings.fixed[k] or engine.factors.fixed[k])
    ]
    if len(learned) < 2:
        return False
    sel = torch.as_tensor(learned, dtype=torch.long, device=engine.loadings.mean.device)
    lmean = engine.loadings.mean.index_select(1, sel)
    fmean = engine.factors.mean.index_select(1, sel)
    start = engine.snapshot()
    best, best_snap = engine.elbo(), None
    for side in ("loadings", "factors"):
        transforms = sparse_rotation(lmean, fmean, side)
        if transforms is None:
            continue
        engine.restore(start)
        engine.transform(learned, *transforms)
        _sweep(engine)
        elbo = engine.elbo()
        logger.info("rotation to sparse %s: ELBO %.10g (before: %.10g)", side, elbo, best)
        if elbo > best:
            best, best_snap = elbo, engine.snapshot()
    engine.restore(start if best_snap is None else best_snap)
    if best_snap is None:
        return False
    trace.append(best)
    return True


def _sweep(engine: Engine) -> list[int]:
    """Update every loading, then every factor, then the noise. Removes and returns the
    factors that became zero. ``engine.deferred`` says afterwards whether an update of
    this sweep kept its prior (a deferred refit)."""
    engine.deferred = False
    dead: set[int] = set()
    for which in ("loadings", "factors"):
        pre = engine.prepare(which)
        for k in range(engine.k):
            if k in dead:
                continue
            if not engine.update(which, k, pre):
                dead.add(k)
    if dead:
        engine.remove_factors(sorted(dead))
    engine.update_noise()
    return sorted(dead)


# greedy + backfit rounds: after a backfit, a failed greedy addition is retried once
_MAX_ROUNDS = 20

# a greedy factor stops when a step gains less than this fraction of its gain so far (or
# tol): on make_data.py's dense case its 5 greedy factors take 178 products instead of 298
# (1.0 s instead of 1.6 s, same ELBO); FACS PBMC: 36 factors, ELBO -2,420,600 instead of 32
# and -2,458,006; the counts case lands on another of its near-equal optima (19,823,329
# instead of 19,823,596) in the same time
_GREEDY_REL_TOL = 1e-4

# extrapolation schedule: flashier's, with beta capped at 1.3 instead of 2. On the counts
# case of benchmarks/bench_engine.py the gains of successive extrapolated sweeps fall as
# beta climbs towards 2 (27, 19, 15, 14, 11 nats, then a failed step at 2). Over six seeds
# there, a cap of 2 took 10.5 s and ended at ELBO 19,823,821 on average, a cap of 1.3
# 7.8 s and 19,823,998. On seven smaller fits (exponential / Laplace slabs at high SNR,
# sparse column noise, FACS PBMC, log counts, two Gaussian cases) a cap of 1.3 ends within
# 100 nats of 2 or higher (FACS: +5,100, converged in 418 sweeps instead of stopping at
# 500) in the same time (docs/engine.md, "Where the default seed stops")
_BETA_INIT, _BETA_UP, _BETA_DOWN, _BETA_MAX = 0.5, 1.2, 0.5, 1.3


def _iterate(
    engine: Engine,
    step,
    tol,
    max_iter,
    cols=None,
    on_step=None,
    rel_tol: float = 0.0,
    gain_from: float | None = None,
):
    """Repeat ``step`` until the ELBO gains less than ``max(tol, rel_tol * (ELBO -
    gain_from))``, with extrapolation: each step starts from cur + beta (cur - prev) and is
    kept only if it beats cur; otherwise a plain step from cur follows and beta shrinks. A
    plain step that lowers the ELBO ends the loop (its gain is below tol) and is undone, so
    the ELBOs recorded never decrease, in float32 too.

    Returns ``(converged, reason, steps, elbo, dead)`` where ``dead`` lists factors that
    the last step found zero (and, for sweeps, removed).
    """
    elbo = -math.inf
    prev = None
    beta = _BETA_INIT / _BETA_UP
    dead: list[int] = []
    for it in range(1, max_iter + 1):
        cur = engine.snapshot()
        new = -math.inf
        if prev is not None and elbo > -math.inf and engine.extrapolate(prev, beta, cols):
            dead = step()
            new = engine.elbo()
            if new > elbo and not dead:
                beta = min(beta * _BETA_UP, _BETA_MAX)
            else:
                engine.restore(cur)
                beta *= _BETA_DOWN
                new = -math.inf
        if new == -math.inf:
            dead = step()
            new = engine.elbo()
            if not dead and new < elbo:
                # a lower ELBO ends the loop (the gain is below tol); keep the better state.
                # Coordinate ascent loses ELBO only through the rounding of the compute
                # dtype (float32 on a GPU), or where a prior's warm start cannot reproduce
                # the previous sweep's prior (emdn's sd bounds, self_covariates)
                engine.restore(cur)
                return True, "converged", it, elbo, []
        prev = cur
        if on_step is not None:
            on_step(it, new)
        if dead:
            return True, "factor became zero", it, new, dead
        enough = tol if gain_from is None else max(tol, rel_tol * abs(new - gain_from))
        if new - elbo < enough:
            return True, "converged", it, new, dead
        elbo = new
    return False, "max_iter", max_iter, elbo, dead


def _backfit(engine: Engine, tol, max_iter, trace, bar):
    def on_step(it, elbo):
        trace.append(elbo)
        bar.update(1)
        bar.set_postfix_str(f"K={engine.k} ELBO={elbo:.6g}")
        logger.info("backfit sweep %d: K=%d, ELBO %.10g", it, engine.k, elbo)

    total = 0
    woken_at = None  # the ELBO when deferred refits were last cancelled
    try:
        while True:
            # covariate-moderated priors whose refits stop gaining (less than their share
            # of tol) are refitted less often (Engine.update). Convergence with refits
            # deferred is confirmed by cancelling them: the next sweep refits every prior,
            # and the backfit ends once the ELBO has gained less than tol since then (so
            # that sweep gained less than tol, as without deferral)
            engine.refit_threshold = tol / (2 * max(engine.k, 1))
            converged, reason, steps, elbo, dead = _iterate(
                engine, lambda: _sweep(engine), tol, max_iter - total, on_step=on_step
            )
            total += steps
            if dead:  # a factor was removed: a confirmation must start afresh
                woken_at = None
            confirmed = woken_at is not None and elbo - woken_at < tol
            if reason == "converged" and engine.deferred and not confirmed:
                if total >= max_iter:  # no sweep left to confirm it
                    return False, "max_iter", total
                logger.info("backfit: converged with deferred prior refits; refitting all")
                woken_at = elbo
                engine.wake_priors()
                continue
            if not dead or engine.k == 0 or total >= max_iter:
                if engine.k == 0:
                    converged, reason = True, "no factors left"
                elif dead:  # a factor was removed on the last allowed sweep
                    converged, reason = False, "max_iter"
                return converged, reason, total
    finally:
        engine.refit_threshold = None


def _nullcheck(engine: Engine, trace) -> bool:
    """Drop factors whose removal does not lower the ELBO; True if any was dropped."""
    dropped = False
    k = 0
    while k < engine.k:
        if engine.loadings.fixed[k] or engine.factors.fixed[k]:
            k += 1
            continue
        with_k = engine.elbo()
        snap = engine.snapshot()
        engine.remove_factors([k])
        engine.update_noise()
        without = engine.elbo()
        if without >= with_k:
            logger.info(
                "nullcheck: factor %d dropped (ELBO %.10g -> %.10g)", k + 1, with_k, without
            )
            trace.append(without)
            dropped = True
        else:
            engine.restore(snap)
            k += 1
    return dropped


def _result(engine: Engine, trace, converged, stop, n_iter) -> EBMFResult:
    engine.final_lfsr()
    lo, fa = engine.loadings, engine.factors
    L = lo.mean.to(torch.float64)
    F = fa.mean.to(torch.float64)
    d2 = (L * L).sum(0) * (F * F).sum(0)
    inv_a, inv_b = 1.0 / engine.a, 1.0 / engine.b
    if engine.masked:
        noise_var = inv_a @ engine.data.mask.to(torch.float64) @ inv_b
    else:
        noise_var = inv_a.sum() * inv_b.sum()
    pve = (d2 / (d2.sum() + noise_var)).cpu().numpy()
    fixed = [(bool(a), bool(b)) for a, b in zip(lo.fixed, fa.fixed, strict=True)]
    learned = [k for k in range(engine.k) if not any(fixed[k])]
    order = [k for k in range(engine.k) if any(fixed[k])] + sorted(learned, key=lambda k: -pve[k])

    def cols(t):
        return t[:, order].cpu().numpy() if engine.k else t.cpu().numpy()

    def sd(side):
        return cols(torch.sqrt(side.var.clamp(min=0)))

    if engine.noise == "constant":
        noise_sd = float(torch.sqrt(inv_b[0]))
    elif engine.noise == "row":
        noise_sd = torch.sqrt(inv_a).cpu().numpy()
    else:
        noise_sd = torch.sqrt(inv_b).cpu().numpy()
    inputs = None
    if engine.keep_inputs:
        inputs = [
            {
                side.name: (
                    side.last_x[k].cpu().numpy(),
                    side.last_s[k].expand_as(side.last_x[k]).cpu().numpy(),
                )
                if side.last_x[k] is not None
                else (None, None)
                for side in (lo, fa)
            }
            for k in order
        ]
    return EBMFResult(
        L=cols(lo.mean),
        F=cols(fa.mean),
        L_sd=sd(lo),
        F_sd=sd(fa),
        L_lfsr=cols(lo.lfsr),
        F_lfsr=cols(fa.lfsr),
        elbo=engine.elbo(),
        elbo_trace=list(trace),
        noise=engine.noise,
        noise_sd=noise_sd,
        pve=pve[order] if engine.k else pve,
        priors=[{"loadings": lo.g[k], "factors": fa.g[k]} for k in order],
        fixed=[fixed[k] for k in order],
        converged=converged,
        stop_reason=stop,
        n_iter=n_iter,
        ebnm_inputs=inputs,
    )
