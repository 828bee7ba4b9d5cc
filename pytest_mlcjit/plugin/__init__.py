"""The pytest plugin (entry point ``mlcjit``; ``-p no:mlcjit`` disables it): hooks and
fixtures only.

The controller resolves the options (:mod:`.options`) and probes the devices once, then
sends both, with the run id, to the workers in ``workerinput``; each worker compiles and
counts; the counts come back in ``workeroutput`` and only the controller prints them
(:mod:`.report`). What each test requests is read by :mod:`.plan`.

Loading it is cheap: the device probe, the settings and the engine (and the modules behind
them) are made when a test first needs them, so a run whose tests never ask for a model
pays for none of it.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import pytest

from pytest_mlcjit.errors import CompileError, ConfigError, MlcJitError
from pytest_mlcjit.plugin import gpu, plan
from pytest_mlcjit.plugin import options as opts
from pytest_mlcjit.plugin.gpu import MARKER as GPU_LOCK_MARKER
from pytest_mlcjit.plugin.gpu import mlc_gpu_lock, pytest_runtest_call  # noqa: F401
from pytest_mlcjit.plugin.session import (
    RunState,
    compile_log_key,
    failure_line_key,
    get_engine,
    run_state,
    state_key,
)
from pytest_mlcjit.policy import Policy

if TYPE_CHECKING:
    from pytest_mlcjit.device import Device
    from pytest_mlcjit.engine.jit import JIT
    from pytest_mlcjit.engine.model import CompiledModel

MARKERS = (
    "mlc_model(spec, *, target=None, **options): the model the compiled_model fixture "
    "compiles: a TVMModel, or an MLC model directory (with overrides=, opt=, "
    "system_lib_prefix=). target= cross-compiles for that target instead of the test's device.",
    "mlc_devices(*devices): run this test only on these devices (cpu, cuda, cuda:1, ...), "
    "intersected with --mlc-device.",
    "mlc_jit_policy(policy): the JIT policy (ON, OFF, REDO, READONLY) for this test only.",
    "gpu: the test runs on a GPU device (pytest-mlcjit adds it to each test parametrized "
    "onto one, as TVM's suite marks its GPU tests); deselect them with -m 'not gpu'.",
    GPU_LOCK_MARKER,
)


def pytest_addoption(parser: pytest.Parser) -> None:
    opts.add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    for marker in MARKERS:
        config.addinivalue_line("markers", marker)
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and "mlcjit" in workerinput:
        state = RunState.from_worker_input(workerinput["mlcjit"])
    else:
        try:
            state = RunState(opts.resolve_settings(config))
        except MlcJitError as exc:
            raise pytest.UsageError(str(exc)) from None
        state.started = time.time()
    if workerinput is not None:  # an xdist worker: its id, from its own config
        state.worker = str(workerinput.get("workerid") or "main")
    config.stash[state_key] = state
    if state.options.trace_path is not None:
        from pytest_mlcjit.plugin.trace import Tracer

        tracer = Tracer(config, state)
        state.on_job = tracer.job
        config.pluginmanager.register(tracer, "mlcjit-trace")
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(XdistHooks(config), "mlcjit-xdist")
    if state.options.shard is not None and not state.options.prepare:
        raise pytest.UsageError(
            "--mlc-jit-shard splits the libraries of --mlc-jit-prepare between CI jobs; "
            "pass --mlc-jit-prepare too (a test run needs every library)")
    if state.options.prepare:
        if state.options.policy is Policy.OFF:
            raise pytest.UsageError(
                "--mlc-jit-prepare compiles libraries, but the policy is OFF; use ON (or "
                "READONLY to check that every library is cached)")
        from pytest_mlcjit.plugin.prepare import Prepare

        config.pluginmanager.register(Prepare(config), "mlcjit-prepare")


class XdistHooks:
    """Hooks that exist only when pytest-xdist is installed."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    @pytest.hookimpl
    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput["mlcjit"] = run_state(self.config).worker_input()  # probes, once
        _start_progress(self.config)

    @pytest.hookimpl
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        state = run_state(self.config)
        output = getattr(node, "workeroutput", {})
        if stats := output.get("mlcjit_stats"):
            state.worker_stats.append(stats)
        state.used.update(output.get("mlcjit_used") or ())


@pytest.hookimpl(wrapper=True)
def pytest_collection(session: pytest.Session) -> Generator[None, object, object]:
    """While collecting, a spec with a bad field (a module-level ``TVMModel`` with a config
    that is not JSON…) does not abort the collection of its module: it fails the tests that
    request it, at setup."""
    from pytest_mlcjit.spec import deferring_spec_errors

    with deferring_spec_errors():
        return (yield)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start background prefetch of the run's libraries (longest first, work stealing)."""
    config = session.config
    if state_key not in config.stash or config.option.collectonly:
        return
    state = config.stash[state_key]
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None and any(plan.uses_plugin(item) or gpu.wraps_call(item)
                                   for item in session.items):
        _start_progress(config)  # compiles, downloads, waits for a compile or the GPU
    if state.options.prepare:
        return
    index, count = (0, 1) if workerinput is None else (
        int(str(workerinput["workerid"]).lstrip("gw") or 0), int(workerinput["workercount"]))
    mode, opts = state.options.prefetch, state.options
    compiles = opts.policy.writes and (mode == "on" or (mode == "auto" and count > 1))
    ahead = 0 if mode == "off" or opts.remote is None else opts.remote_ahead  # remote hits
    if not (compiles or ahead) or not any(plan.uses_plugin(item) for item in session.items):
        return
    from pytest_mlcjit.plugin.prefetch import Prefetcher

    state.prefetcher = Prefetcher(state.engine, index, count, compiles=compiles,
                                  downloads=ahead)
    state.prefetcher.start(session.items)


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    if state_key not in config.stash:
        return
    state = config.stash[state_key]
    if state.prefetcher is not None:  # interrupted: stop its compile, do not wait for it
        state.prefetcher.stop(interrupted=session.exitstatus == pytest.ExitCode.INTERRUPTED)
    if state.progress is not None:
        state.progress.stop()  # and removes this run's records from the board
    if state.engine_made:  # a worker's record stays for the controller's display to read
        state.engine.close(keep_record=hasattr(config, "workeroutput")
                           and state.options.progress != "off")
    if hasattr(config, "workeroutput"):
        if state.engine_made:
            config.workeroutput["mlcjit_stats"] = state.engine.stats.to_json()
        config.workeroutput["mlcjit_used"] = sorted(state.used)
    elif state.used_the_plugin():
        from pytest_mlcjit.plugin.after_run import after_run

        after_run(session, state)


def _start_progress(config: pytest.Config) -> None:
    """Start the live progress display (:mod:`.progress`), once, where it draws: the
    controller, or the one process without xdist."""
    state = run_state(config)
    if state.progress is not None or state.options.progress == "off":
        return
    terminalreporter = config.pluginmanager.get_plugin("terminalreporter")
    if terminalreporter is None:
        return
    from pytest_mlcjit.plugin.progress import Progress

    state.progress = Progress(terminalreporter, state.settings, board=state.progress_board(),
                              local=lambda: state.engine.board if state.engine_made else None)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A test whose compile failed gets a section with the compile log's last lines, and
    its one-line form (``-rE``) starts with the cause, not with pytest's ``Failed:``."""
    report = yield
    if report.when != "setup" or not report.failed:
        return report
    section = item.stash.get(compile_log_key, None)
    if section is not None:
        report.sections.append(section)
    line = item.stash.get(failure_line_key, None)
    crash = getattr(report.longrepr, "reprcrash", None)
    if line is not None and crash is not None and hasattr(crash, "message"):
        crash.message = line
    return report


def pytest_report_header(config: pytest.Config) -> str | None:
    """The policy, the devices as probed, and the cache (probes the devices: shown only
    at the default verbosity and above, so ``-q`` runs do not pay for it)."""
    if state_key not in config.stash:
        return None
    return config.stash[state_key].header_line()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if state_key not in config.stash or hasattr(config, "workeroutput"):
        return
    state = config.stash[state_key]
    if not state.used_the_plugin():
        return
    from pytest_mlcjit.plugin.report import write_summary

    write_summary(terminalreporter, state)


# -- collection: one test per device --------------------------------------------------------
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "mlc_device" not in metafunc.fixturenames or state_key not in metafunc.config.stash:
        return
    definition = metafunc.definition
    if plan.user_parametrizes_device(definition):
        return
    from pytest_mlcjit.device import Device, Presence, device_for_target, parse_target

    state = metafunc.config.stash[state_key]
    settings = state.settings
    origin = settings.device_origin
    target = plan.marker_target(definition)
    if target is not None:
        try:
            device = device_for_target(parse_target(target))
            name = str(device)
        except MlcJitError:  # a packaging target (android…), or bad: the fixture says which
            device, name = Device("cpu"), str(target)
        metafunc.parametrize("mlc_device", [pytest.param(device, id=f"target-{name}")])
        return
    names = list(settings.devices)
    marker = definition.get_closest_marker("mlc_devices")
    if marker is not None:
        try:
            if not marker.args:
                raise ConfigError("mlc_devices() needs at least one device")
            wanted = {str(Device.parse(str(d))) for d in marker.args}
        except ConfigError as exc:  # fails this test at setup; collection goes on
            error = str(exc) if not marker.args else f"mlc_devices: {exc}"
            bad = plan.NoDevice(f"{definition.nodeid}: {error}", invalid=True)
            metafunc.parametrize("mlc_device", [pytest.param(bad, id=str(bad))], indirect=True)
            return
        names = [n for n in names if n in wanted or n.partition(":")[0] in wanted]
    require = state.options.require_devices
    params = []
    for name in names:
        device = Device.parse(name)
        presence = settings.presence.get(name) or settings.presence.get(
            name.partition(":")[0]) or Presence(name == "cpu", "not probed")
        marks: list[pytest.MarkDecorator] = [pytest.mark.gpu] if device.is_gpu else []
        value: Device | plan.NoDevice = device
        absent = f"device {name} is not present: {presence.reason} ({origin})"
        if not presence.present and require:
            value = plan.NoDevice(f"{absent}; --mlc-jit-require-devices makes an absent device "
                                  "fail its tests instead of skipping them")
        elif not presence.present:
            marks.append(pytest.mark.skip(reason=absent))
        params.append(pytest.param(value, id=name, marks=marks))
    if not params:
        reason = (f"none of the devices this test allows ({', '.join(map(str, marker.args))}) "
                  f"is selected by {origin}") if marker else "no device selected"
        params.append(pytest.param(None, id="no-device", marks=pytest.mark.skip(reason=reason)))
    # Indirect: the mlc_device fixture receives each value, and fails a NoDevice at setup.
    metafunc.parametrize("mlc_device", params, indirect=True)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by the gpu marks added here
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``gpu`` the tests that parametrize ``mlc_device`` themselves onto a GPU, and
    skip, at collection, the tests of an existing MLC model directory while ``mlc_llm`` is
    not installed (a path that does not exist, or a factory string, fails at setup)."""
    installed: bool | None = None
    for item in items:
        _mark_user_gpu_device(item)
        if not plan.uses_plugin(item):
            continue
        spec = plan.raw_spec(item)
        if spec is None or not plan.mlc_dir_ready(spec):
            continue
        if installed is None:
            from pytest_mlcjit.compiler.backends.mlc import mlc_llm_installed

            installed = mlc_llm_installed()
        if not installed:
            item.add_marker(pytest.mark.skip(
                reason="mlc_llm is not installed (it is published on MLC's own package "
                "index, not PyPI); this test needs the MLC-LLM backend"))


def _mark_user_gpu_device(item: pytest.Item) -> None:
    """The ``gpu`` mark for a test that parametrizes ``mlc_device`` itself onto a GPU (the
    plugin's own device parameters carry it already)."""
    value = plan.params_of(item).get("mlc_device")
    if value is None or item.get_closest_marker("gpu") is not None:
        return
    if not plan.user_parametrizes_device(getattr(item, "definition", item)):
        return
    from pytest_mlcjit.device import Device

    try:
        device = value if isinstance(value, Device) else Device.parse(str(value))
    except MlcJitError:
        return  # the mlc_device fixture fails it, naming the value
    if device.is_gpu:
        item.add_marker(pytest.mark.gpu)


def pytest_make_parametrize_id(config: pytest.Config, val: object, argname: str) -> str | None:
    return plan.parse_param_id(val, argname)


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def mlc_jit(pytestconfig: pytest.Config) -> JIT:
    """The session's JIT engine: ``mlc_jit.compile(spec, device)`` from code, its
    ``settings`` (policy, devices, cache dir…) and ``stats``."""
    return get_engine(pytestconfig)


@pytest.fixture
def mlc_device(request: pytest.FixtureRequest, pytestconfig: pytest.Config) -> Device:
    """The device this test runs on; tests using it run once per ``--mlc-device`` entry.
    A GPU named without an index is this xdist worker's GPU on a multi-GPU host."""
    params = {"mlc_device": request.param} if hasattr(request, "param") else {}
    if isinstance(params.get("mlc_device"), plan.NoDevice):  # a bad marker, an absent device
        pytest.fail(params["mlc_device"].message, pytrace=False)
    state = run_state(pytestconfig)
    try:  # a GPU without an index: this xdist worker's GPU (--mlc-jit-gpu-assign)
        device = plan.requested_device(params, state.settings, state.worker)
    except ConfigError as exc:
        error = f"mlc_device: {exc}"
    else:
        if device is None:  # the placeholder of a test no selected device allows
            pytest.skip("no device selected")
        return device
    pytest.fail(error, pytrace=False)  # outside the except: no chained traceback


@pytest.fixture
def compiled_model(request: pytest.FixtureRequest, mlc_device: Device,
                   mlc_jit: JIT) -> CompiledModel:
    """The library for this test's model (``mlc_model`` marker or indirect parametrization)
    on this test's device, compiled once for all workers and runs."""
    try:
        params = {"compiled_model": request.param} if hasattr(request, "param") else {}
        spec, policy = plan.requested_spec(request.node, params)
        model = mlc_jit.compile(spec, mlc_device, policy=policy)
        run_state(request.config).used.add(model.digest)
        return model
    except MlcJitError as exc:
        error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, CompileError):
            error = _compile_failure(request, mlc_jit, mlc_device, exc)
    except (pytest.fail.Exception, KeyboardInterrupt) as exc:  # pytest-timeout, Ctrl-C
        info = getattr(exc, "mlcjit_interrupted", None)
        if info is None:
            raise
        from pytest_mlcjit.plugin.report import interruption

        error = interruption(exc, info, mlc_jit.board)
        if isinstance(exc, KeyboardInterrupt):  # pytest stops the run and shows this line
            exc.args = (error.splitlines()[0],)
            raise
        request.node.stash[failure_line_key] = error.splitlines()[0]
    pytest.fail(error, pytrace=False)  # outside the except: no chained traceback


def _compile_failure(request: pytest.FixtureRequest, engine: JIT, device: Device,
                     exc: CompileError) -> str:
    """The message of a failed compile (the cause first), and its log as a section."""
    from pytest_mlcjit.engine.activity import describe_spec, describe_target
    from pytest_mlcjit.plugin.report import compile_failure

    params = {"compiled_model": request.param} if hasattr(request, "param") else {}
    spec, policy = plan.requested_spec(request.node, params)
    try:
        target = describe_target(engine.request(spec, device, policy).target)
    except MlcJitError:
        target = "its target"
    message, section = compile_failure(exc, describe_spec(spec), target)
    if section is not None:
        request.node.stash[compile_log_key] = section
    request.node.stash[failure_line_key] = message.splitlines()[0]
    return message
