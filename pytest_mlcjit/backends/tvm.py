"""The apache-tvm backend: Relax models from an importable factory, built by ``tvm.compile``."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..device import Device, TargetJSON, device_for_target, target_for, target_kind
from ..errors import SpecError
from ..key import CACHE_FORMAT, host_fingerprint, nvcc_version, sha256_digest, tvm_fingerprint
from ..layout import EntryPaths, tvm_entry
from ..spec import TVMModel
from .base import Backend, BuildContext, BuildRequest


def toolchain(target: TargetJSON | str) -> dict[str, Any]:
    """What compiles the bytes: TVM's version and build, and nvcc's for CUDA targets."""
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
        key: dict[str, Any] = {
            "format": CACHE_FORMAT,
            "backend": "tvm",
            "factory": spec.factory,
            "factory_sha256": spec.source_digest(),
            "config": spec.config,
            "target": target,
            "host": host_fingerprint(),
            "opt_level": spec.opt_level,
            "toolchain": chain,
        }
        return BuildRequest(
            backend="tvm", spec=spec, device=device, target=target, key=key,
            digest=sha256_digest(key), describe=f"{spec!r} for target {json.dumps(target)}",
            toolchain=chain,
        )

    def locate(self, req: BuildRequest, root: Path) -> EntryPaths:
        return tvm_entry(root, req.digest)

    def command(self, req: BuildRequest, staging: Path) -> tuple[list[str], Path]:
        spec: TVMModel = req.spec
        output = staging / "lib.so"
        job = {"factory": spec.factory, "config": spec.config, "target": req.target,
               "opt_level": spec.opt_level, "output": str(output),
               "meta": str(staging / "meta.json")}
        (staging / "request.json").write_text(json.dumps(job), encoding="utf-8")
        argv = [sys.executable, "-m", "pytest_mlcjit.backends._tvm_compile",
                str(staging / "request.json")]
        return argv, output

    def collect(self, req: BuildRequest, staging: Path) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((staging / "meta.json").read_text(encoding="utf-8"))
        return data

    def stale(self, req: BuildRequest, manifest: Mapping[str, Any]) -> str | None:
        key = manifest.get("key")
        recorded = key.get("toolchain") if isinstance(key, Mapping) else None
        if recorded is not None and recorded != req.key["toolchain"]:
            return f"built by toolchain {recorded}, installed is {req.key['toolchain']}"
        return None
