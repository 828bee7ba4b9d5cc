"""Recording what a factory really uses, in the compile child: the ``open`` audit hook and
:class:`InputRecorder`.

The compile child wraps ``import factory module`` and ``factory(**config)`` in an
:class:`InputRecorder`, which notes every local module imported in between (path and
SHA-256; stdlib and installed distributions are not local, an editable install is), the
distribution (and its version) of every installed module imported in between, and every
regular file opened for reading in between (``open``, ``numpy.load``, ``os.open`` ... all go
through the ``open`` audit event), except files of the stdlib and of installed
distributions, files the recording process itself created or overwrote, and the
directories it was told to ignore (the cache root and the staging directory).

Files read by C code through its own ``fopen`` are invisible to the audit hook: name them
explicitly (``TVMModel(..., files=["weights/*.npy"])``, :mod:`.explicit`). This module is
imported by the compile child: only the standard library and :mod:`.paths`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from pytest_mlcjit.inputs.closure import import_root
from pytest_mlcjit.inputs.paths import (
    PSEUDO_FS,
    FileRecord,
    PathLike,
    RecordedInputs,
    abspath,
    both_forms,
    classify,
    dist_versions_for,
    hashed_entry,
    real_dir,
    realpath,
    top_level_of_installed_file,
    under_any,
)

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
        self.base = Path(abspath(base))
        self.roots = tuple(roots)
        self.exclude_temp = exclude_temp
        self._exclude = both_forms(list(exclude))
        self._temp = both_forms([tempfile.gettempdir()]) if exclude_temp else ()
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
                found[name] = abspath(file)
        return found

    # -- the result --------------------------------------------------------------------------

    def result(self) -> RecordedInputs:
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
            real_dir.cache_clear()
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
        return under_any(path, dirs) or under_any(realpath(path), dirs)

    def _build(self, new_modules: dict[str, str]) -> RecordedInputs:
        base = str(self.base)
        modules: dict[str, FileRecord] = {}
        dists: dict[str, str] = {}
        module_paths = set(new_modules.values())
        for name, path in sorted(new_modules.items()):
            if self._excluded(path):
                continue
            where = classify(path, base)
            if where == "local":
                entry = hashed_entry(path, base, hints=True)
                if entry is not None:
                    modules[entry["path"]] = entry
            elif where == "installed":
                dists.update(dist_versions_for(name.split(".", 1)[0]))
        files: dict[str, FileRecord] = {}
        for path in list(self._reads):
            if (path in module_paths
                    or under_any(path, PSEUDO_FS) or self._excluded(path, data=True)):
                continue
            if os.path.basename(os.path.dirname(path)) == "__pycache__" and path.endswith(".pyc"):
                continue
            where = classify(path, base)
            if where == "installed":
                top = top_level_of_installed_file(path)
                if top:
                    dists.update(dist_versions_for(top))
                continue
            if where == "local":
                entry = hashed_entry(path, base, hints=True)
                if entry is not None:
                    files[entry["path"]] = entry
        return {
            "roots": list(self.roots),
            "modules": [modules[p] for p in sorted(modules)],
            "files": [files[p] for p in sorted(files)],
            "dists": dict(sorted(dists.items())),
        }
