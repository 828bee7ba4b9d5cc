"""Which library to compile first: the longest, by the compile times the cache recorded.

With W workers taking the next unclaimed library as each becomes free (:mod:`.prefetch`),
the makespan depends on the order of the list: one long compile taken last leaves the
other workers idle while it runs. Longest first (LPT) is within 4/3 of the best schedule
and, for the usual mix (a few long compiles among many short ones), at it.

The expected time of a library, from what this cache recorded (nothing is compiled or
imported to find it):

1. the **spec's compile-time memo**, ``.mlcjit/timings/<spec digest>``
   (:func:`.layout.timing_file`), rewritten after every compile of the spec, successful or
   not. A spec's digest is its key's without what changes with the toolchain or the
   factory's source (:data:`VOLATILE`), so the memo also holds for the same spec on an
   earlier toolchain, an edited factory or another input state;
2. else the ``compile_seconds`` of the newest manifest among the key's other input states
   (its variants), or of its failure record.

A library with no record is expected to take the median of those with one (none known:
all equal); ties keep the order of first use.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pytest_mlcjit._util.fs import FILE_MODE, best_effort
from pytest_mlcjit.key import sha256_digest
from pytest_mlcjit.cache.layout import timing_file

if TYPE_CHECKING:
    from pytest_mlcjit.build.backends import Backend, BuildRequest
    from pytest_mlcjit.cache.store import Store

T = TypeVar("T")

#: Key fields that do not make a spec another spec (toolchain, host, the factory's
#: source, the key's format, explicit input files): their change keeps the memo.
VOLATILE = ("format", "factory_sha256", "host", "toolchain", "files")


def spec_digest(req: BuildRequest) -> str:
    """The digest of ``req``'s spec: its backend and key, without :data:`VOLATILE`."""
    return sha256_digest({"backend": req.backend,
                          **{k: v for k, v in req.key.items() if k not in VOLATILE}})


def record_time(root: Path, req: BuildRequest, seconds: float) -> None:
    """Remember how long ``req`` took to compile (best effort; no fsync: a lost memo only
    costs a worse order)."""
    path = timing_file(root, spec_digest(req))
    with best_effort(path, "record the compile time in"):
        path.parent.mkdir(mode=0o755, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        # Made 0644 whatever the umask: nothing the cache makes is writable by others.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        with open(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps({"seconds": round(float(seconds), 3), "key": req.digest}))
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)


def _seconds(data: Any) -> float | None:
    value = data.get("seconds", data.get("compile_seconds")) if isinstance(data, dict) else None
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None


def _read_json(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read(1 << 16))
    except (OSError, ValueError):
        return None


def expected_seconds(req: BuildRequest, backend: Backend, store: Store) -> float | None:
    """How long ``req`` is expected to take to compile, from the cache's records; None if
    it holds none."""
    memo = _seconds(_read_json(timing_file(store.root, spec_digest(req))))
    if memo is not None:
        return memo
    with contextlib.suppress(OSError, ValueError):
        paths = backend.locate(req, store.root)
        for variant in store.read_variants(paths.library.parent, req.digest):
            found = _seconds(_read_json(backend.locate(req, store.root,
                                                       variant["entry"]).manifest))
            if found is not None:
                return found
        record, _ = store.failure_paths(req.digest)
        return _seconds(_read_json(record))
    return None


def longest_first(items: Sequence[T], seconds: Sequence[float | None]) -> list[T]:
    """``items`` by expected seconds, longest first; an unknown one counts as the median of
    the known ones; ties (and everything when nothing is known) keep their order."""
    known = sorted(s for s in seconds if s is not None)
    half = len(known) // 2
    fill = (known[half] if len(known) % 2 else (known[half - 1] + known[half]) / 2
            ) if known else 0.0
    expected = [fill if s is None else s for s in seconds]
    order = sorted(range(len(items)), key=lambda i: (-expected[i], i))
    return [items[i] for i in order]
