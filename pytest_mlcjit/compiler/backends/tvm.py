"""The apache-tvm backend: Relax models from an importable factory, built by ``tvm.compile``."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pytest_mlcjit.cache.layout import EntryPaths, tvm_entry
from pytest_mlcjit.compiler.backends.base import Backend, BuildContext, BuildRequest
from pytest_mlcjit.compiler.toolchain import (
    describe_changes,
    host_fingerprint,
    nvcc_version,
    toolchain_changes,
    tvm_fingerprint,
)
from pytest_mlcjit.device import Device, TargetJSON, device_for_target, target_for, target_kind
from pytest_mlcjit.errors import SpecError
from pytest_mlcjit.inputs.closure import import_root, local_import_closure
from pytest_mlcjit.inputs.explicit import expand_files, explicit_inputs_digest
from pytest_mlcjit.key import CACHE_FORMAT, sha256_digest
from pytest_mlcjit.spec import TVMModel


def toolchain(target: TargetJSON | str) -> dict[str, Any]:
    """What compiles the bytes: TVM's version and build with the versions of the
    distributions imported with it (apache-tvm-ffi…), and nvcc's release for CUDA targets."""
    chain: dict[str, Any] = {"tvm": tvm_fingerprint()}
    if target_kind(target) == "cuda":
        chain["nvcc"] = nvcc_version()
    return chain


class TVMBackend(Backend):
    name = "tvm"

    def request(self, spec: Any, device: Device | None, ctx: BuildContext) -> BuildRequest:
        if not isinstance(spec, TVMModel):
            raise SpecError(f"expected a TVMModel, got {spec!r}")
        if spec.target is not None:
            target = spec.target
            device = device_for_target(target)
        elif device is None:
            raise SpecError(f"{spec!r} has no target and no device to compile for")
        else:
            presence = ctx.presence(device) if device.is_gpu else None
            target = target_for(device, presence)
        chain = toolchain(target)
        # First: its errors name the spec (a missing module, a missing name, a syntax error).
        factory_sha256 = spec.source_digest()
        module = spec.factory.partition(":")[0]
        base = import_root(module)
        explicit: list[dict[str, Any]] = []
        if spec.files:
            found = importlib.util.find_spec(module)  # exists: source_digest found it
            module_dir = Path(str(found.origin if found else base)).parent
            explicit = explicit_inputs_digest(expand_files(spec.files, module_dir), base,
                                              checker=ctx.checker)
        key: dict[str, Any] = {
            "format": CACHE_FORMAT,
            "backend": "tvm",
            "factory": spec.factory,
            "factory_sha256": factory_sha256,
            "config": spec.config,
            "target": target,
            "host": host_fingerprint(),
            "opt_level": spec.opt_level,
            "toolchain": chain,
        }
        if explicit:
            key["files"] = explicit
        return BuildRequest(
            backend="tvm", spec=spec, device=device, target=target, key=key,
            digest=sha256_digest(key), describe=f"{spec!r} for target {json.dumps(target)}",
            toolchain=chain, extra={"inputs_base": str(base)},
        )

    def locate(self, req: BuildRequest, root: Path, entry: str | None = None) -> EntryPaths:
        return tvm_entry(root, entry or req.digest)

    def inputs_base(self, req: BuildRequest) -> Path | None:
        return Path(req.extra["inputs_base"])

    def static_inputs(self, req: BuildRequest) -> list[dict[str, Any]]:
        """The factory module and every local module it imports, directly or through
        other local modules (read, not run)."""
        module = req.spec.factory.partition(":")[0]
        return explicit_inputs_digest(local_import_closure(module), self.inputs_base(req) or "")

    def command(self, req: BuildRequest, staging: Path, root: Path) -> tuple[list[str], Path]:
        spec: TVMModel = req.spec
        output = staging / "lib.so"
        job = {"factory": spec.factory, "config": spec.config, "target": req.target,
               "opt_level": spec.opt_level, "output": str(output),
               "meta": str(staging / "meta.json"),
               "exclude": [str(staging), str(root)],
               # declared inputs, compared again once compiled (changed: not published)
               "files": req.key.get("files", []), "files_base": req.extra["inputs_base"]}
        (staging / "request.json").write_text(json.dumps(job), encoding="utf-8")
        argv = [sys.executable, "-m", "pytest_mlcjit.compiler.backends._tvm_compile",
                str(staging / "request.json")]
        return argv, output

    def collect(self, req: BuildRequest, staging: Path) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((staging / "meta.json").read_text(encoding="utf-8"))
        data["name"] = req.spec.name  # the spec's short name, for `pytest-mlcjit list`
        return data

    def failed_compile(self, req: BuildRequest, staging: Path) -> dict[str, Any] | None:
        """The failure ``_tvm_compile`` wrote down in ``meta.json`` when the factory or
        ``tvm.compile`` raised (not for a crash, a kill, a timeout or a missing file)."""
        try:
            data = json.loads((staging / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if (not isinstance(data, dict) or data.get("deterministic") is not True
                or not isinstance(data.get("inputs"), dict)
                or not isinstance(data.get("error"), str)):
            return None
        missing = data.get("missing")
        return {"error": data["error"], "inputs": data["inputs"],
                "missing": [str(p) for p in missing] if isinstance(missing, list) else []}

    def stale(self, req: BuildRequest, manifest: Mapping[str, Any]) -> str | None:
        key = manifest.get("key")
        recorded = key.get("toolchain") if isinstance(key, Mapping) else None
        if recorded is not None and recorded != req.key["toolchain"]:
            changes = (toolchain_changes(recorded, req.key["toolchain"])
                       if isinstance(recorded, Mapping) else [])
            return describe_changes(changes) if changes else (
                f"built by toolchain {recorded}, installed is {req.key['toolchain']}")
        return None
