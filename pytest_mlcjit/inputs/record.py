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
imported by the compile child: only the standard library and this package. What is
observed besides opened files (listings, probes, environment variables, what cannot be
followed) is described in :mod:`.observe`; the hooks live in :mod:`.hooks`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from pytest_mlcjit.inputs.closure import import_root
from pytest_mlcjit.inputs.hooks import (
    ACTIVE,
    HOOK_LOCK,
    audit_hook,
    install_hook,
    intent,
    observe,
    quiet,
    state_now,
)
from pytest_mlcjit.inputs.observe import (
    MAX_INCOMPLETE,
    by_import_system,
    env_noise,
    listing_state,
    path_state,
    value_digest,
)
from pytest_mlcjit.inputs.paths import (
    PSEUDO_FS,
    FileRecord,
    ListingRecord,
    PathLike,
    ProbeRecord,
    RecordedInputs,
    Signature,
    abspath,
    both_forms,
    classify,
    dist_versions_for,
    hashed_with_stat,
    real_dir,
    realpath,
    rel,
    top_level_of_installed_file,
    under,
    under_any,
)

#: The hook and the open-mode rule (:mod:`.hooks`), by their names here before it split.
_audit_hook = audit_hook
_intent = intent


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
        self._bases = frozenset({str(self.base), os.path.realpath(self.base)})
        self._prefixes = tuple(b.rstrip(os.sep) + os.sep for b in self._bases)
        self.roots = tuple(roots)
        self.exclude_temp = exclude_temp
        self._exclude = both_forms(list(exclude))
        self._temp = both_forms([tempfile.gettempdir()]) if exclude_temp else ()
        self._reads: dict[str, None] = {}
        self._produced: set[str] = set()
        #: Each read file's state when first read: its stat signature and, when it was too
        #: new to trust its stat, its SHA-256 (None: absent).
        self._first: dict[str, tuple[Signature, str | None] | None] = {}
        #: Directories listed → (names digest, count) when listed (None: the import system's).
        self._listings: dict[str, tuple[str, int] | None] = {}
        #: Paths probed → state when probed (None: the import system's).
        self._probes: dict[str, str | None] = {}
        #: Environment variables read → value digest at the first read; written first: None.
        self._env: dict[str, str | None] = {}
        self._env_written: set[str] = set()
        self._incomplete: dict[str, None] = {}
        self._made: set[str] = set()
        #: Why the recorded state is not what was used (inputs that changed while recording),
        #: set by :meth:`result`: an entry must not be published under it.
        self.unstable: list[str] = []
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
        install_hook()
        self._before = sys.modules.copy()  # references: an alias of an old module is not new
        self._active = True
        with HOOK_LOCK:
            if not ACTIVE:
                observe(True)
            ACTIVE.append(self)
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
        with HOOK_LOCK, contextlib.suppress(ValueError):
            ACTIVE.remove(self)
            if not ACTIVE:
                observe(False)
        self._new_modules = self._module_files(self._new_names())

    def _note(self, path: str, reads: bool, produces: bool) -> None:
        """Called by the hook for every open while active: as cheap as possible.

        A file first opened to be created, truncated or appended to is an output (even if
        read back later); a file first opened for reading is an input (even if rewritten
        later: an outside edit must still be noticed)."""
        if path in self._produced:
            return
        if path in self._reads:
            if produces and self._first.get(path, 0) is None:
                # "Open it, else make it": a file absent when the factory first tried it
                # and then written by the factory is its own output, not an input.
                del self._reads[path], self._first[path]
                self._produced.add(path)
            return
        if produces:
            self._produced.add(path)
        elif reads:
            self._reads[path] = None
            self._first[path] = state_now(path)

    def _inside(self, path: str) -> bool:
        """The cheap first test of a listed or probed path: under the project's base (or
        its real path), by name only. Everything else is judged in :meth:`_local`."""
        return path.startswith(self._prefixes) or path in self._bases

    def _note_listing(self, path: str) -> None:
        if path not in self._listings and self._inside(path):
            self._listings[path] = None if by_import_system() else listing_state(path)

    def _note_probe(self, path: str) -> None:
        if path not in self._probes and self._inside(path):
            self._probes[path] = None if by_import_system() else path_state(path)

    def _note_env(self, name: str, value: str | None, write: bool) -> None:
        if name in self._env or name in self._env_written or env_noise(name):
            return
        if write:
            self._env_written.add(name)  # its own setting, not an input
        else:
            self._env[name] = value_digest(value)

    def _note_incomplete(self, note: str) -> None:
        if len(self._incomplete) < MAX_INCOMPLETE:
            self._incomplete[note] = None

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

        Only when not empty (:mod:`.observe`): ``listings`` (``{"path", "sha256",
        "count"}``), ``probes`` (``{"path", "state"}``), ``env`` (name → value SHA-256 or
        None) and ``incomplete`` (what ran that cannot be followed). :attr:`unstable` then
        says which inputs changed between their first read and now.
        """
        with quiet():
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

    def _local(self, path: str, base: str) -> bool:
        """Whether a listed, probed or missing path counts: inside the project (the import
        root: a hold or lock file, a cache in ``$HOME`` or the temp dir is the factory's
        surroundings, not its input), local, not excluded, not made by the recording
        process itself (its scratch)."""
        if not (under(path, base) or under(realpath(path), real_dir(base))):
            return False
        if under_any(path, PSEUDO_FS) or self._excluded(path, data=True):
            return False
        if path in self._produced or (self._made and under_any(path, tuple(self._made))):
            return False
        if "__pycache__" in path.split(os.sep):
            return False
        return classify(path, base) == "local"

    def _hashed(self, path: str, base: str) -> FileRecord | None:
        """The recorded form of a file read while recording, or None (gone: scratch); an
        input whose state changed since it was first read is noted in :attr:`unstable`."""
        entry, before, after = hashed_with_stat(path, base, hints=True)
        if path not in self._first:
            return entry
        first = self._first[path]
        if entry is None:
            return None
        if first is None:
            self.unstable.append(f"{entry['path']} appeared during the compile")
        elif (entry["sha256"] != first[1] if first[1] is not None
              else not first[0] == before == after):
            self.unstable.append(f"{entry['path']} changed during the compile")
        return entry

    def _modules(self, new_modules: dict[str, str], base: str, dists: dict[str, str]
                 ) -> dict[str, FileRecord]:
        modules: dict[str, FileRecord] = {}
        for name, path in sorted(new_modules.items()):
            if self._excluded(path):
                continue
            where = classify(path, base)
            if where == "local":
                entry = self._hashed(path, base)
                if entry is not None:
                    modules[entry["path"]] = entry
            elif where == "installed":
                dists.update(dist_versions_for(name.split(".", 1)[0]))
        return modules

    def _build(self, new_modules: dict[str, str]) -> RecordedInputs:
        base = str(self.base)
        self.unstable = []
        dists: dict[str, str] = {}
        modules = self._modules(new_modules, base, dists)
        module_paths = set(new_modules.values())
        files: dict[str, FileRecord] = {}
        probes: dict[str, ProbeRecord] = {}
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
                entry = self._hashed(path, base)
                if entry is not None:
                    files[entry["path"]] = entry
                elif (self._first.get(path, 0) is None and self._local(path, base)
                      and path_state(path) == "absent"):
                    probes[rel(path, base)] = {"path": rel(path, base), "state": "absent"}
        recorded: RecordedInputs = {
            "roots": list(self.roots),
            "modules": [modules[p] for p in sorted(modules)],
            "files": [files[p] for p in sorted(files)],
            "dists": dict(sorted(dists.items())),
        }
        self._observed(recorded, base, probes, module_paths)
        return recorded

    def _observed(self, recorded: RecordedInputs, base: str, probes: dict[str, ProbeRecord],
                  module_paths: set[str]) -> None:
        """Add what the factory learnt without reading a file (only fields not empty)."""
        listings: dict[str, ListingRecord] = {}
        for path, seen in list(self._listings.items()):
            if seen is None or not self._local(path, base):
                continue
            now = listing_state(path)
            if now is None:
                continue  # gone: its own scratch
            name = rel(path, base)
            if now != seen:
                self.unstable.append(f"directory {name} changed during the compile")
            listings[name] = {"path": name, "sha256": now[0], "count": now[1]}
        for path, state in list(self._probes.items()):
            if (state is None or path in self._reads or path in module_paths
                    or not self._local(path, base)):
                continue
            name, current = rel(path, base), path_state(path)
            if current != state:
                self.unstable.append(f"{name} changed during the compile ({state} → {current})")
            probes[name] = {"path": name, "state": current}
        if listings:
            recorded["listings"] = [listings[p] for p in sorted(listings)]
        if probes:
            recorded["probes"] = [probes[p] for p in sorted(probes)]
        if self._env:
            recorded["env"] = dict(sorted(self._env.items()))
        if self._incomplete:
            recorded["incomplete"] = sorted(self._incomplete)
