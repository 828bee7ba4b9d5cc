"""Local modules compiled from their source in the compile child, never from a ``.pyc``.

Python trusts a ``__pycache__`` entry whose recorded source mtime and size match the
source's: a helper edited to the same size within the same mtime second, or restored with
its old mtime, is imported from its old bytecode, while the recorder hashes the new source.
:func:`fresh_local_sources` puts a finder first on ``sys.meta_path`` that gives each local
module (see :func:`.paths.classify`) a loader that compiles the source it reads (the very
bytes the recorder sees through the ``open`` audit event) and writes no bytecode; installed
and stdlib modules keep their ``.pyc``. Only the standard library and :mod:`.paths`.

Not covered: a module the factory loads itself, bypassing ``sys.meta_path``
(``importlib.util.spec_from_file_location(...).loader.exec_module``), keeps Python's
``.pyc`` rules.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import sys
from collections.abc import Iterator, Sequence
from types import CodeType, ModuleType
from typing import Any

from pytest_mlcjit.inputs.hooks import quiet
from pytest_mlcjit.inputs.paths import PathLike, abspath, classify


class SourceLoader(importlib.machinery.SourceFileLoader):
    """Compiles the source every time; reads and writes no bytecode."""

    def get_code(self, fullname: str) -> CodeType:
        path = self.get_filename(fullname)
        code: CodeType = self.source_to_code(self.get_data(path), path)
        return code


class LocalSourceFinder:
    """A meta-path finder that asks the others, then swaps the loader of a local module."""

    def __init__(self, base: PathLike) -> None:
        self.base = abspath(base)

    def find_spec(self, name: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> Any:
        for finder in tuple(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if type(loader) is importlib.machinery.SourceFileLoader and spec.origin:
            with quiet():  # judging where it lives is no input of the factory
                local = classify(abspath(spec.origin), self.base) == "local"
            if local:
                spec.loader = SourceLoader(loader.name, loader.path)
        return spec

    def invalidate_caches(self) -> None:
        return None


@contextlib.contextmanager
def fresh_local_sources(base: PathLike) -> Iterator[LocalSourceFinder]:
    """Install (first on ``sys.meta_path``) the finder that compiles local modules from
    source, for the block (the factory's import and call in the compile child): removed
    after it, so that what runs later (``tvm.compile``) imports as usual."""
    finder = LocalSourceFinder(base)
    sys.meta_path.insert(0, finder)
    try:
        yield finder
    finally:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(finder)
