"""Compile engines. Each backend turns a spec and a device into a :class:`BuildRequest`:
the key fields, where the entry lives, and the command that compiles it in a subprocess.

Backends know nothing of pytest or locking; :mod:`pytest_mlcjit.engine` drives them.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..cache import EntryPaths
from ..device import Device, TargetJSON


@dataclasses.dataclass(frozen=True)
class BuildRequest:
    """One library to produce: a validated spec on a device, its key, and how to build it."""

    backend: str
    spec: Any
    device: Device
    target: TargetJSON | str
    key: dict[str, Any]
    digest: str
    #: ``(cache_root) -> EntryPaths``: where this entry lives under a root.
    locate: Callable[[Path], EntryPaths]
    #: ``(staging_dir) -> (argv, output_path)``: the compile command for a scratch dir.
    command: Callable[[Path], tuple[list[str], Path]]
    #: ``(staging_dir) -> dict``: extra manifest fields read after a successful compile.
    collect: Callable[[Path], dict[str, Any]]
    #: Reasons an existing manifest is stale for this request (toolchain changed…).
    stale: Callable[[Mapping[str, Any]], str | None] = lambda _m: None
    #: Short human description for messages: the config that was asked for.
    describe: str = ""
    #: The cache root this backend uses when no ``--mlc-jit-cache-dir`` is given.
    default_root: Path | None = None
    #: What compiles the bytes (versions, build commits), recorded in the manifest.
    toolchain: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: ``(entry_paths) -> manifest`` for a library found without a manifest (put there by
    #: another tool): raises CorruptEntryError unless it proves loadable. None: a miss.
    adopt: Callable[[EntryPaths], dict[str, Any]] | None = None
    #: False for libraries no device here can run (packaging targets such as android).
    runnable: bool = True
    #: ``(cache_root) -> (parent dir or None, note for the log)``: where to stage compiles.
    staging_parent: Callable[[Path], tuple[Path | None, str]] | None = None


def child_env() -> dict[str, str]:
    """The environment of a compile subprocess: ours, with our ``sys.path`` as PYTHONPATH,
    so the child imports factories (and ``mlc_llm``) exactly as the test process can."""
    paths = [p or os.getcwd() for p in sys.path]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
