"""Recorded inputs: what a factory really used, and cheap checks that it is unchanged.

This is ccache's *direct mode* for Python factories. The compile child wraps ``import
factory module`` and ``factory(**config)`` in an :class:`InputRecorder`, which notes

* every local module imported in between (path and SHA-256; stdlib and installed
  distributions are not local, an editable install is),
* the distribution (and its version) of every installed module imported in between,
* every regular file opened for reading in between (``open``, ``numpy.load``, ``os.open``
  ... all go through the ``open`` audit event), except files of the stdlib and of installed
  distributions, files the recording process itself created or overwrote, and the
  directories it was told to ignore (the cache root and the staging directory).

The result is a small JSON dict (see :meth:`InputRecorder.result`). A later lookup, in
another process, asks an :class:`InputChecker` what :func:`changes` since; the checker
stats each recorded file and hashes it only when its stat is not already known to match,
so checking an unchanged entry costs one ``stat`` per file. :func:`inputs_digest` names a
recorded state: the same input state always gives the same digest.

Files read by C code through its own ``fopen`` are invisible to the audit hook: name them
explicitly (``TVMModel(..., files=["weights/*.npy"])``, expanded by :func:`expand_files`).
:func:`local_import_closure` finds the local modules a factory imports without running it,
for a CI cache key.

Only the standard library is imported here, and the heavy parts (``ast``,
``importlib.metadata``) only when used.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import importlib.util
import os
import site
import stat
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, cast

from pytest_mlcjit.errors import SpecError
from pytest_mlcjit.key import file_sha256, sha256_digest

if TYPE_CHECKING:
    import ast
    from importlib.machinery import ModuleSpec

__all__ = [
    "RACY_WINDOW_NS",
    "Change",
    "InputChecker",
    "InputRecorder",
    "changes_since",
    "expand_files",
    "explicit_inputs_digest",
    "file_entry",
    "import_root",
    "inputs_digest",
    "is_local_path",
    "local_import_closure",
    "shared_checker",
]

#: A file whose mtime or ctime is this recent when it is hashed may still change within the
#: same timestamp tick without its stat changing (coarse file-system clocks: 1 to 2 s on some
#: network and FAT file systems, a few ms on ext4), so its stat is not trusted later: it is
#: hashed again next time (ccache's and git's "racy" rule).
RACY_WINDOW_NS = 2_000_000_000

PathLike = str | os.PathLike[str]
ChangeKind = Literal["module", "file", "dist"]

_PSEUDO_FS = ("/proc", "/sys", "/dev")
_SITE_DIR_NAMES = frozenset({"site-packages", "dist-packages"})


# --------------------------------------------------------------------------------------------
# Paths: local or not, relative or not


def _abspath(path: PathLike) -> str:
    return os.path.normpath(os.path.abspath(os.fspath(path)))


def _under(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or inside it (both absolute and normalized)."""
    path, root = os.path.normcase(path), os.path.normcase(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _under_any(path: str, roots: Sequence[str]) -> bool:
    return any(_under(path, root) for root in roots)


def _both_forms(paths: Sequence[PathLike]) -> tuple[str, ...]:
    """Each path as given (absolute, normalized) and with its symlinks resolved."""
    out: dict[str, None] = {}
    for p in paths:
        out[_abspath(p)] = None
        out[os.path.realpath(p)] = None
    return tuple(out)


@functools.lru_cache(maxsize=1)
def _system_dirs() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(stdlib dirs, installed-distribution dirs, interpreter prefixes), symlinks resolved."""
    paths = sysconfig.get_paths()
    stdlib = [paths["stdlib"], paths["platstdlib"], os.path.dirname(os.__file__)]
    installed = [paths["purelib"], paths["platlib"]]
    with contextlib.suppress(Exception):
        installed.extend(site.getsitepackages())
    with contextlib.suppress(Exception):
        installed.append(site.getusersitepackages())
    prefixes = [p for p in {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
                if os.path.dirname(os.path.realpath(p)) != os.path.realpath(p)]  # never "/"
    return (tuple(os.path.realpath(p) for p in stdlib),
            tuple(os.path.realpath(p) for p in installed),
            tuple(os.path.realpath(p) for p in prefixes))


@functools.lru_cache(maxsize=4096)
def _real_dir(directory: str) -> str:
    return os.path.realpath(directory)


def _realpath(path: str) -> str:
    """``os.path.realpath``, with each directory resolved once per recording (a file that
    is itself a symlink is resolved in full)."""
    if os.path.islink(path):
        return os.path.realpath(path)
    directory, name = os.path.split(path)
    return os.path.join(_real_dir(directory), name)


def _classify(path: str, base: str | None) -> Literal["local", "stdlib", "installed"]:
    """Where a file lives, judged by its real path (so a symlinked editable install is local).

    ``stdlib``: the standard library. ``installed``: a site-packages (or dist-packages) dir,
    or anywhere under the interpreter's prefixes, unless it is under ``base`` (a project in
    ``/usr/src/app`` with Python in ``/usr`` stays local) and not in a prefix inside ``base``
    (the project's own ``.venv`` is not local). Everything else is ``local``.
    """
    real = _realpath(path)
    stdlib, installed, prefixes = _system_dirs()
    parts = real.split(os.sep)
    if _SITE_DIR_NAMES.intersection(parts) or _under_any(real, installed):
        return "installed"
    if _under_any(real, stdlib):
        return "stdlib"
    in_prefixes = [p for p in prefixes if _under(real, p)]
    if base is not None:
        real_base = _real_dir(base)
        if _under(real, real_base) or _under(path, base):
            # local, unless an interpreter prefix inside the project holds it (a .venv)
            inner = [p for p in in_prefixes if _under(p, real_base) and p != real_base]
            return "installed" if inner else "local"
    return "installed" if in_prefixes else "local"


def is_local_path(path: PathLike, base: PathLike | None = None) -> bool:
    """Whether a file is the user's own: not in the stdlib, not in an installed distribution
    (a site-packages dir or the interpreter's prefix; files under ``base`` always count as
    local). An editable install counts as local: its files live in the project."""
    return _classify(_abspath(path), None if base is None else _abspath(base)) == "local"


def _rel(path: str, base: str) -> str:
    """``path`` relative to ``base`` in POSIX form, or absolute (POSIX form) if outside."""
    if _under(path, base):
        return Path(os.path.relpath(path, base)).as_posix()
    return Path(path).as_posix()


def _is_absolute_record(path: str) -> bool:
    return path.startswith("/") or PureWindowsPath(path).is_absolute()


def _resolve(path: str, base: str) -> str:
    """A recorded path made absolute (relative ones against ``base``), normalized."""
    if _is_absolute_record(path):
        return os.path.normpath(path)
    return os.path.normpath(os.path.join(base, path))


# --------------------------------------------------------------------------------------------
# Recording, in the compile child


_TLS = threading.local()
_ACTIVE: list[InputRecorder] = []
_HOOK_LOCK = threading.Lock()
_hook_installed = False
_O_ACCMODE = getattr(os, "O_ACCMODE", 3)
_O_PRODUCES = os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _intent(mode: object, flags: object) -> tuple[bool, bool]:
    """(reads, produces) for an ``open`` audit event's mode and flags.

    "Produces" means the opener creates, truncates or appends: what it later reads back is
    its own output, not an input.
    """
    if isinstance(mode, str):
        return ("r" in mode or "+" in mode), any(c in mode for c in "wxa")
    if isinstance(flags, int):
        access = flags & _O_ACCMODE
        reads = access in (os.O_RDONLY, os.O_RDWR)
        return reads, access == os.O_WRONLY or bool(flags & _O_PRODUCES)
    return True, False


def _audit_hook(event: str, args: tuple[Any, ...]) -> None:
    """The one process-wide hook (hooks cannot be removed): a no-op unless a recorder is
    active, never raises, and ignores the opens made by itself or by ``result()``."""
    if event != "open" or not _ACTIVE:
        return
    with contextlib.suppress(Exception):
        if getattr(_TLS, "busy", False):
            return
        _TLS.busy = True
        try:
            target = args[0]
            if isinstance(target, int) or target is None:
                return  # an already open file descriptor
            path = os.fsdecode(os.fspath(target))
            if not os.path.isabs(path):
                path = os.path.join(os.getcwd(), path)
            path = os.path.normpath(path)
            reads, produces = _intent(args[1] if len(args) > 1 else None,
                                      args[2] if len(args) > 2 else None)
            for recorder in tuple(_ACTIVE):
                recorder._note(path, reads, produces)
        finally:
            _TLS.busy = False


def _install_hook() -> None:
    global _hook_installed  # noqa: PLW0603 - one hook per process, installed on first use
    with _HOOK_LOCK:
        if not _hook_installed:
            sys.addaudithook(_audit_hook)
            _hook_installed = True


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Opens made by this thread inside the block are not recorded."""
    previous = getattr(_TLS, "busy", False)
    _TLS.busy = True
    try:
        yield
    finally:
        _TLS.busy = previous


def _stat_hints(before: os.stat_result, after: os.stat_result) -> dict[str, int]:
    """mtime/ctime to store beside a digest, if the file was stable while hashed and old
    enough that a later change must change its stat (see :data:`RACY_WINDOW_NS`)."""
    if _signature(before) != _signature(after):
        return {}
    if time.time_ns() - max(after.st_mtime_ns, after.st_ctime_ns) <= RACY_WINDOW_NS:
        return {}
    return {"mtime_ns": after.st_mtime_ns, "ctime_ns": after.st_ctime_ns}


def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _hashed_entry(path: str, base: str, *, hints: bool) -> dict[str, Any] | None:
    """{"path", "sha256", "size"} (plus stat hints), or None if not a readable regular file."""
    try:
        before = os.stat(path)
        if not stat.S_ISREG(before.st_mode):
            return None
        digest = file_sha256(path)
        after = os.stat(path)
    except OSError:
        return None
    entry: dict[str, Any] = {"path": _rel(path, base), "sha256": digest, "size": after.st_size}
    if hints:
        entry.update(_stat_hints(before, after))
    return entry


def file_entry(path: PathLike, base: PathLike, *, hints: bool = True) -> dict[str, Any]:
    """The recorded form of one file: ``{"path", "sha256", "size"}``, the path relative to
    ``base`` (POSIX form) or absolute if outside it. With ``hints``, ``mtime_ns`` and
    ``ctime_ns`` are added when the file is old enough to trust them: a checker in another
    process then skips hashing while the file's stat still matches. OSError if unreadable."""
    abspath = _abspath(path)
    entry = _hashed_entry(abspath, _abspath(base), hints=hints)
    if entry is None:
        raise FileNotFoundError(f"not a readable regular file: {abspath}")
    return entry


@functools.lru_cache(maxsize=1)
def _packages_distributions() -> Mapping[str, list[str]]:
    import importlib.metadata

    return importlib.metadata.packages_distributions()


@functools.lru_cache(maxsize=1024)
def _dist_versions_for(top_level: str) -> dict[str, str]:
    import importlib.metadata

    found: dict[str, str] = {}
    for name in _packages_distributions().get(top_level, ()):
        with contextlib.suppress(Exception):
            found[name] = importlib.metadata.version(name)
    return found


def _top_level_of_installed_file(path: str) -> str | None:
    """The importable top-level name a file inside a site-packages dir belongs to."""
    parts = Path(_realpath(path)).parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] in _SITE_DIR_NAMES:
            first = parts[i + 1]
            if first.endswith((".dist-info", ".egg-info", ".pth")) or first == "__pycache__":
                return None
            return first.split(".", 1)[0]
    return None


class InputRecorder:
    """Records what a factory really used, while active; see :meth:`result`.

    Use it in the compile child, around importing the factory module and calling the
    factory, and as early as possible (a module imported before the recorder starts is not
    new, so it is not recorded)::

        recorder = InputRecorder.for_module("models.mlp", exclude=[cache_root, staging])
        with recorder:
            build = getattr(importlib.import_module("models.mlp"), "build")
            mod = build(**config)
        recorded = recorder.result()

    ``base`` is the ``sys.path`` directory the factory module is imported from (see
    :func:`import_root`); recorded paths are relative to it, so an entry stays valid when
    the project is checked out elsewhere. ``roots`` are module names always recorded as
    local modules, even if imported before (the factory module). ``exclude`` names
    directories whose files are never recorded (the cache root, the staging directory).

    Temporary files (``exclude_temp``, default False): a file under
    :func:`tempfile.gettempdir` is recorded like any other. A factory that reads a data file
    a test generated in ``tmp_path`` has really used it, and silently leaving it out could
    give a stale hit, the one failure a cache must never have; recording too much costs at
    worst a recompile. The temp files that must *not* be recorded are scratch files, and
    those are left out by rule, wherever they live: a file the recording process itself
    created, truncated or appended to (before reading it) while recording is its own
    output, and a file gone by
    the time :meth:`result` runs cannot be checked later. The recorder's own staging
    directory belongs in ``exclude``. Pass ``exclude_temp=True`` to ignore the temp
    directory altogether (for factories that read scratch files other processes write
    there); it applies to data files, not to imported modules.

    The ``open`` audit hook is installed once per process and is a no-op while no recorder
    is active; it never raises into the code it observes. Opens from every thread count.
    """

    def __init__(
        self,
        base: PathLike,
        *,
        roots: Sequence[str] = (),
        exclude: Sequence[PathLike] = (),
        exclude_temp: bool = False,
    ) -> None:
        self.base = Path(_abspath(base))
        self.roots = tuple(roots)
        self.exclude_temp = exclude_temp
        self._exclude = _both_forms(list(exclude))
        self._temp = _both_forms([tempfile.gettempdir()]) if exclude_temp else ()
        self._reads: dict[str, None] = {}
        self._produced: set[str] = set()
        self._before: dict[str, Any] | None = None
        self._new_modules: dict[str, str] | None = None
        self._active = False

    @classmethod
    def for_module(
        cls,
        module_name: str,
        *,
        exclude: Sequence[PathLike] = (),
        exclude_temp: bool = False,
    ) -> InputRecorder:
        """A recorder for factory module ``module_name``: its import root (found without
        importing anything) is the base and the module is a root. SpecError if not found."""
        return cls(import_root(module_name), roots=[module_name], exclude=exclude,
                   exclude_temp=exclude_temp)

    # -- recording ---------------------------------------------------------------------------

    def __enter__(self) -> InputRecorder:
        if self._before is not None:
            raise RuntimeError("an InputRecorder records once; create a new one")
        _install_hook()
        self._before = sys.modules.copy()  # references: an alias of an old module is not new
        self._active = True
        _ACTIVE.append(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()

    def _stop(self) -> None:
        if not self._active:
            return
        self._active = False
        with contextlib.suppress(ValueError):
            _ACTIVE.remove(self)
        self._new_modules = self._module_files(self._new_names())

    def _note(self, path: str, reads: bool, produces: bool) -> None:
        """Called by the hook for every open while active: as cheap as possible.

        A file first opened to be created, truncated or appended to is an output (even if
        read back later); a file first opened for reading is an input (even if rewritten
        later: an outside edit must still be noticed)."""
        if path in self._reads or path in self._produced:
            return
        if produces:
            self._produced.add(path)
        elif reads:
            self._reads[path] = None

    def _new_names(self) -> set[str]:
        """Modules imported while recording; a new name for an old module object (such as
        multiprocessing's ``__mp_main__`` for ``__main__``) is not new."""
        before = self._before or {}
        old_ids = {id(m) for m in before.values()}
        return {name for name, module in sys.modules.copy().items()
                if name not in before and id(module) not in old_ids}

    @staticmethod
    def _module_files(names: set[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        modules = sys.modules.copy()
        for name in sorted(names):
            file = getattr(modules.get(name), "__file__", None)
            if isinstance(file, str) and file:
                found[name] = _abspath(file)
        return found

    # -- the result --------------------------------------------------------------------------

    def result(self) -> dict[str, Any]:
        """What was used, as JSON-able data::

            {"roots": ["models.mlp"],
             "modules": [{"path": "models/mlp.py", "sha256": "…", "size": 1234}, …],
             "files": [{"path": "data/w.npy", "sha256": "…", "size": 4096}, …],
             "dists": {"numpy": "2.1.0"}}

        Paths are POSIX, relative to ``base``, or absolute (leading ``/`` or a drive) when
        outside it; lists are sorted by path. An entry may also hold ``mtime_ns`` and
        ``ctime_ns`` (stat hints, see :func:`file_entry`); they are not part of
        :func:`inputs_digest`. Files are hashed here, not while recording.
        """
        with _quiet():
            _real_dir.cache_clear()
            if self._active and self._new_modules is None:
                new_modules = self._module_files(self._new_names())
            else:
                new_modules = dict(self._new_modules or {})
            new_modules.update(self._module_files(set(self.roots)))
            return self._build(new_modules)

    def _excluded(self, path: str, *, data: bool = False) -> bool:
        dirs = self._exclude + self._temp if data else self._exclude
        if not dirs:
            return False
        return _under_any(path, dirs) or _under_any(_realpath(path), dirs)

    def _build(self, new_modules: dict[str, str]) -> dict[str, Any]:
        base = str(self.base)
        modules: dict[str, dict[str, Any]] = {}
        dists: dict[str, str] = {}
        module_paths = set(new_modules.values())
        for name, path in sorted(new_modules.items()):
            if self._excluded(path):
                continue
            where = _classify(path, base)
            if where == "local":
                entry = _hashed_entry(path, base, hints=True)
                if entry is not None:
                    modules[entry["path"]] = entry
            elif where == "installed":
                dists.update(_dist_versions_for(name.split(".", 1)[0]))
        files: dict[str, dict[str, Any]] = {}
        for path in list(self._reads):
            if (path in module_paths
                    or _under_any(path, _PSEUDO_FS) or self._excluded(path, data=True)):
                continue
            if os.path.basename(os.path.dirname(path)) == "__pycache__" and path.endswith(".pyc"):
                continue
            where = _classify(path, base)
            if where == "installed":
                top = _top_level_of_installed_file(path)
                if top:
                    dists.update(_dist_versions_for(top))
                continue
            if where == "local":
                entry = _hashed_entry(path, base, hints=True)
                if entry is not None:
                    files[entry["path"]] = entry
        return {
            "roots": list(self.roots),
            "modules": [modules[p] for p in sorted(modules)],
            "files": [files[p] for p in sorted(files)],
            "dists": dict(sorted(dists.items())),
        }


# --------------------------------------------------------------------------------------------
# Finding modules without running them


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
    origin_abs = Path(_abspath(origin_path))
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
    import ast

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
    _real_dir.cache_clear()
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
        path = _abspath(origin)
        if _classify(path, base) != "local":
            continue
        found[path] = None
        if not path.endswith(".py"):
            continue  # an extension module: nothing to read
        queue.extend(n for n in _parse_imports(path, name, is_package) if n not in seen)
    return sorted(Path(p) for p in found)


def _parse_imports(path: str, module_name: str, is_package: bool) -> list[str]:
    import ast

    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, ValueError):
        return []
    return _imported_names(tree, module_name, is_package)


# --------------------------------------------------------------------------------------------
# Explicit inputs


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
    root = Path(_abspath(module_dir))
    found: set[str] = set()
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern.strip():
            raise SpecError(
                f"invalid file pattern {pattern!r}: expected a non-empty glob relative to "
                f"the factory module's directory {root}, for example 'weights/*.npy'"
            )
        if _is_absolute_record(pattern) or os.path.isabs(pattern):
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
    memo (default: the process's :func:`shared_checker`). SpecError if a file is unreadable.
    """
    checker = checker if checker is not None else shared_checker()
    base_abs = _abspath(base)
    out: dict[str, dict[str, Any]] = {}
    for p in paths:
        path = _abspath(p)
        try:
            digest, _size = checker.digest(path)
        except OSError as exc:
            raise SpecError(f"cannot read input file {path}: {exc.strerror or exc}") from None
        rel = _rel(path, base_abs)
        out[rel] = {"path": rel, "sha256": digest}
    return [out[k] for k in sorted(out)]


# --------------------------------------------------------------------------------------------
# Checking, in the parent


@dataclass(frozen=True)
class Change:
    """One recorded input that no longer matches.

    ``kind`` is ``module``, ``file`` or ``dist``; ``name`` the recorded path (modules and
    files) or distribution name. ``old`` is the recorded SHA-256 or version; ``new`` the
    current one, or None for a file that no longer exists (or whose size changed, then
    ``old_size``/``new_size`` say how: it was not hashed), ``"unreadable"`` for a file that
    cannot be read, ``"missing"`` for a distribution no longer installed.
    """

    kind: ChangeKind
    name: str
    old: str | None
    new: str | None
    old_size: int | None = None
    new_size: int | None = None

    def __str__(self) -> str:
        if self.kind == "dist":
            if self.new == "missing":
                return f"distribution {self.name} {self.old} is no longer installed"
            return f"distribution {self.name} {self.old} → {self.new}"
        if self.new is None and self.new_size is None:
            return f"{self.kind} {self.name} no longer exists"
        if self.new == "unreadable":
            return f"{self.kind} {self.name} cannot be read"
        if self.new is None:
            return f"{self.name}: size {self.old_size} → {self.new_size} bytes"
        return f"{self.name}: sha256 {(self.old or '')[:8]}… → {self.new[:8]}…"


def _normalize_dist(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def _validated(recorded: Mapping[str, Any]) -> tuple[list[dict[str, Any]],
                                                      list[dict[str, Any]], dict[str, str]]:
    """(modules, files, dists) of a recorded dict; ValueError naming what is malformed."""
    if not isinstance(recorded, Mapping):
        raise ValueError(f"recorded inputs must be a dict, not {type(recorded).__name__}")
    lists: list[list[dict[str, Any]]] = []
    for key in ("modules", "files"):
        entries = recorded.get(key)
        if not isinstance(entries, list):
            raise ValueError(f"recorded inputs: {key!r} must be a list, got {entries!r:.80}")
        for e in entries:
            if not (isinstance(e, dict) and isinstance(e.get("path"), str) and e["path"]
                    and isinstance(e.get("sha256"), str) and len(e["sha256"]) == 64
                    and isinstance(e.get("size"), int) and not isinstance(e["size"], bool)):
                raise ValueError(
                    f"recorded inputs: bad {key} entry {e!r:.120}; expected "
                    '{"path": str, "sha256": 64 hex digits, "size": int}'
                )
        lists.append(entries)
    dists = recorded.get("dists")
    if not (isinstance(dists, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in dists.items())):
        raise ValueError(f"recorded inputs: 'dists' must map names to versions, got {dists!r:.80}")
    return lists[0], lists[1], dists


class InputChecker:
    """Checks recorded inputs against the files and distributions present now.

    Keep one per process (:func:`shared_checker`): it remembers, per absolute path, the
    SHA-256 of the content it last hashed under a stat signature (inode, size, mtime,
    ctime), and each distribution's version. Checking a file costs one ``stat``; it is
    hashed only on first sight or when its stat changed (a ``touch`` costs a hash but is no
    change: contents are compared), and not at all when its size differs from the
    recorded one, or when the entry's stat hints still match. A file too recent to trust
    its stat (:data:`RACY_WINDOW_NS`) is not remembered.

    Distribution versions are read once per process: installing a package while a test
    session runs is not noticed until :meth:`forget`.
    """

    def __init__(self, *, racy_window_ns: int = RACY_WINDOW_NS) -> None:
        self.racy_window_ns = racy_window_ns
        self._memo: dict[str, tuple[tuple[int, int, int, int], str]] = {}
        self._versions: dict[str, str | None] = {}
        #: How many files this checker has hashed (for diagnostics and tests).
        self.files_hashed = 0

    def forget(self) -> None:
        """Drop everything remembered (file digests and distribution versions)."""
        self._memo.clear()
        self._versions.clear()

    def digest(self, path: PathLike, st: os.stat_result | None = None) -> tuple[str, int]:
        """(SHA-256, size) of a file's current content, through the stat memo. OSError if
        it is not a readable regular file."""
        return self._digest(_abspath(path), st)

    def _digest(self, key: str, st: os.stat_result | None) -> tuple[str, int]:
        if st is None:
            st = os.stat(key)
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(f"not a regular file: {key}")
        signature = _signature(st)
        remembered = self._memo.get(key)
        if remembered is not None and remembered[0] == signature:
            return remembered[1], st.st_size
        digest = file_sha256(key)
        self.files_hashed += 1
        after = os.stat(key)
        if (_signature(after) == signature and time.time_ns()
                - max(after.st_mtime_ns, after.st_ctime_ns) > self.racy_window_ns):
            self._memo[key] = (signature, digest)
        else:
            self._memo.pop(key, None)
        return digest, after.st_size

    def dist_version(self, name: str) -> str | None:
        """The installed version of distribution ``name``, or None; memoized."""
        key = _normalize_dist(name)
        if key not in self._versions:
            import importlib.metadata

            try:
                self._versions[key] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                self._versions[key] = None
        return self._versions[key]

    def _check_file(self, kind: ChangeKind, entry: Mapping[str, Any], base: str
                    ) -> Change | None:
        name, old, size = entry["path"], entry["sha256"], entry["size"]
        path = _resolve(name, base)
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                raise FileNotFoundError(path)
            if st.st_size != size:
                return Change(kind, name, old, None, old_size=size, new_size=st.st_size)
            hint = entry.get("mtime_ns")
            if (isinstance(hint, int) and hint == st.st_mtime_ns
                    and entry.get("ctime_ns") == st.st_ctime_ns):
                return None  # unchanged since it was hashed, and it was not racy then
            digest, _ = self._digest(path, st)
        except (FileNotFoundError, NotADirectoryError):
            return Change(kind, name, old, None)
        except OSError:
            return Change(kind, name, old, "unreadable")
        return None if digest == old else Change(kind, name, old, digest)

    def changes(self, recorded: Mapping[str, Any], base: PathLike) -> list[Change]:
        """What differs now from ``recorded`` (a :meth:`InputRecorder.result`), relative
        paths resolved against ``base``: modules, then files, then distributions; empty if
        nothing changed. ValueError if ``recorded`` is malformed."""
        modules, files, dists = _validated(recorded)
        base_path = _abspath(base)
        out: list[Change] = []
        groups: tuple[tuple[ChangeKind, list[dict[str, Any]]], ...] = (
            ("module", modules), ("file", files))
        for kind, entries in groups:
            for entry in entries:
                change = self._check_file(kind, entry, base_path)
                if change is not None:
                    out.append(change)
        for name, version in sorted(dists.items()):
            current = self.dist_version(name)
            if current != version:
                out.append(Change("dist", name, version, current or "missing"))
        return out


@functools.lru_cache(maxsize=1)
def shared_checker() -> InputChecker:
    """The process's one :class:`InputChecker` (its memo lives as long as the process)."""
    return InputChecker()


def changes_since(recorded: object, base: PathLike) -> list[Change] | None:
    """What differs now from an entry's recorded inputs (empty: the entry still fits),
    checked by the process's one checker; None when ``recorded`` is not a well-formed
    record, so the entry cannot be judged and fits nothing. The one rule for local
    variants, entries returned before and remote entries alike."""
    if not isinstance(recorded, Mapping):
        return None
    try:
        return shared_checker().changes(recorded, base)
    except ValueError:
        return None


def inputs_digest(recorded: Mapping[str, Any]) -> str:
    """SHA-256 naming a recorded input state: over the canonical JSON of each module's and
    file's path and SHA-256 and of the distributions' versions, independent of order, of
    sizes and stat hints, and of ``roots``. ValueError if ``recorded`` is malformed."""
    modules, files, dists = _validated(recorded)
    payload = {
        "modules": sorted([e["path"], e["sha256"]] for e in modules),
        "files": sorted([e["path"], e["sha256"]] for e in files),
        "dists": dict(dists),
    }
    return sha256_digest(payload)
