"""The process-wide observation of a recording: the audit hook (``open``, directory
listings, ``mkdir``, and what cannot be followed), the ``os.stat``/``os.lstat`` wrappers and
the recording ``os.environ``, active while an :class:`.record.InputRecorder` records.

Only the standard library and :mod:`.observe`, :mod:`.paths` are imported here.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from pytest_mlcjit.inputs.observe import (
    BULK_READ,
    ENV_HOOK,
    REAL_LSTAT,
    REAL_STAT,
    RecordingEnviron,
    incomplete_note,
)
from pytest_mlcjit.inputs.paths import (
    PSEUDO_FS,
    RACY_WINDOW_NS,
    Signature,
    abspath,
    classify,
    signature,
    under_any,
)
from pytest_mlcjit.key import file_sha256

if TYPE_CHECKING:
    from pytest_mlcjit.inputs.record import InputRecorder

_TLS = threading.local()


ACTIVE: list[InputRecorder] = []


HOOK_LOCK = threading.Lock()


_hook_installed = False


_O_ACCMODE = getattr(os, "O_ACCMODE", 3)


_O_PRODUCES = os.O_CREAT | os.O_TRUNC | os.O_APPEND


def intent(mode: object, flags: object) -> tuple[bool, bool]:
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


def _absolute(target: object) -> str | None:
    """An audit event's path argument as an absolute, normalized path (None: a descriptor)."""
    if target is None:
        target = "."
    if isinstance(target, int):
        return None  # an already open file descriptor
    path = os.fsdecode(os.fspath(target))  # type: ignore[call-overload]
    if not os.path.isabs(path):
        path = os.path.join(os.getcwd(), path)
    return os.path.normpath(path)


def _on_open(args: tuple[Any, ...]) -> None:
    path = _absolute(args[0])
    if path is None:
        return
    reads, produces = intent(args[1] if len(args) > 1 else None,
                              args[2] if len(args) > 2 else None)
    for recorder in tuple(ACTIVE):
        recorder._note(path, reads, produces)


def _on_listing(args: tuple[Any, ...]) -> None:
    path = _absolute(args[0] if args else None)
    if path is not None:
        for recorder in tuple(ACTIVE):
            recorder._note_listing(path)


def _on_mkdir(args: tuple[Any, ...]) -> None:
    path = _absolute(args[0])
    if path is not None and (len(args) < 3 or args[2] is None or args[2] == -1):
        for recorder in tuple(ACTIVE):
            recorder._made.add(path)


def _on_unrecordable(event: str, args: tuple[Any, ...]) -> None:
    if event == "ctypes.dlopen":  # a library of the project's own, named by its path
        name = args[0] if args else None
        if not (isinstance(name, str) and os.sep in name
                and classify(abspath(name), None) == "local"):
            return
    note = incomplete_note(event, args)
    if note is not None:
        for recorder in tuple(ACTIVE):
            recorder._note_incomplete(note)


_HANDLERS: dict[str, Any] = {
    "open": _on_open, "os.listdir": _on_listing, "os.scandir": _on_listing,
    "os.mkdir": _on_mkdir,
}
_UNRECORDABLE = frozenset({"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn",
                           "os.spawn", "os.fork", "os.forkpty", "ctypes.dlopen",
                           "socket.connect"})


def audit_hook(event: str, args: tuple[Any, ...]) -> None:
    """The one process-wide hook (hooks cannot be removed): a no-op unless a recorder is
    active, never raises, and ignores the events caused by itself or by ``result()``."""
    if not ACTIVE:
        return
    handler = _HANDLERS.get(event)
    if handler is None and event not in _UNRECORDABLE:
        return
    with contextlib.suppress(Exception):
        if getattr(_TLS, "busy", False):
            return
        _TLS.busy = True
        try:
            if handler is not None:
                handler(args)
            else:
                _on_unrecordable(event, args)
        finally:
            _TLS.busy = False


def _on_probe(target: object) -> None:
    """``os.stat``/``os.lstat`` (so ``os.path.exists``, ``isfile`` ...) called while
    recording: no audit event exists for them."""
    if not ACTIVE or getattr(_TLS, "busy", False):
        return
    with contextlib.suppress(Exception):
        _TLS.busy = True
        try:
            path = _absolute(target)
            if path is not None:
                for recorder in tuple(ACTIVE):
                    recorder._note_probe(path)
        finally:
            _TLS.busy = False


def _on_env(name: str, value: str | None, write: bool) -> None:
    if not ACTIVE or getattr(_TLS, "busy", False) or not isinstance(name, str):
        return
    with contextlib.suppress(Exception):
        for recorder in tuple(ACTIVE):
            recorder._note_env(name, value, write)


def _probing(real: Callable[..., os.stat_result]) -> Callable[..., os.stat_result]:
    def probe(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if ACTIVE and kwargs.get("dir_fd") is None:
            _on_probe(path)
        return real(path, *args, **kwargs)

    probe.__name__, probe.__doc__ = real.__name__, real.__doc__
    return probe


def _spawning(real: Callable[..., int]) -> Callable[..., int]:
    """``_posixsubprocess.fork_exec`` as called by ``multiprocessing`` (its spawn and
    forkserver start methods raise no audit event); ``subprocess`` raises its own."""
    def fork_exec(*args: Any, **kwargs: Any) -> int:
        if ACTIVE and not getattr(_TLS, "busy", False):
            caller = sys._getframe(1).f_code.co_filename
            if os.path.basename(caller) != "subprocess.py":
                for recorder in tuple(ACTIVE):
                    recorder._note_incomplete(SPAWNED)
        return real(*args, **kwargs)

    return fork_exec


#: The note of a process started by ``multiprocessing`` (spawn, forkserver).
SPAWNED = "a process started by multiprocessing"

try:
    import _posixsubprocess

    _REAL_FORK_EXEC: Any = _posixsubprocess.fork_exec
    _SPAWN_HOOK: Any = _spawning(_REAL_FORK_EXEC)
except (ImportError, AttributeError):  # not POSIX
    _posixsubprocess = None  # type: ignore[assignment]


def observe(on: bool) -> None:
    """Wrap ``os.stat``/``os.lstat`` (and ``_posixsubprocess.fork_exec``) and make
    ``os.environ`` record (``on``), or undo it; call with :data:`HOOK_LOCK` held."""
    environ = os.environ
    if _posixsubprocess is not None:
        _posixsubprocess.fork_exec = _SPAWN_HOOK if on else _REAL_FORK_EXEC
    BULK_READ.keys = None  # names this thread listed before: no longer a copy's
    if on:
        os.stat, os.lstat = _probing(REAL_STAT), _probing(REAL_LSTAT)
        if type(environ) is os._Environ:
            environ.__class__ = RecordingEnviron
        ENV_HOOK[0] = _on_env
    else:
        os.stat, os.lstat = REAL_STAT, REAL_LSTAT
        if type(environ) is RecordingEnviron:
            environ.__class__ = os._Environ  # type: ignore[assignment]


def install_hook() -> None:
    global _hook_installed  # noqa: PLW0603 - one hook per process, installed on first use
    with HOOK_LOCK:
        if not _hook_installed:
            sys.addaudithook(audit_hook)
            _hook_installed = True


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Opens made by this thread inside the block are not recorded."""
    previous = getattr(_TLS, "busy", False)
    _TLS.busy = True
    try:
        yield
    finally:
        _TLS.busy = previous


def state_now(path: str) -> tuple[Signature, str | None] | None:
    """A file's state when first read: its stat signature and, when it is too new to trust
    its stat (:data:`.paths.RACY_WINDOW_NS`), its SHA-256; None if absent."""
    try:
        st = REAL_STAT(path)
    except (OSError, ValueError):
        return None
    digest = None
    if (stat.S_ISREG(st.st_mode) and not under_any(path, PSEUDO_FS)
            and time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) <= RACY_WINDOW_NS):
        with contextlib.suppress(OSError):
            digest = file_sha256(path)
    return signature(st), digest
