"""Numerical helpers shared by the prior families: log-space normal densities and
numerically stable truncated-normal moments.

Everything here is elementwise and vectorised over observations; nothing loops in
Python over data.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from contextvars import ContextVar

import numpy as np
import torch

LOG_2PI = math.log(2.0 * math.pi)
SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)

# Above this truncation point the standardised truncated-normal moments are computed from
# Laplace's continued fraction (no cancellation there; depth 28 reaches 1e-14 at 5); below
# it the direct formulas lose at most ~alpha^4 ulps (6e-14 at 5). Computed in float64.
_CF_THRESHOLD = 5.0
_CF_DEPTH = 28


def exp_flushed(d: torch.Tensor) -> torch.Tensor:
    """``exp(d)`` computed in place, with results below ~1e-217 (float64) or ~1e-35
    (float32) set to exactly 0.

    Subnormal numbers make x86 arithmetic ~100 times slower; responsibilities and
    likelihood ratios that small carry no information, so they are flushed to zero.
    """
    cutoff = -500.0 if d.dtype == torch.float64 else -80.0
    return d.masked_fill_(d < cutoff, -math.inf).exp_()


def subset_on_host(device: torch.device) -> bool:
    """Whether a special case is computed on its own entries (CPU: boolean indexing, and
    nothing when no entry needs it) rather than on every entry and selected with
    ``torch.where`` (accelerators, where sizing a boolean subset is a host sync)."""
    return device.type == "cpu"


def where_apply(mask: torch.Tensor, fn, base, *args: torch.Tensor):
    """``base`` (a tensor or a tuple of tensors) with ``fn(*args)`` written where ``mask``
    holds. On the CPU ``fn`` sees only those entries (and is skipped when there are
    none); elsewhere it sees every entry and ``torch.where`` keeps the masked ones, so
    ``fn`` must accept every entry (values off the mask, NaN included, are discarded).
    ``mask`` and ``args`` have one shape; ``fn`` returns what ``base`` is made of."""
    single = isinstance(base, torch.Tensor)
    bases = (base,) if single else tuple(base)
    if subset_on_host(mask.device):
        if not bool(mask.any()):
            return base
        vals = fn(*(a[mask] for a in args))
        vals = (vals,) if single else vals
        out = tuple(b.masked_scatter(mask, v.to(b.dtype)) for b, v in zip(bases, vals, strict=True))
    else:
        vals = fn(*args)
        vals = (vals,) if single else vals
        out = tuple(torch.where(mask, v.to(b.dtype), b) for b, v in zip(bases, vals, strict=True))
    return out[0] if single else out


class _RowLogSumExp(torch.autograd.Function):
    """log sum_k exp(a_ik) of each row of an (n, K) tensor with a finite maximum."""

    @staticmethod
    def forward(ctx, a: torch.Tensor) -> torch.Tensor:
        # log_softmax is one fused pass; at the row's argmax m, lse = a_m - log_softmax_m
        # with no cancellation (log_softmax_m lies in [-log K, 0])
        log_sm = torch.log_softmax(a, dim=1)
        top, arg = a.max(dim=1, keepdim=True)
        ctx.save_for_backward(log_sm)
        return (top - log_sm.gather(1, arg)).squeeze(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (log_sm,) = ctx.saved_tensors
        return log_sm.exp() * grad[:, None]  # d lse_i / d a_ik = softmax(a)_ik


def logsumexp_rows(a: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp(a, dim=1)`` for an (n, K) tensor whose rows have a finite
    maximum, differentiable; on small CPU tensors (the covariate priors' training
    loss) the forward and backward take about a third of ``torch.logsumexp``'s time."""
    return _RowLogSumExp.apply(a)


def ndtr(z: torch.Tensor) -> torch.Tensor:
    """Standard normal CDF, accurate in both tails (``torch.special.ndtr`` returns 0 for
    z < -9 or so, losing lfsr values such as Phi(-20) = 2.8e-89)."""
    return 0.5 * torch.special.erfc(-z / SQRT2)


def log_normal_pdf(x: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """log N(x; 0, var), elementwise."""
    return -0.5 * (LOG_2PI + torch.log(var) + x * x / var)


def log_tilted_ndtr(z: torch.Tensor, c: torch.Tensor | float) -> torch.Tensor:
    r"""``-z**2 / 2 + log M(z - c)`` with ``M(u) = exp(u**2 / 2) Phi(u)``, for ``c >= 0``,
    i.e. ``-c z + c**2 / 2 + log Phi(z - c)``: the log of the exponential-slab marginal's
    kernel, without subtracting two terms of size ``z**2 / 2`` (float32 loses 0.03 nats
    at ``|z| = 1e3`` that way, and everything beyond ``1e4``).

    With ``u = z - c`` and one ``t = erfcx(|u| / sqrt 2)``: for ``u > 0``,
    ``-c (u + c / 2) + log Phi(u)``, terms of one sign, with
    ``log Phi(u) = log1p(-t e^{-u^2/2} / 2)`` in ``[log 1/2, 0]``; for ``u <= 0``,
    ``-z**2 / 2 + log(t / 2)``, whose second term is moderate.
    """
    u = z - c
    t = torch.special.erfcx(u.abs() / SQRT2)
    above = -c * (u + 0.5 * c) + torch.log1p(-0.5 * t * torch.exp(-0.5 * u * u))
    below = -0.5 * z * z + torch.log(0.5 * t)
    return torch.where(u > 0, above, below)


def std_truncnorm_moments(alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Moments of Z ~ N(0, 1) truncated to ``[alpha, inf)``.

    Returns ``(delta, var)`` with ``delta = E[Z] - alpha`` (>= 0) and ``var = Var[Z]``.
    With the inverse Mills ratio ``lam = phi(alpha) / Phi(-alpha)``:
    ``delta = lam - alpha`` and ``var = 1 - lam * delta``. Both cancel badly for large
    ``alpha``; there we use Laplace's continued fraction
    ``lam = alpha + t1``, ``t_k = k / (alpha + t_{k+1})``, which gives
    ``delta = t1`` and ``var = t1 * (t2 - t1)`` without cancellation.

    These are also the first two derivatives of ``log M(-alpha)``, ``M(u) = exp(u**2 / 2)
    Phi(u)``.
    """
    dtype = alpha.dtype
    alpha = alpha.to(torch.float64)
    threshold, depth = _CF_THRESHOLD, _CF_DEPTH
    a_direct = alpha.clamp(max=threshold)
    lam = SQRT_2_OVER_PI / torch.special.erfcx(a_direct / SQRT2)
    delta = lam - a_direct
    var = 1.0 - lam * delta

    def continued_fraction(a_cf):
        a_cf = a_cf.clamp(min=threshold)  # entries off the mask (accelerators) stay finite
        t = torch.zeros_like(a_cf)
        t2 = t
        for k in range(depth, 0, -1):
            if k == 1:
                t2 = t.clone()
            t = torch.add(a_cf, t).reciprocal_().mul_(k)
        return t, t * (t2 - t)

    delta, var = where_apply(alpha > threshold, continued_fraction, (delta, var), alpha)
    return delta.to(dtype), var.clamp(min=0.0).to(dtype)


def truncnorm_moments(
    mean: torch.Tensor, sd: torch.Tensor, lower: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of N(mean, sd^2) truncated to ``[lower, inf)``."""
    alpha = (lower - mean) / sd
    delta, var = std_truncnorm_moments(alpha)
    return lower + sd * delta, sd * sd * var


#: False inside ``sign_probs(False)``: the sign probabilities are not wanted.
_SIGN_PROBS_WANTED: ContextVar[bool] = ContextVar("cebmf_sign_probs_wanted", default=True)


@contextlib.contextmanager
def sign_probs(wanted: bool) -> Iterator[None]:
    """Within the block, :func:`normal_sign_probs` and :func:`truncnorm_sign_probs` are
    computed (``wanted``) or return zeros (broadcast views, no arithmetic), and
    :func:`sign_probs_wanted` says which. ``Prior.fit(..., lfsr=False)`` skips them: the
    EBMF engine computes the lfsr once, at the end of a fit. The sign probabilities of the
    priors' pieces serve the lfsr only, so nothing else changes. The innermost block
    decides: a fit that asks for its lfsr inside one that does not still gets it."""
    token = _SIGN_PROBS_WANTED.set(bool(wanted))
    try:
        yield
    finally:
        _SIGN_PROBS_WANTED.reset(token)


def sign_probs_wanted() -> bool:
    """False inside ``sign_probs(False)`` (a fit whose lfsr will be discarded)."""
    return _SIGN_PROBS_WANTED.get()


def _skipped_sign_probs(mean: torch.Tensor, sd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.promote_types(mean.dtype, sd.dtype)
    # broadcast_tensors returns views (torch.broadcast_shapes would import sympy)
    shaped = torch.broadcast_tensors(mean, sd)[0]
    zero = torch.zeros((), dtype=dtype, device=mean.device).expand_as(shaped)
    return zero, zero


def normal_sign_probs(
    mean: torch.Tensor, sd: torch.Tensor, c: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P(theta <= c), P(theta >= c))`` for theta ~ N(mean, sd^2); sd = 0 is a point mass.

    One tail, Phi(-|z|), is computed (accurate when tiny); the other is 1 minus it. Point
    masses are handled by masks, not a branch, so nothing waits on the device.
    """
    if not sign_probs_wanted():
        return _skipped_sign_probs(mean, sd)
    point = sd <= 0
    sd = torch.where(point, torch.ones_like(sd), sd)
    z = (c - mean) / sd
    small = ndtr(-z.abs())
    big = 1.0 - small
    below = z < 0
    p_le = torch.where(point, (mean <= c).to(mean.dtype), torch.where(below, small, big))
    p_ge = torch.where(point, (mean >= c).to(mean.dtype), torch.where(below, big, small))
    return p_le, p_ge


# Gauss-Legendre rule on [0, 1] for short integrals of the smooth hazard in
# :func:`_log_tail_ratio` (5 nodes: error ~ (d / 4)^10 relative on intervals d <= 0.1).
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(5)  # on [-1, 1]
_GL_T, _GL_W = 0.5 * (_GL_NODES + 1.0), 0.5 * _GL_WEIGHTS
# Above this d * max(a, 1) the subtraction in :func:`_log_tail_ratio` keeps a relative
# accuracy of ~1e-14; below it the difference of the scaled tails is integrated instead.
_TAIL_NEAR = 0.1


def _log_tail_ratio(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    r"""``log(Q(a + d) / Q(a))`` for ``a >= 0`` and ``d >= 0``, Q the standard normal
    upper tail; accurate to a few ulps relative to the result, in float64.

    With the scaled tail ``M(t) = log Q(t) + t^2/2 = log(erfcx(t / sqrt 2) / 2)``:
    ``log(Q(a + d) / Q(a)) = [M(a + d) - M(a)] - d (2 a + d) / 2``, two terms of the
    same sign, so nothing cancels however large ``a`` is (the difference of two
    ``log Phi`` values of size ``a^2 / 2`` does). When ``d max(a, 1)`` is small the
    bracket is ``-int_a^{a+d} (h(t) - t) dt`` (h the hazard phi/Q), integrated by
    Gauss-Legendre so that the result stays accurate relative to its own size.
    """
    b = a + d
    quad = 0.5 * d * (a + b)
    m_diff = torch.log(torch.special.erfcx(b / SQRT2) / torch.special.erfcx(a / SQRT2))
    nodes = torch.as_tensor(_GL_T, dtype=a.dtype, device=a.device)
    weights = torch.as_tensor(_GL_W, dtype=a.dtype, device=a.device)

    def integrated(an, dn):
        t = an[..., None] + dn[..., None] * nodes  # (m, 5)
        excess, _ = std_truncnorm_moments(t)  # h(t) - t, smooth and in (0, 0.8]
        return -dn * (excess @ weights)

    m_diff = where_apply(d * a.clamp(min=1.0) < _TAIL_NEAR, integrated, m_diff, a, d)
    return m_diff - quad


def truncnorm_sign_probs(
    mean: torch.Tensor, sd: torch.Tensor, lower: float = 0.0, c: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(P(theta <= c), P(theta >= c))`` for N(mean, sd^2) truncated to ``[lower, inf)``.

    With ``alpha = (lower - mean) / sd``, ``beta = (c - mean) / sd`` and the gap
    ``d = beta - alpha = (c - lower) / sd`` (taken from the inputs, not by subtraction),
    ``P(theta >= c) = Q(beta) / Q(alpha)``. By the sign of the interval:

    - ``alpha >= 0`` (both in the upper tail): ``log Q(beta)/Q(alpha)`` from
      :func:`_log_tail_ratio`; ``P(theta <= c) = -expm1`` of it.
    - ``beta <= 0`` (both in the lower tail): ``P(theta <= c) = Phi(beta) (1 -
      Phi(alpha)/Phi(beta)) / Phi(-alpha)``, the ratio mirrored into
      :func:`_log_tail_ratio`; ``P(theta >= c) = Phi(-beta) / Phi(-alpha)``.
    - ``alpha < 0 < beta``: ``P(theta <= c) = (erf(beta') - erf(alpha')) / (2
      Phi(-alpha))`` (two terms of opposite sign: no cancellation).

    Each probability is accurate relative to its own size (computed in float64).
    """
    if not sign_probs_wanted():
        return _skipped_sign_probs(mean, sd)
    if c <= lower:
        return torch.zeros_like(mean), torch.ones_like(mean)
    dtype = torch.promote_types(mean.dtype, sd.dtype)
    mean, sd = torch.broadcast_tensors(mean.to(torch.float64), sd.to(torch.float64))
    alpha = (lower - mean) / sd
    beta = (c - mean) / sd
    d = (c - lower) / sd
    nan = torch.full_like(alpha, math.nan)

    def both_upper(a, dd):
        r = _log_tail_ratio(a, dd)
        return -torch.expm1(r), exp_flushed(r)

    def below_upper(a, b, dd):
        # P(theta >= c) = Phi(-beta) / Phi(-alpha); log Phi(-alpha) in [log 1/2, 0]
        log_norm = torch.special.log_ndtr(-a)
        # beta <= 0: log P(theta <= c) = log Phi(beta) + log(1 - e^r) - log Phi(-alpha);
        # alpha < 0 < beta: (erf(beta') - erf(alpha')) / 2, two terms of opposite sign
        r = _log_tail_ratio((-b).clamp(min=0.0), dd)
        le_low = torch.special.log_ndtr(b) + torch.log(-torch.expm1(r))
        le_mixed = torch.log(0.5 * (torch.erf(b / SQRT2) - torch.erf(a / SQRT2)))
        le = torch.where(b <= 0, le_low, le_mixed)
        return exp_flushed(le - log_norm), exp_flushed(torch.special.log_ndtr(-b) - log_norm)

    # each case on its own entries on the CPU (these are the expensive special functions)
    upper = alpha >= 0
    p_le, p_ge = where_apply(upper, both_upper, (nan, nan), alpha, d)
    p_le, p_ge = where_apply(~upper, below_upper, (p_le, p_ge), alpha, beta, d)
    return p_le.clamp(0.0, 1.0).to(dtype), p_ge.clamp(0.0, 1.0).to(dtype)


def point_sign_probs(location: float = 0.0, c: float = 0.0) -> tuple[float, float]:
    """``(P(theta <= c), P(theta >= c))`` for a point mass at ``location``."""
    return (1.0 if location <= c else 0.0), (1.0 if location >= c else 0.0)


def exp_any(v):
    """exp of a Python float (math) or a tensor (torch)."""
    return math.exp(v) if isinstance(v, float | int) else torch.exp(v)
