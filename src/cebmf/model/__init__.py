"""The EBMF engine: greedy addition, backfitting, nullcheck, exact ELBO."""

from .fit import fit_ebmf
from .result import LDF, EBMFResult

__all__ = ["LDF", "EBMFResult", "fit_ebmf"]
