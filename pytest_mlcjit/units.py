"""Sizes, ages and counts as people write and read them: ``10G``, ``30d``, ``1 entry``."""

from __future__ import annotations

import re
import time

from pytest_mlcjit.errors import ConfigError

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30,
    "ti": 2**40, "tib": 2**40,
}
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_NUMBER_UNIT_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


def parse_size(text: str, *, what: str = "size") -> int:
    """``10G``, ``500M``, ``1.5GiB``, ``4096`` (bytes) → bytes; ConfigError naming the value.

    K, M, G, T (and kB, MB…) are powers of 1000; Ki, Mi, Gi, Ti (KiB…) powers of 1024.
    """
    match = _NUMBER_UNIT_RE.match(str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise ConfigError(
            f"invalid {what} {text!r}: expected a number of bytes with an optional unit "
            "K, M, G, T (powers of 1000) or Ki, Mi, Gi, Ti (powers of 1024), for example 10G"
        )
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_age(text: str, *, what: str = "age") -> float:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` (a bare number is seconds) → seconds."""
    match = _NUMBER_UNIT_RE.match(str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in ("", *_AGE_UNITS):
        raise ConfigError(
            f"invalid {what} {text!r}: expected a number with a unit s, m, h, d or w "
            "(seconds, minutes, hours, days, weeks), for example 30d"
        )
    return float(match.group(1)) * _AGE_UNITS.get(unit, 1)


def plural(n: int, word: str, plural: str | None = None) -> str:
    """``1 entry``, ``2 entries``: ``n`` and the word, in the plural (``word + "s"`` unless
    given) when ``n`` is not 1."""
    return f"{n} {word if n == 1 else plural or word + 's'}"


def format_size(n: float) -> str:
    """``1234567`` → ``1.2 MB`` (powers of 1000, like :func:`parse_size`'s ``M``); ``?`` for
    a number no float holds (a junk manifest's size)."""
    try:
        n = float(n)
    except (OverflowError, TypeError, ValueError):
        return "?"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def format_time(t: float | None) -> str:
    """A timestamp as ``2026-12-07 05:40``; ``-`` for none, ``?`` for one no date holds."""
    if not t:
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))
    except (OverflowError, TypeError, ValueError, OSError):
        return "?"
