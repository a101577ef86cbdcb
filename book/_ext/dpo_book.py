r"""The book layer over the unmodified notebooks (a Sphinx extension used by `book/conf.py`).

The notebooks stay plain Jupyter notebooks; everything a printed book needs on top is added here:

* equation anchors: the display under a heading "Eq. N — ..." gets the paper's number (N) and an anchor
  ``eq-N``; a display that says ``\text{(Eq. N)}`` itself, and a sentence right after it that says
  "(Eq. M)", get the anchor alone;
* equation links: "Eq. N" / "Eqs. N and M" in the text of every other page link to those anchors;
* figure captions: each output image becomes a numbered figure with the caption `book/captions.yml` gives
  for the file its cell saves, and a Markdown image alone in its paragraph becomes a figure captioned by its
  alt text;
* a note at the top of each notebook page: its `.py` source (a local copy, so the book works offline) and
  how to run it;
* a note in place of an ipywidgets output (a widget needs a live kernel; the book loads no widget scripts).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import nbformat
import yaml
from docutils import nodes
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.transforms import SphinxTransform
from sphinx.transforms.post_transforms import SphinxPostTransform
from sphinx.util import logging

logger = logging.getLogger(__name__)

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
EQ_HEADING = re.compile(r"^(?:\d+\.\s+)?Eq\.\s*(\d+)\s*[—–:-]")  # "Eq. 1 — ...", "3. Eq. 10: ..."
EQ_MARK_MATH = re.compile(r"\\text\{\(Eq\.\s*(\d+)\)\}")  # a display that names itself: \text{(Eq. 8)}
EQ_MARK_TEXT = re.compile(r"\(Eq\.\s*(\d+)\)")  # a sentence that names itself: "... = 1 (Eq. 9)."
EQ_MENTION = re.compile(r"\bEqs?\.\s*\d+(?:\s*(?:,|–|-|/|and|or)\s*\d+)*")
TABLE_MATH = re.compile(r"(?<![\\$])\$[^$\n]+\$")  # one $...$ span of a table row
CAPTION_MATH = re.compile(r"\$([^$]+)\$")  # inline math in a caption of book/captions.yml
PNG_IN_SOURCE = re.compile(r"""["/]([^"/\n]+?\.png)["]""")  # "NN_name.png" or f"frontier_{x}.png"
NO_LINKS_INSIDE = (nodes.FixedTextElement, nodes.literal, nodes.math, nodes.math_block, nodes.reference,
                   nodes.title, nodes.raw, addnodes.pending_xref, addnodes.download_reference)


def _is_notebook(docname: str) -> bool:
    return docname.startswith("notebooks/")


def _cell_element(node: nodes.Node, kind: str) -> bool:
    return isinstance(node, nodes.container) and node.get("nb_element") == kind


def _own_section(node: nodes.Node) -> nodes.Node | None:
    """The innermost section that holds `node`."""
    parent = node.parent
    while parent is not None and not isinstance(parent, nodes.section):
        parent = parent.parent
    return parent


def _pipes_in_table_math(app: Sphinx, docname: str, source: list[str]) -> None:
    """Write `|` inside `$...$` of a Markdown table row as `\\vert`, as Jupyter reads it.

    Jupyter takes the math out before it parses the Markdown; MyST would end the table cell at that `|`.
    """
    if not _is_notebook(docname):
        return
    notebook = nbformat.reads(source[0], as_version=4)
    changed = False
    for cell in notebook.cells:
        if cell.cell_type != "markdown":
            continue
        lines = cell.source.split("\n")
        for i, line in enumerate(lines):
            if line.lstrip().startswith("|"):
                lines[i] = TABLE_MATH.sub(lambda m: re.sub(r"(?<!\\)\|", r"\\vert ", m.group()), line)
        fixed = "\n".join(lines)
        changed |= fixed != cell.source
        cell.source = fixed
    if changed:
        source[0] = nbformat.writes(notebook)


class DisplayMathParagraphs(SphinxTransform):
    """Split a paragraph around the `$$...$$` displays it holds (Jupyter writes them mid-paragraph).

    Left in place, the display's <div> would sit inside a <p>, which HTML does not allow.
    """

    default_priority = 790

    def apply(self, **kwargs: Any) -> None:
        for paragraph in list(self.document.findall(nodes.paragraph)):
            if not any(isinstance(child, nodes.math_block) for child in paragraph.children):
                continue
            pieces: list[nodes.Element] = []
            current = paragraph.copy()  # keeps the paragraph's attributes (ids, source line)
            for child in list(paragraph.children):
                if isinstance(child, nodes.math_block):
                    pieces += [current, child.deepcopy()]
                    current = nodes.paragraph()
                else:
                    current += child.deepcopy()
            pieces.append(current)
            keep = [p for p in pieces if isinstance(p, nodes.math_block) or p.astext().strip()]
            for piece in keep:  # drop the line breaks left at the cut
                if isinstance(piece, nodes.paragraph) and piece.children:
                    for end, strip in ((0, str.lstrip), (-1, str.rstrip)):
                        if isinstance(piece[end], nodes.Text):
                            piece[end] = nodes.Text(strip(str(piece[end])))
            paragraph.replace_self(keep)


class EquationAnchors(SphinxTransform):
    """Give the paper's numbered equations an anchor (and the heading's number) where a page displays them."""

    default_priority = 800  # after myst-nb has built the page

    def apply(self, **kwargs: Any) -> None:
        docname = self.env.docname
        if not _is_notebook(docname):
            return
        found: dict[str, str] = {}

        def anchor(node: nodes.Element, number: str, show_number: bool) -> None:
            if number in found:
                return
            node["ids"].append(f"eq-{number}")
            if show_number:  # Sphinx writes "(N)" beside the display, with a permalink
                node["number"] = number
            found[number] = f"eq-{number}"

        # "## Eq. N — ...": the first display of that section is Eq. N
        for section in self.document.findall(nodes.section):
            match = EQ_HEADING.match(section[0].astext()) if section.children else None
            if match:
                own = (m for m in section.findall(nodes.math_block) if _own_section(m) is section)
                display = next(own, None)
                if display is not None:
                    anchor(display, match.group(1), show_number=True)
        # a display that names itself "(Eq. N)", and a "(Eq. M)" in the sentence right after it
        for display in list(self.document.findall(nodes.math_block)):
            numbers = EQ_MARK_MATH.findall(display.astext())
            for number in numbers:
                anchor(display, number, show_number=False)
            after = display.next_node(descend=False, siblings=True)
            if numbers and isinstance(after, nodes.paragraph):
                for number in EQ_MARK_TEXT.findall(after.astext()):
                    anchor(after, number, show_number=False)
        self.env.dpo_equations = getattr(self.env, "dpo_equations", {})
        self.env.dpo_equations[docname] = found


class NotebookNotes(SphinxTransform):
    """Widget outputs become a note; the page opens with its source file and how to run it."""

    default_priority = 801

    def apply(self, **kwargs: Any) -> None:
        docname = self.env.docname
        if not _is_notebook(docname):
            return
        for bundle in list(self.document.findall(lambda n: _cell_element(n, "mime_bundle"))):
            if any(child.get("mime_type") == WIDGET_VIEW for child in bundle.children):
                bundle.replace_self(nodes.note("", nodes.paragraph(
                    "", "An interactive widget (ipywidgets) was here: it needs a live Jupyter kernel, so the "
                        "book shows none. Run the notebook to use it (see the top of this page).")))
        title = next(self.document.findall(nodes.title), None)
        if title is not None:
            title.parent.insert(title.parent.index(title) + 1, self._run_note(docname))

    def _run_note(self, docname: str) -> nodes.Element:
        stem = Path(docname).name
        source = f"notebooks/{stem}.py"
        link = addnodes.download_reference("", "", nodes.literal(text=source), reftarget=f"/{source}",
                                           refdoc=docname, refexplicit=True)
        params = self._parameters()
        run = (f".venv/bin/papermill notebooks/{stem}.ipynb out.ipynb"
               + (" -p preset smoke" if "preset" in params else ""))
        para = nodes.paragraph()
        para += [nodes.strong(text="Source: "), link,
                 nodes.Text(" (jupytext percent format; its paired .ipynb holds the outputs shown here). "),
                 nodes.strong(text="Run it: "),
                 nodes.Text("in a clone of the repository, "), nodes.literal(text="make setup"),
                 nodes.Text(", then open "), nodes.literal(text=f"notebooks/{stem}.ipynb"),
                 nodes.Text(" in Jupyter, or execute it headless: "), nodes.literal(text=run),
                 nodes.Text(".")]
        if params:
            para += nodes.Text(" Parameters ("), nodes.literal(text="-p NAME VALUE"), nodes.Text("): ")
            for i, name in enumerate(params):
                para += [nodes.Text(", " if i else ""), nodes.literal(text=name)]
            para += nodes.Text(".")
        return nodes.admonition("", nodes.title(text="Read it here, run it in Jupyter"), para,
                                classes=["tip", "dpo-run-note"])

    def _parameters(self) -> list[str]:
        """The names the page's papermill `parameters` cell sets."""
        for cell in self.document.findall(lambda n: _cell_element(n, "cell_code")):
            if "tag_parameters" in cell.get("classes", []):
                source = next(cell.findall(nodes.literal_block)).astext()
                return re.findall(r"^([A-Za-z_]\w*)\s*(?::[^=\n]+)?=", source, flags=re.M)
        return []


class FigureCaptions(SphinxTransform):
    """Wrap output images and lone Markdown images in captioned figures."""

    default_priority = 802

    def apply(self, **kwargs: Any) -> None:
        docname = self.env.docname
        captions: dict[str, str] = self.config.dpo_book_captions
        for paragraph in list(self.document.findall(nodes.paragraph)):
            children = [c for c in paragraph.children if not (isinstance(c, nodes.Text) and not c.strip())]
            if len(children) == 1 and isinstance(children[0], nodes.image) and children[0].get("alt"):
                image = children[0]
                paragraph.replace_self(self._figure(image.deepcopy(), image["alt"], None))
        if not _is_notebook(docname):
            return
        count = 0
        for cell in list(self.document.findall(lambda n: _cell_element(n, "cell_code"))):
            source = next(cell.findall(nodes.literal_block)).astext()
            saved = PNG_IN_SOURCE.findall(source)
            for bundle in list(cell.findall(lambda n: _cell_element(n, "mime_bundle"))):
                if not any(str(c.get("mime_type", "")).startswith("image/") for c in bundle.children):
                    continue
                count += 1
                key = saved[0] if saved else f"{Path(docname).name}#{count}"
                caption = captions.get(key)
                if caption is None:
                    logger.warning(f"no caption for figure {key!r} in book/captions.yml", location=bundle)
                    caption = key
                bundle.replace_self(self._figure(bundle.deepcopy(), caption, saved[0] if saved else None))

    def _figure(self, content: nodes.Element, caption: str, saved: str | None) -> nodes.figure:
        figure = nodes.figure("", content, classes=["dpo-figure"])
        text = nodes.caption("")
        for i, part in enumerate(CAPTION_MATH.split(caption)):  # odd parts are the $...$ spans
            text += nodes.math(part, part) if i % 2 else nodes.Text(part)
        if saved:  # say which file the cell writes, so the figure can be found in the repository
            text += [nodes.Text(" ("), nodes.literal(text=f"figures/{saved}"), nodes.Text(")")]
        figure += text
        self.document.set_id(figure)  # an id makes Sphinx number it (numfig)
        return figure


class EquationLinks(SphinxPostTransform):
    """Link "Eq. N" in the text of a page to the equation's anchor on the page that displays it."""

    default_priority = 20

    def run(self, **kwargs: Any) -> None:
        docname = self.env.docname
        targets: dict[str, tuple[str, str]] = {}
        for doc, anchors in sorted(getattr(self.env, "dpo_equations", {}).items(), reverse=True):
            targets.update({number: (doc, anchor) for number, anchor in anchors.items()})  # first page wins
        targets = {n: t for n, t in targets.items() if t[0] != docname}  # a page does not link to itself
        if not targets:
            return
        for text in list(self.document.findall(nodes.Text)):
            if any(isinstance(a, NO_LINKS_INSIDE) for a in _ancestors(text)):
                continue
            linked = self._split(str(text), targets, docname)
            if linked is not None:
                text.parent.replace(text, linked)

    def _split(self, text: str, targets: dict[str, tuple[str, str]], docname: str) -> list[nodes.Node] | None:
        out: list[nodes.Node] = []
        done = 0
        for mention in EQ_MENTION.finditer(text):
            for i, number in enumerate(re.finditer(r"\d+", mention.group())):
                if number.group() not in targets:
                    continue
                start = mention.start() if i == 0 else mention.start() + number.start()
                end = mention.start() + number.end()
                doc, anchor = targets[number.group()]
                uri = self.app.builder.get_relative_uri(docname, doc) + "#" + anchor
                out += [nodes.Text(text[done:start]),
                        nodes.reference("", text[start:end], internal=True, refuri=uri,
                                        reftitle=f"Eq. {number.group()}", classes=["dpo-eqref"])]
                done = end
        if not out:
            return None
        return [*out, nodes.Text(text[done:])]


def _ancestors(node: nodes.Node) -> list[nodes.Node]:
    found = []
    while node.parent is not None:
        node = node.parent
        found.append(node)
    return found


def _purge(app: Sphinx, env: BuildEnvironment, docname: str) -> None:
    getattr(env, "dpo_equations", {}).pop(docname, None)


def _merge(app: Sphinx, env: BuildEnvironment, docnames: set[str], other: BuildEnvironment) -> None:
    env.dpo_equations = getattr(env, "dpo_equations", {})
    env.dpo_equations.update({d: a for d, a in getattr(other, "dpo_equations", {}).items() if d in docnames})


def _notebooks_together(app: Sphinx, env: BuildEnvironment, added: set[str], changed: set[str],
                        removed: set[str]) -> list[str]:
    """When one notebook changes, rewrite them all: a page's equation links depend on the others' anchors."""
    if any(_is_notebook(d) for d in added | changed | removed):
        return sorted(d for d in env.found_docs if _is_notebook(d))
    return []


def _load_captions(app: Sphinx, config: Any) -> None:
    path = Path(app.confdir) / "captions.yml"
    config.dpo_book_captions = yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_config_value("dpo_book_captions", {}, "env")
    # MathJax on every page: the sidebar's chapter titles hold math on pages that have none of their own.
    app.set_html_assets_policy("always")
    app.connect("config-inited", _load_captions)
    app.connect("source-read", _pipes_in_table_math)
    app.add_transform(DisplayMathParagraphs)
    app.add_transform(EquationAnchors)
    app.add_transform(NotebookNotes)
    app.add_transform(FigureCaptions)
    app.add_post_transform(EquationLinks)
    app.connect("env-purge-doc", _purge)
    app.connect("env-merge-info", _merge)
    app.connect("env-get-outdated", _notebooks_together)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "env_version": 1}
