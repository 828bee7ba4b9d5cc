"""The backend seam: a typed :class:`Backend` base class, its registry, and the
:class:`BuildRequest` it makes (plain data: it pickles, so it can be sent to another
process)."""

from __future__ import annotations

import abc
import dataclasses
import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from pytest_mlcjit._util.fs import WriteWarnings
from pytest_mlcjit.cache.layout import EntryPaths
from pytest_mlcjit.cache.manifest import Manifest
from pytest_mlcjit.device import Device, Presence, TargetJSON
from pytest_mlcjit.errors import SpecError
from pytest_mlcjit.inputs.check import InputChecker

#: Backend name (a spec's ``backend`` attribute) → ``module:class`` that implements it,
#: imported on first use.
REGISTRY: dict[str, str] = {
    "tvm": "pytest_mlcjit.compiler.backends.tvm:TVMBackend",
    "mlc": "pytest_mlcjit.compiler.backends.mlc:MLCBackend",
}
_instances: dict[str, Backend] = {}


@dataclasses.dataclass(frozen=True)
class BuildRequest:
    """One library to produce: a validated spec on a device, its key, and what its backend
    needs to build it. Plain, immutable data."""

    backend: str
    spec: Any
    device: Device
    target: TargetJSON | str
    key: dict[str, Any]
    digest: str
    #: Short human description for messages: the config that was asked for.
    describe: str = ""
    #: What compiles the bytes (versions, build commits), recorded in the manifest.
    toolchain: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: False for libraries no device here can run (packaging targets such as android).
    runnable: bool = True
    #: Backend-specific plain data (file suffix, system-lib prefix…).
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class BuildContext:
    """What a backend may need from the run to make a request."""

    run_id: str
    #: The configured cache directory (None: each backend's default root).
    cache_dir: Path | None
    #: Whether the request's policy writes (so the backend may keep memos in the cache).
    writes: bool
    #: Whether a device is present (probed once per run).
    presence: Callable[[Device], Presence]
    #: The run's input checker (hashes explicit input files once per run and stat).
    checker: InputChecker = dataclasses.field(default_factory=InputChecker)
    #: The run's write warnings (a key memo that cannot be kept is said once).
    warnings: WriteWarnings = dataclasses.field(default_factory=WriteWarnings)


class Backend(abc.ABC):
    """A compile backend. Subclasses implement :meth:`request`, :meth:`locate` and
    :meth:`command`; the other steps have defaults that suit a backend without them."""

    #: The ``backend`` attribute of the specs this backend compiles.
    name: ClassVar[str]

    @abc.abstractmethod
    def request(self, spec: Any, device: Device | None, ctx: BuildContext) -> BuildRequest:
        """Validate ``spec`` for ``device`` and key it (SpecError if it is malformed)."""

    @abc.abstractmethod
    def locate(self, req: BuildRequest, root: Path, entry: str | None = None) -> EntryPaths:
        """Where ``req``'s entry lives under a cache root; ``entry``: the digest of one of its
        variants (see :meth:`inputs_base`), by default the request's own digest."""

    @abc.abstractmethod
    def command(self, req: BuildRequest, staging: Path, root: Path) -> tuple[list[str], Path]:
        """The compile command for a scratch dir (of the cache root ``root``), and the
        library it will write there."""

    def inputs_base(self, req: BuildRequest) -> Path | None:
        """Where the compile records its inputs relative to (the ``sys.path`` directory of
        the factory module), or None if this backend records none. A backend that records
        inputs writes them as ``inputs`` in its ``meta``; the engine then keeps one entry per
        input state (a *variant*), named by the key and the inputs' digests."""
        return None

    def collect(self, req: BuildRequest, staging: Path) -> dict[str, Any]:
        """Extra manifest fields, read after a successful compile."""
        return {}

    def failed_compile(self, req: BuildRequest, staging: Path) -> dict[str, Any] | None:
        """What a compile that exited non-zero said about its failure: ``{"error",
        "inputs", "missing"}`` when it was the factory's or the compiler's own verdict
        (deterministic: worth remembering for this key and input state), else None."""
        return None

    def stale(self, req: BuildRequest, manifest: Mapping[str, Any]) -> str | None:
        """Why an existing entry no longer fits ``req`` (its toolchain changed…), or None."""
        return None

    def adopt(self, req: BuildRequest, paths: EntryPaths) -> Manifest | None:
        """A manifest for a library found without one (put there by another tool): raises
        CorruptEntryError unless it proves loadable; None if this backend adopts nothing."""
        return None

    def static_inputs(self, req: BuildRequest) -> list[dict[str, Any]]:
        """The source files ``req`` is known to depend on before compiling (``[{"path",
        "sha256"}]``), for a CI cache key; recorded inputs cover the rest after a compile."""
        return []

    def staging_parent(self, req: BuildRequest, root: Path) -> tuple[Path | None, str]:
        """Where to stage compiles (None: the cache's own staging dir), and a note why."""
        return None, ""


def get_backend(name: str) -> Backend:
    """The backend registered as ``name``."""
    found = _instances.get(name)
    if found is None:
        if name not in REGISTRY:
            raise SpecError(f"unknown backend {name!r}: expected one of {', '.join(REGISTRY)}")
        module, _, cls = REGISTRY[name].partition(":")
        found = _instances[name] = getattr(importlib.import_module(module), cls)()
    return found


def locate(req: BuildRequest, root: Path) -> EntryPaths:
    """Where ``req``'s entry lives under the cache root ``root``."""
    return get_backend(req.backend).locate(req, root)


def backend_for(spec: Any) -> Backend:
    """The backend of a spec (its ``backend`` attribute), or SpecError."""
    name = getattr(spec, "backend", None)
    if not isinstance(name, str) or name not in REGISTRY:
        raise SpecError(
            f"invalid model spec {spec!r}: expected a TVMModel, an MLCModel or an MLC "
            "model directory"
        )
    return get_backend(name)
