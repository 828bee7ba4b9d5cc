"""Staging directories: where a compile (or a download) writes before its publish, on the
cache's filesystem, so that publishing is an atomic rename.

Each directory's lock file (``<name>.lock`` beside it) is made and locked before the
directory, and held by its owner until the directory is gone: whoever finds the directory
finds its lock held while its owner lives (in any PID namespace, container or host sharing
the filesystem), and free once the owner has died, so :meth:`Staging.clean` removes only
abandoned ones, whatever their age.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import threading
from pathlib import Path

from pytest_mlcjit._util.fs import DIR_MODE, WriteWarnings
from pytest_mlcjit.cache import layout
from pytest_mlcjit.cache.locks import (
    MISSING,
    create_held,
    release_and_remove,
    remove_if_free,
    try_existing_flock,
)
from pytest_mlcjit.errors import MlcJitError


class Staging:
    """The staging directories of one cache root that this run made, and their cleanup."""

    def __init__(self, root: Path, warnings: WriteWarnings) -> None:
        self.root = root
        self.warnings = warnings
        #: This run's staging directories → the descriptor holding each one's lock.
        self._held: dict[Path, int] = {}
        self._mutex = threading.Lock()

    def new(self, digest: str, parent: Path | None = None) -> Path:
        """A fresh private directory ``<digest[:32]>.<hex16>`` under ``parent`` (default
        ``.mlcjit/staging``, which must be on the cache's filesystem), its lock held."""
        layout.check_digest(digest)
        base = parent or layout.staging_dir(self.root)
        if parent is not None:
            layout.check_path_room(parent, layout.PATH_ROOM_WRITE, "staging directory")
        base.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        for _ in range(16):
            path = base / f"{digest[:32]}.{secrets.token_hex(8)}"
            lock = layout.staging_lock(path)
            try:
                fd = create_held(lock)
            except FileExistsError:
                continue
            try:
                path.mkdir(mode=0o700)  # private: nobody may swap what we publish
            except BaseException:
                release_and_remove(fd, lock)
                raise
            with self._mutex:
                self._held[path] = fd
            return path
        raise FileExistsError(f"could not make a staging directory in {base}")

    def remove(self, path: Path) -> None:
        """Remove a staging directory of this run, then its lock file, and release it."""
        shutil.rmtree(path, ignore_errors=True)
        with self._mutex:
            fd = self._held.pop(path, None)
        if fd is not None:
            release_and_remove(fd, layout.staging_lock(path))

    def clean(self, *, where: Path | None = None) -> list[Path]:
        """Remove abandoned staging directories: those whose lock file (beside them) this
        process can lock, and those without one (no owner holds a lock on them: left by an
        earlier version of the plugin, or by a crash before the lock existed); then lock
        files left without their directory. A directory whose lock is held is being
        compiled in, whatever its age, host or PID namespace, and is never touched.

        ``where``: a shared directory used for staging (``MLC_TEMP_DIR``): there, only
        entries named like this cache's staging dirs (and their locks) are considered.
        """
        removed: list[Path] = []
        staging = where or layout.staging_dir(self.root)
        try:
            names = set(os.listdir(staging))
        except OSError:
            return removed
        suffix = layout.STAGING_LOCK_SUFFIX
        with self._mutex:
            mine = set(self._held)
        for path in mine:  # ours, removed without remove(): let its lock go too
            if path.parent == staging and not os.path.lexists(path):
                self.remove(path)
        for name in sorted(names):
            path = staging / name
            if name.endswith(suffix) or path in mine:
                continue
            if where is not None and not layout.is_staging_name(name):
                continue
            if self._remove_if_abandoned(path):
                removed.append(path)
        for name in sorted(names):
            stem = name[:-len(suffix)]
            if (name.endswith(suffix) and stem not in names
                    and (where is None or layout.is_staging_name(stem))):
                with contextlib.suppress(OSError, MlcJitError):
                    remove_if_free(staging / name)
        return removed

    def _remove_if_abandoned(self, path: Path) -> bool:
        """Remove the staging directory (or stray file) ``path`` unless its owner holds its
        lock; whether it was removed. The lock file goes last, while held."""
        lock = layout.staging_lock(path)
        try:
            fd = try_existing_flock(lock)
        except (OSError, MlcJitError):  # another user's lock file: not ours to judge
            return False
        if fd is None:
            return False  # its owner is alive
        try:
            if path.is_dir() and not path.is_symlink():
                self.warnings.remove_tree(path)
            else:
                with self.warnings.best_effort(path, "remove the stray staging file"):
                    path.unlink(missing_ok=True)
        finally:
            if fd != MISSING:
                release_and_remove(fd, lock)
        return True
