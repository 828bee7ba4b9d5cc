"""The four JIT policies MLC-LLM users know (resolved from the command line, environment and
ini like every option: :mod:`pytest_mlcjit.engine.settings`)."""

from __future__ import annotations

import enum

from pytest_mlcjit.errors import ConfigError


class Policy(str, enum.Enum):
    """What to do on a cache hit and on a miss.

    ========== ==================================== =====================================
    policy     hit                                  miss
    ========== ==================================== =====================================
    ON         use the cached library               compile, store, use
    OFF        error: JIT disabled                  error: JIT disabled
    REDO       recompile once per test run, use it  compile, store, use
    READONLY   use the cached library               error naming the key
    ========== ==================================== =====================================
    """

    ON = "ON"
    OFF = "OFF"
    REDO = "REDO"
    READONLY = "READONLY"

    @classmethod
    def parse(cls, value: str | Policy, *, source: str = "policy") -> Policy:
        """Parse ``value`` case-insensitively; a bad value raises :class:`ConfigError`."""
        if isinstance(value, Policy):
            return value
        text = str(value).strip().upper()
        try:
            return cls(text)
        except ValueError:
            valid = ", ".join(p.value for p in cls)
            raise ConfigError(
                f"invalid {source} {value!r}: expected one of {valid} (case-insensitive)"
            ) from None

    @property
    def writes(self) -> bool:
        """Whether this policy may write to the cache (create locks, compile, publish)."""
        return self in (Policy.ON, Policy.REDO)

