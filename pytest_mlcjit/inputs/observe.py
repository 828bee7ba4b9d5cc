"""What a factory learns without opening a file, and how a recorded input's state is taken.

Used by :mod:`.record` in the compile child and by :mod:`.check` in the test process:

* *listings*: the names in a directory the factory listed (``os.listdir``, ``os.scandir``,
  so ``glob``, ``os.walk`` and ``pathlib`` too: the ``os.listdir``/``os.scandir`` audit
  events), recorded as a digest of the sorted names and their count;
* *probes*: the state (``absent``, ``file``, ``dir`` or ``other``) of a path the factory
  asked about (``os.stat``/``os.lstat``, hence ``os.path.exists``, ``isfile``, ``isdir``,
  ``getsize``, ``pathlib.Path.exists`` ...: no audit event exists, so the recorder wraps
  ``os.stat`` and ``os.lstat`` while it records), and of a file it failed to open;
* *environment variables* the factory read (``os.environ[...]``, ``.get``, ``in``,
  ``os.getenv``): the name and a digest of the value (None: unset), never the value; a
  variable the factory set before reading it is its own, not an input. Not recorded
  (:data:`ENV_NOISE`): the variables of pytest (``PYTEST_*``), of this plugin
  (``MLC_JIT_*``, ``MLCJIT_*``) and those the plugin sets for the compile child
  (``PYTHONPATH``, ``PYTHONUNBUFFERED``): they describe the run, not the model.
  Reading the whole environment records nothing: ``os.environ.copy()``, ``dict(os.environ)``,
  ``{**os.environ}``, ``.keys()``, ``.items()``, ``.values()``, iterating, ``len``; only
  the reads of a variable by its name count;
* *incomplete*: what cannot be recorded (a subprocess, a forked or spawned process, a
  ctypes load of a local library, a socket connection), named so that the user can name
  its inputs (``files=``, a config value).

Only the standard library is imported here.
"""

from __future__ import annotations

import collections
import hashlib
import importlib
import os
import stat
import sys
import threading
from collections.abc import ItemsView, Iterator, Mapping, ValuesView
from typing import Any

#: Environment variables never recorded: exact names, and prefixes (see the module doc).
ENV_NOISE = frozenset({"PYTHONPATH", "PYTHONUNBUFFERED"})
ENV_NOISE_PREFIXES = ("PYTEST_", "MLC_JIT_", "MLCJIT_")

#: At most this many notes of what could not be recorded, each at most this long.
MAX_INCOMPLETE = 16
MAX_NOTE = 200

#: The stat functions as Python made them (the recorder wraps the module's names).
REAL_STAT = os.stat
REAL_LSTAT = os.lstat

#: Code of the import system: a directory it lists or a path it probes (to find a module or
#: a distribution) is not the factory's input. Matched against the nearest caller that is
#: not a path helper (:data:`_HELPERS`): the factory's own module-level code runs under the
#: import system too, and what it lists or probes there is its input.
_IMPORT_SYSTEM = ("<frozen importlib", "<frozen zipimport", "<frozen site")
_IMPORT_FILES = (os.path.dirname(importlib.__file__) + os.sep,
                 os.sep + "importlib_metadata" + os.sep, os.sep + "pkg_resources" + os.sep)
_IMPORT_MODULES = ("pkgutil", "zipimport", "site", "linecache")
#: The path helpers between a caller and ``os.stat``/``os.listdir`` (and this package's
#: own hooks): skipped to find who asked.
_HELPER_MODULES = ("os", "posixpath", "genericpath", "glob", "fnmatch", "pathlib", "shutil",
                   "ntpath", "stat")


def _stdlib_files(names: tuple[str, ...]) -> frozenset[str]:
    """The code file names (``co_filename``) of stdlib modules ``names``: their source file
    and their frozen name."""
    lib = os.path.dirname(os.__file__)
    out = {f"<frozen {name}>" for name in names}
    out.update(os.path.join(lib, f"{name}.py") for name in names)
    return frozenset(out)


_IMPORT_NAMES = _stdlib_files(_IMPORT_MODULES)
_HELPERS = _stdlib_files(_HELPER_MODULES)
#: This package's hooks and recorder, and ``pathlib`` where it is a package (3.13).
_SKIPPED = (os.path.dirname(__file__) + os.sep,
            os.path.join(os.path.dirname(os.__file__), "pathlib") + os.sep)

#: ``co_filename`` → 0 (a path helper or this package: skipped), 1 (the import system's),
#: 2 (anyone else's: the factory's), memoized.
_KIND: dict[str, int] = {}


def _kind(name: str) -> int:
    kind = _KIND.get(name)
    if kind is None:
        if name in _HELPERS or name.startswith(_SKIPPED):
            kind = 0
        elif (name in _IMPORT_NAMES or name.startswith(_IMPORT_SYSTEM)
              or name.startswith(_IMPORT_FILES[0])
              or any(part in name for part in _IMPORT_FILES[1:])):
            kind = 1
        else:
            kind = 2
        _KIND[name] = kind
    return kind


def env_noise(name: str) -> bool:
    """Whether environment variable ``name`` is never recorded (:data:`ENV_NOISE`)."""
    return name in ENV_NOISE or name.startswith(ENV_NOISE_PREFIXES)


def value_digest(value: str | None) -> str | None:
    """What is recorded of an environment variable's value: its SHA-256 (None: unset)."""
    if value is None:
        return None
    return hashlib.sha256(os.fsencode(value)).hexdigest()


def env_state(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The recorded form of variable ``name`` now (in ``environ``, default ``os.environ``)."""
    return value_digest((os.environ if environ is None else environ).get(name))


def path_state(path: str) -> str:
    """``absent``, ``file``, ``dir`` or ``other`` (symlinks followed): a probe's state."""
    try:
        st = REAL_STAT(path)
    except (FileNotFoundError, NotADirectoryError):
        return "absent"
    except (OSError, ValueError):
        return "other"
    if stat.S_ISREG(st.st_mode):
        return "file"
    return "dir" if stat.S_ISDIR(st.st_mode) else "other"


def listing_state(path: str) -> tuple[str, int] | None:
    """(SHA-256 over the sorted names, count) of directory ``path``; None if not listable."""
    try:
        names = sorted(os.listdir(path))
    except (OSError, ValueError):
        return None
    digest = hashlib.sha256("\0".join(names).encode("utf-8", "surrogateescape")).hexdigest()
    return digest, len(names)


def by_import_system() -> bool:
    """Whether the nearest caller that is not a path helper (``os``, ``glob``,
    ``pathlib`` ... or this package's hooks) is the import system's own code (a finder
    listing a ``sys.path`` directory, ``importlib.metadata`` looking for distributions).
    The module-level code of a module being imported is its module's, not the import
    system's: what it lists or probes is recorded."""
    frame = sys._getframe(1)
    while frame is not None:
        kind = _kind(frame.f_code.co_filename)
        if kind:
            return kind == 1
        frame = frame.f_back  # type: ignore[assignment]
    return False


def _short(words: object) -> str:
    if isinstance(words, list | tuple):
        text = " ".join(os.fsdecode(w) if isinstance(w, bytes | str) else str(w)
                        for w in words)
    else:
        text = os.fsdecode(words) if isinstance(words, bytes | str) else str(words)
    return text if len(text) <= MAX_NOTE else text[:MAX_NOTE - 1] + "…"


#: The note of a forked process (``os.fork``: ``multiprocessing``'s fork start method,
#: ``ProcessPoolExecutor``, ``os.spawnv``).
FORKED = "a forked process (multiprocessing?)"


def incomplete_note(event: str, args: tuple[Any, ...]) -> str | None:
    """What an audit event that the recorder cannot follow did, as a note; None for one
    that is no input (a ctypes load of a library outside the project is judged by the
    caller)."""
    if event == "subprocess.Popen":
        return "subprocess: " + _short(args[1] if len(args) > 1 and args[1] else args[0])
    if event in ("os.system", "os.fork", "os.forkpty"):  # a fork: multiprocessing's too
        return "subprocess: " + _short(args[0]) if event == "os.system" else FORKED
    if event in ("os.exec", "os.posix_spawn", "os.spawn"):
        argv = args[2] if event == "os.spawn" and len(args) > 2 else (
            args[1] if len(args) > 1 else args[0])
        return "subprocess: " + _short(argv)
    if event == "ctypes.dlopen":
        return "ctypes load: " + _short(args[0])
    if event == "socket.connect":
        return "socket connection: " + _short(args[1] if len(args) > 1 else "?")
    return None


class RecordingEnviron(os._Environ):  # type: ignore[type-arg]
    """``os.environ`` while a recorder is active (its class is swapped, so every reference
    to the object records): reads are reported to :data:`ENV_HOOK`, writes too."""

    def __getitem__(self, key: str) -> str:
        pending = getattr(BULK_READ, "keys", None)
        if pending:  # dict(os.environ), {**os.environ}: each name, in the order listed
            if pending[0] == key:
                pending.popleft()
                quiet: str = super().__getitem__(key)
                return quiet
            BULK_READ.keys = None
        try:
            value: str = super().__getitem__(key)
        except KeyError:
            ENV_HOOK[0](key, None, False)
            raise
        ENV_HOOK[0](key, value, False)
        return value

    def __setitem__(self, key: str, value: str) -> None:
        ENV_HOOK[0](key, None, True)
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        ENV_HOOK[0](key, None, True)
        super().__delitem__(key)

    def copy(self) -> dict[str, str]:
        """A copy (to hand a child process its environment): not a read of each variable."""
        data: dict[Any, Any] = self._data  # type: ignore[attr-defined]
        return {self.decodekey(k): self.decodevalue(v) for k, v in data.items()}

    def __iter__(self) -> Iterator[str]:
        """The names; once all are listed, reading them in that order (what ``dict()`` and
        ``{**os.environ}`` do) is a copy, not a read of each variable."""
        names = [self.decodekey(k) for k in list(self._data)]  # type: ignore[attr-defined]
        BULK_READ.keys = None
        yield from names
        BULK_READ.keys = collections.deque(names)

    def items(self) -> ItemsView[str, str]:
        """The whole environment (not a read of each variable)."""
        return self.copy().items()

    def values(self) -> ValuesView[str]:
        """The whole environment's values (not a read of each variable)."""
        return self.copy().values()


#: Per thread: the names just listed by iterating the recording ``os.environ``.
BULK_READ = threading.local()


def _no_env_hook(name: str, value: str | None, write: bool) -> None:
    return None


#: (name, value or None, whether it is a write) → None: set by :mod:`.record`.
ENV_HOOK: list[Any] = [_no_env_hook]
