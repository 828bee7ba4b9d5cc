"""The toolchain fingerprint: what compiles a library's bytes, for the key.

Read from package metadata (the installed wheel's version, commit and the recorded hashes
of its shared libraries) without importing TVM, so computing a key costs microseconds, not
the second that ``import tvm`` takes. What the installed software is does not change while
a process runs, so each answer is kept for the life of the process.
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
        }
    return _tvm_fingerprint_by_import()


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


def host_fingerprint() -> dict[str, str]:
    """The parts of the host that change generated code: OS and CPU architecture."""
    return {"os": sys.platform, "machine": platform.machine()}
