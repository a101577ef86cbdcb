"""scripts/package_size.py, which issue #22's closing notes cite: its counts add up to the package's lines."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("package_size", ROOT / "scripts" / "package_size.py")
package_size = importlib.util.module_from_spec(spec)
spec.loader.exec_module(package_size)


def test_the_composition_adds_up_to_every_line_of_the_package():
    files = sorted((ROOT / "dpo_lab").rglob("*.py"))
    counts = package_size.composition({p: ast.parse(p.read_text()) for p in files})
    kinds = ("code", "blank", "docstring", "comment")
    assert sum(counts[k] for k in kinds) == sum(len(p.read_text().splitlines()) for p in files)
    assert 0 < counts["refusal (of code)"] < counts["code"]


def test_a_definition_only_one_entry_reaches_is_counted_for_it_alone(tmp_path: Path):
    source = "def shared():\n    return 1\n\n\ndef only_a():\n    return shared()\n\n\nLIMIT = 3\n"
    module = tmp_path / "module.py"
    module.write_text(source)
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("only_a()\n")
    b.write_text("shared(); LIMIT\n")
    lines = package_size.exclusive_lines({module: ast.parse(source)}, [a, b])
    assert lines == {"a.py": 2, "b.py": 1}  # only_a; LIMIT (shared is reached by both)
