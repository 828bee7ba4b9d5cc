"""Finding a factory's local modules without running it: the import root of a module, and
the closure of its local imports (read with ``ast``, not run), for a CI cache key.

Only the standard library is imported here.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, cast

from pytest_mlcjit.errors import SpecError
from pytest_mlcjit.inputs.paths import PathLike, abspath, classify, real_dir

if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec


def _find_spec(name: str, memo: dict[str, ModuleSpec | None]) -> ModuleSpec | None:
    """The spec of ``name`` from the meta-path finders, without importing it or its parents
    (a parent's search locations come from its own spec). None if not found."""
    if name in memo:
        return memo[name]
    memo[name] = None  # guards against a finder that recurses
    parent, _, _ = name.rpartition(".")
    search: list[str] | None = None
    if parent:
        parent_spec = _find_spec(parent, memo)
        if parent_spec is None or parent_spec.submodule_search_locations is None:
            return None
        search = list(parent_spec.submodule_search_locations)
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        try:
            spec = find(name, search)
        except Exception:  # noqa: S112 - a broken third-party finder is skipped
            continue
        if spec is not None:
            memo[name] = spec
            return cast("ModuleSpec", spec)
    return None


def import_root(module_name: str, origin_path: PathLike | None = None) -> Path:
    """The ``sys.path`` directory D that ``module_name`` is imported from: its origin is
    ``D/a/b/c.py`` (or another suffix) or ``D/a/b/c/__init__.py`` for ``a.b.c``.

    Without ``origin_path`` the module is located with the import system's finders, without
    importing it or its parents. SpecError if it cannot be found or does not lie where its
    name says.
    """
    parts = module_name.split(".")
    if not all(p.isidentifier() for p in parts):
        raise SpecError(f"invalid module name {module_name!r}: expected 'package.module'")
    if origin_path is None:
        spec = _find_spec(module_name, {})
        origin = spec.origin if spec is not None else None
        if not origin or not os.path.isfile(origin):
            raise SpecError(
                f"cannot find module {module_name!r} on sys.path; is it a module beside the "
                "test file, or an installed package?"
            )
        origin_path = origin
    origin_abs = Path(abspath(origin_path))
    mismatch = SpecError(
        f"module {module_name!r} was found at {origin_abs}, which is not "
        f"<sys.path dir>/{'/'.join(parts)}.py or <sys.path dir>/{'/'.join(parts)}/__init__.py; "
        "a module loaded by a custom importer cannot be a factory's import root"
    )
    stem = origin_abs.name.split(".", 1)[0]
    if stem == "__init__":
        expected = parts
    elif stem == parts[-1]:
        expected = parts[:-1]
    else:
        raise mismatch
    directory = origin_abs.parent
    for part in reversed(expected):
        if directory.name != part:
            raise mismatch
        directory = directory.parent
    return directory


def _imported_names(tree: ast.Module, module_name: str, is_package: bool) -> list[str]:
    """Every module name an import statement anywhere in ``tree`` may load (each parent
    package too, and ``x.y`` for ``from x import y`` in case ``y`` is a submodule)."""
    package = module_name if is_package else module_name.rpartition(".")[0]
    names: list[str] = []

    def with_parents(dotted: str) -> None:
        pieces = dotted.split(".")
        names.extend(".".join(pieces[:i]) for i in range(1, len(pieces) + 1))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                with_parents(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pieces = package.split(".") if package else []
                if node.level - 1 > len(pieces) or (node.level - 1 == len(pieces)
                                                     and not node.module):
                    continue  # beyond the top-level package: an ImportError at run time
                pieces = pieces[:len(pieces) - (node.level - 1)]
                if node.module:
                    pieces.append(node.module)
                if not pieces:
                    continue
                source = ".".join(pieces)
            elif node.module:
                source = node.module
            else:
                continue
            with_parents(source)
            names.extend(f"{source}.{a.name}" for a in node.names if a.name != "*")
    return names


def local_import_closure(module_name: str) -> list[Path]:
    """The local source files ``module_name`` may load: itself, its parent packages, and
    every local module reachable through its ``import`` statements, transitively.

    Found by reading the source (``ast``), not by running it: only the module's parent
    packages are imported (by :func:`importlib.util.find_spec`, as for a spec's source
    digest). Imports anywhere count (in functions too, or under ``if``); relative imports
    are resolved against the module's package; an import that cannot be resolved to a file
    is skipped. "Local" is :func:`is_local_path`. Sorted absolute paths. SpecError if the
    module itself cannot be found.
    """
    try:
        root_spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError) as exc:
        raise SpecError(f"cannot find module {module_name!r}: {type(exc).__name__}: {exc}") \
            from None
    if root_spec is None or not root_spec.origin or not os.path.isfile(root_spec.origin):
        raise SpecError(
            f"cannot find module {module_name!r} on sys.path; is it a module beside the test "
            "file, or an installed package?"
        )
    base = str(import_root(module_name, root_spec.origin))
    real_dir.cache_clear()
    memo: dict[str, ModuleSpec | None] = {module_name: root_spec}
    found: dict[str, None] = {}
    queue: list[str] = [module_name]
    pieces = module_name.split(".")
    queue.extend(".".join(pieces[:i]) for i in range(1, len(pieces)))
    seen: set[str] = set()
    while queue:
        name = queue.pop()
        if name in seen:
            continue
        seen.add(name)
        spec = _find_spec(name, memo)
        if spec is None:
            continue
        is_package = spec.submodule_search_locations is not None
        origin = spec.origin
        if not origin or not os.path.isfile(origin):
            continue  # built-in, frozen or a namespace package
        path = abspath(origin)
        if classify(path, base) != "local":
            continue
        found[path] = None
        if not path.endswith(".py"):
            continue  # an extension module: nothing to read
        queue.extend(n for n in _parse_imports(path, name, is_package) if n not in seen)
    return sorted(Path(p) for p in found)


def _parse_imports(path: str, module_name: str, is_package: bool) -> list[str]:

    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, ValueError):
        return []
    return _imported_names(tree, module_name, is_package)
