"""EK-FAC influence functions (Grosse et al. 2023, arXiv:2308.03296) as a Lightning module.

``EkfacModule`` fits the factors with ``Trainer.fit`` (one epoch per phase) and scores
queries against training examples; the math lives in pure functions in :mod:`.factors`.
"""

from .factors import NonFiniteFactorError
from .influence import EkfacPreconditioner, Preconditioner, TopInfluences, top_influences
from .inspect import inspect_factors
from .module import PHASES, EkfacModule
from .storage import EkfacFactors, ModuleFactors

__all__ = [
    "PHASES",
    "EkfacFactors",
    "EkfacModule",
    "EkfacPreconditioner",
    "ModuleFactors",
    "NonFiniteFactorError",
    "Preconditioner",
    "TopInfluences",
    "inspect_factors",
    "top_influences",
]
