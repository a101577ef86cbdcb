"""Sphinx configuration of the dpo-lab book (`make book`).

The source directory is the repository root (so README's and the notebooks' relative figure paths work
unchanged); this folder only holds the configuration, the table of contents and the book's own extension.
"""

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "dpo-lab"
author = "dpo-lab contributors"
html_title = "dpo-lab: DPO, one equation at a time"

extensions = ["myst_nb", "sphinx_external_toc", "dpo_book"]
external_toc_path = "book/_toc.yml"  # relative to the source directory
# Only these files are the book: everything else in the repository is ignored.
include_patterns = ["README.md", "notebooks/[0-9][0-9]_*.ipynb", "docs/design.md"]
exclude_patterns = ["_build", ".venv"]

# The committed cpu outputs are the content: never execute a notebook.
nb_execution_mode = "off"
# myst-nb's default ipywidgets scripts come from a CDN: none here (dpo_book shows a note instead).
nb_ipywidgets_js: dict[str, dict[str, str]] = {}
myst_enable_extensions = ["dollarmath", "amsmath"]
# Jupyter renders a `$$...$$` display inside a paragraph (the notebooks write them so): so does MyST.
myst_dmath_double_inline = True
myst_heading_anchors = 3

# MathJax 3 from the copy the `sphinx-mathjax-offline` package ships, served from _static/mathjax/ (no CDN).
# Its own extension would also pick CHTML output; SVG output draws every glyph itself, with no web-font
# files to fetch, so only the package's files are used here.
_mathjax = Path(importlib.util.find_spec("sphinx-mathjax-offline").origin).parent / "static"
html_static_path = [str(_mathjax)]
mathjax_path = "mathjax/tex-svg.js"
numfig = True  # figures (captioned by dpo_book) are numbered through the book: Fig. 1, 2, ...
math_numfig = False  # equations keep the paper's numbers (dpo_book sets them), not a count of displays

html_theme = "sphinx_book_theme"
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": True,
    "home_page_in_toc": True,
}
html_copy_source = True
html_show_sourcelink = False
# pydata-sphinx-theme logs a console error on a first visit unless the colour mode has a default.
html_context = {"default_mode": "auto"}
