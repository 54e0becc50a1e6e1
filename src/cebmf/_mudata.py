"""What a MuData's cells carry, as one table: shared by ``tl`` and ``pl``."""

from __future__ import annotations

import pandas as pd


def obs_with_modalities(mdata, mods: list[str]) -> pd.DataFrame:
    """``mdata.obs`` (a shallow copy) plus each modality's cell annotations as
    ``"mod:column"`` where the MuData has not pulled them (``mdata.pull_obs()``, or
    ``mudata.set_options(pull_on_update=False)``, mudata's coming default)."""
    obs = mdata.obs.copy(deep=False)
    for m in mods:
        for col in mdata.mod[m].obs.columns:
            if f"{m}:{col}" not in obs.columns:
                obs[f"{m}:{col}"] = mdata.mod[m].obs[col].array
    return obs
