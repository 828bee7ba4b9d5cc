"""The apache-tvm backend: Relax models from an importable factory, built by ``tvm.compile``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..cache import EntryPaths
from ..device import Device, Presence, TargetJSON, device_for_target, target_for, target_kind
from ..errors import SpecError
from ..key import CACHE_FORMAT, host_fingerprint, nvcc_version, sha256_digest, tvm_fingerprint
from ..spec import TVMModel
from . import BuildRequest

SUBDIR = "tvm"
SUFFIX = "so"


def toolchain(target: TargetJSON | str) -> dict[str, Any]:
    """What compiles the bytes: TVM's version and build, and nvcc's for CUDA targets."""
    chain: dict[str, Any] = {"tvm": tvm_fingerprint()}
    if target_kind(target) == "cuda":
        chain["nvcc"] = nvcc_version()
    return chain


def request(spec: TVMModel, device: Device | None, presence: Presence | None) -> BuildRequest:
    """Build the request for ``spec`` on ``device`` (or on its explicit target)."""
    if not isinstance(spec, TVMModel):
        raise SpecError(f"expected a TVMModel, got {spec!r}")
    if spec.target is not None:
        target = spec.target
        device = device_for_target(target)
    elif device is None:
        raise SpecError(f"{spec!r} has no target and no device to compile for")
    else:
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
    digest = sha256_digest(key)

    def locate(root: Path) -> EntryPaths:
        return EntryPaths(digest, root / SUBDIR / f"{digest}.{SUFFIX}")

    def command(staging: Path) -> tuple[list[str], Path]:
        output = staging / f"lib.{SUFFIX}"
        job = {"factory": spec.factory, "config": spec.config, "target": target,
               "opt_level": spec.opt_level, "output": str(output),
               "meta": str(staging / "meta.json")}
        (staging / "request.json").write_text(json.dumps(job), encoding="utf-8")
        argv = [sys.executable, "-m", "pytest_mlcjit.backends._tvm_compile",
                str(staging / "request.json")]
        return argv, output

    def collect(staging: Path) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((staging / "meta.json").read_text(encoding="utf-8"))
        return data

    def stale(manifest: Any) -> str | None:
        recorded = manifest.get("key", {}).get("toolchain")
        if recorded is not None and recorded != key["toolchain"]:
            return f"built by toolchain {recorded}, installed is {key['toolchain']}"
        return None

    return BuildRequest(
        backend="tvm", spec=spec, device=device, target=target, key=key, digest=digest,
        locate=locate, command=command, collect=collect, stale=stale,
        describe=f"{spec!r} for target {json.dumps(target)}", toolchain=chain,
    )
