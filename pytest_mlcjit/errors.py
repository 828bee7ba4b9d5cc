"""The exceptions pytest-mlcjit raises.

Every error a user can cause derives from :class:`MlcJitError`, so one ``except`` catches
them all, and each message names the offending value and what would have been valid.
"""

from __future__ import annotations

import argparse
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


class CompileError(MlcJitError):
    """Compiling a library failed (non-zero exit, missing output, or timeout)."""

    def __init__(self, message: str, *, log_path: str | None = None) -> None:
        super().__init__(message)
        self.log_path = log_path


class InputError(MlcJitError, TypeError):
    """``CompiledModel.run`` was called with an unknown function, or with inputs that do not
    match the function's signature (count, names, shapes, dtypes); nothing was run."""


class LockTimeoutError(MlcJitError, TimeoutError):
    """Waiting for another process to finish compiling the same key took too long."""


class UntrustedCacheError(MlcJitError, PermissionError):
    """The cache root can be written by other users, so loading from it is refused."""


def argparse_type(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type=`` that shows our error's message (argparse would replace a
    ValueError's by a generic 'invalid value')."""

    def wrapped(text: str) -> Any:
        try:
            return convert(text)
        except MlcJitError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return wrapped
