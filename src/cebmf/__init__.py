"""cebmf: Covariate-moderated Empirical Bayes Matrix Factorization for the scverse."""

from importlib.metadata import PackageNotFoundError, version

from . import data, datasets, pl, priors, tl
from ._ebnm import ebnm
from .model import EBMFResult, fit_ebmf
from .priors import EBNMResult, available_priors

try:
    __version__ = version("cebmf")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = [
    "EBMFResult",
    "EBNMResult",
    "__version__",
    "available_priors",
    "data",
    "datasets",
    "ebnm",
    "fit_ebmf",
    "pl",
    "priors",
    "tl",
]
