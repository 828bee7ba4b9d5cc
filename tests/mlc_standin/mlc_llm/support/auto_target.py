"""From ``--device`` / ``--host`` to a TVM target, shaped like ``mlc_llm.support.auto_target``.

TVM is imported inside the functions that need it. What the stand-in does differently from
the real one: a named GPU device (``cuda``, ``cuda:1``, ``metal``, ...) is never probed, its
target is built from a preset, so code for a GPU compiles on a machine without one (the
CUDA architecture comes from ``MLC_STANDIN_CUDA_ARCH``, default ``sm_80``; the ROCm one from
``MLC_STANDIN_ROCM_ARCH``, default ``gfx90a``). Only ``auto`` probes.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

#: Devices whose output is a static ``.tar`` for an app (system library, prefixed symbols).
PACKAGING_DEVICES = ("iphone", "macabi", "android")

_METAL = {
    "kind": "metal",
    "max_threads_per_block": 256,
    "max_shared_memory_per_block": 32768,
    "thread_warp_size": 1,
}

#: Target dicts (TVM JSON form) of the device names the stand-in knows, host left out.
PRESET: dict[str, dict[str, Any]] = {
    "iphone": {
        **_METAL,
        "libs": ["iphoneos"],
        "host": {"kind": "llvm", "mtriple": "arm64-apple-darwin"},
    },
    "macabi": {
        **_METAL,
        "libs": ["macosx"],
        "host": {"kind": "llvm", "mtriple": "arm64-apple-ios18.0-macabi"},
    },
    "android": {"kind": "opencl", "host": {"kind": "llvm", "mtriple": "aarch64-linux-android"}},
    "metal": _METAL,
    "opencl": {"kind": "opencl"},
    "webgpu": {"kind": "webgpu"},
    "vulkan": {
        "kind": "vulkan",
        "max_threads_per_block": 256,
        "max_shared_memory_per_block": 32768,
        "thread_warp_size": 1,
        "supports_float16": 1,
        "supports_int64": 1,
    },
}

_AUTO_ORDER = ("cuda", "rocm", "metal", "vulkan", "opencl")
_DEVICE = re.compile(r"^(?P<name>[a-z]+)(?::(?P<index>\d+))?$")


def _gpu_preset(name: str) -> dict[str, Any] | None:
    if name == "cuda":
        arch = os.environ.get("MLC_STANDIN_CUDA_ARCH", "sm_80")
        if not re.fullmatch(r"sm_\d+[a-z]?", arch):
            raise ValueError(f"MLC_STANDIN_CUDA_ARCH must look like sm_80, not {arch!r}")
        return {"kind": "cuda", "arch": arch}
    if name == "rocm":
        return {"kind": "rocm", "mcpu": os.environ.get("MLC_STANDIN_ROCM_ARCH", "gfx90a")}
    return PRESET.get(name)


def _auto_device() -> str:
    import tvm

    for name in _AUTO_ORDER:
        try:
            if tvm.runtime.device(name, 0).exist:
                return name
        except Exception:  # a runtime that is not built in means "not present"
            continue
    return "cpu"


def detect_target_and_host(device: str, host: str = "auto") -> Any:
    """The ``tvm.target.Target`` for ``device`` (``ValueError`` when it names none).

    ``device`` is ``auto``, ``cpu``/``llvm``, a GPU name with an optional ``:index``
    (``cuda``, ``rocm``, ``metal``, ``vulkan``, ``opencl``, ``webgpu``), a packaging device
    (``iphone``, ``macabi``, ``android``), or a TVM target in JSON form. ``host`` is
    ``auto`` (plain ``llvm`` for this machine) or an LLVM triple, as in the real CLI.
    """
    import tvm

    host_target: dict[str, Any] = {"kind": "llvm"}
    if host != "auto":
        host_target["mtriple"] = host
    spec: dict[str, Any] | None
    if device.startswith("{"):
        try:
            spec = json.loads(device)
        except json.JSONDecodeError as err:
            raise ValueError(f"Invalid target JSON: {device}: {err}") from err
    else:
        match = _DEVICE.match(device)
        name = match.group("name") if match else device
        if name == "auto":
            name = _auto_device()
        spec = dict(host_target) if name in ("cpu", "llvm") else _gpu_preset(name)
    if spec is None:
        try:
            spec = dict(tvm.target.Target(device).export())
        except Exception as err:
            raise ValueError(f"Invalid target: {device}") from err
    try:
        if spec.get("kind") == "llvm" or "host" in spec:
            return tvm.target.Target(spec)
        return tvm.target.Target(spec, host=host_target)
    except Exception as err:
        raise ValueError(f"Invalid target: {device}: {err}") from err


def detect_system_lib_prefix(
    device: str, prefix_hint: str, model_name: str, quantization: str
) -> str:
    """The effective system-lib prefix, by the real rules: for a packaging device,
    ``auto`` becomes ``{model}_{quantization}_`` and anything else is kept; for every
    other device the prefix is ``""`` whatever was asked."""
    if device not in PACKAGING_DEVICES:
        return ""
    if prefix_hint == "auto":
        return f"{model_name}_{quantization}_".replace("-", "_")
    return prefix_hint
