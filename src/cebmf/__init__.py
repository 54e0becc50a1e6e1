"""cebmf: Covariate-moderated Empirical Bayes Matrix Factorization for the scverse."""

from importlib.metadata import PackageNotFoundError, version

from . import priors
from ._ebnm import ebnm
from .priors import EBNMResult, available_priors

try:
    __version__ = version("cebmf")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = ["EBNMResult", "__version__", "available_priors", "ebnm", "priors"]
