"""A prior made of blocks: observations split into consecutive blocks, each with its own
prior family (e.g. the factors of a joint fit of several modalities: genes, peaks)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .base import EBNMResult, Prior, get_prior


class BlockPrior(Prior):
    """Observations ``[0, n_1)``, ``[n_1, n_1 + n_2)``, ... get separate priors.

    The marginal log-likelihood is the sum over blocks; ``g`` is
    ``{"family": "block", "blocks": {name: g_b}, "sizes": ...}``.
    """

    name = "block"

    def __init__(
        self,
        sizes: Sequence[int],
        priors: Sequence[str | Prior],
        names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(0.0)
        if len(sizes) != len(priors) or not sizes:
            raise ValueError("BlockPrior needs one prior per block size.")
        self.sizes = [int(v) for v in sizes]
        self.priors = [get_prior(p) for p in priors]
        self.names = list(names) if names is not None else [f"block{i}" for i in range(len(sizes))]
        self.nonnegative = all(p.nonnegative for p in self.priors)
        if any(p.uses_covariates for p in self.priors):
            raise ValueError("covariate-moderated priors are not supported inside BlockPrior.")

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={p!r}" for n, p in zip(self.names, self.priors, strict=True))
        return f"BlockPrior({inner})"

    def _fit(self, x, s, *, covariates=None, state, g_init, fix_g) -> EBNMResult:
        if x.numel() != sum(self.sizes):
            raise ValueError(f"BlockPrior expects {sum(self.sizes)} observations, got {x.numel()}.")
        xs = torch.split(x, self.sizes)
        ss = torch.split(s, self.sizes) if s.numel() > 1 else [s] * len(self.sizes)
        states = state["blocks"] if state is not None else [None] * len(self.sizes)
        inits = (
            [g_init["blocks"][n] for n in self.names]
            if g_init is not None
            else [None] * len(self.sizes)
        )
        parts = [
            prior.fit(xb, sb, state=st, g_init=gi, fix_g=fix_g)
            for prior, xb, sb, st, gi in zip(self.priors, xs, ss, states, inits, strict=True)
        ]
        cat = {
            f: torch.cat([getattr(r, f) for r in parts]) for f in ("mean", "mean2", "sd", "lfsr")
        }
        g: dict[str, Any] = {
            "family": self.name,
            "mode": 0.0,
            "blocks": {n: r.g for n, r in zip(self.names, parts, strict=True)},
            "sizes": np.asarray(self.sizes),
        }
        return EBNMResult(
            **cat,
            loglik=float(sum(r.loglik for r in parts)),
            g=g,
            state={"blocks": [r.state for r in parts]},
        )
