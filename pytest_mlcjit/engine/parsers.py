"""Value parsers of the option table (:mod:`.settings`): each takes where the value came
from (``--mlc-jit-timeout``, ``ini mlc_jit_timeout``, ``MLC_JIT_POLICY``) and its text, and
returns the value or raises :class:`ConfigError` naming the source, the bad value and the
valid ones. A parser that returns None means "not set here" (the next source is asked).

Cheap to import (the plugin imports it when it loads): the remote's and the warm workers'
modules, which only some runs need, are imported by the parser that needs them, when it
runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_mlcjit.device import devices_from_tvm_targets, parse_device_list
from pytest_mlcjit.errors import ConfigError
from pytest_mlcjit.policy import Policy
from pytest_mlcjit.units import parse_size

Parse = Callable[[str, str], Any]


def seconds(source: str, text: str) -> float:
    """A positive, finite number of seconds."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = -1.0
    if not (value > 0 and math.isfinite(value)):  # also rejects NaN
        raise ConfigError(f"invalid {source} {text!r}: expected a positive number of seconds")
    return value


def seconds_up_to(high: float) -> Parse:
    """A number of seconds greater than 0 and at most ``high`` (a socket timeout: ``inf``
    or ``1e12`` cannot be waited)."""

    def parse(source: str, text: str) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            value = -1.0
        if not 0 < value <= high:  # also rejects NaN and the infinities
            raise ConfigError(f"invalid {source} {text!r}: expected a number of seconds "
                              f"greater than 0 and at most {high:g}")
        return value

    return parse


def choice(*valid: str) -> Parse:
    """One of ``valid``, case-insensitive."""

    def parse(source: str, text: str) -> str:
        value = str(text).strip().lower()
        if value not in valid:
            raise ConfigError(f"invalid {source} {text!r}: expected one of {', '.join(valid)}")
        return value

    return parse


def truth(source: str, text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"invalid {source} {text!r}: expected true or false")


def count(source: str, text: str) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(f"invalid {source} {text!r}: expected a whole number, 0 or more")
    return value


def size(source: str, text: str) -> int:
    return parse_size(text, what=source)


def throughput(source: str, text: str) -> int:
    """Bytes per second, at least 1 (``1MB``, ``500k``, ``2000``)."""
    value = parse_size(text, what=source)
    if value < 1:
        raise ConfigError(f"invalid {source} {text!r}: expected bytes per second, at least 1 "
                          "(for example 1MB)")
    return value


def policy(source: str, text: str) -> Policy:
    return Policy.parse(text, source=source)


def path(what: str) -> Parse:
    """A path (``~`` expanded), made absolute against the working directory; not empty."""

    def parse(source: str, text: str) -> Path:
        if not str(text).strip():
            raise ConfigError(f"invalid {source} {text!r}: expected {what}")
        return Path(text).expanduser().absolute()

    return parse


def devices(source: str, text: str) -> str:
    """A comma-separated device list (``auto``, ``cpu``, ``cuda:1``…), normalized."""
    return ",".join(parse_device_list(text))


def tvm_targets(source: str, text: str) -> str | None:
    """``TVM_TEST_TARGETS`` (``llvm;cuda``, as TVM's own suite selects its targets) as a
    device list; None when it names no device this plugin runs on."""
    names = devices_from_tvm_targets(text.strip()) if text.strip() else []
    return ",".join(names) if names else None


def shard(source: str, text: str) -> tuple[int, int]:
    """``I/N`` → ``(I, N)`` with 1 <= I <= N."""
    index, sep, total = str(text).strip().partition("/")
    try:
        i, n = int(index), int(total)
    except ValueError:
        i = n = 0
    if not sep or not 1 <= i <= n:
        raise ConfigError(f"invalid {source} {text!r}: expected I/N with 1 <= I <= N, for "
                          "example 2/4")
    return i, n


def remote_url(source: str, text: str) -> str:
    """A remote URL of a kind the cache has an adapter for (and, for ``s3://``, boto3
    installed)."""
    from pytest_mlcjit.cache.store.remote import parse_remote_url  # noqa: PLC0415 - see above

    try:
        url = parse_remote_url(text)
    except ConfigError as exc:
        raise ConfigError(f"invalid {source}: {exc}") from None
    if url.scheme == "s3":
        from pytest_mlcjit.cache.store.remote.s3 import require_boto3  # noqa: PLC0415

        require_boto3()
    if url.scheme == "az":  # the SDK installed, and credentials in the environment
        from pytest_mlcjit.cache.store.remote.azure import require_azure  # noqa: PLC0415

        require_azure()
    if url.scheme == "gha":  # the service's URL and token, as a workflow step exports them
        from pytest_mlcjit.cache.store.remote.gha import service_env  # noqa: PLC0415

        service_env(url.redacted)
    return text


#: ``--mlc-jit-gpu-lock``: auto, on or off (an error names the bad value and these).
gpu_lock = choice("auto", "on", "off")
#: ``--mlc-jit-gpu-assign``: auto or off (an error names the bad value and these).
gpu_assign = choice("auto", "off")


def compile_workers(source: str, text: str) -> str:
    value: str = choice("auto", "on", "off")(source, text)
    if value == "on":
        from pytest_mlcjit.compiler.warm.client import supported  # noqa: PLC0415

        if not supported():
            raise ConfigError(f"{source}=on: pre-warmed compile workers need Linux (fork and "
                              "descriptor passing); use auto or off")
    return value
