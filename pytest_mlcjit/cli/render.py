"""How the ``pytest-mlcjit`` commands print: text lines, or one JSON object (``--json``);
and the small argument types they share."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytest_mlcjit.cache.layout import default_roots

PROG = "pytest-mlcjit"
#: Exit statuses: a runtime failure, a usage error (as argparse's own).
EXIT_FAILURE, EXIT_USAGE = 1, 2


#: How many characters of a model's config ``list`` shows (``--json`` has all of it).
MODEL_WIDTH = 60


def count_arg(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(
            f"invalid count {text!r}: expected a non-negative whole number")
    return int(text)


def out(args: argparse.Namespace, data: Any, lines: Sequence[str]) -> None:
    if args.json:
        # Indented for a person at a terminal; compact for a pipe, where it is parsed (and
        # where json's C encoder, which indenting turns off, keeps large outputs fast).
        # What a remote holds reaches the output: never a crash on a lone surrogate, and
        # NaN or Infinity (not JSON) as null.
        indent = 2 if sys.stdout.isatty() else None
        print(json.dumps(_json_safe(data), indent=indent, sort_keys=True, default=str))
    else:
        for line in lines:
            print(line.encode("utf-8", "backslashreplace").decode("utf-8"))


def _json_safe(data: Any) -> Any:
    """``data`` with floats that JSON cannot hold (NaN, infinities) as None."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _json_safe(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_json_safe(v) for v in data]
    return data


def roots(args: argparse.Namespace) -> list[Path]:
    return default_roots(args.cache_dir)
