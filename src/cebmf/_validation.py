"""Input validation shared by the public functions (scikit-learn style: clear messages
that name the argument and the fix)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

_FLOATS = (torch.float32, torch.float64)


# the seeds a torch.Generator accepts
_SEED_RANGE = (-(2**63), 2**64 - 1)


def resolve_seed(random_state: Any, name: str = "random_state") -> int:
    """An integer seed from ``random_state``: an int is used as it is, None draws a fresh
    one from the operating system, a numpy ``Generator`` / ``RandomState`` draws one from
    itself (advancing it), as in scikit-learn and scanpy."""
    if isinstance(random_state, bool):
        raise TypeError(f"{name} must be an int, None or a numpy random generator, got a bool.")
    if isinstance(random_state, int | np.integer):
        lo, hi = _SEED_RANGE
        if not lo <= random_state <= hi:
            raise ValueError(
                f"{name}={random_state} is outside the seeds torch accepts, [-2**63, 2**64 - 1]; "
                "pass a smaller integer."
            )
        return int(random_state)
    if random_state is None:
        return int(np.random.SeedSequence().generate_state(1, dtype=np.uint64)[0] >> 1)
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(0, 2**63 - 1))
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(0, 2**31 - 1))
    raise TypeError(
        f"{name} must be an int, None or a numpy random generator, got "
        f"{type(random_state).__name__}."
    )


def check_count(value: Any, name: str, minimum: int = 1) -> int:
    """An integer option (numpy integers too) of at least ``minimum``; 2.5 or True is not
    silently truncated or counted."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def check_positive(value: Any, name: str, *, zero_ok: bool = False) -> float:
    """A finite real option, > 0 (or >= 0 with ``zero_ok``); NaN and Inf are refused."""
    ok = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and (value >= 0 if zero_ok else value > 0)
    if not ok:
        bound = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}.")
    return float(value)


def check_flags(**flags: Any) -> None:
    """Each keyword is an on/off switch: True or False (numpy bools too). A string such as
    ``"no"`` or ``"False"`` would otherwise count as True."""
    for name, value in flags.items():
        if not isinstance(value, bool | np.bool_):
            raise TypeError(f"{name} must be True or False, got {value!r}.")


def refuse_masked(value: Any, name: str, fix: str) -> None:
    """A numpy masked array with masked entries is refused (``np.asarray`` would drop the
    mask and read the hidden values as data); one with none is plain data."""
    if np.ma.isMaskedArray(value) and np.ma.getmaskarray(value).any():
        n_masked = int(np.ma.getmaskarray(value).sum())
        raise ValueError(f"{name} is a masked array with {n_masked} masked entries; {fix}.")


def tensor_view(arr: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy(arr)``, sharing memory (copied only if ``arr`` is not
    C-contiguous), without torch's warning for read-only arrays (e.g. memory-mapped data):
    cebmf never writes to its inputs."""
    arr = np.ascontiguousarray(arr)
    if arr.flags.writeable:
        return torch.from_numpy(arr)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(arr)


def as_vector(value: Any, name: str) -> tuple[torch.Tensor, bool]:
    """A 1-D floating tensor from a numpy array, torch tensor or sequence.

    Returns ``(tensor, was_numpy)``. Integer and boolean inputs become float64, other
    floating dtypes float32; float32/float64 are kept. The input is never modified.
    """
    was_numpy = not isinstance(value, torch.Tensor)
    refuse_masked(
        value,
        name,
        "the normal means problem has no missing observations: drop them (x.compressed() "
        "and the matching standard errors)",
    )
    if was_numpy:
        arr = np.asarray(value)
        if arr.dtype == object or not (
            np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_
        ):
            raise TypeError(f"{name} must be numeric, got an array of dtype {arr.dtype}.")
        if np.iscomplexobj(arr):
            raise TypeError(f"{name} must be real, got a complex array.")
        if arr.dtype not in (np.float32, np.float64):
            arr = arr.astype(np.float64)
        t = tensor_view(arr)
    else:
        t = value.detach()
        if t.is_complex():
            raise TypeError(f"{name} must be real, got a complex tensor.")
        if t.dtype not in _FLOATS:
            t = t.to(torch.float64 if not t.is_floating_point() else torch.float32)
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-dimensional, got shape {tuple(t.shape)}.")
    return t, was_numpy


def check_finite(t: torch.Tensor, name: str) -> None:
    """Raise if ``t`` holds NaN or Inf, saying how many and where the first one is."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        idx = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"{name} contains {int(bad.sum())} non-finite value(s) (NaN or Inf), the first at "
            f"index {idx}; remove or impute them before fitting."
        )


def check_mode(mode: Any, name: str = "mode") -> float:
    """``mode`` (a prior's fixed location) as a finite float, or a clear error naming it.

    Only a fixed mode is supported: a string such as ``"estimate"`` (R ebnm's
    ``mode = "estimate"``) or None is refused with a message that says so.
    """
    not_estimated = (
        "estimating the mode is not supported; pass a fixed number (e.g. the median of x, or 0)"
    )
    if isinstance(mode, str):
        raise ValueError(f"{name}={mode!r} is not a number: {not_estimated}.")
    if mode is None or isinstance(mode, bool | np.bool_):
        raise TypeError(f"{name} must be a finite number, got {mode!r}; {not_estimated}.")
    try:
        value = float(mode)
    except (TypeError, ValueError):
        raise TypeError(
            f"{name} must be a finite number, got {type(mode).__name__}; {not_estimated}."
        ) from None
    if not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}.")
    return value


def real_array(value: Any, name: str) -> np.ndarray:
    """``value`` as a float64 numpy array (any shape), or a TypeError naming ``name``
    when it is not real numbers (strings, None, complex, objects)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be real numbers, got {value!r}.")
    return arr.astype(np.float64)


def non_numeric_columns(value: Any) -> list[str]:
    """The names of a pandas DataFrame's non-numeric columns ([] for anything else)."""
    if not (hasattr(value, "columns") and hasattr(value, "dtypes")):
        return []
    return [
        str(c) for c, d in zip(value.columns, value.dtypes, strict=True) if d.kind not in "biuf"
    ]


def covariate_matrix(
    value: Any, n: int, name: str, rows: str, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Covariates as an (n, d) tensor of ``dtype`` on ``device``: numpy / torch / scipy
    sparse (densified: d is small) / pandas (numeric columns only), 1-D meaning one
    covariate; finite, one row per ``rows`` (e.g. "observation", "row of Y")."""
    if sp.issparse(value):
        value = value.toarray()
    refuse_masked(value, name, "covariates cannot be missing: impute or drop those entries")
    bad = non_numeric_columns(value)
    if bad:
        raise TypeError(
            f"{name} has non-numeric column(s) {bad[:5]}; encode them first, e.g. "
            f"pandas.get_dummies({name}, columns={bad[:5]}, dtype=float)."
        )
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.is_complex():
            raise TypeError(f"{name} must be real numbers, got a complex tensor.")
    else:
        arr = np.asarray(value)
        if arr.dtype == object or arr.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be numeric, got an array of dtype {arr.dtype}.")
        t = tensor_view(arr.astype(np.float64, copy=False))
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2:
        raise ValueError(
            f"{name} must be 1-D or 2-D (one column per covariate), got shape {tuple(t.shape)}."
        )
    if t.shape[0] != n:
        raise ValueError(f"{name} must have one row per {rows} ({n}), got shape {tuple(t.shape)}.")
    if t.is_floating_point():
        check_finite(t.reshape(-1), name)
    cov = t.to(device=device, dtype=dtype)
    if not bool(torch.isfinite(cov).all()):
        raise ValueError(
            f"{name}'s largest absolute value, {float(t.abs().max()):.3g}, overflows "
            f"{str(dtype).removeprefix('torch.')}; rescale {name} (the priors use its "
            "standardised columns only) or compute in float64 (dtype='float64')."
        )
    return cov


def representable_range(dtype: torch.dtype) -> tuple[float, float]:
    """``[tiny^0.45, max^0.45]`` of ``dtype`` (float64: about 3.6e-139 to 5.2e138; float32:
    8.5e-18 to 2.2e17): magnitudes whose squares and pairwise products neither overflow
    nor sink to subnormals, with room for the constants the solvers multiply them by."""
    info = torch.finfo(dtype)
    return info.tiny**0.45, info.max**0.45


def check_magnitude(value: float, dtype: torch.dtype, what: str, fix: str) -> None:
    """A clear error when ``value`` (a largest or smallest magnitude, described by ``what``)
    lies outside :func:`representable_range`; ``fix`` says what to do about it."""
    lo, hi = representable_range(dtype)
    if lo <= value <= hi:
        return
    wide_lo, wide_hi = representable_range(torch.float64)
    hint = ""
    if dtype != torch.float64 and wide_lo <= value <= wide_hi:
        hint = ", or compute in float64 (dtype='float64')"
    raise ValueError(
        f"{what} is {value:.3g}, outside [{lo:.1e}, {hi:.1e}], the range that "
        f"{str(dtype).removeprefix('torch.')} arithmetic handles (squares of the values would "
        f"overflow or underflow); {fix}{hint}."
    )


def observations_and_se(x: Any, s: Any) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Validate EBNM inputs: ``x`` 1-D finite, ``s`` a positive scalar or 1-D of x's length.

    Returns ``(x, s, was_numpy)`` with ``s`` on x's device and dtype (a 1-element tensor
    when a scalar was given).
    """
    xt, was_numpy = as_vector(x, "x")
    if xt.numel() == 0:
        raise ValueError("x is empty; give at least one observation.")
    check_finite(xt, "x")
    if (isinstance(s, torch.Tensor) and s.ndim == 0) or np.ndim(s) == 0:
        st, _ = as_vector(
            torch.as_tensor(s).reshape(1) if isinstance(s, torch.Tensor) else np.reshape(s, 1), "s"
        )
    else:
        st, _ = as_vector(s, "s")
        if st.numel() != xt.numel():
            raise ValueError(
                f"s has length {st.numel()} but x has length {xt.numel()}; give one standard "
                "error per observation or a single scalar."
            )
    st = st.to(device=xt.device, dtype=xt.dtype)
    check_finite(st, "s")
    if bool((st <= 0).any()):
        n_bad = int((st <= 0).sum())
        raise ValueError(
            f"s must be strictly positive; {n_bad} value(s) are <= 0. Standard errors of 0 "
            "are not allowed: drop those observations or give them a small positive s."
        )
    x_max, s_min, s_max = torch.stack([xt.abs().max(), st.min(), st.max()]).double().tolist()
    together = (
        "rescale x and s together: with both divided by c, the posterior means, sds and the "
        "prior's scales come out divided by c and the log-likelihood raised by n log c"
    )
    if x_max > 0:
        check_magnitude(x_max, xt.dtype, "x's largest absolute value", together)
    too_big = s_max > representable_range(xt.dtype)[1]
    which = "s's largest value" if too_big else "s's smallest value"
    check_magnitude(s_max if too_big else s_min, xt.dtype, which, together)
    return xt, st, was_numpy


def shortlist(items, n: int = 10) -> str:
    """The first ``n`` items quoted, and how many there are in all, for error messages."""
    items = [str(i) for i in items]
    shown = ", ".join(repr(i) for i in items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")
