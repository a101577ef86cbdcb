"""Student copies (``make student``): ``notebooks/NAME.py`` -> ``notebooks/student/NAME.ipynb``, each function
of a cell tagged ``exercise`` kept to its signature and docstring, then ``raise NotImplementedError("Exercise:
NAME (tier N)")``; outputs dropped. How a solution notebook marks an exercise (each rule is checked)::

    # %% [markdown]
    # ### Exercise · tier 1 · Eq. 5 by hand          <- a markdown heading that says "tier N"
    # %% tags=["exercise", "tier-1"]                  <- "exercise" and one of tier-1, tier-2, tier-3
    def reward_from_policy(policy, pi_ref, beta, log_z):
        \"\"\"The docstring is what the student sees: say what to compute and the shapes.\"\"\"
        return ...                                    # the solution, replaced by the stub
    # %%                                              <- the very next cell calls grade(...)
    grade(reward_from_policy, bd.reparameterised_reward, bandit_cases("optimal_policy", ...))
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
    """A cell tagged ``exercise`` breaks a marking rule (module docstring)."""


@dataclass(frozen=True)
class Exercise:
    notebook: str
    cell: int  # index of the exercise cell in the notebook
    tier: int
    functions: tuple[str, ...]  # the functions it defines, in order
    source: str
    grader: str  # the source of the grader cell right after it


def _functions(source: str, where: str) -> list[ast.FunctionDef]:
    body = ast.parse(source).body
    if not body or not all(isinstance(node, ast.FunctionDef) for node in body):
        raise ExerciseError(f"{where}: an exercise cell may hold only function definitions")
    for node in body:
        if ast.get_docstring(node) is None or not (len(node.body) > 1
                                                   and node.body[1].lineno > node.body[0].end_lineno):
            raise ExerciseError(f"{where}: {node.name} needs a docstring (the student's instructions) "
                                "and, on the lines after it, a body")
    return body


def exercises(nb: NotebookNode, name: str) -> list[Exercise]:
    found = []
    for i, cell in enumerate(nb.cells):
        tags = cell.metadata.get("tags", [])
        if "exercise" not in tags:
            continue
        where = f"{name}, cell {i}"
        tiers = [t for t in tags if re.fullmatch(r"tier-\d+", t)]
        if len(tiers) != 1 or int(tiers[0][5:]) not in TIERS:
            wanted = [f"tier-{t}" for t in TIERS]
            raise ExerciseError(f"{where}: tag it with exactly one of {wanted}, got {tiers}")
        tier = int(tiers[0][5:])
        if cell.cell_type != "code":
            raise ExerciseError(f"{where}: only a code cell can be an exercise")
        functions = _functions(cell.source, where)
        before = nb.cells[i - 1] if i else None
        heading = before is not None and before.cell_type == "markdown" and any(
            line.startswith("#") and f"tier {tier}" in line.lower() for line in before.source.splitlines())
        if not heading:
            raise ExerciseError(f"{where}: the markdown cell before it needs a heading saying 'tier {tier}'")
        after = nb.cells[i + 1] if i + 1 < len(nb.cells) else None
        if after is None or after.cell_type != "code" or not any(
                isinstance(node, ast.Call) and "grade" in (getattr(node.func, "id", None),
                                                           getattr(node.func, "attr", None))
                for node in ast.walk(ast.parse(after.source))):
            raise ExerciseError(f"{where}: the cell right after it must call grade(...) on its functions")
        found.append(Exercise(notebook=name, cell=i, tier=tier, functions=tuple(f.name for f in functions),
                              source=cell.source, grader=after.source))
    return found


def stub(source: str, tier: int) -> str:
    lines = source.splitlines()
    for node in reversed(_functions(source, "stub")):  # bottom-up: a splice moves no line above it
        raise_line = f'raise NotImplementedError("Exercise: {node.name} (tier {tier})")'
        lines[node.body[0].end_lineno:node.end_lineno] = [" " * node.body[0].col_offset + raise_line]
    return "\n".join(lines)


def student_notebook(source: Path) -> NotebookNode | None:
    nb = jupytext.read(source)
    stubs = {ex.cell: stub(ex.source, ex.tier) for ex in exercises(nb, source.name)}
    if not stubs:
        return None
    cells = []
    for i, cell in enumerate(nb.cells):
        new = {"code": nbformat.v4.new_code_cell, "markdown": nbformat.v4.new_markdown_cell}.get(
            cell.cell_type, nbformat.v4.new_raw_cell)
        tags = cell.metadata.get("tags")
        cells.append(new(stubs.get(i, cell.source), metadata={"tags": list(tags)} if tags else {}))
    banner = (f"> **Student copy** of `notebooks/{source.name}`, generated by `make student`: edit the "
              "source and regenerate, not this file.\n"
              "> Each exercise is a function whose body raises `NotImplementedError`: write it (the "
              "docstring says what to compute; the hints above it open one at a time) and run the check cell "
              "below it, which compares it with the library's answer. Until it passes, the check puts the "
              "library's version in its place, so the cells after it still run.\n"
              "> The prose describes the `cpu` preset (the default); `DPO_LAB_PRESET=smoke` runs in minutes "
              "with other numbers.")
    cells.insert(1 if cells[0].cell_type == "markdown" else 0, nbformat.v4.new_markdown_cell(banner))
    for i, cell in enumerate(cells):
        cell.id = f"cell-{i}"  # fixed ids: regenerating an unchanged notebook changes no byte
    # formats "ipynb": not paired, so opening it with jupytext installed writes no .py next to it
    metadata = {"kernelspec": dict(nb.metadata.get("kernelspec", {})), "jupytext": {"formats": "ipynb"}}
    return nbformat.v4.new_notebook(cells=cells, metadata=metadata)


def write_student_copies(notebooks: Path, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for source in sorted(notebooks.glob("*.py")):
        nb = student_notebook(source)
        if nb is not None:
            written.append(out / f"{source.stem}.ipynb")
            nbformat.write(nb, written[-1])
    for stale in set(out.glob("*.ipynb")) - set(written):
        stale.unlink()
    return written
