"""Every notebook is a jupytext pair whose .py source and .ipynb agree cell for cell."""

from pathlib import Path

import jupytext
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SOURCES = sorted(p for p in NOTEBOOKS.rglob("*.py") if ".ipynb_checkpoints" not in p.parts)


def _cells(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_py_and_ipynb_are_in_sync(source: Path):
    paired = source.with_suffix(".ipynb")
    assert paired.is_file(), f"{source.name} has no paired .ipynb (run `make notebooks`)"
    assert _cells(jupytext.read(source)) == _cells(jupytext.read(paired)), (
        f"{source.name} and {paired.name} differ: run `jupytext --sync {source}`"
    )


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_notebook_has_one_parameters_cell(source: Path):
    nb = jupytext.read(source)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{source.name} needs exactly one cell tagged 'parameters' (papermill)"


def test_every_ipynb_has_a_source():
    for paired in NOTEBOOKS.glob("*.ipynb"):
        assert paired.with_suffix(".py").is_file(), f"{paired.name} has no percent-format .py source"
