"""Subprocess entry point: ``python -m pytest_mlcjit._probe cuda:0 rocm:0 ...``.

Prints one JSON object mapping each ``kind:index`` to ``{"present", "reason", "arch"}``.
``kind:*`` counts the GPUs of a kind: indexes 0, 1… are probed until one is absent, and each
present one is in the output under its ``kind:index``.
Runs in its own process so that a broken driver cannot hang or crash the test process.
"""

from __future__ import annotations

import json
import sys
from typing import Any

#: The most GPUs of one kind ``kind:*`` looks for (as :data:`..device.MAX_GPUS`).
_MAX_GPUS = 64


def _probe_one(tvm: Any, kind: str, index: int) -> dict[str, Any]:
    dev = tvm.runtime.device(kind, index)
    if not dev.exist:
        return {"present": False, "reason": f"TVM sees no {kind}:{index}", "arch": None}
    arch = None
    if kind == "cuda":
        arch = "sm_" + str(dev.compute_version).replace(".", "")
    elif kind == "rocm":
        arch = f"gfx{str(dev.compute_version).replace('.', '')}"
    return {"present": True, "reason": "", "arch": arch}


def _count(tvm: Any, kind: str) -> dict[str, Any]:
    """Every present GPU of ``kind``, from index 0 up to the first absent one."""
    found: dict[str, Any] = {}
    for index in range(_MAX_GPUS):
        try:
            entry = _probe_one(tvm, kind, index)
        except Exception:  # a driver error: no more GPUs of this kind usable here
            break
        if not entry["present"]:
            break
        found[f"{kind}:{index}"] = entry
    return found


def main(argv: list[str]) -> int:
    try:
        import tvm
    except ImportError as exc:
        why = f"apache-tvm is not importable: {exc}"
        out = {n: {"present": False, "reason": why, "arch": None} for n in argv}
        print(json.dumps(out))
        return 0
    result: dict[str, Any] = {}
    for name in argv:
        kind, _, index = name.partition(":")
        if index == "*":
            result.update(_count(tvm, kind))
            continue
        try:
            result[name] = _probe_one(tvm, kind, int(index or 0))
        except Exception as exc:  # a driver error means: not usable here
            why = f"{type(exc).__name__}: {exc}"
            result[name] = {"present": False, "reason": why, "arch": None}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
