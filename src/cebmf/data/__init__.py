"""Data operators (dense with NaN as missing, sparse CSR, implicit offsets) and transforms."""

from .convert import as_data_matrix, resolve_device, resolve_dtype
from .matrix import DataMatrix, DenseData, OffsetData, SparseData
from .transforms import log1p_normalize

__all__ = [
    "DataMatrix",
    "DenseData",
    "OffsetData",
    "SparseData",
    "as_data_matrix",
    "log1p_normalize",
    "resolve_device",
    "resolve_dtype",
]
