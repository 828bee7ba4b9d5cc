"""The pytest plugin (entry point ``mlcjit``; ``-p no:mlcjit`` disables it).

Hooks only: options, markers, fixtures, device parametrization, the xdist hand-off and
reporting. The controller resolves the options and probes the devices once, then sends
both, with the run id, to the workers in ``workerinput``; each worker compiles and counts;
the counts come back in ``workeroutput`` and only the controller prints them.

Loading it is cheap: at start-up it imports only :mod:`.errors` and checks the options
it was given; the device probe, the settings and the engine (and the modules behind
them) are made when a test first needs them, so a run whose tests never ask for a
model pays for none of it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ._defaults import DEFAULT_COMPILE_TIMEOUT_S, ENV_CACHE_DIR
from .errors import ConfigError, MlcJitError, SpecError, argparse_type
from .policy import Policy
from .policy import resolve as resolve_policy

if TYPE_CHECKING:
    from .device import Device
    from .engine import JIT, Settings, Stats
    from .model import CompiledModel
    from .prefetch import Prefetcher

ENV_POLICY = "MLC_JIT_POLICY"
AUTO = "auto"

#: The options as resolved at configure, then the settings and engine made from them.
state_key = pytest.StashKey["RunState"]()
prefetch_key = pytest.StashKey[str]()
#: --mlc-jit-max-size in bytes (controller only), when set.
max_size_key = pytest.StashKey[int]()
#: When this run started (controller), and the digests its tests used (each process).
started_key = pytest.StashKey[float]()
used_key = pytest.StashKey[set[str]]()
#: What the size cap pruned after the run, per root, or the error that stopped it.
pruned_key = pytest.StashKey[list[Any]]()

MARKERS = (
    "mlc_model(spec, *, target=None, **options): the model the compiled_model fixture "
    "compiles: a TVMModel, or an MLC model directory (with overrides=, opt=, "
    "system_lib_prefix=). target= cross-compiles for that target instead of the test's device.",
    "mlc_devices(*devices): run this test only on these devices (cpu, cuda, cuda:1, ...), "
    "intersected with --mlc-device.",
    "mlc_jit_policy(policy): the JIT policy (ON, OFF, REDO, READONLY) for this test only.",
)


# -- options ----------------------------------------------------------------------------------
def _seconds(name: str, text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = -1.0
    if not value > 0:  # also rejects NaN
        raise ConfigError(f"invalid {name} {text!r}: expected a positive number of seconds")
    return value


PREFETCH_MODES = ("auto", "on", "off")


def _choice(name: str, text: str, valid: tuple[str, ...]) -> str:
    value = str(text).strip().lower()
    if value not in valid:
        raise ConfigError(f"invalid {name} {text!r}: expected one of {', '.join(valid)}")
    return value


def _truth(name: str, text: str | None) -> bool:
    value = (text or "false").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"invalid {name} {text!r}: expected true or false")


def pytest_addoption(parser: pytest.Parser) -> None:
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
        type=argparse_type(lambda t: ",".join(_device_list(t))),
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
        type=argparse_type(lambda t: _seconds("--mlc-jit-timeout", t)), default=None,
        help=f"limit for one compilation. ini mlc_jit_timeout; default "
        f"{DEFAULT_COMPILE_TIMEOUT_S:g}.",
    )
    group.addoption(
        "--mlc-jit-lock-timeout", dest="mlc_jit_lock_timeout", metavar="SECONDS",
        type=argparse_type(lambda t: _seconds("--mlc-jit-lock-timeout", t)), default=None,
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
        type=argparse_type(lambda t: _choice("--mlc-jit-prefetch", t, PREFETCH_MODES)),
        help="compile, in the background right after collection, each worker's share of the "
        "libraries the collected tests need, so workers do not wait on each other. auto: "
        "under xdist with 2+ workers. ini mlc_jit_prefetch; default auto.",
    )
    group.addoption(
        "--mlc-jit-max-size", dest="mlc_jit_max_size", metavar="SIZE", default=None,
        type=argparse_type(lambda t: _size("--mlc-jit-max-size", t)),
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


def _size(name: str, text: str) -> int:
    from .manage import parse_size

    return parse_size(text, what=name)


def _ini(config: pytest.Config, name: str) -> Any:
    value = config.getini(name)
    return value if value not in ("", None) else None


def _policy_value(source: str, text: str) -> str:
    return Policy.parse(text, source=source).value


def _device_list(text: str) -> list[str]:
    from .device import parse_device_list

    return parse_device_list(text)


class RunState:
    """This process's view of the run.

    At configure only the options are resolved and checked (CLI > env > ini > default).
    The device probe, the :class:`Settings` and the engine are made on first need: by a
    test that asks for a model or a device, by the report header, or (on the xdist
    controller) when the workers are started, which receive them ready-made.
    """

    def __init__(self, *, policy: Policy, devices: list[str], option: str,
                 cache_dir: Path | None = None, compile_timeout: float | None = None,
                 lock_timeout: float | None = None, allow_untrusted: bool = False,
                 settings_json: dict[str, Any] | None = None) -> None:
        self.policy, self.device_names, self.option = policy, devices, option
        self.cache_dir, self.allow_untrusted = cache_dir, allow_untrusted
        self.compile_timeout, self.lock_timeout = compile_timeout, lock_timeout
        self._settings_json = settings_json
        self._settings: Settings | None = None
        self._engine: JIT | None = None
        #: Statistics sent by the workers (controller only), merged with its own.
        self.worker_stats: list[Mapping[str, Any]] = []
        #: This process's background prefetch, when one runs.
        self.prefetcher: Prefetcher | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            if self._settings_json is not None:
                self._settings = settings_from_json(self._settings_json)
            else:
                from .device import devices_to_probe, probe, resolve_auto
                from .engine import Settings

                presence = probe(devices_to_probe(self.device_names))
                self._settings = Settings(
                    policy=self.policy, cache_dir=self.cache_dir,
                    compile_timeout=self.compile_timeout or DEFAULT_COMPILE_TIMEOUT_S,
                    lock_timeout=self.lock_timeout, presence=presence,
                    devices=tuple(resolve_auto(self.device_names, presence)),
                    allow_untrusted=self.allow_untrusted,
                )
        return self._settings

    @property
    def engine(self) -> JIT:
        if self._engine is None:
            from .engine import JIT

            self._engine = JIT(self.settings)
        return self._engine

    @property
    def engine_made(self) -> bool:
        return self._engine is not None

    def stats(self) -> Stats | None:
        """This process's statistics merged with the workers'; None if none were kept."""
        if self._engine is None and not self.worker_stats:
            return None
        from .engine import Stats

        total = Stats()
        if self._engine is not None:
            total.merge(self._engine.stats.to_json())
        for stats in self.worker_stats:
            total.merge(stats)
        return total


def _resolve_options(config: pytest.Config) -> RunState:
    """CLI > env > ini > default, for every option; bad values raise ConfigError."""
    opt = config.option
    policy = resolve_policy(opt.mlc_jit_policy, os.environ.get(ENV_POLICY),
                            _ini(config, "mlc_jit_policy"))
    option = opt.mlc_device or _ini(config, "mlc_device") or AUTO
    devices = [AUTO] if option == AUTO else _device_list(option)

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
        timeout = _seconds("ini mlc_jit_timeout", text)
    lock_timeout = opt.mlc_jit_lock_timeout
    if lock_timeout is None and (text := _ini(config, "mlc_jit_lock_timeout")) is not None:
        lock_timeout = _seconds("ini mlc_jit_lock_timeout", text)
    allow = bool(opt.mlc_jit_allow_untrusted) or _truth(
        "ini mlc_jit_allow_untrusted_cache", _ini(config, "mlc_jit_allow_untrusted_cache"))
    return RunState(policy=policy, devices=devices, option=option,
                    cache_dir=cache_dir, compile_timeout=timeout, lock_timeout=lock_timeout,
                    allow_untrusted=allow)


def settings_to_json(settings: Settings) -> dict[str, Any]:
    """A form of the settings that execnet can send to a worker."""
    return {
        "policy": settings.policy.value,
        "cache_dir": str(settings.cache_dir) if settings.cache_dir else None,
        "compile_timeout": settings.compile_timeout, "lock_timeout": settings.lock_timeout,
        "run_id": settings.run_id,
        "presence": {k: v.to_json() for k, v in settings.presence.items()},
        "devices": list(settings.devices), "allow_untrusted": settings.allow_untrusted,
    }


def settings_from_json(data: dict[str, Any]) -> Settings:
    from .device import Presence
    from .engine import Settings

    return Settings(
        policy=Policy.parse(data["policy"]),
        cache_dir=Path(data["cache_dir"]) if data["cache_dir"] else None,
        compile_timeout=data["compile_timeout"], lock_timeout=data["lock_timeout"],
        run_id=data["run_id"],
        presence={k: Presence.from_json(v) for k, v in data["presence"].items()},
        devices=tuple(data["devices"]), allow_untrusted=data["allow_untrusted"],
    )


def run_state(config: pytest.Config) -> RunState:
    """The run's state; a UsageError if the plugin was not configured (disabled with -p)."""
    if state_key not in config.stash:
        raise pytest.UsageError("pytest-mlcjit is not configured (was it disabled with -p?)")
    return config.stash[state_key]


def get_engine(config: pytest.Config) -> JIT:
    """The run's engine (made on first call)."""
    return run_state(config).engine


# -- configuration ----------------------------------------------------------------------------
def pytest_configure(config: pytest.Config) -> None:
    for marker in MARKERS:
        config.addinivalue_line("markers", marker)
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and "mlcjit" in workerinput:
        data = workerinput["mlcjit"]
        state = RunState(policy=Policy.parse(data["policy"]), devices=list(data["devices"]),
                         option=workerinput["mlcjit_option"], settings_json=data)
    else:
        try:
            state = _resolve_options(config)
        except MlcJitError as exc:
            raise pytest.UsageError(str(exc)) from None
    config.stash[state_key] = state
    config.stash[used_key] = set()
    if workerinput is None:
        config.stash[started_key] = time.time()
        try:
            max_size = config.option.mlc_jit_max_size
            if max_size is None and (text := _ini(config, "mlc_jit_max_size")) is not None:
                max_size = _size("ini mlc_jit_max_size", text)
        except MlcJitError as exc:
            raise pytest.UsageError(str(exc)) from None
        if max_size is not None:
            config.stash[max_size_key] = max_size
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(XdistHooks(config), "mlcjit-xdist")
    try:
        prefetch = config.option.mlc_jit_prefetch or _choice(
            "ini mlc_jit_prefetch", _ini(config, "mlc_jit_prefetch") or "auto", PREFETCH_MODES)
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[prefetch_key] = prefetch
    if config.option.mlc_jit_prepare:
        if state.policy is Policy.OFF:
            raise pytest.UsageError(
                "--mlc-jit-prepare compiles libraries, but the policy is OFF; use ON (or "
                "READONLY to check that every library is cached)")
        from .prepare import Prepare

        config.pluginmanager.register(Prepare(config), "mlcjit-prepare")


class XdistHooks:
    """Hooks that exist only when pytest-xdist is installed."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    @pytest.hookimpl
    def pytest_configure_node(self, node: Any) -> None:
        state = self.config.stash[state_key]
        node.workerinput["mlcjit"] = settings_to_json(state.settings)  # probes, once
        node.workerinput["mlcjit_option"] = state.option

    @pytest.hookimpl
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        stats = getattr(node, "workeroutput", {}).get("mlcjit_stats")
        if stats:
            self.config.stash[state_key].worker_stats.append(stats)
        used = getattr(node, "workeroutput", {}).get("mlcjit_used")
        if used:
            self.config.stash[used_key].update(used)


def _uses_plugin(item: pytest.Item) -> bool:
    return "compiled_model" in getattr(item, "fixturenames", ())


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start background prefetch of this worker's share of the run's libraries."""
    config = session.config
    if state_key not in config.stash or config.option.collectonly or config.option.mlc_jit_prepare:
        return
    state = config.stash[state_key]
    workerinput = getattr(config, "workerinput", None)
    index, count = (0, 1) if workerinput is None else (
        int(str(workerinput["workerid"]).lstrip("gw") or 0), int(workerinput["workercount"]))
    mode = config.stash[prefetch_key]
    if not state.policy.writes or mode == "off" or (mode == "auto" and count < 2):
        return
    if not any(_uses_plugin(item) for item in session.items):
        return
    from .prefetch import Prefetcher

    state.prefetcher = Prefetcher(state.engine, index, count)
    state.prefetcher.start(session.items)


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    if state_key not in config.stash:
        return
    state = config.stash[state_key]
    if state.prefetcher is not None:
        state.prefetcher.stop()
    if hasattr(config, "workeroutput"):
        if state.engine_made:
            config.workeroutput["mlcjit_stats"] = state.engine.stats.to_json()
        used: set[str] = config.stash[used_key]
        config.workeroutput["mlcjit_used"] = sorted(used)
    else:
        _after_run(session)


def _after_run(session: pytest.Session) -> None:
    """On the controller, when the policy writes: append this run's statistics to each
    cache root's history (``.mlcjit/runs.jsonl``, read by ``pytest-mlcjit info``), then
    apply --mlc-jit-max-size, never evicting an entry this run used."""
    config = session.config
    state = config.stash[state_key]
    stats = state.stats()
    requests = stats.requests if stats is not None else 0
    if not state.policy.writes or (not requests and max_size_key not in config.stash):
        return
    from ._defaults import default_roots
    from .cache import CONTROL_DIR
    from .history import record_run

    settings = state.settings
    roots = [r for r in default_roots(settings.cache_dir) if (r / CONTROL_DIR).is_dir()]
    started = config.stash.get(started_key, time.time())
    if stats is not None and requests:
        record = {"time": time.time(), "started": started, "run_id": settings.run_id,
                  "policy": settings.policy.value, "devices": list(settings.devices),
                  "prepare": bool(config.option.mlc_jit_prepare),
                  "exitstatus": int(session.exitstatus), **stats.to_json()}
        for root in roots:
            record_run(root, record)
    max_size = config.stash.get(max_size_key, None)
    if max_size is None or config.option.collectonly:
        return
    from . import manage

    used: set[str] = config.stash[used_key]
    results: list[Any] = []
    for root in roots:
        try:
            results.append(manage.prune(root, max_size=max_size, protect=used,
                                        protect_used_since=started))
        except (OSError, MlcJitError) as exc:
            results.append(f"pruning {root} failed: {exc}")
    config.stash[pruned_key] = results


def pytest_report_header(config: pytest.Config) -> str | None:
    """The policy, the devices as probed, and the cache (probes the devices: shown only
    at the default verbosity and above, so ``-q`` runs do not pay for it)."""
    if state_key not in config.stash:
        return None
    from ._defaults import default_cache_dir, mlc_llm_home
    from .device import Presence

    s = config.stash[state_key].settings
    parts = []
    for name in s.devices:
        p = s.presence.get(name, Presence(True))
        parts.append(f"{name} (present)" if p.present else f"{name} (absent: {p.reason})")
    if s.cache_dir is not None:
        where = f"cache={s.cache_dir}"
    else:
        where = f"cache={default_cache_dir()} (MLC: {mlc_llm_home()})"
    return f"mlcjit: policy={s.policy.value}, devices={', '.join(parts)}, {where}"


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if state_key not in config.stash or hasattr(config, "workeroutput"):
        return
    s = config.stash[state_key].stats()
    lines = []
    if s is not None and s.requests:
        lines.append(
            f"{s.requests} request{'s' * (s.requests != 1)}: {s.hits} hits, {s.compiles} "
            f"compiled ({f'{s.prefetched} ahead of time, ' if s.prefetched else ''}"
            f"{s.compile_seconds:.2f}s compiling), {s.failures} failed, "
            f"{s.corrupt} corrupt; {s.lock_wait_seconds:.2f}s waiting for locks"
        )
    lines += _prune_lines(config)
    if not lines:
        return
    terminalreporter.write_sep("-", "pytest-mlcjit")
    for line in lines:
        terminalreporter.write_line(line)


def _prune_lines(config: pytest.Config) -> list[str]:
    results = config.stash.get(pruned_key, [])
    if not results:
        return []
    from .manage import format_size, plural

    cap = config.stash.get(max_size_key, None)
    lines = []
    for result in results:
        if isinstance(result, str):
            lines.append(result)
            continue
        line = (f"--mlc-jit-max-size={format_size(cap or 0)}: {result.root} is "
                f"{format_size(result.total_after)}")
        if result.evicted or result.quarantine_removed:
            evicted = plural(len(result.evicted), "least recently used entry",
                             "least recently used entries")
            line += f" after evicting {evicted} ({format_size(result.freed)})"
        if result.over_cap:
            line += (f"; still over the cap: kept {len(result.kept_in_use)} used by this run "
                     f"and {len(result.kept_locked)} being compiled")
        lines.append(line)
    return lines


# -- collection: one test per device --------------------------------------------------------
def _marker_target(metafunc: pytest.Metafunc) -> Any:
    marker = metafunc.definition.get_closest_marker("mlc_model")
    if marker is None:
        return None
    target = marker.kwargs.get("target")
    if target is None and marker.args:
        target = getattr(marker.args[0], "target", None)
    return target


def _user_parametrizes_device(metafunc: pytest.Metafunc) -> bool:
    for marker in metafunc.definition.iter_markers("parametrize"):
        names = marker.args[0] if marker.args else marker.kwargs.get("argnames", "")
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",")]
        if "mlc_device" in names:
            return True
    return False


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "mlc_device" not in metafunc.fixturenames or state_key not in metafunc.config.stash:
        return
    if _user_parametrizes_device(metafunc):
        return
    from .device import Device, Presence, device_for_target, parse_target

    state = metafunc.config.stash[state_key]
    settings, option = state.settings, state.option
    target = _marker_target(metafunc)
    if target is not None:
        try:
            device = device_for_target(parse_target(target))
            name = str(device)
        except MlcJitError:  # a packaging target (android…), or bad: the fixture says which
            device, name = Device("cpu"), str(target)
        metafunc.parametrize("mlc_device", [pytest.param(device, id=f"target-{name}")])
        return
    names = list(settings.devices)
    marker = metafunc.definition.get_closest_marker("mlc_devices")
    if marker is not None:
        try:
            wanted = {str(Device.parse(str(d))) for d in marker.args}
        except ConfigError as exc:
            raise pytest.UsageError(f"{metafunc.definition.nodeid}: mlc_devices: {exc}") from None
        if not marker.args:
            raise pytest.UsageError(
                f"{metafunc.definition.nodeid}: mlc_devices() needs at least one device")
        names = [n for n in names if n in wanted or n.partition(":")[0] in wanted]
    params = []
    for name in names:
        presence = settings.presence.get(name) or settings.presence.get(
            name.partition(":")[0]) or Presence(name == "cpu", "not probed")
        marks = () if presence.present else (pytest.mark.skip(
            reason=f"device {name} is not present: {presence.reason} (--mlc-device={option})"),)
        params.append(pytest.param(Device.parse(name), id=name, marks=marks))
    if not params:
        reason = (f"none of the devices this test allows ({', '.join(map(str, marker.args))}) "
                  f"is selected by --mlc-device={option}") if marker else "no device selected"
        params.append(pytest.param(None, id="no-device", marks=pytest.mark.skip(reason=reason)))
    metafunc.parametrize("mlc_device", params)


def _is_mlc(spec: Any) -> bool:
    return getattr(spec, "backend", None) == "mlc" or isinstance(spec, str | os.PathLike)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip, at collection, the tests whose model needs an ``mlc_llm`` that is not here."""
    installed: bool | None = None
    for item in items:
        if not _uses_plugin(item):
            continue
        callspec = getattr(item, "callspec", None)
        marker = item.get_closest_marker("mlc_model")
        if callspec is not None and "compiled_model" in callspec.params:
            spec = callspec.params["compiled_model"]
        elif marker is not None and marker.args:
            spec = marker.args[0]
        else:
            continue
        if not _is_mlc(spec):
            continue
        if installed is None:
            from .backends.mlc import mlc_llm_installed

            installed = mlc_llm_installed()
        if not installed:
            item.add_marker(pytest.mark.skip(
                reason="mlc_llm is not installed (it is published on MLC's own package "
                "index, not PyPI); this test needs the MLC-LLM backend"))


def pytest_make_parametrize_id(config: pytest.Config, val: object, argname: str) -> str | None:
    """Readable ids for specs: ``mlp-hidden=128``; an MLC directory by its name."""
    if argname == "compiled_model" and isinstance(val, str | os.PathLike):
        return Path(val).name
    spec_id = getattr(val, "id", None)
    if getattr(val, "backend", None) in ("tvm", "mlc") and isinstance(spec_id, str):
        return spec_id
    return None


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def mlc_jit(pytestconfig: pytest.Config) -> JIT:
    """The session's JIT engine: ``mlc_jit.compile(spec, device)`` from code, its
    ``settings`` (policy, devices, cache dir…) and ``stats``."""
    return get_engine(pytestconfig)


@pytest.fixture
def mlc_device(request: pytest.FixtureRequest, pytestconfig: pytest.Config) -> Device:
    """The device this test runs on; tests using it run once per ``--mlc-device`` entry."""
    params = {"mlc_device": request.param} if hasattr(request, "param") else {}
    settings = run_state(pytestconfig).settings
    try:
        device = requested_device(params, settings)
    except ConfigError as exc:
        error = f"mlc_device: {exc}"
    else:
        if device is None:  # the placeholder of a test no selected device allows
            pytest.skip("no device selected")
        return device
    pytest.fail(error, pytrace=False)  # outside the except: no chained traceback


def requested_device(params: Mapping[str, Any], settings: Settings) -> Device | None:
    """The device a test runs on: its ``mlc_device`` parameter (a Device, or a device
    string where the test parametrizes ``mlc_device`` itself), else the first selected
    device; None for the placeholder of a test no selected device allows."""
    from .device import Device

    if "mlc_device" not in params:
        return Device.parse(settings.devices[0])
    value = params["mlc_device"]
    if value is None or isinstance(value, Device):
        return value
    return Device.parse(str(value))


def spec_from_marker(marker: pytest.Mark) -> Any:
    """Turn ``mlc_model(...)`` arguments into a spec, or raise SpecError."""
    if len(marker.args) != 1:
        raise SpecError(
            f"mlc_model takes exactly one positional argument (the model spec), got "
            f"{len(marker.args)}: {marker.args!r}"
        )
    from .spec import TVMModel

    spec, options = marker.args[0], dict(marker.kwargs)
    if isinstance(spec, TVMModel):
        target = options.pop("target", None)
        if options:
            raise SpecError(f"mlc_model({spec!r}) got unknown options {sorted(options)}; "
                            "a TVMModel takes only target=")
        if target is not None:
            spec = TVMModel(spec.factory, spec.config, target=target, opt_level=spec.opt_level,
                            seed=spec.seed, name=spec.name)
        return spec
    if _is_mlc(spec):
        from .backends.mlc import MLCModel

        return MLCModel.coerce(spec, **options)
    raise SpecError(
        f"invalid model spec {spec!r}: expected a TVMModel, an MLCModel or the path of an MLC "
        "model directory"
    )


@pytest.fixture
def compiled_model(request: pytest.FixtureRequest, mlc_device: Device,
                   mlc_jit: JIT) -> CompiledModel:
    """The library for this test's model (``mlc_model`` marker or indirect parametrization)
    on this test's device, compiled once for all workers and runs."""
    try:
        params = {"compiled_model": request.param} if hasattr(request, "param") else {}
        spec, policy = requested_spec(request.node, params)
        model = mlc_jit.compile(spec, mlc_device, policy=policy)
        request.config.stash[used_key].add(model.digest)
        return model
    except MlcJitError as exc:
        error = f"{type(exc).__name__}: {exc}"
    pytest.fail(error, pytrace=False)  # outside the except: no chained traceback


def requested_spec(node: pytest.Item, params: Mapping[str, Any]) -> tuple[Any, Policy | None]:
    """The spec and per-test policy a test asks for: ``params["compiled_model"]`` (indirect
    parametrization) or its ``mlc_model`` marker; SpecError/ConfigError if malformed."""
    if "compiled_model" in params:
        spec = params["compiled_model"]
        if isinstance(spec, str | os.PathLike):
            from .backends.mlc import MLCModel

            spec = MLCModel.coerce(spec)
    else:
        marker = node.get_closest_marker("mlc_model")
        if marker is None:
            raise SpecError(
                "this test uses compiled_model but names no model: add "
                "@pytest.mark.mlc_model(spec) or parametrize compiled_model indirectly"
            )
        spec = spec_from_marker(marker)
    policy_marker = node.get_closest_marker("mlc_jit_policy")
    if policy_marker is None:
        return spec, None

    if len(policy_marker.args) != 1:
        raise SpecError("mlc_jit_policy takes exactly one argument: ON, OFF, REDO or READONLY")
    return spec, Policy.parse(policy_marker.args[0], source="mlc_jit_policy marker")
