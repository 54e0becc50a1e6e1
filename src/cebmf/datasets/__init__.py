"""Simulated data sets for tests, tutorials and benchmarks."""

from .pbmc import de_estimates, pbmc68k_counts
from .simulate import SimulatedData, simulate_covariate_sparsity, simulate_low_rank

__all__ = [
    "SimulatedData",
    "de_estimates",
    "pbmc68k_counts",
    "simulate_covariate_sparsity",
    "simulate_low_rank",
]
