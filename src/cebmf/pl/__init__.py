"""Plots of a cebmf fit stored in an AnnData or a MuData by :func:`cebmf.tl.fit` (scanpy
conventions).

Every function takes ``key`` (the fit's ``key_added``, default ``"cebmf"``) and scanpy's
``show`` / ``save`` / ``ax`` / ``return_fig``, and ``mod`` (a MuData's modality) where
features are drawn. None of them modifies the data: plots that need obs columns (scanpy
colours cells by obs columns) draw from a temporary object.

- :func:`embedding`: loadings on a UMAP / PCA / spatial embedding, one panel per factor.
- :func:`top_genes`: the genes with the largest factor values.
- :func:`variance_explained`: proportion of variance explained per factor.
- :func:`elbo`: the ELBO trace of the fit.
- :func:`structure`: mean loading per group of cells (heatmap or structure plot).
- :func:`prior`: a covariate-moderated prior (1 - pi0, mean or sd) against covariates.
"""

from ._diagnostics import elbo, variance_explained
from ._embedding import embedding
from ._genes import top_genes
from ._prior import prior
from ._structure import structure

__all__ = ["elbo", "embedding", "prior", "structure", "top_genes", "variance_explained"]
