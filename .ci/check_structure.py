"""CI's check of the package's shape: no module over MAX_LINES lines, and no import cycle
between its modules, function-level imports included (imports only for type checking,
under ``if TYPE_CHECKING:``, run nothing and are left out).

    python .ci/check_structure.py [PACKAGE_DIR]

Exit status 1, with each module too long and each cycle (its modules, and the line of
each import that closes it), when the shape is broken; 0 otherwise. Only the standard
library is used. The layers themselves are import-linter's contracts (pyproject.toml).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_LINES = 500


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(tree: ast.Module, name: str, is_package: bool) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import in ``tree`` that runs (module level or
    inside a function), relative imports resolved."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join([*package, base] if base else package)
            found.append((base, node.lineno))
            found.extend((f"{base}.{alias.name}", node.lineno) for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def graph(root: Path) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """The import graph of the package's modules (edges: imported module → line) and the
    length of each module in lines."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    edges: dict[str, dict[str, int]] = {}
    lengths: dict[str, int] = {}
    for name, path in files.items():
        text = path.read_text(encoding="utf-8")
        lengths[name] = len(text.splitlines())
        tree = ast.parse(text, filename=str(path))
        targets: dict[str, int] = {}
        for module, line in imports(tree, name, path.name == "__init__.py"):
            if module in files and module != name:
                targets.setdefault(module, line)
        edges[name] = targets
    return edges, lengths


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def connect(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for succ in edges.get(node, {}):
            if succ not in index:
                connect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in sorted(edges):
        if node not in index:
            connect(node)
    return found


def main(argv: list[str]) -> int:
    root = Path(argv[0] if argv else Path(__file__).resolve().parents[1] / "pytest_mlcjit")
    edges, lengths = graph(root)
    problems = [f"{name}: {n} lines, more than {MAX_LINES} (split it by concern)"
                for name, n in sorted(lengths.items()) if n > MAX_LINES]
    for component in cycles(edges):
        members = set(component)
        ties = [f"    {a} -> {b} (line {line})" for a in component
                for b, line in sorted(edges[a].items()) if b in members]
        problems.append("import cycle between " + ", ".join(component) + ":\n"
                        + "\n".join(ties))
    for problem in problems:
        print(f"check_structure: {problem}")
    if not problems:
        print(f"check_structure: {len(lengths)} modules, none over {MAX_LINES} lines, "
              "no import cycle")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
