"""Sphinx configuration for the sockdrawer documentation."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(HERE, "_ext"))

import sockdrawer  # noqa: E402

project = "sockdrawer"
author = "sockdrawer developers"
copyright = "sockdrawer developers"
version = release = sockdrawer.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
    "zope_interfaces",
    "sockdrawer_options",
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
