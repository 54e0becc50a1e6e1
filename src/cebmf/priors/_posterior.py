"""Posterior summaries of a mixture posterior, shared by every prior family.

Every posterior in this package is a finite mixture of simple pieces (point masses,
normals, one-sided truncated normals). A family describes its posterior as a stack of
pieces, each with an unnormalised log weight (log prior weight + log marginal
likelihood of that piece) and the piece's own mean, variance and sign probabilities.
This module turns that stack into the posterior mean, second moment, sd, lfsr and the
per-observation log marginal likelihood.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Pieces:
    """A stack of K posterior pieces for n observations; every field is (n, K).

    ``log_weight`` is log(prior weight) + log(marginal likelihood) of the piece, so that
    ``logsumexp(log_weight, 1)`` is the log marginal likelihood of each observation.
    ``p_le`` / ``p_ge`` are P(theta <= 0) and P(theta >= 0) under the piece.
    """

    log_weight: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    p_le: torch.Tensor
    p_ge: torch.Tensor

    @staticmethod
    def stack(parts: list[tuple[torch.Tensor, ...]]) -> Pieces:
        """Build from a list of ``(log_weight, mean, var, p_le, p_ge)`` tuples of (n,) tensors."""
        cols = list(zip(*parts, strict=True))
        return Pieces(*(torch.stack(torch.broadcast_tensors(*c), dim=1) for c in cols))


@dataclass
class PosteriorSummary:
    """Per-observation posterior summaries (all (n,) tensors)."""

    mean: torch.Tensor
    mean2: torch.Tensor
    sd: torch.Tensor
    lfsr: torch.Tensor
    log_marginal: torch.Tensor


def summarize(pieces: Pieces, shift: float = 0.0) -> PosteriorSummary:
    """Combine posterior pieces into per-observation summaries.

    The variance is the law of total variance, sum_k r_k (v_k + (m_k - m)^2), which is
    non-negative by construction; ``mean2 = mean^2 + var``. ``shift`` is added to the
    means (the prior's mode; the pieces' sign probabilities must already refer to the
    unshifted zero). ``lfsr = min(P(theta <= 0), P(theta >= 0))``.
    """
    log_marginal = torch.logsumexp(pieces.log_weight, dim=1)
    resp = torch.exp(pieces.log_weight - log_marginal[:, None])
    mean = (resp * pieces.mean).sum(1)
    dev = pieces.mean - mean[:, None]
    var = (resp * (pieces.var + dev * dev)).sum(1).clamp(min=0.0)
    p_le = (resp * pieces.p_le).sum(1)
    p_ge = (resp * pieces.p_ge).sum(1)
    lfsr = torch.minimum(p_le, p_ge).clamp(0.0, 1.0)
    mean = mean + shift
    return PosteriorSummary(
        mean=mean,
        mean2=mean * mean + var,
        sd=torch.sqrt(var),
        lfsr=lfsr,
        log_marginal=log_marginal,
    )


def summarize_chunked(build, n: int, k: int, shift: float = 0.0, budget: int = 1 << 24):
    """``summarize`` over row chunks so that no (n, K) temporary exceeds ``budget`` entries.

    ``build(start, stop)`` returns the :class:`Pieces` of rows ``start:stop``.
    """
    step = max(1, budget // max(k, 1))
    if step >= n:
        return summarize(build(0, n), shift)
    parts = [summarize(build(i, min(i + step, n)), shift) for i in range(0, n, step)]
    return PosteriorSummary(
        *(torch.cat([getattr(p, f) for p in parts]) for f in PosteriorSummary.__dataclass_fields__)
    )
