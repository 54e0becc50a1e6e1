"""Input validation shared by the public functions (scikit-learn style: clear messages
that name the argument and the fix)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

_FLOATS = (torch.float32, torch.float64)


def resolve_seed(random_state: Any, name: str = "random_state") -> int:
    """An integer seed from ``random_state``: an int is used as it is, None draws a fresh
    one from the operating system, a numpy ``Generator`` / ``RandomState`` draws one from
    itself (advancing it), as in scikit-learn and scanpy."""
    if isinstance(random_state, bool):
        raise TypeError(f"{name} must be an int, None or a numpy random generator, got a bool.")
    if isinstance(random_state, int | np.integer):
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


def as_vector(value: Any, name: str) -> tuple[torch.Tensor, bool]:
    """A 1-D floating tensor from a numpy array, torch tensor or sequence.

    Returns ``(tensor, was_numpy)``. Integer and boolean inputs become float64, other
    floating dtypes float32; float32/float64 are kept. The input is never modified.
    """
    was_numpy = not isinstance(value, torch.Tensor)
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
        t = torch.from_numpy(np.ascontiguousarray(arr))
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
    return xt, st, was_numpy
