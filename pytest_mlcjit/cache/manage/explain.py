"""The pieces of ``pytest-mlcjit explain`` that read the cache: a miss explained as a diff
against the nearest entry, and how a READONLY run would find an entry."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from pytest_mlcjit.cache.manage.entries import Entry
from pytest_mlcjit.cache.store.local import LocalStore
from pytest_mlcjit.errors import CorruptEntryError


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (lists stay whole)."""
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


#: Stands for a key field one side does not have, in :func:`key_diff`.
ABSENT = "(absent)"


def key_diff(wanted: Mapping[str, Any], cached: Mapping[str, Any]
             ) -> list[tuple[str, Any, Any]]:
    """``(field, wanted, cached)`` for every leaf field that differs (:data:`ABSENT` for a
    field one side lacks), fields as dotted paths such as ``config.hidden``."""
    a, b = flatten(wanted), flatten(cached)
    return [(name, a.get(name, ABSENT), b.get(name, ABSENT))
            for name in sorted(a.keys() | b.keys())
            if a.get(name, ABSENT) != b.get(name, ABSENT)]


def nearest(entries: Iterable[Entry], key: Mapping[str, Any], backend: str
            ) -> tuple[Entry | None, list[tuple[str, Any, Any]]]:
    """The entry of ``backend`` whose key differs from ``key`` in the fewest fields."""
    best: tuple[Entry | None, list[tuple[str, Any, Any]]] = (None, [])
    best_score = math.inf
    for entry in entries:
        if entry.backend != backend or not entry.key:
            continue
        diffs = key_diff(key, entry.key)
        if len(diffs) < best_score:
            best, best_score = (entry, diffs), len(diffs)
    return best


def entry_status(entries: Iterable[Entry], digest: str, stale: Any = None) -> str:
    """``hit``, ``missing``, ``unmanaged…``, ``corrupt: …`` or ``stale: …`` for ``digest``
    among ``entries`` (of one root), as a READONLY run would find it."""
    for entry in entries:
        if entry.digest != digest:
            continue
        if entry.state == "unmanaged":
            return "unmanaged (a library without manifest: adopted on first use if it loads)"
        if entry.manifest is None:
            return f"corrupt: {entry.manifest_error or 'the library is missing'}"
        try:
            LocalStore(entry.root, allow_untrusted=True).verify(
                entry.paths, entry.manifest)
        except CorruptEntryError as exc:
            return f"corrupt: {exc}"
        why = stale(entry.manifest) if stale is not None else None
        return f"stale: {why}" if why else "hit"
    return "missing"



def incomplete_inputs(entries: Iterable[Entry], key_digest: str) -> list[str]:
    """What the entries of key ``key_digest`` (its input states) could not record: a
    subprocess, a ctypes load, a socket the factory used (``inputs.incomplete``)."""
    notes: dict[str, None] = {}
    for entry in entries:
        fields = entry.fields
        if entry.digest != key_digest and fields.get("key_digest") != key_digest:
            continue
        recorded = fields.get("inputs")
        found = recorded.get("incomplete") if isinstance(recorded, Mapping) else None
        if isinstance(found, list):
            notes.update(dict.fromkeys(str(n) for n in found))
    return list(notes)
