"""A prior made of blocks: observations split into consecutive blocks, each with its own
prior family (e.g. the factors of a joint fit of several modalities: genes, peaks)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .._math import sign_probs_wanted
from .base import EBNMResult, Prior, get_prior


class BlockPrior(Prior):
    """Observations ``[0, n_1)``, ``[n_1, n_1 + n_2)``, ... get separate priors.

    The marginal log-likelihood is the sum over blocks; ``g`` is
    ``{"family": "block", "blocks": {name: g_b}, "sizes": ...}``.

    Blocks may use covariate-moderated priors: the covariates given to :meth:`fit` have one
    row per observation, and block b sees its own rows and the columns
    ``covariate_columns[b]`` (default: all). The features of different modalities have
    different covariates, so a joint fit lays them out block-diagonally (zeros elsewhere)
    and names each block's columns. Blocks with plain priors ignore the covariates.
    """

    name = "block"

    def __init__(
        self,
        sizes: Sequence[int],
        priors: Sequence[str | Prior],
        names: Sequence[str] | None = None,
        covariate_columns: Sequence[Sequence[int] | None] | None = None,
    ) -> None:
        super().__init__(0.0)
        if len(sizes) != len(priors) or not sizes:
            raise ValueError("BlockPrior needs one prior per block size.")
        self.sizes = [int(v) for v in sizes]
        self.priors = [get_prior(p) for p in priors]
        self.names = list(names) if names is not None else [f"block{i}" for i in range(len(sizes))]
        self.nonnegative = all(p.nonnegative for p in self.priors)
        self.uses_covariates = any(p.uses_covariates for p in self.priors)
        if covariate_columns is None:
            covariate_columns = [None] * len(self.sizes)
        if len(covariate_columns) != len(self.sizes):
            raise ValueError(
                f"covariate_columns needs one entry per block ({len(self.sizes)}), got "
                f"{len(covariate_columns)}."
            )
        self.covariate_columns = []
        for name, prior, cols in zip(self.names, self.priors, covariate_columns, strict=True):
            if cols is not None:
                cols = [int(c) for c in cols]
                if not prior.uses_covariates:
                    raise ValueError(
                        f"block {name!r} has covariate columns but its prior {prior.name!r} "
                        "does not use covariates."
                    )
                if not cols or min(cols) < 0:
                    raise ValueError(
                        f"covariate_columns of block {name!r} must be non-negative column "
                        f"indices (or None for all columns), got {cols}."
                    )
            self.covariate_columns.append(cols)

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
        covs = self._block_covariates(covariates)
        # inside a fit whose lfsr is discarded (Prior.fit(..., lfsr=False)) the blocks skip
        # theirs too
        lfsr = sign_probs_wanted()
        parts = [
            prior.fit(xb, sb, covariates=cb, state=st, g_init=gi, fix_g=fix_g, lfsr=lfsr)
            for prior, xb, sb, cb, st, gi in zip(
                self.priors, xs, ss, covs, states, inits, strict=True
            )
        ]
        cat = {f: torch.cat([getattr(r, f) for r in parts]) for f in ("mean", "mean2", "sd")}
        cat["lfsr"] = torch.cat([r.lfsr for r in parts]) if lfsr else None
        g: dict[str, Any] = {
            "family": self.name,
            "mode": 0.0,
            "blocks": {n: r.g for n, r in zip(self.names, parts, strict=True)},
            "sizes": np.asarray(self.sizes),
        }
        state: dict[str, Any] = {"blocks": [r.state for r in parts]}
        gains = [r.state.get("refit_gain") if r.state else None for r in parts]
        if all(gain is not None for gain in gains):
            # every block is a warm-refitted covariate prior: the refit's gain over the
            # saved prior is known (the EBMF engine may defer the next refits)
            state["refit_gain"] = float(sum(gains))
        return EBNMResult(
            **cat,
            loglik=float(sum(r.loglik for r in parts)),
            g=g,
            state=state,
        )

    def _block_covariates(self, covariates: torch.Tensor | None) -> list[torch.Tensor | None]:
        """Each block's rows (and its columns) of ``covariates``; None for plain blocks."""
        if covariates is None:
            return [None] * len(self.sizes)
        out, start = [], 0
        for prior, size, cols, name in zip(
            self.priors, self.sizes, self.covariate_columns, self.names, strict=True
        ):
            block = None
            if prior.uses_covariates:
                block = covariates[start : start + size]
                if cols is not None:
                    if max(cols) >= covariates.shape[1]:
                        raise ValueError(
                            f"block {name!r} asks for covariate column {max(cols)}, but the "
                            f"covariates have {covariates.shape[1]} columns."
                        )
                    block = block[:, cols]
            out.append(block)
            start += size
        return out
