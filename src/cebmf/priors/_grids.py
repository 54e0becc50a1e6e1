"""Automatic grids of component scales for the mixture families.

``normal_mixture_scales`` follows the rule of Willwerscheid (2021) used by R's ebnm
(``ebnm_scale_normalmix``): component marginal variances s_min^2 m^k are geometric with
ratio m chosen so that the worst-case KL divergence per observation between a normal
scale mixture and its best approximation on the grid is at most ``kl_target`` (default
1/n, i.e. about one nat of log-likelihood in total); the table of KL(m) is computed by
``tools/make_smn_grid.py``.

``exponential_mixture_scales`` follows ashr's ``autoselect.mixsd``: exponential means
from min(s)/10 to 2 sqrt(max(x_+^2 - s^2)) in ratio ``mult`` (sqrt(2) by default).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._grid_tables import SMN_GRID_KL

_LOG_M1 = np.log([m - 1.0 for m, _ in SMN_GRID_KL])
_LOG_KL = np.log([kl for _, kl in SMN_GRID_KL])


def kl_grid_multiplier(kl_target: float) -> float:
    """Variance ratio m of adjacent grid components whose worst-case KL is ``kl_target``."""
    return 1.0 + math.exp(float(np.interp(math.log(kl_target), _LOG_KL, _LOG_M1)))


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
    x: torch.Tensor, s: torch.Tensor, *, mult: float = math.sqrt(2.0)
) -> np.ndarray:
    """Means of the exponential components, the first 0 (the point mass)."""
    pos = x.clamp(min=0.0)
    stats = torch.stack([s.min(), (pos * pos - s * s).max()]).double().tolist()
    s_min, excess = stats
    a_min = s_min / 10.0
    a_max = 2.0 * math.sqrt(max(excess, 0.0))
    if a_max < 8.0 * a_min:
        a_max = 8.0 * a_min
    k = math.ceil(math.log(a_max / a_min) / math.log(mult))
    return np.concatenate([[0.0], a_max * mult ** np.arange(-k, 1, dtype=np.float64)])


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
