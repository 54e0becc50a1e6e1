"""Simulated data sets for tests, tutorials and benchmarks."""

from .simulate import SimulatedData, simulate_covariate_sparsity, simulate_low_rank

__all__ = ["SimulatedData", "simulate_covariate_sparsity", "simulate_low_rank"]
