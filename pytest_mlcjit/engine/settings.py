"""What the engine needs, resolved once: :class:`Settings`, a frozen value that the xdist
controller sends to its workers as JSON."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pytest_mlcjit.device import Presence
from pytest_mlcjit.policy import Policy

#: The limit for one compilation, in seconds (``--mlc-jit-timeout``).
DEFAULT_COMPILE_TIMEOUT_S = 1800.0


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the engine needs, resolved once (by the plugin, or by you)."""

    policy: Policy = Policy.ON
    #: The cache root; None means each backend's default (see :mod:`.layout`).
    cache_dir: Path | None = None
    compile_timeout: float = DEFAULT_COMPILE_TIMEOUT_S
    #: How long to wait for another process's compile; None: compile timeout + 5 minutes.
    lock_timeout: float | None = None
    #: Identifies one test run across all its xdist workers (REDO and failure memory).
    run_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    #: Probed devices, ``{str(device): Presence}``; others are probed on first use.
    presence: Mapping[str, Presence] = dataclasses.field(default_factory=dict)
    allow_untrusted: bool = False
    #: The devices tests run on (resolved ``--mlc-device``).
    devices: tuple[str, ...] = ("cpu",)
    #: The remote tier (``s3://bucket/prefix`` or ``file:///path``), None for none; its mode
    #: (``read`` or ``readwrite``), and whether a remote error fails the run.
    remote: str | None = None
    remote_mode: str = "readwrite"
    remote_required: bool = False
    #: Pre-warmed compile workers (``--mlc-jit-compile-workers``): ``auto`` and ``on`` use
    #: them where they can run (Linux), ``off`` starts a fresh process per compile.
    compile_workers: str = "auto"
    #: Compile a known failure again although nothing changed (``--mlc-jit-retry-failed``).
    retry_failed: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", Policy.parse(self.policy))

    @property
    def effective_lock_timeout(self) -> float:
        return self.lock_timeout if self.lock_timeout is not None else self.compile_timeout + 300

    def to_json(self) -> dict[str, Any]:
        """A form that execnet can send to a worker."""
        return {
            "policy": self.policy.value,
            "cache_dir": str(self.cache_dir) if self.cache_dir else None,
            "compile_timeout": self.compile_timeout, "lock_timeout": self.lock_timeout,
            "run_id": self.run_id,
            "presence": {k: v.to_json() for k, v in self.presence.items()},
            "devices": list(self.devices), "allow_untrusted": self.allow_untrusted,
            "remote": self.remote, "remote_mode": self.remote_mode,
            "remote_required": self.remote_required,
            "compile_workers": self.compile_workers, "retry_failed": self.retry_failed,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Settings:
        return cls(
            policy=Policy.parse(data["policy"]),
            cache_dir=Path(data["cache_dir"]) if data["cache_dir"] else None,
            compile_timeout=data["compile_timeout"], lock_timeout=data["lock_timeout"],
            run_id=data["run_id"],
            presence={k: Presence.from_json(v) for k, v in data["presence"].items()},
            devices=tuple(data["devices"]), allow_untrusted=data["allow_untrusted"],
            remote=data.get("remote"), remote_mode=data.get("remote_mode", "readwrite"),
            remote_required=bool(data.get("remote_required")),
            compile_workers=str(data.get("compile_workers") or "auto"),
            retry_failed=bool(data.get("retry_failed")),
        )
