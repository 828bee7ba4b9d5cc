"""What the engine does with a compile whose recorded inputs cannot be trusted.

* *Unstable* (an input changed while the factory ran: the compile child lists why in
  ``meta.json`` as ``unstable``, see :mod:`pytest_mlcjit.inputs.record`): the library was
  built from a state no record names, so it is not published, locally or remotely. The
  request that compiled it still gets it: it stays in its staging directory (its lock
  held) until the run's engine closes (:meth:`Unpublished.release`, from ``JIT.close``); the
  compile log and a warning say why, and the next request compiles again.
* *Incomplete* (the factory ran something the recorder cannot follow: a subprocess, a
  ctypes load, a socket): the entry is published, and the run warns once per such set of
  notes, with the fix.

Warnings go through the run's :class:`~pytest_mlcjit._util.fs.WriteWarnings` (its
``emit``: a ``PytestWarning`` under the plugin), each message once per run.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pytest_mlcjit._util.fs import WriteWarnings, is_no_space, log
from pytest_mlcjit.cache.layout import EntryPaths
from pytest_mlcjit.cache.manifest import Manifest
from pytest_mlcjit.cache.store.interface import Hit
from pytest_mlcjit.engine.failures import no_space
from pytest_mlcjit.key import file_sha256


def incomplete_message(describe: str, notes: list[str]) -> str:
    return (f"pytest-mlcjit: the recorded inputs of {describe} are incomplete: the factory "
            f"ran {'; '.join(notes)}; what that reads is not in the key, so a change to it "
            "is not noticed: name those files with TVMModel(files=[...]) or pass what "
            "matters as a config value")


class Unpublished:
    """One run's compiles whose recorded inputs cannot be trusted (see the module doc): the
    warnings said (each once per run) and the staging directories kept until the run's
    engine closes (:meth:`release`). Thread-safe."""

    def __init__(self, warnings: WriteWarnings) -> None:
        self.warnings = warnings
        self._lock = threading.Lock()
        self._said: set[str] = set()
        self._kept: list[tuple[Any, Path]] = []

    def say_once(self, message: str) -> None:
        """Show ``message`` through the run's warnings, once per run; never raises."""
        with self._lock:
            if message in self._said:
                return
            self._said.add(message)
        try:
            self.warnings.emit(message)
        except Warning:  # a filter of "error": logged instead, as WriteWarnings does
            log.warning(message)

    def check(self, describe: str, digest: str, *, staging: Path, library: Path,
              manifest: Manifest) -> Hit | None:
        """The hit to return instead of publishing ``library`` when its inputs changed
        during the compile, else None (publish it; an incomplete record is said once)."""
        inputs: Any = manifest.get("inputs")
        notes = inputs.get("incomplete") if isinstance(inputs, dict) else None
        if isinstance(notes, list) and notes:
            self.say_once(incomplete_message(describe, [str(n) for n in notes]))
        unstable = manifest.get("unstable")
        if not unstable:
            return None
        reasons = "; ".join(str(r) for r in unstable) if isinstance(unstable, list) else "?"
        message = (f"pytest-mlcjit: input {reasons}; {describe} was not cached (it is used "
                   "by this request only, and compiled again on the next)")
        with contextlib.suppress(OSError), open(staging / "compile.log", "a",
                                                encoding="utf-8") as f:
            f.write(f"[pytest-mlcjit] {message}\n")
        self.say_once(message)
        kept: dict[str, Any] = {**manifest, "digest": digest, "library": library.name,
                                "sha256": file_sha256(library),
                                "size": library.stat().st_size, "log": "compile.log",
                                "cached": False}
        return Hit(EntryPaths(digest, library), kept)  # type: ignore[arg-type]

    def settle(self, store: Any, staging: Path, kept: Hit | None) -> None:
        """After a build: remove its staging directory, or, when its library is ``kept``
        (unpublished, used from there), hold it until :meth:`release`."""
        if kept is None:
            store.remove_staging(staging)
            return
        with self._lock:
            self._kept.append((store, staging))

    def release(self) -> None:
        """The run is over: remove the staging directories it kept, their locks and
        descriptors; never raises for a directory already gone."""
        with self._lock:
            kept, self._kept = self._kept, []
        for store, staging in kept:
            with contextlib.suppress(OSError):
                store.remove_staging(staging)


@contextlib.contextmanager
def disk_full_said(describe: str, root: Path) -> Iterator[None]:
    """An OSError of a full disk in the block becomes the compile's "no space" error."""
    try:
        yield
    except OSError as exc:
        if is_no_space(exc):
            raise no_space(describe, root, "") from None
        raise
