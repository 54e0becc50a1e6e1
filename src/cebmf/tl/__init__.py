"""Tools: fit EBMF / cEBMF on AnnData and MuData (scanpy's ``tl`` conventions)."""

from ._fit import fit

__all__ = ["fit"]
