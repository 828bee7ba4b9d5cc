"""The toolchain fingerprint: what compiles a library's bytes, for the key.

Read from package metadata (the installed wheel's version, commit and the recorded hashes
of its shared libraries) without importing TVM, so computing a key costs milliseconds, not
the second that ``import tvm`` takes. What the installed software is does not change while
a process runs, so each answer is kept for the life of the process.

The fingerprint also names the version of every distribution the compile process imports
with TVM, before its inputs are recorded (``imports``): TVM's own requirements (apache-tvm-ffi,
ml_dtypes, numpy, typing_extensions for apache-tvm 0.2x) and theirs, one level down, read from
their metadata (:func:`imported_with_tvm`). apache-tvm requires apache-tvm-ffi unpinned: without
it, a library built against one tvm-ffi would be served to another.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any


@functools.lru_cache(maxsize=1)
def tvm_fingerprint() -> dict[str, Any]:
    """Version, commit and build digest of the installed TVM, without importing it.

    For a wheel (``apache-tvm``) the build digest covers the recorded hashes of its shared
    libraries; for a TVM without distribution metadata (a source build on ``PYTHONPATH``)
    a subprocess asks TVM itself.
    """
    for dist_name in ("apache-tvm", "mlc-ai-nightly-cu128", "mlc-ai-nightly-cpu", "tvm"):
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            continue
        # RECORD read as text: dist.files would build an object per file (thousands).
        rows = [row.rsplit(",", 1)[0] for row in (dist.read_text("RECORD") or "").splitlines()
                if row.startswith("tvm/")]
        if not rows:
            continue  # PyPI's 'tvm' is an unrelated package
        libs = sorted(row for row in rows if ".so" in row.split(",", 1)[0].rsplit("/", 1)[-1])
        commit = None
        version_file = Path(str(dist.locate_file("tvm/_version.py")))
        with contextlib.suppress(OSError):
            match = re.search(r"commit_id\s*=\s*['\"]([^'\"]+)['\"]",
                              version_file.read_text(encoding="utf-8"))
            commit = match.group(1) if match else None
        return {
            "dist": dist_name,
            "version": dist.version,
            "commit": commit,
            "build": hashlib.sha256("\n".join(libs).encode()).hexdigest()[:16],
            "imports": imported_with_tvm(dist),
        }
    return _tvm_fingerprint_by_import()


#: What ``import tvm`` imports besides TVM in every release this supports (apache-tvm 0.2x,
#: mlc-ai nightlies), keyed even where TVM has no metadata to say so (a source build).
IMPORTED_WITH_TVM = ("apache-tvm-ffi", "ml_dtypes", "numpy")

_REQUIREMENT_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_EXTRA_MARKER = re.compile(r"\bextra\s*==")


def _canonical(name: str) -> str:
    """A distribution's name as PEP 503 compares them: ``ml_dtypes`` is ``ml-dtypes``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(dist: importlib.metadata.Distribution) -> list[str]:
    """The names of the distributions ``dist`` requires outside of its extras."""
    names = []
    for req in dist.requires or ():
        spec, _, marker = req.partition(";")
        found = _REQUIREMENT_NAME.match(spec)
        if found and not _EXTRA_MARKER.search(marker):
            names.append(found.group(1))
    return names


def imported_with_tvm(tvm: importlib.metadata.Distribution | None) -> dict[str, str]:
    """``{distribution: version}`` of what the compile process imports with TVM: the fixed
    :data:`IMPORTED_WITH_TVM` and TVM's requirements, with their own requirements (one level
    down), those installed here; read from metadata, nothing imported. Names in PEP 503 form.

    A requirement under a marker that is false here but installed anyway is kept: one
    distribution too many only makes keys change more often, one too few serves a library
    built against another.
    """
    own = _canonical(tvm.metadata["Name"] or "") if tvm is not None else None
    pending = [*IMPORTED_WITH_TVM, *(_requirements(tvm) if tvm is not None else [])]
    versions: dict[str, str] = {}
    for depth in (0, 1):
        below: list[str] = []
        for name in pending:
            canonical = _canonical(name)
            if canonical in versions or canonical == own:
                continue
            try:
                dist = importlib.metadata.distribution(name)
            except importlib.metadata.PackageNotFoundError:
                continue
            versions[canonical] = dist.version
            if depth == 0:
                below += _requirements(dist)
        pending = below
    return dict(sorted(versions.items()))


def _tvm_fingerprint_by_import() -> dict[str, Any]:
    code = (
        "import json, tvm; li = tvm.support.libinfo();"
        "print(json.dumps({'version': tvm.__version__, 'commit': li.get('GIT_COMMIT_HASH'),"
        " 'build': str(sorted(li.items()))}))"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=120, check=False)
    except subprocess.TimeoutExpired:
        return {"version": None, "error": "timed out asking TVM for its version"}
    if proc.returncode != 0:
        return {"version": None, "error": "apache-tvm is not installed"}
    data: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    data["build"] = hashlib.sha256(str(data["build"]).encode()).hexdigest()[:16]
    data["dist"] = None
    data["imports"] = imported_with_tvm(None)
    return data


@functools.lru_cache(maxsize=1)
def nvcc_version() -> str | None:
    """The ``nvcc --version`` release line of the nvcc TVM would use, or None if absent."""
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return None
    try:
        proc = subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                              timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip()]
    return lines[-1] if lines else None


#: A fingerprint's own fields that say which build of the software it is (``path``, ``dist``,
#: ``error`` do not).
_RELEASE_FIELDS = ("version", "commit", "build")


def toolchain_changes(recorded: Mapping[str, Any], installed: Mapping[str, Any]
                      ) -> list[tuple[str, str, str]]:
    """``(software, recorded, installed)`` for each piece of two toolchains that differs:
    a fingerprint's own release (``apache-tvm 0.27.0 (4f1c…)``, ``mlc_llm 0.1 (…)``), every
    distribution imported with it (``apache-tvm-ffi``: its two versions, ``not installed``
    or, for an entry from before these were recorded, ``not recorded``), nvcc's release."""
    changes: list[tuple[str, str, str]] = []
    for part in sorted(recorded.keys() | installed.keys()):
        old, new = recorded.get(part), installed.get(part)
        if old == new:
            continue
        if not isinstance(old, Mapping) and not isinstance(new, Mapping):
            changes.append((part, str(old), str(new)))
            continue
        old_m = old if isinstance(old, Mapping) else {}
        new_m = new if isinstance(new, Mapping) else {}
        if any(old_m.get(f) != new_m.get(f) for f in _RELEASE_FIELDS):
            same = all(old_m.get(f) == new_m.get(f) for f in ("version", "commit"))
            changes.append((str(new_m.get("dist") or old_m.get("dist") or part),
                            _release(old_m, same), _release(new_m, same)))
        old_i, new_i = old_m.get("imports"), new_m.get("imports")
        if isinstance(new_i, Mapping) and old_i != new_i:
            seen: Mapping[str, Any] | None = old_i if isinstance(old_i, Mapping) else None
            for dist in sorted(new_i.keys() | (seen.keys() if seen is not None else set())):
                before = seen.get(dist, "not installed") if seen is not None else "not recorded"
                after = new_i.get(dist, "not installed")
                if before != after:
                    changes.append((str(dist), str(before), str(after)))
    return changes


def _release(fingerprint: Mapping[str, Any], with_build: bool) -> str:
    """``0.27.0 (4f1c2e9a0b)``: a fingerprint's version and commit (and build digest when
    only that differs)."""
    commit = str(fingerprint.get("commit") or "no commit")[:10]
    text = f"{fingerprint.get('version')} ({commit})"
    return f"{text} build {fingerprint.get('build')}" if with_build else text


def describe_changes(changes: list[tuple[str, str, str]]) -> str:
    """``built by apache-tvm-ffi 0.1.15, installed is apache-tvm-ffi 0.1.16; …``."""
    return "; ".join(f"built by {name} {old}, installed is {name} {new}"
                     for name, old, new in changes)


def host_fingerprint() -> dict[str, str]:
    """The parts of the host that change generated code: OS and CPU architecture."""
    return {"os": sys.platform, "machine": platform.machine()}
