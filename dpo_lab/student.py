"""Student copies of the notebooks: ``notebooks/NAME.py`` -> ``notebooks/student/NAME.ipynb``.

    python -m dpo_lab student            # or: make student

Every function defined in a code cell tagged ``exercise`` keeps its signature and docstring; the rest of
its body becomes ``raise NotImplementedError("Exercise: NAME (tier N)")``. Outputs are dropped; everything
else, the check (grader) cells included, is copied. Only notebooks with an exercise get a copy. How a
solution notebook marks an exercise (each rule is checked, with an error naming the cell)::

    # %% [markdown]
    # ### Exercise · tier 1 · Eq. 5 by hand          <- a markdown cell whose heading says "tier N"
    # %% tags=["exercise", "tier-1"]                  <- "exercise" and one of tier-1, tier-2, tier-3
    def reward_from_policy(policy, pi_ref, beta, log_z):
        \"\"\"The docstring is what the student sees: say what to compute and the shapes.\"\"\"
        return ...                                    # the solution, replaced by the stub
    # %%                                              <- the very next cell calls grade(...)
    grade(reward_from_policy, bd.reparameterised_reward, bandit_cases("optimal_policy", ...))

An exercise cell holds only function definitions (they may call earlier exercises). The notebook code is
parsed with :mod:`ast`, never run.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import jupytext
import nbformat
from nbformat import NotebookNode

TIERS = (1, 2, 3)


class ExerciseError(ValueError):
    """A cell tagged ``exercise`` that breaks one of the marking rules (module docstring)."""


@dataclass(frozen=True)
class Exercise:
    """One exercise cell of a solution notebook, and the grader cell right after it."""

    notebook: str
    cell: int  # index of the exercise cell in the notebook
    tier: int
    functions: tuple[str, ...]  # the functions it defines, in order
    source: str
    grader: str


def _tier(tags: list[str], where: str) -> int:
    tiers = [t for t in tags if re.fullmatch(r"tier-\d+", t)]
    if len(tiers) != 1 or int(tiers[0][5:]) not in TIERS:
        wanted = [f"tier-{t}" for t in TIERS]
        raise ExerciseError(f"{where}: tag it with exactly one of {wanted}, got {tiers}")
    return int(tiers[0][5:])


def _functions(source: str, where: str) -> list[ast.FunctionDef]:
    """The cell's function definitions; anything else in an exercise cell would be lost from the stub."""
    body = ast.parse(source).body
    if not body or not all(isinstance(node, ast.FunctionDef) for node in body):
        raise ExerciseError(f"{where}: an exercise cell may hold only function definitions")
    for node in body:
        code_after_docstring = len(node.body) > 1 and node.body[1].lineno > node.body[0].end_lineno
        if ast.get_docstring(node) is None or not code_after_docstring:
            raise ExerciseError(f"{where}: {node.name} needs a docstring (the student's instructions) "
                                "and, on the lines after it, a body")
    return body


def _calls_grade(source: str) -> bool:
    return any(isinstance(node, ast.Call) and (getattr(node.func, "id", None) == "grade"
                                               or getattr(node.func, "attr", None) == "grade")
               for node in ast.walk(ast.parse(source)))


def exercises(nb: NotebookNode, name: str) -> list[Exercise]:
    """Every exercise of a solution notebook, each checked against the marking rules."""
    found = []
    for i, cell in enumerate(nb.cells):
        tags = cell.metadata.get("tags", [])
        if "exercise" not in tags:
            continue
        where = f"{name}, cell {i}"
        tier = _tier(tags, where)
        if cell.cell_type != "code":
            raise ExerciseError(f"{where}: only a code cell can be an exercise")
        functions = _functions(cell.source, where)
        before = nb.cells[i - 1] if i else None
        heading = before is not None and before.cell_type == "markdown" and any(
            line.startswith("#") and f"tier {tier}" in line.lower() for line in before.source.splitlines())
        if not heading:
            raise ExerciseError(f"{where}: the markdown cell before it needs a heading saying 'tier {tier}'")
        after = nb.cells[i + 1] if i + 1 < len(nb.cells) else None
        if after is None or after.cell_type != "code" or not _calls_grade(after.source):
            raise ExerciseError(f"{where}: the cell right after it must call grade(...) on its functions")
        found.append(Exercise(notebook=name, cell=i, tier=tier, functions=tuple(f.name for f in functions),
                              source=cell.source, grader=after.source))
    return found


def stub(source: str, tier: int) -> str:
    """The cell with each function's body, after its docstring, replaced by a NotImplementedError."""
    lines = source.splitlines()
    # bottom-up, so that splicing one function does not move the line numbers of those above it
    for node in reversed(_functions(source, "stub")):
        # everything after the docstring goes, comments included: they are part of the solution
        keep, indent = node.body[0].end_lineno, " " * node.body[0].col_offset
        raise_line = f'{indent}raise NotImplementedError("Exercise: {node.name} (tier {tier})")'
        lines[keep:node.end_lineno] = [raise_line]
    return "\n".join(lines)


def _banner(source: Path) -> str:
    return (f"> **Student copy** of `notebooks/{source.name}`, generated by `make student`: edit the source "
            "and regenerate, not this file.\n"
            "> Each exercise is a function whose body raises `NotImplementedError`: write it (the docstring "
            "says what to compute) and run the check cell below it, which compares it with the exact answer. "
            "Later cells use your functions, so work from the top.")


def student_notebook(source: Path) -> NotebookNode | None:
    """The student copy of a percent-format notebook source, or None if it has no exercise."""
    nb = jupytext.read(source)
    stubs = {ex.cell: stub(ex.source, ex.tier) for ex in exercises(nb, source.name)}
    if not stubs:
        return None
    cells = []
    for i, cell in enumerate(nb.cells):
        metadata = {"tags": list(cell.metadata["tags"])} if cell.metadata.get("tags") else {}
        if cell.cell_type == "code":
            cells.append(nbformat.v4.new_code_cell(stubs.get(i, cell.source), metadata=metadata))
        elif cell.cell_type == "markdown":
            cells.append(nbformat.v4.new_markdown_cell(cell.source, metadata=metadata))
        else:
            cells.append(nbformat.v4.new_raw_cell(cell.source, metadata=metadata))
    cells.insert(1 if cells[0].cell_type == "markdown" else 0, nbformat.v4.new_markdown_cell(_banner(source)))
    for i, cell in enumerate(cells):
        cell.id = f"cell-{i}"  # fixed ids: regenerating an unchanged notebook changes no byte
    # formats "ipynb": not paired, so opening it with jupytext installed writes no .py next to it
    metadata = {"kernelspec": dict(nb.metadata.get("kernelspec", {})), "jupytext": {"formats": "ipynb"}}
    return nbformat.v4.new_notebook(cells=cells, metadata=metadata)


def write_student_copies(notebooks: Path, out: Path) -> list[Path]:
    """Write the student copy of every ``notebooks/*.py`` with an exercise to ``out``; delete the copies in
    ``out`` whose source no longer has one (they are generated, never edited)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for source in sorted(notebooks.glob("*.py")):
        nb = student_notebook(source)
        if nb is not None:
            path = out / f"{source.stem}.ipynb"
            nbformat.write(nb, path)
            written.append(path)
    for stale in set(out.glob("*.ipynb")) - set(written):
        stale.unlink()
    return written
