"""Sphinx configuration for the sockdrawer documentation."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import sockdrawer  # noqa: E402

project = "sockdrawer"
author = "sockdrawer developers"
copyright = "sockdrawer developers"
version = release = sockdrawer.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]

# No intersphinx: the docs build offline.
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
}

exclude_patterns = ["_build", "examples"]
templates_path = []
html_static_path = []
html_theme = "alabaster"
html_title = f"sockdrawer {release}"
