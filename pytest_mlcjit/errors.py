"""Every exception (and warning) pytest-mlcjit raises, in one place.

Every error a user can cause derives from :class:`MlcJitError`, so one ``except`` catches
them all, and each message names the offending value and what would have been valid.
Errors that a report renders carry fields (:class:`CompileError`), so nothing ever takes
a message apart again. Interruptions derive from :class:`KeyboardInterrupt`, so that
pytest stops the run as it does for Ctrl-C. Only the standard library is imported here.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any


class MlcJitError(Exception):
    """Base class of every pytest-mlcjit error."""


class ConfigError(MlcJitError, ValueError):
    """An option, environment variable or ini value is invalid."""


class SpecError(MlcJitError, ValueError):
    """A model spec or marker argument is malformed; nothing was compiled or written."""


class JitDisabledError(MlcJitError):
    """The policy is ``OFF``: nothing is read from or written to the cache."""


class CacheMissError(MlcJitError):
    """The policy is ``READONLY`` and the library is absent, corrupt or stale."""


class CorruptEntryError(MlcJitError):
    """A cached library does not match the checksum or size in its manifest."""


#: Between a failed compile's message and the last lines of its log.
LOG_TAIL_MARK = "\n--- last lines of the log ---"
#: The line a failure remembered from an earlier attempt in the same run ends with.
REMEMBERED_NOTE = "(remembered from an earlier attempt in this run)"


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{max(0.0, seconds):.0f} s"


class CompileError(MlcJitError):
    """Compiling a library failed (non-zero exit, missing output, timeout, a full disk).

    Its fields say what happened; the message is made from them:

    ``model``: what was compiled (the request, described); ``cause``: why, in one phrase
    ("the compiler exited with code 1"); ``log_path``: the kept compile log, if any;
    ``log_tail``: its last lines; ``known_since``: for a *known failure* (an earlier run
    recorded it, and nothing it depends on changed), when it was recorded;
    ``remembered``: the failure was remembered from an earlier attempt in this run.
    A ``message`` given explicitly replaces the made one.
    """

    def __init__(self, message: str | None = None, *, model: str = "", cause: str = "",
                 log_path: str | None = None, log_tail: str | None = None,
                 known_since: float | None = None, remembered: bool = False) -> None:
        self.model, self.cause = model, cause
        self.log_path, self.log_tail = log_path, log_tail
        self.known_since, self.remembered = known_since, remembered
        self._message = message
        super().__init__(message if message is not None else self.render())

    def head(self) -> str:
        """The message without the log's last lines."""
        if self._message is not None:
            return self._message.partition(LOG_TAIL_MARK)[0]
        lines = [f"compiling {self.model} failed: {self.cause}"]
        if self.log_path:
            lines.append(f"compile log: {self.log_path}")
        if self.known_since is not None:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.known_since))
            lines.append(
                f"(a known failure, recorded {when}, {_ago(time.time() - self.known_since)} "
                "ago: not compiled again, since its key and its recorded inputs are "
                "unchanged; --mlc-jit-retry-failed or --mlc-jit-policy=REDO compiles it again)")
        return "\n".join(lines)

    def render(self) -> str:
        text = self.head()
        if self.log_tail is not None:
            text += f"{LOG_TAIL_MARK}\n{self.log_tail}"
        if self.remembered:
            text += f"\n{REMEMBERED_NOTE}"
        return text

    def fields(self) -> dict[str, Any]:
        """The fields as plain data (kept in a failure record; see :meth:`from_fields`)."""
        return {"model": self.model, "cause": self.cause, "log_path": self.log_path,
                "log_tail": self.log_tail}

    @classmethod
    def from_fields(cls, data: dict[str, Any], **more: Any) -> CompileError:
        return cls(model=str(data.get("model", "")), cause=str(data.get("cause", "")),
                   log_path=data.get("log_path"), log_tail=data.get("log_tail"), **more)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self._message, {**self.fields(),
                                                        "known_since": self.known_since,
                                                        "remembered": self.remembered}))


def _rebuild(cls: type[CompileError], message: str | None,
             fields: dict[str, Any]) -> CompileError:
    return cls(message, **fields)


class InputError(MlcJitError, TypeError):
    """``CompiledModel.run`` was called with an unknown function, or with inputs that do not
    match the function's signature (count, names, shapes, dtypes); nothing was run."""


class LockTimeoutError(MlcJitError, TimeoutError):
    """Waiting for another process to finish compiling the same key took too long."""


class UntrustedCacheError(MlcJitError, PermissionError):
    """The cache root can be written by other users, so loading from it is refused."""


# -- the remote tier ------------------------------------------------------------------------
class RemoteError(MlcJitError):
    """A remote cache operation failed (base class of the remote errors)."""


class RemoteUnavailableError(RemoteError):
    """The remote could not be reached or did not answer in time: connection refused,
    timeouts, throttling (429, 503 SlowDown) or a server error (5xx), after retries."""


class RemoteAuthError(RemoteError):
    """The remote refused the credentials (401/403, invalid or expired keys, access denied).
    Never a cache miss: the configuration is wrong and must be fixed."""


class RemoteIntegrityError(RemoteError):
    """Bytes or a manifest from the remote do not match what they claim: wrong size or
    SHA-256, a missing blob, or a missing or invalid signature."""


class RemoteConfigError(RemoteError, ConfigError):
    """The remote is misconfigured: a malformed URL, a bucket or directory that does not
    exist, or the ``remote`` extra (boto3) is not installed."""


# -- interruptions (KeyboardInterrupt: pytest stops the run) ---------------------------------
class CompileInterrupted(KeyboardInterrupt):
    """A build was stopped because its run is being interrupted."""


class LockWaitCancelled(KeyboardInterrupt):
    """A wait for a lock was given up because its run is being interrupted."""


# -- control flow inside the package ----------------------------------------------------------
class BadURL(ValueError):
    """Raised by a remote adapter's ``parse_url``: why the URL is not of its form (the
    registry turns it into a RemoteConfigError listing every valid form)."""


class LauncherStop(BaseException):
    """Raised by a compile launcher's signal handler: kill the whole tree and exit."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class KeyBusy(Exception):
    """A prefetch found its key held by another thread or process (it is being compiled
    there): the prefetch moves on to the next library instead of waiting."""


class CliError(Exception):
    """A runtime failure of the ``pytest-mlcjit`` command: ``pytest-mlcjit: error: …``,
    exit status 1."""

    status = 1


class CliUsageError(CliError):
    """A bad argument of the ``pytest-mlcjit`` command, exit status 2 (as argparse's own)."""

    status = 2


def argparse_type(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type=`` that shows our error's message (argparse would replace a
    ValueError's by a generic 'invalid value')."""

    def wrapped(text: str) -> Any:
        try:
            return convert(text)
        except MlcJitError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return wrapped
