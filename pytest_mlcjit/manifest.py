"""The manifest: the JSON record written last beside each library (full key, SHA-256,
size, toolchain, timings…). One reader validates it for the engine and for the tools."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import CorruptEntryError


def parse_manifest(raw: bytes, path: Path, digest: str) -> dict[str, Any]:
    """A manifest's bytes as a dict; CorruptEntryError unless they are UTF-8 JSON with a
    string ``sha256``, a non-negative integer ``size`` and ``digest`` equal to ``digest``."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        raise CorruptEntryError(f"manifest {path} is not valid JSON") from None
    if not isinstance(data, dict) or not {"sha256", "size", "digest"} <= data.keys():
        raise CorruptEntryError(f"manifest {path} lacks sha256/size/digest")
    size, sha = data["size"], data["sha256"]
    if not isinstance(sha, str) or isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise CorruptEntryError(f"manifest {path} has an invalid sha256 {sha!r} or size {size!r}")
    if data["digest"] != digest:
        raise CorruptEntryError(f"manifest {path} is for key {data['digest']}, not {digest}")
    return data


def read_manifest_file(path: Path, digest: str) -> tuple[dict[str, Any] | None, str | None]:
    """``(manifest, None)``, ``(None, why it is unusable)``, or ``(None, None)`` if absent."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror}"
    try:
        return parse_manifest(raw, path, digest), None
    except CorruptEntryError as exc:
        return None, str(exc)
