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

from pytest_mlcjit.errors import ConfigError, argparse_type
from pytest_mlcjit.cache.layout import ENV_CACHE_DIR
from pytest_mlcjit.policy import Policy
from pytest_mlcjit.policy import resolve as resolve_policy
from pytest_mlcjit.engine.settings import DEFAULT_COMPILE_TIMEOUT_S

ENV_POLICY = "MLC_JIT_POLICY"
ENV_TVM_TEST_TARGETS = "TVM_TEST_TARGETS"
AUTO = "auto"
PREFETCH_MODES = ("auto", "on", "off")
ENV_REMOTE = "MLC_JIT_REMOTE"
ENV_REMOTE_MODE = "MLC_JIT_REMOTE_MODE"
REMOTE_MODES = ("read", "readwrite")
PROGRESS_MODES = ("auto", "on", "off")
COMPILE_WORKER_MODES = ("auto", "on", "off")
ENV_COMPILE_WORKERS = "MLC_JIT_COMPILE_WORKERS"


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


def count(name: str, text: str) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(f"invalid {name} {text!r}: expected a whole number, 0 or more")
    return value


def size(name: str, text: str) -> int:
    from pytest_mlcjit.units import parse_size

    return parse_size(text, what=name)


def device_list(text: str) -> list[str]:
    from pytest_mlcjit.device import parse_device_list

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
        "metal, vulkan, opencl, webgpu. Absent devices are skipped. Env TVM_TEST_TARGETS "
        "(';'-separated TVM targets, as tvm.testing reads them: llvm;cuda); ini mlc_device; "
        "default auto (the first present GPU, else cpu).",
    )
    group.addoption(
        "--mlc-jit-require-devices", dest="mlc_jit_require_devices", action="store_true",
        default=None,
        help="fail, instead of skipping, the tests of a selected device that is absent (for "
        "GPU runners: a broken driver fails the run instead of skipping every GPU test). "
        "ini mlc_jit_require_devices.",
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
        help="compile, in the background right after collection, the libraries the "
        "collected tests need, longest expected compile first, each worker taking the next "
        "one no other worker is compiling. auto: under xdist with 2+ workers. ini "
        "mlc_jit_prefetch; default auto.",
    )
    group.addoption(
        "--mlc-jit-max-size", dest="mlc_jit_max_size", metavar="SIZE", default=None,
        type=argparse_type(lambda t: size("--mlc-jit-max-size", t)),
        help="after the run, evict least recently used entries until the cache is at most "
        "SIZE (10G, 500M, 2GiB), never one this run used. ini mlc_jit_max_size; default: "
        "no cap.",
    )
    group.addoption(
        "--mlc-jit-progress", dest="mlc_jit_progress", metavar="{auto,on,off}", default=None,
        type=argparse_type(lambda t: choice("--mlc-jit-progress", t, PROGRESS_MODES)),
        help="show what is compiling, downloading or waiting for another's compile once it "
        "has taken 2s: model, target, worker, seconds. auto: a status line redrawn in place "
        "on a terminal, plain start/end lines (and a heartbeat every 30s) otherwise; on: the "
        "redrawn line even where no terminal is detected; off: nothing. ini "
        "mlc_jit_progress; default auto.",
    )
    group.addoption(
        "--mlc-jit-report", dest="mlc_jit_report", metavar="PATH", default=None,
        help="write the run's accounting as JSON to PATH (requests, outcomes, one record per "
        "library), merged across xdist workers. ini mlc_jit_report (relative to the ini "
        "file).",
    )
    group.addoption(
        "--mlc-jit-durations", dest="mlc_jit_durations", metavar="N", default=None,
        type=argparse_type(lambda t: count("--mlc-jit-durations", t)),
        help="list the N slowest compiles in the summary (0: all). ini mlc_jit_durations; "
        "default 5 when a compile took over 10s, else none.",
    )
    _add_remote_options(group, parser)
    _add_cold_path_options(group, parser)
    parser.addini("mlc_jit_policy", "JIT policy (ON, OFF, REDO, READONLY)", default=None)
    parser.addini("mlc_jit_prefetch", "background prefetch: auto, on or off", default=None)
    parser.addini("mlc_device", "comma-separated devices (default auto)", default=None)
    parser.addini("mlc_jit_require_devices",
                  "fail the tests of an absent device instead of skipping them (true or false)",
                  default=None)
    parser.addini("mlc_jit_cache_dir", "cache directory (relative to the ini file)",
                  type="string", default=None)
    parser.addini("mlc_jit_timeout", "limit in seconds for one compilation", default=None)
    parser.addini("mlc_jit_lock_timeout", "limit in seconds for a lock wait", default=None)
    parser.addini("mlc_jit_allow_untrusted_cache",
                  "load from a cache others can write to (true or false)", default=None)
    parser.addini("mlc_jit_max_size", "cache size cap applied after each run (10G, 500M)",
                  default=None)
    parser.addini("mlc_jit_progress", "live progress: auto, on or off", default=None)
    parser.addini("mlc_jit_report", "JSON accounting report path (relative to the ini file)",
                  type="string", default=None)
    parser.addini("mlc_jit_durations", "list the N slowest compiles (0: all)", default=None)


def _add_remote_options(group: Any, parser: pytest.Parser) -> None:
    group.addoption(
        "--mlc-jit-remote", dest="mlc_jit_remote", metavar="URL", default=None,
        type=argparse_type(lambda t: remote_url("--mlc-jit-remote", t)),
        help="a second cache tier shared by many machines: s3://bucket/prefix (needs "
        "pytest-mlcjit[remote]; credentials, region and endpoint from the AWS_* variables) "
        f"or file:///path. Env {ENV_REMOTE}; ini mlc_jit_remote; default: none.",
    )
    group.addoption(
        "--mlc-jit-remote-mode", dest="mlc_jit_remote_mode", metavar="{read,readwrite}",
        default=None, type=argparse_type(
            lambda t: choice("--mlc-jit-remote-mode", t, REMOTE_MODES)),
        help="read: only download from the remote; readwrite: also upload what this run "
        f"compiles. Env {ENV_REMOTE_MODE}; ini mlc_jit_remote_mode; default readwrite.",
    )
    group.addoption(
        "--mlc-jit-remote-required", dest="mlc_jit_remote_required", action="store_true",
        default=None,
        help="a remote error (unreachable, timeout, throttled) fails the tests that meet it "
        "instead of falling back to compiling locally. ini mlc_jit_remote_required.",
    )
    group.addoption(
        "--mlc-jit-shard", dest="mlc_jit_shard", metavar="I/N", default=None,
        type=argparse_type(lambda t: shard("--mlc-jit-shard", t)),
        help="with --mlc-jit-prepare: compile only the libraries whose key falls in shard I "
        "of N (1 <= I <= N, stable by key digest), so N CI jobs fill a remote together. "
        "ini mlc_jit_shard.",
    )
    parser.addini("mlc_jit_remote", "remote tier URL (s3://bucket/prefix, file:///path)",
                  default=None)
    parser.addini("mlc_jit_remote_mode", "remote mode: read or readwrite", default=None)
    parser.addini("mlc_jit_remote_required", "fail on remote errors (true or false)",
                  default=None)
    parser.addini("mlc_jit_shard", "prepare shard I/N", default=None)


def _add_cold_path_options(group: Any, parser: pytest.Parser) -> None:
    group.addoption(
        "--mlc-jit-compile-workers", dest="mlc_jit_compile_workers", metavar="{auto,on,off}",
        default=None, type=argparse_type(
            lambda t: choice("--mlc-jit-compile-workers", t, COMPILE_WORKER_MODES)),
        help="run each compile in a fork of a worker that imported TVM once per test "
        "process (still one process per compile, killed whole on timeout, dying with the "
        "test process), instead of a new interpreter that imports TVM each time. auto: "
        "where it can (Linux); on: the same, an error elsewhere; off: a new interpreter "
        f"per compile. Env {ENV_COMPILE_WORKERS}; ini mlc_jit_compile_workers; default auto.",
    )
    group.addoption(
        "--mlc-jit-retry-failed", dest="mlc_jit_retry_failed", action="store_true",
        default=None,
        help="compile again the known failures: a library whose factory or compiler raised "
        "in an earlier run is otherwise reported at once, without compiling, while its key "
        "and recorded inputs are unchanged. ini mlc_jit_retry_failed.",
    )
    parser.addini("mlc_jit_compile_workers", "pre-warmed compile workers: auto, on or off",
                  default=None)
    parser.addini("mlc_jit_retry_failed", "compile known failures again (true or false)",
                  default=None)


def _cold_path_options(config: pytest.Config) -> dict[str, Any]:
    opt = config.option
    workers = opt.mlc_jit_compile_workers
    if workers is None and (text := os.environ.get(ENV_COMPILE_WORKERS)):
        workers = choice(ENV_COMPILE_WORKERS, text, COMPILE_WORKER_MODES)
    if workers is None and (text := _ini(config, "mlc_jit_compile_workers")) is not None:
        workers = choice("ini mlc_jit_compile_workers", text, COMPILE_WORKER_MODES)
    workers = workers or "auto"
    if workers == "on":
        from pytest_mlcjit.build.warm import supported

        if not supported():
            raise ConfigError("--mlc-jit-compile-workers=on: pre-warmed compile workers need "
                              "Linux (fork and descriptor passing); use auto or off")
    retry = bool(opt.mlc_jit_retry_failed) or truth(
        "ini mlc_jit_retry_failed", _ini(config, "mlc_jit_retry_failed"))
    return {"compile_workers": workers, "retry_failed": retry}


def remote_url(name: str, text: str) -> str:
    """``text`` if it is a valid remote URL (ConfigError naming the valid forms)."""
    from pytest_mlcjit.cache.store.remote import parse_remote_url

    try:
        parse_remote_url(text)
    except ConfigError as exc:
        raise ConfigError(f"invalid {name}: {exc}") from None
    return text


def shard(name: str, text: str) -> tuple[int, int]:
    """``I/N`` → ``(I, N)`` with 1 <= I <= N."""
    index, sep, total = str(text).strip().partition("/")
    try:
        i, n = int(index), int(total)
    except ValueError:
        i = n = 0
    if not sep or not 1 <= i <= n:
        raise ConfigError(f"invalid {name} {text!r}: expected I/N with 1 <= I <= N, for "
                          "example 2/4")
    return i, n


def _remote_options(config: pytest.Config) -> dict[str, Any]:
    opt = config.option
    url = opt.mlc_jit_remote or os.environ.get(ENV_REMOTE) or _ini(config, "mlc_jit_remote")
    if url and not opt.mlc_jit_remote:
        source = ENV_REMOTE if os.environ.get(ENV_REMOTE) else "ini mlc_jit_remote"
        url = remote_url(source, url)
    mode = opt.mlc_jit_remote_mode
    if mode is None and (text := os.environ.get(ENV_REMOTE_MODE)):
        mode = choice(ENV_REMOTE_MODE, text, REMOTE_MODES)
    if mode is None and (text := _ini(config, "mlc_jit_remote_mode")) is not None:
        mode = choice("ini mlc_jit_remote_mode", text, REMOTE_MODES)
    required = bool(opt.mlc_jit_remote_required) or truth(
        "ini mlc_jit_remote_required", _ini(config, "mlc_jit_remote_required"))
    shard_of = opt.mlc_jit_shard
    if shard_of is None and (text := _ini(config, "mlc_jit_shard")) is not None:
        shard_of = shard("ini mlc_jit_shard", text)
    if url and url.startswith("s3:"):
        from pytest_mlcjit.cache.store.remote import require_boto3

        require_boto3()
    return {"remote": url or None, "remote_mode": mode or "readwrite",
            "remote_required": required, "shard": shard_of}


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
    #: Fail, not skip, the tests of an absent device (--mlc-jit-require-devices).
    require_devices: bool = False
    #: Where the devices came from, for messages: ``--mlc-device=cpu,cuda`` or
    #: ``TVM_TEST_TARGETS=llvm;cuda``.
    device_origin: str = ""
    #: Live progress: auto, on or off (--mlc-jit-progress).
    progress: str = "auto"
    #: Where to write the JSON accounting (--mlc-jit-report), if anywhere.
    report_path: Path | None = None
    #: How many of the slowest compiles the summary lists (0: all; None: 5 when one took
    #: over 10s).
    durations: int | None = None
    #: The remote tier (see :class:`Settings`), and the prepare shard ``(I, N)``.
    remote: str | None = None
    remote_mode: str = "readwrite"
    remote_required: bool = False
    shard: tuple[int, int] | None = None
    #: Pre-warmed compile workers: auto, on or off (--mlc-jit-compile-workers).
    compile_workers: str = "auto"
    #: Compile known failures again (--mlc-jit-retry-failed).
    retry_failed: bool = False


def _ini(config: pytest.Config, name: str) -> Any:
    value = config.getini(name)
    return value if value not in ("", None) else None


def _device_option(config: pytest.Config) -> tuple[str, str]:
    """The device list and where it came from: ``--mlc-device``, else ``TVM_TEST_TARGETS``
    (TVM's own suite selects its targets with it), else ini ``mlc_device``, else auto."""
    option = config.option.mlc_device
    tvm_targets = os.environ.get(ENV_TVM_TEST_TARGETS, "").strip()
    if option is None and tvm_targets:
        from pytest_mlcjit.device import devices_from_tvm_targets

        if names := devices_from_tvm_targets(tvm_targets):
            return ",".join(names), f"{ENV_TVM_TEST_TARGETS}={tvm_targets}"
    option = option or _ini(config, "mlc_device") or AUTO
    return option, f"--mlc-device={option}"


def resolve(config: pytest.Config) -> Options:
    """CLI > env > ini > default, for every option; bad values raise ConfigError."""
    opt = config.option
    policy = resolve_policy(opt.mlc_jit_policy, os.environ.get(ENV_POLICY),
                            _ini(config, "mlc_jit_policy"))
    device_option, device_origin = _device_option(config)
    devices = (AUTO,) if device_option == AUTO else tuple(device_list(device_option))
    require_devices = bool(opt.mlc_jit_require_devices) or truth(
        "ini mlc_jit_require_devices", _ini(config, "mlc_jit_require_devices"))

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
    progress = opt.mlc_jit_progress or choice(
        "ini mlc_jit_progress", _ini(config, "mlc_jit_progress") or "auto", PROGRESS_MODES)
    report_path: Path | None = None
    if opt.mlc_jit_report is not None and not opt.mlc_jit_report.strip():
        raise ConfigError("invalid --mlc-jit-report '': expected a file path")
    if opt.mlc_jit_report:
        report_path = Path(opt.mlc_jit_report).expanduser().absolute()
    elif (ini_report := _ini(config, "mlc_jit_report")) is not None:
        base = config.inipath.parent if config.inipath else config.rootpath
        report_path = (base / Path(ini_report).expanduser()).absolute()
    durations = opt.mlc_jit_durations
    if durations is None and (text := _ini(config, "mlc_jit_durations")) is not None:
        durations = count("ini mlc_jit_durations", text)
    return Options(policy=policy, devices=devices, device_option=device_option,
                   cache_dir=cache_dir, compile_timeout=timeout, lock_timeout=lock_timeout,
                   allow_untrusted=allow, prefetch=prefetch, max_size=max_size,
                   prepare=bool(opt.mlc_jit_prepare), require_devices=require_devices,
                   device_origin=device_origin,
                   progress=progress, report_path=report_path, durations=durations,
                   **_remote_options(config), **_cold_path_options(config))
