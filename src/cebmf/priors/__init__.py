"""Prior families behind one EBNM contract, registered by name.

``get_prior("point_normal")`` returns an instance; ``available_priors()`` lists names.
A new family is one new module with a :class:`Prior` subclass decorated by
:func:`register_prior`.
"""

from .base import EBNMResult, Prior, available_priors, get_prior, register_prior
from .cash import Cash
from .cgb import Cgb
from .emdn import Emdn, SpikedEmdn
from .flat import Flat
from .generalized_binary import GeneralizedBinary
from .nonnegative_mixture import NonnegativeMixture
from .normal import Normal, PointNormal
from .point_exponential import PointExponential
from .point_laplace import PointLaplace
from .scale_mixture import NormalScaleMixture

__all__ = [
    "Cash",
    "Cgb",
    "EBNMResult",
    "Emdn",
    "Flat",
    "GeneralizedBinary",
    "NonnegativeMixture",
    "Normal",
    "NormalScaleMixture",
    "PointExponential",
    "PointLaplace",
    "PointNormal",
    "Prior",
    "SpikedEmdn",
    "available_priors",
    "get_prior",
    "register_prior",
]
