"""One reader for every JSON the project reads from outside (remote manifests, local
manifests, records beside the entries, the activity board, lines of the run history):
bounded in size and in nesting depth, so that what someone else wrote can only be junk,
skipped and reported, never an exception (a 100,000-deep array makes ``json.loads`` raise
``RecursionError``; a huge object costs memory). Only the standard library is imported.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

#: The most bytes a JSON document read from outside may have: manifests and records are a
#: few KiB, but each recorded input adds about 250 bytes, so a factory that reads tens of
#: thousands of files (weight shards, a calibration set) writes a manifest of megabytes.
MAX_JSON_BYTES = 16 << 20
#: The deepest nesting of arrays and objects accepted (the cache's own documents nest a
#: few levels; a recorded signature's arguments a few more).
MAX_JSON_DEPTH = 64

#: A JSON string (skipped by the depth scan: brackets inside strings do not nest; one
#: left open runs to the end, so the scan stays linear) or one bracket.
_TOKEN_RE = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]', re.DOTALL)


def nesting_depth(text: str, limit: int = MAX_JSON_DEPTH) -> int:
    """The deepest nesting of arrays and objects in ``text`` (strings skipped), counted up
    to ``limit + 1`` (the scan stops there). Cheap: no parse, and no scan at all when the
    text holds too few brackets to pass ``limit``."""
    if text.count("[") + text.count("{") <= limit:
        return text.count("[") + text.count("{")  # an upper bound that is within the limit
    depth = deepest = 0
    for match in _TOKEN_RE.finditer(text):
        first = match.group()[0]  # a bracket, or the quote that opens a string
        if first in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        elif first in "]}":
            depth -= 1
    return deepest


def loads_bounded(raw: bytes | str, *, max_bytes: int = MAX_JSON_BYTES,
                  max_depth: int = MAX_JSON_DEPTH,
                  parse_constant: Callable[[str], Any] | None = None) -> Any:
    """``raw`` (UTF-8 bytes or text) parsed as JSON; ValueError saying why in a few words
    (``nested deeper than 64 levels``) when it is larger than ``max_bytes``, nested deeper
    than ``max_depth``, not UTF-8 or not JSON.
    Never raises anything else for any input (``parse_constant`` may raise ValueError to
    refuse NaN and the infinities: that is junk too)."""
    if len(raw) > max_bytes:
        raise ValueError(f"larger than {max_bytes} bytes")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes | bytearray) else str(raw)
    except UnicodeError:
        raise ValueError("not UTF-8") from None
    if nesting_depth(text, max_depth) > max_depth:
        raise ValueError(f"nested deeper than {max_depth} levels")
    try:
        if parse_constant is None:
            return json.loads(text)
        return json.loads(text, parse_constant=parse_constant)
    except (ValueError, RecursionError, MemoryError) as exc:
        raise ValueError(f"{type(exc).__name__}: {str(exc)[:80]}") from None
