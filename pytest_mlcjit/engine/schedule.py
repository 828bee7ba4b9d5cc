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

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

from pytest_mlcjit.key import sha256_digest

if TYPE_CHECKING:
    from pytest_mlcjit.cache.store.interface import EntryQuery, Store
    from pytest_mlcjit.compiler.backends import BuildRequest

T = TypeVar("T")

#: Key fields that do not make a spec another spec (toolchain, host, the factory's
#: source, the key's format, explicit input files): their change keeps the memo.
VOLATILE = ("format", "factory_sha256", "host", "toolchain", "files")


def spec_digest(req: BuildRequest) -> str:
    """The digest of ``req``'s spec: its backend and key, without :data:`VOLATILE`."""
    return sha256_digest({"backend": req.backend,
                          **{k: v for k, v in req.key.items() if k not in VOLATILE}})


def expected_seconds(query: EntryQuery, req: BuildRequest, store: Store) -> float | None:
    """How long ``req`` is expected to take to compile, from the cache's records; None if
    it holds none."""
    try:
        return store.recorded_time(query, spec_digest(req))
    except (OSError, ValueError):
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
