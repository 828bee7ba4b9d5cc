"""Canonical key dicts and their digests.

The key of a library is a JSON-able dict of everything that changes its bytes; its digest
is SHA-256 over the canonical JSON (sorted keys, compact separators, UTF-8), so the same
inputs give the same digest in every process and on every machine. What goes into a key
is the backends' business (:mod:`pytest_mlcjit.compiler`); the toolchain fingerprint is in
:mod:`pytest_mlcjit.compiler.toolchain`. Only the standard library is imported here.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

#: Bumped whenever the cache layout or key fields change meaning.
CACHE_FORMAT = 2


def canonical_json(obj: Any) -> str:
    """The one canonical JSON text of ``obj`` (sorted keys, no spaces, no NaN)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def sha256_digest(obj: Any) -> str:
    """SHA-256 hex digest of the canonical JSON of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
