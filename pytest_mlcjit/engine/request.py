"""A request as it goes through the engine: :class:`Query`, the build request as a store
sees it, and :class:`RequestState`, what the request learns on its way (made where it
starts and passed down, never kept on a thread)."""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from pytest_mlcjit._version import __version__
from pytest_mlcjit.cache.layout import EntryPaths
from pytest_mlcjit.cache.manifest import Manifest
from pytest_mlcjit.compiler.backends import Backend, BuildRequest
from pytest_mlcjit.engine.model import CompiledModel
from pytest_mlcjit.engine.stats import Outcome


class Query:
    """A build request as a store sees it (:class:`~..cache.store.interface.EntryQuery`):
    its key, and its backend's rules for where its entries live and whether one fits."""

    def __init__(self, req: BuildRequest, backend: Backend) -> None:
        self.req, self.backend = req, backend

    @property
    def digest(self) -> str:
        return self.req.digest

    @property
    def describe(self) -> str:
        return self.req.describe

    def locate(self, root: Path, entry: str | None = None) -> EntryPaths:
        return self.backend.locate(self.req, root, entry)

    def inputs_base(self) -> Path | None:
        return self.backend.inputs_base(self.req)

    def stale(self, manifest: Mapping[str, Any]) -> str | None:
        return self.backend.stale(self.req, manifest)

    def adopt(self, paths: EntryPaths) -> Manifest | None:
        return self.backend.adopt(self.req, paths)

    def manifest(self, staging: Path, *, seconds: float, run_id: str) -> Manifest:
        """The manifest of the library just compiled in ``staging`` (the store adds its
        digest, file name, SHA-256 and size when it publishes it)."""
        req = self.req
        manifest: dict[str, Any] = {
            "format": req.key.get("format"), "backend": req.backend, "key": req.key,
            "key_digest": req.digest,
            "toolchain": dict(req.toolchain), "compile_seconds": round(seconds, 3),
            "created": time.time(), "run_id": run_id,
            "host": socket.gethostname(), "plugin_version": __version__,
            **self.backend.collect(req, staging),
        }
        return cast(Manifest, manifest)


@dataclasses.dataclass
class RequestState:
    """One request's state, made where the request starts and passed down."""

    #: A prefetch: not counted as a request (its compile is counted as prefetched).
    background: bool = False
    #: Wait for a key another thread or process holds; False: a prefetch moves on.
    blocking: bool = True
    req: BuildRequest | None = None
    #: Seconds spent waiting for another's compile.
    waited: float = 0.0
    #: The library appeared while this request waited (another compiled it).
    waited_for_other: bool = False
    #: Which tier served it (``remote``: a download).
    source: str = "local"
    #: How long the request's last job ran (a failed compile's time).
    job_seconds: float = 0.0

    def outcome(self, model: CompiledModel) -> Outcome:
        if not model.hit:
            return "compiled"
        if self.source == "remote":
            return "remote_hit"
        return "waited" if self.waited_for_other else "hit"
