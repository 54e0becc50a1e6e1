"""Automatic grids of component scales for the mixture families.

``normal_mixture_scales`` follows the rule of Willwerscheid (2021) used by R's ebnm
(``ebnm_scale_normalmix``): component marginal variances s_min^2 m^k are geometric with
ratio m chosen so that the worst-case KL divergence per observation between a normal
scale mixture and its best approximation on the grid is at most ``kl_target`` (default
1/n, i.e. about one nat of log-likelihood in total); the table of KL(m) is computed by
``tools/make_smn_grid.py``.

``exponential_mixture_scales`` spans ashr's range (``autoselect.mixsd``: exponential
means from min(s)/10 to 2 sqrt(max(x_+^2 - s^2))) with the same KL rule: ratio m such that
the worst-case KL divergence between an exponential and its best two-component
approximation on the grid is ``kl_target`` (computed without noise, an upper bound).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._grid_tables import EXP_GRID_KL, SMN_GRID_KL


def _interpolator(table):
    log_m1 = np.log([m - 1.0 for m, _ in table])
    log_kl = np.log([kl for _, kl in table])
    return lambda target: 1.0 + math.exp(float(np.interp(math.log(target), log_kl, log_m1)))


_SMN_RATIO = _interpolator(SMN_GRID_KL)
_EXP_RATIO = _interpolator(EXP_GRID_KL)


def kl_grid_multiplier(kl_target: float, family: str = "normal") -> float:
    """Ratio m of adjacent grid components (variances for ``"normal"``, means for
    ``"exponential"``) whose worst-case KL per observation is ``kl_target``."""
    return (_SMN_RATIO if family == "normal" else _EXP_RATIO)(kl_target)


def normal_mixture_scales(
    x: torch.Tensor,
    s: torch.Tensor,
    *,
    kl_target: float | None = None,
    mult: float | None = None,
    min_k: int = 3,
    max_k: int = 300,
) -> np.ndarray:
    """Standard deviations of the components, the first 0 (the point mass).

    sigma_k = s_min sqrt(m^k - 1), k = 0..K-1, with K the smallest number that reaches
    max x^2 (x already centred at the mode). ``mult`` fixes m; otherwise m comes from
    ``kl_target`` (default 1/n), clamped so that min_k <= K <= max_k.
    """
    stats = torch.stack([(x * x).max(), s.min()]).double().tolist()
    max_x2, min_s = stats
    ratio = max(max_x2 / (min_s * min_s), 1.0)
    max_mult = (ratio + 1.0) ** (1.0 / (min_k - 1)) + 1e-8
    min_mult = max_mult ** ((min_k - 1) / (max_k - 1)) - 1e-8
    if mult is None:
        target = kl_target if kl_target is not None else 1.0 / max(x.numel(), 1)
        mult = kl_grid_multiplier(target)
        mult = min(max(mult, min_mult), max_mult)
    k = math.ceil(math.log(ratio + 1.0) / math.log(mult)) + 1
    return min_s * np.sqrt(mult ** np.arange(k) - 1.0)


def exponential_mixture_scales(
    x: torch.Tensor,
    s: torch.Tensor,
    *,
    kl_target: float | None = None,
    mult: float | None = None,
    max_k: int = 300,
) -> np.ndarray:
    """Means of the exponential components, the first 0 (the point mass).

    a_k = a_min m^k from a_min = min(s)/10 until a_max = max(2 sqrt(max(x_+^2 - s^2)),
    8 a_min) is reached; m from ``kl_target`` (default 1/n) unless ``mult`` fixes it,
    raised if needed so that K <= max_k.
    """
    pos = x.clamp(min=0.0)
    stats = torch.stack([s.min(), (pos * pos - s * s).max()]).double().tolist()
    s_min, excess = stats
    a_min = s_min / 10.0
    a_max = max(2.0 * math.sqrt(max(excess, 0.0)), 8.0 * a_min)
    ratio = a_max / a_min
    if mult is None:
        target = kl_target if kl_target is not None else 1.0 / max(x.numel(), 1)
        mult = kl_grid_multiplier(target, "exponential")
    mult = max(mult, ratio ** (1.0 / max(max_k - 2, 1)) * (1 + 1e-12))
    k = math.ceil(math.log(ratio) / math.log(mult) - 1e-9) + 1
    return np.concatenate([[0.0], a_min * mult ** np.arange(k, dtype=np.float64)])


def merge_grids(fresh: np.ndarray, old: np.ndarray, old_pi: np.ndarray) -> tuple:
    """Union of a fresh grid and the old grid's components with positive weight.

    Returns ``(scales, pi_init)`` with the old weights placed on their components, so
    that the old prior is a point of the new family (warm starts never lose likelihood).
    """
    keep = old[old_pi > 0]
    scales = np.union1d(fresh, keep)
    pi = np.zeros(scales.size)
    pos = np.searchsorted(scales, keep)
    np.add.at(pi, pos, old_pi[old_pi > 0])
    return scales, pi / pi.sum()
