"""The load check: a library is loaded in a process of its own, and the functions its
manifest records (``functions``) are looked up in it, before it is shared with other
machines (an upload) and, for an entry whose uploader did not check it, after a download.

``python -m pytest_mlcjit.compiler.loadcheck LIBRARY FUNCTIONS_JSON`` is the child; it runs
as a compile does (:meth:`.launch.Builds.run_logged`): in a fork of the warm compile worker
when the pool is on (TVM already imported: a fork, no interpreter start, no ``import tvm``),
else in a fresh interpreter under the launcher; killed with the run's builds on an
interrupt. The engine hands :class:`LoadChecker` to the stores (the cache layer starts no
process itself).

What is checked, by kind of library:

* a TVM library (``.so``): ``tvm.runtime.load_module`` loads it (the shared object is
  opened and its symbols resolved, its imported modules deserialized), and each recorded
  function is a function of its Relax VM executable;
* a library cross-compiled for a device whose runtime this TVM lacks (CUDA, OpenCL,
  Vulkan, Metal, ROCm, WebGPU on a CPU-only TVM): its device code cannot be loaded here, so
  for those device modules only their presence is checked (a stand-in loader that requires
  non-empty device code); the host code and the recorded functions are checked as above.
  The device code itself is not checked (that needs the device's runtime);
* a system library (``.tar``, MLC-LLM's iOS/Android builds, linked into an app, never
  loaded): that it is a valid tar archive.

A library whose loading crashes the child (a signal) or does not end in time fails; a
check that could not run at all (TVM does not import, the child could not start, or had
not started checking when its time was up) is reported as such, not as the library's
fault.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import tarfile
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pytest_mlcjit.cache.store.remote_policy import LoadResult
    from pytest_mlcjit.compiler.launch import Builds

#: The child's lines the parent reads (the last one is the verdict, as JSON).
MARK = "[mlcjit-loadcheck] "
#: The child's exit status for a library that failed the check.
FAILED = 3
#: How long one check may take (a large MLC library loads in seconds).
TIMEOUT_S = 300.0
#: Device modules a library may import, by the name of their loader: where this TVM has
#: no runtime for one, a stand-in that checks only that its code is there is used.
DEVICE_MODULES = ("cuda", "opencl", "vulkan", "metal", "hip", "rocm", "webgpu")
_LOADER = "ffi.Module.load_from_bytes."
_UNREGISTERED_RE = re.compile(r"created using \{(\w+)\} but a loader of that name is not")


class LoadChecker:
    """Checks libraries in processes of one run's :class:`.launch.Builds` (the warm
    compile worker's forks when the pool is on); ``(library, manifest) -> LoadResult``."""

    def __init__(self, builds: Builds, timeout: float = TIMEOUT_S) -> None:
        self.builds = builds
        self.timeout = timeout

    def __call__(self, library: Path, manifest: Mapping[str, Any]) -> LoadResult:
        # The child (this module as __main__) never imports the cache.
        from pytest_mlcjit.cache.store.remote_policy import LoadResult  # noqa: PLC0415

        functions = manifest.get("functions")
        names = [f for f in functions if isinstance(f, str)] if isinstance(functions, list) \
            else []
        argv = [sys.executable, "-m", __name__, str(library), json.dumps(names)]
        t0 = time.monotonic()
        try:
            with tempfile.TemporaryDirectory(prefix="mlcjit-loadcheck-") as tmp:
                log = Path(tmp) / "check.log"
                rc = self.builds.run_logged(argv, log, timeout=self.timeout)
                text = log.read_text(encoding="utf-8", errors="replace") \
                    if log.is_file() else ""
        except OSError as exc:  # no child (it could not start, no room for its log)
            return LoadResult(False, f"the load check could not run: {exc}", at_fault=False,
                              seconds=time.monotonic() - t0)
        return _result(rc, text, self.timeout, time.monotonic() - t0)


def _result(rc: int | None, text: str, timeout: float, seconds: float) -> LoadResult:
    """What a check's child found: its exit status ``rc`` (None: stopped at ``timeout``)
    and its output ``text``."""
    from pytest_mlcjit.cache.store.remote_policy import LoadResult  # noqa: PLC0415

    said = [line[len(MARK):] for line in text.splitlines() if line.startswith(MARK)]
    verdict = _verdict(said[-1]) if said else None
    if verdict is not None and rc in (0, FAILED):
        ok = bool(verdict.get("ok")) and rc == 0
        why = str(verdict.get("how" if ok else "why", ""))
        if not ok and verdict.get("checkable") is False:
            return LoadResult(False, f"the load check could not run: {why}",
                              at_fault=False, seconds=seconds)
        return LoadResult(ok, why, seconds=seconds)
    lines = [line for line in text.strip().splitlines() if not line.startswith(MARK)]
    last = lines[-1][-300:] if lines else "no output"
    if rc is None and "tvm imported" in said:  # its loading hung: the library's fault
        return LoadResult(False, f"loading it did not end within {timeout:g}s",
                          seconds=seconds)
    if rc is None:  # still starting (a loaded machine): no fault of the library
        return LoadResult(False, "the load check could not run: it had not started "
                          f"checking within {timeout:g}s", at_fault=False,
                          seconds=seconds)
    if "tvm imported" in said:  # it died while loading the library: the library's fault
        return LoadResult(False, f"loading it crashed the checking process ({_how(rc)})",
                          seconds=seconds)
    return LoadResult(False, f"the load check could not run ({_how(rc)}): {last}",
                      at_fault=False, seconds=seconds)


def _how(rc: int) -> str:
    """An exit status in words: ``exit status 1``, ``SIGBUS, signal 7``."""
    if rc >= 0:
        return f"exit status {rc}"
    try:
        return f"{signal.Signals(-rc).name}, signal {-rc}"
    except ValueError:
        return f"signal {-rc}"


def _verdict(line: str) -> dict[str, Any] | None:
    try:
        data = json.loads(line)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


# -- the child ------------------------------------------------------------------------------------
def check(library: Path, functions: list[str]) -> dict[str, Any]:
    """Load ``library`` and look up ``functions``: ``{"ok": True, "how": what was
    checked}`` or ``{"ok": False, "why": ...}`` (with ``"checkable": False`` when this
    machine cannot check it)."""
    if library.suffix == ".tar":
        if tarfile.is_tarfile(library):
            return {"ok": True, "how": "a valid tar archive (a system library)"}
        return {"ok": False, "why": "it is not a valid tar archive"}
    import tvm

    print(f"{MARK}tvm imported", flush=True)
    sizes: dict[str, int] = {}  # the device code each stand-in loader was given, in bytes
    lib, failed = _load(tvm, library, sizes)
    if failed is not None:
        return failed
    empty = sorted(kind for kind, size in sizes.items() if size == 0)
    missing = _missing(lib, functions)
    if empty or missing:
        why = f"its {', '.join(empty)} device code is empty" if empty else \
            "it lacks the function(s) its manifest records: " + ", ".join(missing)
        return {"ok": False, "why": why}
    how = f"loaded, {len(functions)} recorded function(s) found"
    if sizes:
        how += (f"; its {', '.join(sorted(sizes))} device code is present but not loaded "
                "(no runtime for it here)")
    return {"ok": True, "how": how}


def _load(tvm: Any, library: Path, sizes: dict[str, int]
          ) -> tuple[Any, dict[str, Any] | None]:
    """``tvm.runtime.load_module(library)``, with stand-in loaders for the device modules
    this TVM has no runtime for (:func:`_stand_in`); the module, or why it failed."""
    standins = {kind for kind in DEVICE_MODULES if _stand_in(tvm, kind, sizes)}
    for _ in range(len(DEVICE_MODULES) + 1):
        try:
            return tvm.runtime.load_module(str(library)), None
        except Exception as exc:
            text = str(exc).strip()
            line = (text.splitlines() or [type(exc).__name__])[-1][:400]
            unknown = _UNREGISTERED_RE.search(text)
            if unknown is None or unknown.group(1) in standins:
                return None, {"ok": False, "why": f"it does not load: {line}"}
            if not _stand_in(tvm, unknown.group(1), sizes):
                # Device code this TVM can neither load nor stand in for: not checkable.
                return None, {"ok": False, "why": line, "checkable": False}
            standins.add(unknown.group(1))
    return None, {"ok": False, "why": "it does not load"}


def _stand_in(tvm: Any, kind: str, sizes: dict[str, int]) -> bool:
    """Register a stand-in loader for device modules of ``kind`` when this TVM has none
    (True if it did): it records the size of the device code it is given (``sizes``) and
    returns an empty source module."""
    name = _LOADER + kind
    if tvm.get_global_func(name, allow_missing=True) is not None:
        return False
    make = tvm.get_global_func("runtime.SourceModuleCreate", allow_missing=True)
    if make is None:
        return False

    def load(data: Any) -> Any:
        sizes[kind] = sizes.get(kind, 0) + len(bytes(data))
        return make("", kind)

    tvm.register_global_func(name, load)
    return True


def _missing(lib: Any, functions: list[str]) -> list[str]:
    """Which of ``functions`` the library does not define (as Relax VM functions)."""
    if not functions:
        return []
    try:
        exe = lib["vm_load_executable"]()
    except Exception:  # not a Relax VM executable: its own functions
        exe = lib
    missing = []
    for name in functions:
        try:
            found = bool(exe.implements_function(name))
        except Exception:  # a name of another kind (a kernel)
            found = False
        if not found:
            missing.append(name)
    return missing


def main(argv: list[str]) -> int:
    library = Path(argv[0])
    functions = json.loads(argv[1]) if len(argv) > 1 else []
    verdict = check(library, [str(f) for f in functions])
    print(MARK + json.dumps(verdict), flush=True)
    return 0 if verdict["ok"] else FAILED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
