"""Writing a fit into AnnData / MuData slots (scanpy conventions, h5ad-safe values)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..model.result import EBMFResult


def h5_safe(value: Any) -> Any:
    """Make a value writable by ``write_h5ad``: dict keys as str, tuples / lists as
    arrays, numpy scalars as Python scalars, None kept; recursively."""
    if isinstance(value, dict):
        return {str(k): h5_safe(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        items = [h5_safe(v) for v in value]
        if all(isinstance(v, str) for v in items):
            return np.asarray(items, dtype=object)
        if all(isinstance(v, bool | int | float | np.number) for v in items):
            return np.asarray(items)
        return {str(i): v for i, v in enumerate(items)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) and value.dtype.kind == "U":
        return value.astype(object)
    if value is None or isinstance(value, str | bool | int | float | np.ndarray):
        return value
    return repr(value)


def factor_names(k: int) -> list[str]:
    return [f"factor_{i + 1}" for i in range(k)]


def full_rows(values: np.ndarray, rows: np.ndarray, n: int, fill: float) -> np.ndarray:
    """An (n, K) array with ``values`` on ``rows`` and ``fill`` elsewhere."""
    out = np.full((n, values.shape[1]), fill, dtype=np.float64)
    out[rows] = values
    return out


def pve_by_block(res: EBMFResult, blocks: dict[str, slice]) -> dict[str, np.ndarray]:
    """Variance explained per factor within each block of columns (modality):
    d_km^2 / (sum_k d_km^2 + sum over the block of the noise variances)."""
    l2 = (res.L**2).sum(0)
    noise_var = np.broadcast_to(np.asarray(res.noise_sd, dtype=np.float64) ** 2, (res.F.shape[0],))
    out = {}
    for name, cols in blocks.items():
        d2 = l2 * (res.F[cols] ** 2).sum(0)
        total = d2.sum() + res.L.shape[0] * noise_var[cols].sum()
        out[name] = d2 / total if total > 0 else np.zeros_like(d2)
    return out


def uns_summary(res: EBMFResult, params: dict, covariates: dict, extra: dict) -> dict:
    """The ``uns[key]`` record of a fit."""
    names = factor_names(res.n_factors)
    record = {
        "params": params,
        "factor_names": np.asarray(names, dtype=object),
        "elbo": np.asarray(res.elbo_trace, dtype=np.float64),
        "elbo_final": float(res.elbo),
        "pve": np.asarray(res.pve, dtype=np.float64),
        "converged": bool(res.converged),
        "stop_reason": res.stop_reason,
        "n_iter": int(res.n_iter),
        "max_factors_reached": bool(res.max_factors_reached),
        "timing": dict(res.timing),
        "fixed": np.asarray([list(f) for f in res.fixed], dtype=bool).reshape(-1, 2),
        "priors": {name: pr for name, pr in zip(names, res.priors, strict=True)},
        "covariates": covariates,
        **extra,
    }
    return h5_safe(record)


def output_names(key: str) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
    """The obsm and varm entries a fit under ``key`` writes: (means, sds, lfsr) each."""
    obsm = (f"X_{key}", f"X_{key}_sd", f"X_{key}_lfsr")
    varm = (f"{key}_factors", f"{key}_factors_sd", f"{key}_factors_lfsr")
    return obsm, varm


def _is_fit_record(record) -> bool:
    """True for an ``uns`` entry written by :func:`cebmf.tl.fit`."""
    return isinstance(record, Mapping) and "factor_names" in record


def drop_joint_outputs(mod, key: str) -> bool:
    """Remove from a modality ``mod`` the outputs of a joint MuData fit under ``key`` (its
    ``varm`` entries and ``uns[key]``), as when a refit under that key leaves ``mod`` out.
    A fit of the modality on its own under ``key`` is kept. Returns whether any was."""
    record = mod.uns.get(key)
    if not (_is_fit_record(record) and bool(record.get("joint_fit", False))):
        return False
    for name in output_names(key)[1]:
        mod.varm.pop(name, None)
    del mod.uns[key]
    return True


def check_key_free(data, key: str) -> None:
    """Refuse a ``key_added`` whose outputs would overwrite those of another fit recorded
    in ``data.uns`` (e.g. ``key_added="cebmf_sd"`` next to a fit under ``"cebmf"``, whose
    loadings' sds are ``obsm["X_cebmf_sd"]``). Refitting under the same key is allowed."""
    obsm, varm = output_names(key)
    for other, record in data.uns.items():
        if other == key or not _is_fit_record(record):
            continue
        other_obsm, other_varm = output_names(other)
        clash = sorted(set(obsm) & set(other_obsm) | set(varm) & set(other_varm))
        if clash:
            raise ValueError(
                f"key_added={key!r} would overwrite {', '.join(clash)} of the fit stored "
                f"under uns[{other!r}]; choose another key_added."
            )
    # entries another tool wrote (e.g. key_added="umap" next to scanpy's obsm["X_umap"]
    # and uns["umap"]): a fit of this package under ``key`` may be replaced, nothing else
    record = data.uns.get(key)
    if _is_fit_record(record):
        return
    varms = [("varm", data.varm)]
    varms += [(f"mod[{m!r}].varm", mod.varm) for m, mod in getattr(data, "mod", {}).items()]
    taken = [f"uns[{key!r}]"] if record is not None else []
    taken += [f"obsm[{name!r}]" for name in obsm if name in data.obsm]
    taken += [f"{where}[{name!r}]" for where, slot in varms for name in varm if name in slot]
    if taken:
        raise ValueError(
            f"key_added={key!r} would overwrite {', '.join(taken)}, which this package did "
            "not write (another tool's results); choose another key_added."
        )
