"""Device strings, compile targets, and the presence probe.

A *device* is where a library runs (``cpu``, ``cuda:1``); a *target* is what the compiler
emits code for (``{"kind": "cuda", "arch": "sm_90"}``). Devices are probed once per session
in a subprocess with a timeout, so a broken driver can never hang the test process, and a
cheap look for the driver's files first means machines without a GPU pay nothing. The probe
can also count the GPUs of a kind (``count=True``: indexes 1, 2… in the same subprocess), so
that xdist workers can be spread over them (``--mlc-jit-gpu-assign``).

Test-only: ``MLCJIT_TEST_PRESENCE`` stands in for the GPUs where there are none (this
project's own tests). Its value is a JSON object ``{"cuda:0": {"present": true, "arch":
"sm_90"}, "cuda:1": {...}}``: for each kind it names, the probe answers from it instead of
asking the driver (a device it does not list is absent) and counts its present entries.
Nothing but tests sets it: a library "present" this way cannot be loaded.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from pytest_mlcjit.errors import ConfigError

#: Device kinds a user may name, in the order ``auto`` tries the GPUs.
GPU_KINDS = ("cuda", "rocm", "metal", "vulkan", "opencl", "webgpu")
DEVICE_KINDS = ("cpu", *GPU_KINDS)
AUTO = "auto"

#: The JSON form of a compile target, a TVM target dict: ``{"kind": "cuda", "arch": "sm_90"}``.
TargetJSON = dict[str, Any]


@dataclasses.dataclass(frozen=True, order=True)
class Device:
    """A device a library runs on: a kind and an index (``cuda:1``)."""

    kind: str
    index: int = 0

    def __str__(self) -> str:
        return self.kind if self.index == 0 else f"{self.kind}:{self.index}"

    @property
    def full_name(self) -> str:
        """The ``kind:index`` form MLC-LLM uses in its cache key (``cuda:0``)."""
        return f"{self.kind}:{self.index}"

    @property
    def is_gpu(self) -> bool:
        return self.kind != "cpu"

    @classmethod
    def parse(cls, text: str) -> Device:
        """Parse ``cpu``, ``cuda``, ``cuda:1``…; a bad string raises :class:`ConfigError`."""
        raw = text.strip().lower()
        kind, sep, index_text = raw.partition(":")
        if kind not in DEVICE_KINDS:
            valid = ", ".join((AUTO, *DEVICE_KINDS))
            raise ConfigError(
                f"invalid device {text!r}: expected one of {valid}, optionally with an index "
                "such as cuda:1"
            )
        if not sep:
            return cls(kind)
        if not index_text.isdigit():
            raise ConfigError(
                f"invalid device {text!r}: the index after ':' must be a non-negative integer"
            )
        return cls(kind, int(index_text))


#: The environment variable TVM's own test suite selects its targets with (``tvm.testing``).
ENV_TVM_TEST_TARGETS = "TVM_TEST_TARGETS"
#: TVM target kinds whose code runs on a device of another name.
_KIND_DEVICES = {"llvm": "cpu", "c": "cpu", "nvptx": "cuda"}


def devices_from_tvm_targets(text: str) -> list[str]:
    """The devices of a ``TVM_TEST_TARGETS`` value, as ``tvm.testing`` reads it: targets
    separated by ``;``, each a kind with optional CLI-style attributes (``llvm``,
    ``opencl -device=mali``) or a JSON target (``{"kind": "cuda", "arch": "sm_80"}``).
    ``llvm`` and ``c`` run on the CPU, ``nvptx`` on CUDA; an unknown kind is a ConfigError.
    Empty: ``[]`` (the variable is then ignored, as tvm.testing does)."""
    out: list[str] = []
    for raw in text.split(";"):
        entry = raw.strip()
        if not entry:
            continue
        if entry.startswith("{"):
            try:
                data = json.loads(entry)
            except ValueError as exc:
                raise ConfigError(f"invalid {ENV_TVM_TEST_TARGETS} entry {entry!r}: not a "
                                  f"JSON object ({exc})") from None
            if not isinstance(data, dict) or not isinstance(data.get("kind"), str):
                raise ConfigError(f"invalid {ENV_TVM_TEST_TARGETS} entry {entry!r}: a JSON "
                                  "target needs a 'kind' string")
            kind = str(data["kind"])
        else:
            kind = entry.split()[0]
        device = _KIND_DEVICES.get(kind, kind)
        if device not in DEVICE_KINDS:
            kinds = ", ".join(("llvm", "c", "nvptx", *GPU_KINDS))
            raise ConfigError(
                f"invalid {ENV_TVM_TEST_TARGETS} entry {entry!r}: target kind {kind!r} runs "
                f"on no device pytest-mlcjit knows; expected one of {kinds} (or choose the "
                "devices with --mlc-device)")
        if device not in out:
            out.append(device)
    return out


def parse_device_list(text: str) -> list[str]:
    """Parse a comma-separated ``--mlc-device`` value into validated device strings.

    ``auto`` is kept as is (it is resolved after the probe); duplicates are dropped.
    """
    items = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise ConfigError(
            f"invalid device list {text!r}: expected comma-separated devices such as cpu,cuda"
        )
    out: list[str] = []
    for item in items:
        name = AUTO if item.lower() == AUTO else str(Device.parse(item))
        if name not in out:
            out.append(name)
    return out


@dataclasses.dataclass(frozen=True)
class Presence:
    """Whether a device is present, and what the compiler needs to know about it."""

    present: bool
    reason: str = ""
    arch: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Presence:
        return cls(bool(data["present"]), str(data.get("reason", "")), data.get("arch"))


_LIBRARY_DIRS = ("/usr/lib", "/usr/lib64", "/usr/local/lib", "/lib", "/lib64",
                 "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/opt/rocm/lib")


def _find_shared_library(stem: str) -> bool:
    """Whether a ``stem.so*`` (``stem*.dylib`` on macOS) lies in a usual library directory or
    on ``LD_LIBRARY_PATH``: a few globs, not ``ctypes.util.find_library``'s subprocesses."""
    dirs = [*os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep), *_LIBRARY_DIRS]
    pattern = f"{stem}*.dylib" if sys.platform == "darwin" else f"{stem}.so*"
    return any(glob.glob(os.path.join(d, pattern)) for d in dirs if d)


def _cheap_absence(device: Device) -> str | None:  # noqa: PLR0911 - one answer per kind
    """A reason the device is surely absent, found without loading any driver, else None."""
    kind = device.kind
    if kind == "cuda" and not glob.glob("/dev/nvidia[0-9]*"):
        return "no NVIDIA device nodes (/dev/nvidia*)"
    if kind == "rocm" and not os.path.exists("/dev/kfd"):
        return "no ROCm device node (/dev/kfd)"
    if kind == "metal" and sys.platform != "darwin":
        return "Metal exists only on macOS"
    if kind == "webgpu":
        return "TVM has no native WebGPU runtime (compile-only: give a target)"
    if kind == "vulkan" and not _find_shared_library("libvulkan"):
        return "no Vulkan loader (libvulkan) found"
    if kind == "opencl" and not _find_shared_library("libOpenCL"):
        return "no OpenCL loader (libOpenCL) found"
    return None


#: Test-only: a JSON stand-in for the GPUs (see the module's docstring).
TEST_PRESENCE_ENV = "MLCJIT_TEST_PRESENCE"
#: The most GPUs of one kind ``count=True`` looks for.
MAX_GPUS = 64


def _stand_in() -> dict[Device, Presence]:
    """The devices :data:`TEST_PRESENCE_ENV` stands in for (empty when it is not set)."""
    text = os.environ.get(TEST_PRESENCE_ENV, "")
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return {Device.parse(name): Presence.from_json(entry) for name, entry in data.items()}
    except (ValueError, TypeError, KeyError, AttributeError, ConfigError) as exc:
        raise ConfigError(f"invalid {TEST_PRESENCE_ENV} (test-only): {exc}") from None


def probe(
    devices: Iterable[Device], *, timeout: float = 60.0, python: str = sys.executable,
    count: bool = False,
) -> dict[str, Presence]:
    """Probe each device once; return ``{str(device): Presence}``.

    ``cpu`` is always present. GPUs that are surely absent are reported without starting a
    process; the rest are asked in one subprocess that imports TVM, bounded by ``timeout``.
    ``count``: for each GPU named without an index, the other GPUs of its kind are probed
    too (in the same subprocess) and each present one is in the result (``cuda:1``…), so
    :func:`gpu_count` can count them.
    """
    result: dict[str, Presence] = {}
    ask: list[Device] = []
    counted: list[str] = []
    stand_in = _stand_in()
    faked = {d.kind for d in stand_in}
    for device in dict.fromkeys(devices):
        if device.kind == "cpu":
            result[str(device)] = Presence(True)
        elif device.kind in faked:
            result[str(device)] = stand_in.get(
                device, Presence(False, f"{TEST_PRESENCE_ENV} names no {device.full_name}"))
            if count and device.index == 0:
                result.update((str(d), p) for d, p in stand_in.items()
                              if d.kind == device.kind and p.present)
        elif (why := _cheap_absence(device)) is not None:
            result[str(device)] = Presence(False, why)
        else:
            ask.append(device)
            if count and device.index == 0:
                counted.append(device.kind)
    if ask:
        result.update(_probe_in_subprocess(ask, timeout=timeout, python=python,
                                           counted=counted))
    return result


def gpu_count(presence: Mapping[str, Presence], kind: str) -> int:
    """How many GPUs of ``kind`` a probe found present (all of them where it counted:
    ``probe(count=True)``)."""
    return len(gpus_present(presence, kind))


def gpus_present(presence: Mapping[str, Presence], kind: str) -> list[Device]:
    """The present devices of ``kind`` in a probe's result, by index."""
    found = []
    for name, p in presence.items():
        if p.present and name.partition(":")[0] == kind:
            found.append(Device.parse(name))
    return sorted(set(found))


def _probe_in_subprocess(
    devices: list[Device], *, timeout: float, python: str, counted: Iterable[str] = ()
) -> dict[str, Presence]:
    cmd = [python, "-m", "pytest_mlcjit.device._probe", *(d.full_name for d in devices),
           *(f"{kind}:*" for kind in counted)]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
    except subprocess.TimeoutExpired:
        why = f"device probe timed out after {timeout:g}s (a hung driver?)"
        return {str(d): Presence(False, why) for d in devices}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        why = f"device probe failed (exit {proc.returncode}): {tail[0]}"
        return {str(d): Presence(False, why) for d in devices}
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    result = {str(Device.parse(name)): Presence.from_json(entry)
              for name, entry in data.items() if not name.endswith(":*")}
    return {**result, **{str(d): Presence.from_json(data[d.full_name]) for d in devices}}


def resolve_auto(names: list[str], presence: Mapping[str, Presence]) -> list[str]:
    """Replace ``auto`` by the first present GPU (in :data:`GPU_KINDS` order), else ``cpu``."""
    chosen = next((k for k in GPU_KINDS if presence.get(k, Presence(False)).present), "cpu")
    return list(dict.fromkeys(chosen if name == AUTO else name for name in names))


def devices_to_probe(names: Iterable[str]) -> list[Device]:
    """Every device a device list needs probed (``auto`` needs each GPU kind)."""
    out: list[Device] = []
    for name in names:
        if name == AUTO:
            out.extend(Device(kind) for kind in GPU_KINDS if kind != "webgpu")
        else:
            out.append(Device.parse(name))
    return list(dict.fromkeys(out))


def target_for(device: Device, presence: Presence | None) -> TargetJSON:
    """The compile target for a device: generic ``llvm`` for the CPU, the probed arch for GPUs.

    The CPU target names no ``-mcpu``, so a CPU library is portable between machines (and
    its key is the same on every x86-64 host); pass an explicit target to specialize.
    """
    if device.kind == "cpu":
        return {"kind": "llvm"}
    target: TargetJSON = {"kind": device.kind}
    arch = presence.arch if presence else None
    if arch and device.kind == "cuda":
        target["arch"] = arch
    elif arch and device.kind == "rocm":
        target["mcpu"] = arch
    return target


def parse_target(value: str | Mapping[str, Any]) -> TargetJSON | str:
    """Validate an explicit target: a dict with ``kind``, a JSON object string, or a TVM string."""
    if isinstance(value, Mapping):
        data = dict(value)
    elif isinstance(value, str) and value.strip().startswith("{"):
        try:
            data = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"invalid target JSON {value!r}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"invalid target {value!r}: expected a JSON object")
    elif isinstance(value, str) and value.strip() and len(value.split()) == 1:
        return value.strip()
    elif isinstance(value, str) and value.strip():
        raise ConfigError(
            f"invalid target {value!r}: TVM 0.27 no longer parses CLI-style target strings; "
            "give a dict such as {'kind': 'llvm', 'mcpu': 'znver4'}"
        )
    else:
        raise ConfigError(
            f"invalid target {value!r}: expected a TVM target string such as 'llvm' or a dict "
            "such as {'kind': 'cuda', 'arch': 'sm_90'}"
        )
    if not isinstance(data.get("kind"), str) or not data["kind"]:
        raise ConfigError(f"invalid target {value!r}: a target dict needs a 'kind' string")
    return data


def target_kind(target: TargetJSON | str) -> str:
    """The TVM target kind (``llvm``, ``cuda``…) of a target in either form."""
    if isinstance(target, str):
        return target.split()[0]
    return str(target["kind"])


def device_for_target(target: TargetJSON | str) -> Device:
    """The device a target's code runs on (``llvm``/``c`` run on the CPU)."""
    kind = target_kind(target)
    if kind in ("llvm", "c"):
        return Device("cpu")
    if kind in DEVICE_KINDS:
        return Device(kind)
    raise ConfigError(
        f"target kind {kind!r} runs on no device this plugin knows: "
        f"expected llvm, c or one of {', '.join(GPU_KINDS)}"
    )
