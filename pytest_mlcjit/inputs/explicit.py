"""Explicit inputs: files a factory reads through C code's own ``fopen`` (invisible to the
audit hook), named by the spec (``TVMModel(..., files=["weights/*.npy"])``) and hashed
into the key.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytest_mlcjit.errors import SpecError
from pytest_mlcjit.inputs.check import InputChecker
from pytest_mlcjit.inputs.paths import PathLike, abspath, is_absolute_record, rel


def expand_files(patterns: Sequence[str], module_dir: Path) -> list[Path]:
    """The regular files matched by glob ``patterns``, relative to the factory module's
    directory ``module_dir`` (``**`` matches any number of directories; dot files are not
    matched by wildcards). Sorted absolute paths, each once. A pattern that matches no
    regular file, an absolute pattern or an empty one is a SpecError naming it."""
    if isinstance(patterns, str):
        raise SpecError(
            f"files={patterns!r}: expected a list of glob patterns, for example "
            f"[{patterns!r}]"
        )
    root = Path(abspath(module_dir))
    found: set[str] = set()
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern.strip():
            raise SpecError(
                f"invalid file pattern {pattern!r}: expected a non-empty glob relative to "
                f"the factory module's directory {root}, for example 'weights/*.npy'"
            )
        if is_absolute_record(pattern) or os.path.isabs(pattern):
            raise SpecError(
                f"file pattern {pattern!r} is absolute; patterns are relative to the factory "
                f"module's directory {root}"
            )
        matches = [os.path.normpath(os.path.join(root, m))
                   for m in glob.glob(pattern, root_dir=root, recursive=True)]
        files = [m for m in matches if os.path.isfile(m)]
        if not files:
            what = "only directories" if matches else "nothing"
            raise SpecError(
                f"file pattern {pattern!r} matches {what} in {root} (patterns are relative "
                "to the factory module's directory and must match at least one file; use "
                "'**' for sub-directories, for example 'weights/**/*.npy')"
            )
        found.update(files)
    return sorted(Path(p) for p in found)


def explicit_inputs_digest(
    paths: Sequence[PathLike], base: PathLike, *, checker: InputChecker | None = None
) -> list[dict[str, Any]]:
    """``[{"path", "sha256"}]`` for explicit input files, for the key: paths relative to
    ``base`` (POSIX form, absolute if outside), sorted. Hashes go through ``checker``'s stat
    memo (default: a new checker, which hashes every file). SpecError if a file is
    unreadable.
    """
    checker = checker if checker is not None else InputChecker()
    base_abs = abspath(base)
    out: dict[str, dict[str, Any]] = {}
    for p in paths:
        path = abspath(p)
        try:
            digest, _size = checker.digest(path)
        except OSError as exc:
            raise SpecError(f"cannot read input file {path}: {exc.strerror or exc}") from None
        name = rel(path, base_abs)
        out[name] = {"path": name, "sha256": digest}
    return [out[k] for k in sorted(out)]
