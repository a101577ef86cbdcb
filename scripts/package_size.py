"""Where dpo_lab's lines are (issue #22's size target): blank, docstring, comment and code lines; the lines
of refusals (a ``raise`` with its guard, or an ``except`` that re-raises with a message); and, per entry point
(a notebook, a script, a benchmark, the CLI), the lines of top-level definitions that only it reaches through
the package's own references, which is what dropping that entry point would free.

    python scripts/package_size.py
"""

from __future__ import annotations

import ast
import collections
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORD = re.compile(r"\b[A-Za-z_]\w*\b")


def composition(trees: dict[Path, ast.Module]) -> dict[str, int]:
    counts = collections.Counter()
    for path, tree in trees.items():
        owners = (ast.Module, ast.ClassDef, ast.FunctionDef)
        docs = {line for node in ast.walk(tree)
                if isinstance(node, owners) and ast.get_docstring(node, clean=False) is not None
                for line in range(node.body[0].lineno, node.body[0].end_lineno + 1)}
        refusals = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and not node.orelse and [type(s) for s in node.body] == [ast.Raise]:
                refusals.update(range(node.lineno, node.end_lineno + 1))
            elif isinstance(node, ast.Raise) and node.exc is not None:
                refusals.update(range(node.lineno, node.end_lineno + 1))
        for number, line in enumerate(path.read_text().splitlines(), 1):
            kind = ("docstring" if number in docs else "blank" if not line.strip()
                    else "comment" if line.strip().startswith("#") else "code")
            counts[kind] += 1
            counts["refusal (of code)"] += kind == "code" and number in refusals
    return counts


def exclusive_lines(trees: dict[Path, ast.Module], entries: list[Path] | None = None) -> dict[str, int]:
    defs: dict[tuple[str, str], tuple[int, set[str]]] = {}
    for path, tree in trees.items():
        text = path.read_text()
        for node in tree.body:
            names = ([node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else
                     [t.id for t in getattr(node, "targets", [getattr(node, "target", None)])
                      if isinstance(t, ast.Name)] if isinstance(node, (ast.Assign, ast.AnnAssign)) else [])
            for name in names:
                source = ast.get_source_segment(text, node) or ""
                defs[(str(path), name)] = (node.end_lineno - node.lineno + 1, set(WORD.findall(source)))
    by_name = collections.defaultdict(list)
    for key in defs:
        by_name[key[1]].append(key)

    def reach(words: set[str]) -> set[tuple[str, str]]:
        seen, stack = set(), [k for w in words for k in by_name.get(w, [])]
        while stack:
            key = stack.pop()
            if key not in seen:
                seen.add(key)
                stack += [k for w in defs[key][1] - {key[1]} for k in by_name.get(w, [])]
        return seen

    found = [*(ROOT / "notebooks").glob("**/*.py"), *(ROOT / "scripts").glob("*.py"),
             *(ROOT / "benchmarks").glob("*.py"), ROOT / "dpo_lab" / "__main__.py"]
    entries = entries or sorted(e for e in found if "student" not in e.parts)
    reached = {e.name if not e.is_relative_to(ROOT) else str(e.relative_to(ROOT)):
               reach(set(WORD.findall(e.read_text()))) for e in entries}
    users = collections.Counter(key for keys in reached.values() for key in keys)
    return {entry: sum(defs[k][0] for k in keys if users[k] == 1) for entry, keys in reached.items()}


def main() -> None:
    trees = {p: ast.parse(p.read_text()) for p in sorted((ROOT / "dpo_lab").rglob("*.py"))}
    counts = composition(trees)
    total = sum(v for k, v in counts.items() if not k.startswith("refusal"))
    print(f"dpo_lab: {total:,} lines in {len(trees)} files")
    for kind, n in counts.most_common():
        print(f"  {kind:18} {n:6,}")
    print("lines that only one entry point reaches (what dropping it would free):")
    for entry, n in sorted(exclusive_lines(trees).items(), key=lambda kv: -kv[1]):
        if n:
            print(f"  {n:5} {entry}")


if __name__ == "__main__":
    main()
