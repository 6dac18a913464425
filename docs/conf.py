"""Sphinx configuration of the likelihood-free documentation.

Build the HTML with ``make -C docs html`` (warnings are errors) and run the guides' code with
``make -C docs doctest``; ``python -m pytest tests/test_docs.py`` does both.

Offline builds: intersphinx links to the Python and PyTorch docs need their ``objects.inv``,
fetched over the network at build time. A failed fetch is a warning (an error under ``-W``), so
the mapping is left empty when ``CALM_DOCS_OFFLINE=1`` is set, or when an inventory host does not
answer within a second (``CALM_DOCS_OFFLINE=0`` forces the online mapping). Without the mapping,
references to ``torch``/Python objects are rendered as plain code instead of links; nothing else
changes.
"""

from __future__ import annotations

import doctest
import os
import re
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # the packages, importable without installing them
sys.path.insert(0, str(DOCS / "_ext"))  # local extensions


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("likelihood-free")
    except Exception:  # not installed: read pyproject.toml
        pyproject = ROOT / "pyproject.toml"
        text = pyproject.read_text(encoding="utf-8") if pyproject.is_file() else ""
        match = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
        return match.group(1) if match else "0.0.0"


# -- project ------------------------------------------------------------------------------------

project = "likelihood-free"
author = "likelihood-free contributors"
copyright = "2025, likelihood-free contributors"
release = _version()
version = ".".join(release.split(".")[:2])

# -- extensions ---------------------------------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # Google-style docstrings
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.doctest",  # runs the guides' code: `make -C docs doctest`
    "sphinx.ext.viewcode",
    "calm_docs",  # docs/_ext/calm_docs.py: re-export links, results include
]

source_suffix = {".rst": "restructuredtext"}
suppress_warnings = ["myst.header"]  # generated Markdown results start at "##" inside a page
root_doc = "index"
exclude_patterns = ["_build", "_generated", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []
pygments_style = "friendly"
pygments_dark_style = "monokai"

# -- autodoc, napoleon, type hints --------------------------------------------------------------

autodoc_default_options = {"members": True, "member-order": "bysource", "show-inheritance": True}
autodoc_class_signature = "mixed"
autodoc_preserve_defaults = True
autodoc_typehints_format = "short"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as a field list: no duplicate attribute entries
napoleon_use_rtype = False
napoleon_attr_annotations = True
autodoc_typehints = "description"  # types in the parameter lists, signatures stay short
autodoc_typehints_description_target = "documented_params"

# -- intersphinx (skipped offline, see the module docstring) ------------------------------------

_INTERSPHINX = {
    "python": ("https://docs.python.org/3", None),
    "torch": ("https://docs.pytorch.org/docs/stable", None),
    "numpy": ("https://numpy.org/doc/stable", None),
}


def _offline() -> bool:
    flag = os.environ.get("CALM_DOCS_OFFLINE", "").strip().lower()
    if flag in ("1", "true", "yes", "on"):
        return True
    if flag in ("0", "false", "no", "off"):
        return False
    for uri, _ in _INTERSPHINX.values():
        try:
            socket.create_connection((urlparse(uri).hostname, 443), timeout=1.0).close()
        except OSError:
            return True
    return False


intersphinx_mapping = {} if _offline() else _INTERSPHINX
intersphinx_timeout = 10

# -- doctest: the guides' code ------------------------------------------------------------------

doctest_default_flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE | doctest.DONT_ACCEPT_TRUE_FOR_1
doctest_test_doctest_blocks = ""  # docstring examples run in tests/test_docs.py (doctest.testmod)
doctest_global_setup = f"""
import os
DOCS_DIR = {str(DOCS)!r}  # the guides copy their example files from DOCS_DIR/examples
import torch
torch.set_num_threads(1)
torch.manual_seed(0)
try:
    import transformers
except ImportError:
    transformers = None
"""

# -- HTML ---------------------------------------------------------------------------------------

html_theme = "furo"
html_title = f"likelihood-free {release}"
html_static_path: list[str] = []
html_show_sourcelink = False
