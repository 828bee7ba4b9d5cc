"""Every option of the plugin: declared once, checked by an argparse ``type`` where given on
the command line, and resolved once (CLI > environment > ini > default) at configure into
one frozen :class:`Options`. The xdist controller sends the resolved settings to its
workers, which never resolve anything themselves.

Importing this module is cheap: nothing heavy, no device probe.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from .errors import ConfigError, argparse_type
from .layout import ENV_CACHE_DIR
from .policy import Policy
from .policy import resolve as resolve_policy
from .settings import DEFAULT_COMPILE_TIMEOUT_S

ENV_POLICY = "MLC_JIT_POLICY"
AUTO = "auto"
PREFETCH_MODES = ("auto", "on", "off")


# -- value parsers (each raises ConfigError naming the bad value and the valid ones) ----------
def seconds(name: str, text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = -1.0
    if not value > 0:  # also rejects NaN
        raise ConfigError(f"invalid {name} {text!r}: expected a positive number of seconds")
    return value


def choice(name: str, text: str, valid: tuple[str, ...]) -> str:
    value = str(text).strip().lower()
    if value not in valid:
        raise ConfigError(f"invalid {name} {text!r}: expected one of {', '.join(valid)}")
    return value


def truth(name: str, text: str | None) -> bool:
    value = (text or "false").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"invalid {name} {text!r}: expected true or false")


def size(name: str, text: str) -> int:
    from .units import parse_size

    return parse_size(text, what=name)


def device_list(text: str) -> list[str]:
    from .device import parse_device_list

    return parse_device_list(text)


def _policy_value(source: str, text: str) -> str:
    return Policy.parse(text, source=source).value


# -- declaration ------------------------------------------------------------------------------
def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("mlcjit", "pytest-mlcjit: just-in-time compiled model libraries")
    group.addoption(
        "--mlc-jit-policy", dest="mlc_jit_policy", metavar="{ON,OFF,REDO,READONLY}",
        type=argparse_type(lambda t: _policy_value("--mlc-jit-policy", t)),
        default=None,
        help="JIT policy: ON compiles on a miss, OFF never compiles nor reads, REDO recompiles "
        "each key once per run, READONLY only reads. Case-insensitive. "
        f"Env {ENV_POLICY}; ini mlc_jit_policy; default ON.",
    )
    group.addoption(
        "--mlc-device", dest="mlc_device", metavar="LIST", default=None,
        type=argparse_type(lambda t: ",".join(device_list(t))),
        help="comma-separated devices each test runs on: auto, cpu, cuda, cuda:1, rocm, "
        "metal, vulkan, opencl, webgpu. Absent devices are skipped. ini mlc_device; "
        "default auto (the first present GPU, else cpu).",
    )
    group.addoption(
        "--mlc-jit-cache-dir", dest="mlc_jit_cache_dir", metavar="PATH", default=None,
        help=f"cache directory. Env {ENV_CACHE_DIR}; ini mlc_jit_cache_dir; default "
        "$XDG_CACHE_HOME/pytest-mlcjit or ~/.cache/pytest-mlcjit (MLC model directories: "
        "$MLC_LLM_HOME).",
    )
    group.addoption(
        "--mlc-jit-timeout", dest="mlc_jit_timeout", metavar="SECONDS",
        type=argparse_type(lambda t: seconds("--mlc-jit-timeout", t)), default=None,
        help=f"limit for one compilation. ini mlc_jit_timeout; default "
        f"{DEFAULT_COMPILE_TIMEOUT_S:g}.",
    )
    group.addoption(
        "--mlc-jit-lock-timeout", dest="mlc_jit_lock_timeout", metavar="SECONDS",
        type=argparse_type(lambda t: seconds("--mlc-jit-lock-timeout", t)), default=None,
        help="limit for waiting on another process compiling the same library. "
        "ini mlc_jit_lock_timeout; default: the compile timeout plus 300.",
    )
    group.addoption(
        "--mlc-jit-allow-untrusted-cache", dest="mlc_jit_allow_untrusted", action="store_true",
        default=None,
        help="load from a cache directory that other users can write to (refused by default: "
        "loading a library runs its code). ini mlc_jit_allow_untrusted_cache.",
    )
    group.addoption(
        "--mlc-jit-prepare", dest="mlc_jit_prepare", action="store_true", default=False,
        help="warm the cache: collect the tests, compile every distinct library they request "
        "(in parallel under -n), run no test; exit 0 only if every library compiled. With "
        "--mlc-jit-policy=READONLY it only checks that every library is cached.",
    )
    group.addoption(
        "--mlc-jit-prefetch", dest="mlc_jit_prefetch", metavar="{auto,on,off}", default=None,
        type=argparse_type(lambda t: choice("--mlc-jit-prefetch", t, PREFETCH_MODES)),
        help="compile, in the background right after collection, each worker's share of the "
        "libraries the collected tests need, so workers do not wait on each other. auto: "
        "under xdist with 2+ workers. ini mlc_jit_prefetch; default auto.",
    )
    group.addoption(
        "--mlc-jit-max-size", dest="mlc_jit_max_size", metavar="SIZE", default=None,
        type=argparse_type(lambda t: size("--mlc-jit-max-size", t)),
        help="after the run, evict least recently used entries until the cache is at most "
        "SIZE (10G, 500M, 2GiB), never one this run used. ini mlc_jit_max_size; default: "
        "no cap.",
    )
    parser.addini("mlc_jit_policy", "JIT policy (ON, OFF, REDO, READONLY)", default=None)
    parser.addini("mlc_jit_prefetch", "background prefetch: auto, on or off", default=None)
    parser.addini("mlc_device", "comma-separated devices (default auto)", default=None)
    parser.addini("mlc_jit_cache_dir", "cache directory (relative to the ini file)",
                  type="string", default=None)
    parser.addini("mlc_jit_timeout", "limit in seconds for one compilation", default=None)
    parser.addini("mlc_jit_lock_timeout", "limit in seconds for a lock wait", default=None)
    parser.addini("mlc_jit_allow_untrusted_cache",
                  "load from a cache others can write to (true or false)", default=None)
    parser.addini("mlc_jit_max_size", "cache size cap applied after each run (10G, 500M)",
                  default=None)


# -- resolution -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Options:
    """Every option, resolved (CLI > env > ini > default) and checked."""

    policy: Policy
    #: The devices as named (``auto`` resolved later, by the probe), and the option text.
    devices: tuple[str, ...]
    device_option: str
    cache_dir: Path | None
    compile_timeout: float | None
    lock_timeout: float | None
    allow_untrusted: bool
    prefetch: str
    max_size: int | None
    prepare: bool


def _ini(config: pytest.Config, name: str) -> Any:
    value = config.getini(name)
    return value if value not in ("", None) else None


def resolve(config: pytest.Config) -> Options:
    """CLI > env > ini > default, for every option; bad values raise ConfigError."""
    opt = config.option
    policy = resolve_policy(opt.mlc_jit_policy, os.environ.get(ENV_POLICY),
                            _ini(config, "mlc_jit_policy"))
    device_option = opt.mlc_device or _ini(config, "mlc_device") or AUTO
    devices = (AUTO,) if device_option == AUTO else tuple(device_list(device_option))

    cache_dir: Path | None
    if opt.mlc_jit_cache_dir is not None and not opt.mlc_jit_cache_dir.strip():
        raise ConfigError("invalid --mlc-jit-cache-dir '': expected a directory path")
    if opt.mlc_jit_cache_dir:
        cache_dir = Path(opt.mlc_jit_cache_dir).expanduser().absolute()
    elif os.environ.get(ENV_CACHE_DIR):
        cache_dir = Path(os.environ[ENV_CACHE_DIR]).expanduser().absolute()
    elif (ini_dir := _ini(config, "mlc_jit_cache_dir")) is not None:
        base = config.inipath.parent if config.inipath else config.rootpath
        cache_dir = (base / Path(ini_dir).expanduser()).absolute()
    else:
        cache_dir = None

    timeout = opt.mlc_jit_timeout
    if timeout is None and (text := _ini(config, "mlc_jit_timeout")) is not None:
        timeout = seconds("ini mlc_jit_timeout", text)
    lock_timeout = opt.mlc_jit_lock_timeout
    if lock_timeout is None and (text := _ini(config, "mlc_jit_lock_timeout")) is not None:
        lock_timeout = seconds("ini mlc_jit_lock_timeout", text)
    allow = bool(opt.mlc_jit_allow_untrusted) or truth(
        "ini mlc_jit_allow_untrusted_cache", _ini(config, "mlc_jit_allow_untrusted_cache"))
    prefetch = opt.mlc_jit_prefetch or choice(
        "ini mlc_jit_prefetch", _ini(config, "mlc_jit_prefetch") or "auto", PREFETCH_MODES)
    max_size = opt.mlc_jit_max_size
    if max_size is None and (text := _ini(config, "mlc_jit_max_size")) is not None:
        max_size = size("ini mlc_jit_max_size", text)
    return Options(policy=policy, devices=devices, device_option=device_option,
                   cache_dir=cache_dir, compile_timeout=timeout, lock_timeout=lock_timeout,
                   allow_untrusted=allow, prefetch=prefetch, max_size=max_size,
                   prepare=bool(opt.mlc_jit_prepare))
