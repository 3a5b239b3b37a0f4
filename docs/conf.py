"""Sphinx configuration: ``make docs`` builds the site with warnings as errors.

Why Sphinx (and not mkdocs-material): autodoc + napoleon render the Google-style docstrings and
their ``:math:`` roles as they are written, and myst-nb executes the notebooks at build time, so
the site shows the figures that the stored, output-free notebooks lack.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PIMA_QUICK", "1")  # notebooks execute in quick mode

project = "pima-pyro"
author = "pima-pyro developers"
extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
myst_enable_extensions = ["dollarmath", "amsmath"]
nb_execution_mode = "force"
nb_execution_timeout = 600
nb_execution_raise_on_error = True
exclude_patterns = ["_build", "figures", "**.ipynb_checkpoints"]
autodoc_member_order = "bysource"
autodoc_typehints = "none"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
suppress_warnings = ["myst.header", "misc.highlighting_failure"]
html_theme = "furo"
html_title = "pima-pyro"
autodoc_inherit_docstrings = False  # Lightning hooks: their docstrings use roles of its own site
