"""Sphinx configuration for the cebmf documentation.

Build with ``sphinx-build -W -b html docs docs/_build/html`` (warnings are errors). The
API pages document the *installed* package (``pip install -e .``); a source tree that is
not installed is found through ``../src`` as a fallback.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import cebmf
except ImportError:  # building from a source checkout without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import cebmf

project = "cebmf"
author = "The cebmf developers"
copyright = "The cebmf developers"
release = cebmf.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# MyST: $...$ / $$...$$ maths, and amsmath environments.
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

# numpy-style docstrings
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_ivar = False
napoleon_use_rtype = False

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"

html_theme = "alabaster"
html_title = f"cebmf {release}"
