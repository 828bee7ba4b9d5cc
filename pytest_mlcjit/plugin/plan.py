"""What each collected test requests: its spec, device and policy.

Pure functions over a test's markers and parameters, shared by the fixtures, prepare,
prefetch, ``pytest-mlcjit key`` and ``explain``, so they can never disagree; a plan keys
every request without compiling anything.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_mlcjit.device import Device
from pytest_mlcjit.errors import MlcJitError, SpecError
from pytest_mlcjit.policy import Policy

if TYPE_CHECKING:
    from pytest_mlcjit.compiler.backends import BuildRequest
    from pytest_mlcjit.engine.jit import JIT
    from pytest_mlcjit.engine.settings import Settings

#: What a test compiles: ``(spec, device, policy)``, or the error its request raised.
planned_key = pytest.StashKey["tuple[Any, Device, Policy | None] | str"]()

#: Why a test requests no library, by the code :class:`Plan` records.
#: Each reads after a count, singular or plural ("1 skipped at collection").
EXCLUDED = {
    "direct": "with mlc_jit.compile in the test body: what it compiles is not known before "
              "the test runs, so prepare cannot warm it",
    "plain": "without compiled_model",
    "off": "with policy OFF (mlc_jit_policy marker)",
    "skipped": "skipped at collection (an absent device without a target, no mlc_llm, "
               "or a skip mark)",
    "no-device": "with no device to run on",
}

MLC_CONFIG_FILE = "mlc-chat-config.json"


@dataclasses.dataclass(frozen=True)
class NoDevice:
    """The ``mlc_device`` parameter of a test that cannot run as collected: a malformed
    ``mlc_devices`` marker (``invalid``), or a device that is absent while
    ``--mlc-jit-require-devices`` is on. The ``mlc_device`` fixture fails the test at
    setup with ``message``; collection goes on."""

    message: str
    invalid: bool = False

    def __str__(self) -> str:
        return "invalid-devices" if self.invalid else "absent-device"


def uses_plugin(item: pytest.Item) -> bool:
    return "compiled_model" in getattr(item, "fixturenames", ())


def params_of(item: pytest.Item) -> Mapping[str, Any]:
    callspec = getattr(item, "callspec", None)
    return callspec.params if callspec is not None else {}


def is_mlc(spec: Any) -> bool:
    return getattr(spec, "backend", None) == "mlc" or isinstance(spec, str | os.PathLike)


def check_mlc_path(spec: Any, where: str) -> None:
    """SpecError unless an MLC spec (a path or an MLCModel) names a directory that exists;
    a ``module:function`` string is a factory given where a TVMModel belongs."""
    model_dir = getattr(spec, "model_dir", spec)
    if not isinstance(model_dir, str | os.PathLike):
        return
    text = os.fspath(model_dir)
    path = Path(text).expanduser()
    if path.exists():
        return
    from pytest_mlcjit.spec import is_factory_name

    if isinstance(spec, str) and is_factory_name(spec):
        fix = (f"@pytest.mark.mlc_model(TVMModel({spec!r}))" if where == "mlc_model"
               else f"TVMModel({spec!r})")
        raise SpecError(
            f"{where} {spec!r} names a factory, not an MLC model directory: write {fix} "
            "(from pytest_mlcjit import TVMModel)")
    relative = "" if path.is_absolute() else f" (relative to {os.getcwd()})"
    raise SpecError(
        f"MLC model directory {text!r} does not exist{relative}: {where} expected a "
        f"TVMModel, an MLCModel or an MLC model directory (one with {MLC_CONFIG_FILE})")


def mlc_dir_ready(spec: Any) -> bool:
    """Whether ``spec`` is an MLC spec whose model directory exists with its
    ``mlc-chat-config.json``: only such a test is skipped when ``mlc_llm`` is missing (a
    wrong path fails instead, so that a typo cannot hide a test)."""
    if not is_mlc(spec) or spec_error(spec) is not None:
        return False
    model_dir = getattr(spec, "model_dir", spec)
    if not isinstance(model_dir, str | os.PathLike):
        return False
    return (Path(os.fspath(model_dir)).expanduser() / MLC_CONFIG_FILE).is_file()


def spec_error(spec: Any) -> str | None:
    """The deferred error of a spec made invalid during collection, else None."""
    error = getattr(spec, "error", None)
    return error if isinstance(error, str) and getattr(spec, "backend", None) else None


def spec_from_marker(marker: pytest.Mark) -> Any:
    """Turn ``mlc_model(...)`` arguments into a spec, or raise SpecError."""
    if len(marker.args) != 1:
        raise SpecError(
            f"mlc_model takes exactly one positional argument (the model spec), got "
            f"{len(marker.args)}: {marker.args!r}"
        )
    from pytest_mlcjit.spec import TVMModel

    spec, options = marker.args[0], dict(marker.kwargs)
    if (error := spec_error(spec)) is not None:
        raise SpecError(error)
    if isinstance(spec, TVMModel):
        target = options.pop("target", None)
        if options:
            raise SpecError(f"mlc_model({spec!r}) got unknown options {sorted(options)}; "
                            "a TVMModel takes only target=")
        if target is not None:
            spec = TVMModel(spec.factory, spec.config, target=target, opt_level=spec.opt_level,
                            seed=spec.seed, name=spec.name, files=spec.files)
        return spec
    if is_mlc(spec):
        from pytest_mlcjit.compiler.backends.mlc import MLCModel

        check_mlc_path(spec, "mlc_model")
        return MLCModel.coerce(spec, **options)
    raise SpecError(
        f"invalid model spec {spec!r}: expected a TVMModel, an MLCModel or the path of an MLC "
        "model directory"
    )


def requested_policy(node: pytest.Item) -> Policy | None:
    """The test's own policy (``mlc_jit_policy`` marker), parsed once; None: the run's."""
    marker = node.get_closest_marker("mlc_jit_policy")
    if marker is None:
        return None
    if len(marker.args) != 1:
        raise SpecError("mlc_jit_policy takes exactly one argument: ON, OFF, REDO or READONLY")
    return Policy.parse(marker.args[0], source="mlc_jit_policy marker")


def requested_spec(node: pytest.Item, params: Mapping[str, Any]) -> tuple[Any, Policy | None]:
    """The spec and per-test policy a test asks for: ``params["compiled_model"]`` (indirect
    parametrization) or its ``mlc_model`` marker; SpecError/ConfigError if malformed."""
    if "compiled_model" in params:
        spec = params["compiled_model"]
        if (error := spec_error(spec)) is not None:
            raise SpecError(error)
        if is_mlc(spec):
            check_mlc_path(spec, "compiled_model parameter")
        if isinstance(spec, str | os.PathLike):
            from pytest_mlcjit.compiler.backends.mlc import MLCModel

            spec = MLCModel.coerce(spec)
    else:
        marker = node.get_closest_marker("mlc_model")
        if marker is None:
            raise SpecError(
                "this test uses compiled_model but names no model: add "
                "@pytest.mark.mlc_model(spec) or parametrize compiled_model indirectly"
            )
        spec = spec_from_marker(marker)
    return spec, requested_policy(node)


def requested_device(params: Mapping[str, Any], settings: Settings,
                     worker: str = "main") -> Device | None:
    """The device a test runs on: its ``mlc_device`` parameter (a Device, or a device
    string where the test parametrizes ``mlc_device`` itself), else the first selected
    device; None for the placeholder of a test no selected device allows. A GPU named
    without an index goes to ``worker``'s GPU of its kind (:func:`assigned_device`)."""
    if "mlc_device" not in params:
        return assigned_device(Device.parse(settings.devices[0]), settings, worker)
    value = params["mlc_device"]
    if value is None:
        return value
    if isinstance(value, Device):
        return assigned_device(value, settings, worker)
    if isinstance(value, NoDevice):
        if value.invalid:
            raise SpecError(value.message)
        return None
    return assigned_device(Device.parse(str(value)), settings, worker)


def assigned_device(device: Device, settings: Settings, worker: str) -> Device:
    """The GPU that xdist worker ``worker`` (``gwI``) runs ``device``'s tests on
    (``--mlc-jit-gpu-assign``): a GPU named without an index, where the probe found G > 1
    of its kind, is the (I mod G)-th of them; anything else stays as it is (the CPU, an
    explicit index, one GPU, ``off``, a process that is no worker, ``--mlc-jit-prepare``,
    whose plan must be the same in every worker)."""
    if (not device.is_gpu or device.index != 0 or settings.gpu_assign == "off"
            or settings.prepare or not worker.startswith("gw")
            or str(device) not in settings.devices):
        return device
    from pytest_mlcjit.device import gpus_present

    gpus = gpus_present(settings.presence, device.kind)
    if len(gpus) < 2 or not worker[2:].isdigit():
        return device
    return gpus[int(worker[2:]) % len(gpus)]


def raw_spec(item: pytest.Item) -> Any:
    """The spec a test names, as written (no validation), or None."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "compiled_model" in callspec.params:
        return callspec.params["compiled_model"]
    marker = item.get_closest_marker("mlc_model")
    if marker is not None and marker.args:
        return marker.args[0]
    return None


def static_skip(item: pytest.Item) -> str | None:
    """Why ``item`` is skipped at collection (a ``skip`` mark, or ``skipif`` with a true
    boolean condition), else None. String conditions are not evaluated: such a test's
    library is prepared anyway."""
    for mark in item.iter_markers("skip"):
        return str(mark.kwargs.get("reason") or (mark.args[0] if mark.args else "skip"))
    for mark in item.iter_markers("skipif"):
        conditions = mark.args or ((mark.kwargs["condition"],) if "condition" in mark.kwargs
                                   else ())
        if not conditions or any(c is True for c in conditions):
            return str(mark.kwargs.get("reason", "skipif"))
    return None


# -- device parametrization -------------------------------------------------------------------
def marker_target(definition: Any) -> Any:
    """The explicit cross-compile target of a test's ``mlc_model`` (marker or spec)."""
    marker = definition.get_closest_marker("mlc_model")
    if marker is None:
        return None
    target = marker.kwargs.get("target")
    if target is None and marker.args:
        target = getattr(marker.args[0], "target", None)
    return target


def user_parametrizes_device(definition: Any) -> bool:
    for marker in definition.iter_markers("parametrize"):
        names = marker.args[0] if marker.args else marker.kwargs.get("argnames", "")
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",")]
        if "mlc_device" in names:
            return True
    return False


def parse_param_id(val: object, argname: str) -> str | None:
    """Readable ids for specs: ``mlp-hidden=128``; an MLC directory by its name."""
    if argname == "compiled_model" and isinstance(val, str | os.PathLike):
        return Path(val).name
    spec_id = getattr(val, "id", None)
    if getattr(val, "backend", None) in ("tvm", "mlc") and isinstance(spec_id, str):
        return spec_id
    return None


# -- plans ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Plan:
    """The distinct libraries a list of tests requests."""

    #: digest → the request and the tests that ask for it (collection order).
    libraries: dict[str, tuple[BuildRequest, list[pytest.Item]]] = dataclasses.field(
        default_factory=dict)
    #: Tests whose request is malformed, with the error.
    errors: list[tuple[pytest.Item, str]] = dataclasses.field(default_factory=list)
    #: Tests that request no library, with why (a key of :data:`EXCLUDED`).
    excluded: list[tuple[pytest.Item, str]] = dataclasses.field(default_factory=list)

    def counts(self) -> dict[str, Any]:
        return {
            "tests": sum(len(items) for _, items in self.libraries.values()),
            "libraries": len(self.libraries), "errors": len(self.errors),
            "excluded": dict(Counter(why for _, why in self.excluded)),
        }


def make_plan(items: list[pytest.Item], engine: JIT) -> Plan:
    """Key what each test would request, without compiling anything; each test's request
    (or its error) is kept in its stash under :data:`planned_key`."""
    plan = Plan()
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "compiled_model" not in fixtures:
            plan.excluded.append((item, "direct" if "mlc_jit" in fixtures else "plain"))
            continue
        if static_skip(item) is not None:
            plan.excluded.append((item, "skipped"))
            continue
        try:
            spec, policy = requested_spec(item, params_of(item))
            if policy is Policy.OFF:
                plan.excluded.append((item, "off"))
                continue
            device = requested_device(params_of(item), engine.settings, engine.board.worker)
            if device is None:
                plan.excluded.append((item, "no-device"))
                continue
            req = engine.request(spec, device, policy)
        except MlcJitError as exc:
            plan.errors.append((item, f"{type(exc).__name__}: {exc}"))
            continue
        plan.libraries.setdefault(req.digest, (req, []))[1].append(item)
        item.stash[planned_key] = (spec, device, policy)
    for item, error in plan.errors:
        item.stash[planned_key] = error
    return plan
