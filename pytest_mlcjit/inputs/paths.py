"""Where a file lives (the stdlib, an installed distribution, or the user's own: *local*), how
a recorded path is written (relative to the factory's import root, POSIX form), and the
recorded form of one file (its SHA-256, size, and stat hints when they can be trusted).

Only the standard library is imported here.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
import site
import stat
import sys
import sysconfig
import time
from collections.abc import Mapping, Sequence
from pathlib import Path, PureWindowsPath
from typing import Literal, TypedDict

from pytest_mlcjit.key import file_sha256

#: A file whose mtime or ctime is this recent when it is hashed may still change within the
#: same timestamp tick without its stat changing (coarse file-system clocks: 1 to 2 s on some
#: network and FAT file systems, a few ms on ext4), so its stat is not trusted later: it is
#: hashed again next time (ccache's and git's "racy" rule).
RACY_WINDOW_NS = 2_000_000_000


PathLike = str | os.PathLike[str]


PSEUDO_FS = ("/proc", "/sys", "/dev")

#: ``os.stat`` as Python made it (the recorder wraps the module's name while it records).
_stat = os.stat


SITE_DIR_NAMES = frozenset({"site-packages", "dist-packages"})


class FileRecord(TypedDict, total=False):
    """One recorded module or file: its path (relative to the import root, POSIX form, or
    absolute), SHA-256 and size, and stat hints when they can be trusted."""

    path: str
    sha256: str
    size: int
    mtime_ns: int
    ctime_ns: int


class _Recorded(TypedDict):
    roots: list[str]
    modules: list[FileRecord]
    files: list[FileRecord]
    dists: dict[str, str]


class ListingRecord(TypedDict):
    """A directory the factory listed: the SHA-256 of its sorted names, and their count."""

    path: str
    sha256: str
    count: int


class ProbeRecord(TypedDict):
    """A path the factory asked about (or failed to open): ``absent``, ``file``, ``dir``
    or ``other``."""

    path: str
    state: str


class RecordedInputs(_Recorded, total=False):
    """What a factory really used (:meth:`.record.InputRecorder.result`). The optional
    fields are written only when not empty (a record without them is read as before)."""

    listings: list[ListingRecord]
    probes: list[ProbeRecord]
    #: Environment variable → SHA-256 of its value (None: unset).
    env: dict[str, str | None]
    #: What the recorder could not follow (a subprocess, a ctypes load, a socket).
    incomplete: list[str]



def abspath(path: PathLike) -> str:
    return os.path.normpath(os.path.abspath(os.fspath(path)))


def under(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or inside it (both absolute and normalized)."""
    path, root = os.path.normcase(path), os.path.normcase(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def under_any(path: str, roots: Sequence[str]) -> bool:
    return any(under(path, root) for root in roots)


def both_forms(paths: Sequence[PathLike]) -> tuple[str, ...]:
    """Each path as given (absolute, normalized) and with its symlinks resolved."""
    out: dict[str, None] = {}
    for p in paths:
        out[abspath(p)] = None
        out[os.path.realpath(p)] = None
    return tuple(out)


@functools.lru_cache(maxsize=1)
def system_dirs() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
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
def real_dir(directory: str) -> str:
    return os.path.realpath(directory)


def realpath(path: str) -> str:
    """``os.path.realpath``, with each directory resolved once per recording (a file that
    is itself a symlink is resolved in full)."""
    if os.path.islink(path):
        return os.path.realpath(path)
    directory, name = os.path.split(path)
    return os.path.join(real_dir(directory), name)


def classify(path: str, base: str | None) -> Literal["local", "stdlib", "installed"]:
    """Where a file lives, judged by its real path (so a symlinked editable install is local).

    ``stdlib``: the standard library. ``installed``: a site-packages (or dist-packages) dir,
    or anywhere under the interpreter's prefixes, unless it is under ``base`` (a project in
    ``/usr/src/app`` with Python in ``/usr`` stays local) and not in a prefix inside ``base``
    (the project's own ``.venv`` is not local). Everything else is ``local``.
    """
    real = realpath(path)
    stdlib, installed, prefixes = system_dirs()
    parts = real.split(os.sep)
    if SITE_DIR_NAMES.intersection(parts) or under_any(real, installed):
        return "installed"
    if under_any(real, stdlib):
        return "stdlib"
    in_prefixes = [p for p in prefixes if under(real, p)]
    if base is not None:
        real_base = real_dir(base)
        if under(real, real_base) or under(path, base):
            # local, unless an interpreter prefix inside the project holds it (a .venv)
            inner = [p for p in in_prefixes if under(p, real_base) and p != real_base]
            return "installed" if inner else "local"
    return "installed" if in_prefixes else "local"


def is_local_path(path: PathLike, base: PathLike | None = None) -> bool:
    """Whether a file is the user's own: not in the stdlib, not in an installed distribution
    (a site-packages dir or the interpreter's prefix; files under ``base`` always count as
    local). An editable install counts as local: its files live in the project."""
    return classify(abspath(path), None if base is None else abspath(base)) == "local"


def rel(path: str, base: str) -> str:
    """``path`` relative to ``base`` in POSIX form, or absolute (POSIX form) if outside."""
    if under(path, base):
        return Path(os.path.relpath(path, base)).as_posix()
    return Path(path).as_posix()


def is_absolute_record(path: str) -> bool:
    return path.startswith("/") or PureWindowsPath(path).is_absolute()


def resolve(path: str, base: str) -> str:
    """A recorded path made absolute (relative ones against ``base``), normalized."""
    if is_absolute_record(path):
        return os.path.normpath(path)
    return os.path.normpath(os.path.join(base, path))


def stat_hints(before: os.stat_result, after: os.stat_result) -> dict[str, int]:
    """mtime/ctime to store beside a digest, if the file was stable while hashed and old
    enough that a later change must change its stat (see :data:`RACY_WINDOW_NS`)."""
    if signature(before) != signature(after):
        return {}
    if time.time_ns() - max(after.st_mtime_ns, after.st_ctime_ns) <= RACY_WINDOW_NS:
        return {}
    return {"mtime_ns": after.st_mtime_ns, "ctime_ns": after.st_ctime_ns}


def signature(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def hashed_entry(path: str, base: str, *, hints: bool) -> FileRecord | None:
    """{"path", "sha256", "size"} (plus stat hints), or None if not a readable regular file."""
    return hashed_with_stat(path, base, hints=hints)[0]


Signature = tuple[int, int, int, int]


def hashed_with_stat(path: str, base: str, *, hints: bool
                     ) -> tuple[FileRecord | None, Signature | None, Signature | None]:
    """:func:`hashed_entry`, and the file's stat signature before and after hashing."""
    try:
        before = _stat(path)
        if not stat.S_ISREG(before.st_mode):
            return None, None, None
        digest = file_sha256(path)
        after = _stat(path)
    except OSError:
        return None, None, None
    entry: FileRecord = {"path": rel(path, base), "sha256": digest, "size": after.st_size}
    if hints and (found := stat_hints(before, after)):
        entry["mtime_ns"], entry["ctime_ns"] = found["mtime_ns"], found["ctime_ns"]
    return entry, signature(before), signature(after)


def file_entry(path: PathLike, base: PathLike, *, hints: bool = True) -> FileRecord:
    """The recorded form of one file: ``{"path", "sha256", "size"}``, the path relative to
    ``base`` (POSIX form) or absolute if outside it. With ``hints``, ``mtime_ns`` and
    ``ctime_ns`` are added when the file is old enough to trust them: a checker in another
    process then skips hashing while the file's stat still matches. OSError if unreadable."""
    full = abspath(path)
    entry = hashed_entry(full, abspath(base), hints=hints)
    if entry is None:
        raise FileNotFoundError(f"not a readable regular file: {full}")
    return entry


@functools.lru_cache(maxsize=1)
def packages_distributions() -> Mapping[str, list[str]]:

    return importlib.metadata.packages_distributions()


@functools.lru_cache(maxsize=1024)
def dist_versions_for(top_level: str) -> dict[str, str]:

    found: dict[str, str] = {}
    for name in packages_distributions().get(top_level, ()):
        with contextlib.suppress(Exception):
            found[name] = importlib.metadata.version(name)
    return found


def top_level_of_installed_file(path: str) -> str | None:
    """The importable top-level name a file inside a site-packages dir belongs to."""
    parts = Path(realpath(path)).parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] in SITE_DIR_NAMES:
            first = parts[i + 1]
            if first.endswith((".dist-info", ".egg-info", ".pth")) or first == "__pycache__":
                return None
            return first.split(".", 1)[0]
    return None
