"""Bad options, devices, specs, markers, factories and API arguments: one clear error
naming the bad value and what is valid, on the offending test only, and nothing written to
the cache.

The cases from ``USAGE`` on are also the table in docs/explanation/reliability.md
(``python tests/test_bad_inputs.py`` prints it; a test checks the two agree). Every case is
fast and deterministic, so all of them run in the default tier, in-process
(:meth:`conftest.Project.run`; compiles still run in processes of their own). The one good
test beside the bad ones starts from :func:`conftest.warm_template`'s cache: its compile
would prove nothing here. Bad specs under ``-n 2`` are tests/test_first_day.py's.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import pytest

from conftest import Project
from pytest_mlcjit import JIT, ConfigError, Policy, Settings, SpecError, TVMModel

DOC = Path(__file__).resolve().parent.parent / "docs" / "explanation" / "reliability.md"

BAD_SPECS = '''
import pytest
from pytest_mlcjit import TVMModel

@pytest.mark.mlc_model(TVMModel("nosuchmodule:build"))
def test_unimportable(compiled_model):
    pass

@pytest.mark.mlc_model(TVMModel("tinymodel:nosuchfunction"))
def test_missing_function(compiled_model):
    pass

@pytest.mark.mlc_model(TVMModel("tinymodel:build", config={"fail": True}))
def test_factory_raises(compiled_model):
    pass

@pytest.mark.mlc_model(TVMModel("tinymodel:build"), opt="O3")
def test_unknown_marker_option(compiled_model):
    pass

@pytest.mark.mlc_model(42)
def test_not_a_spec(compiled_model):
    pass

@pytest.mark.mlc_model()
def test_no_spec(compiled_model):
    pass

def test_no_marker(compiled_model):
    pass

@pytest.mark.mlc_model(TVMModel("tinymodel:build"), target={"arch": "sm_90"})
def test_target_without_kind(compiled_model):
    pass

@pytest.mark.mlc_model(TVMModel("tinymodel:build", config={"hidden": 4}))
def test_good(compiled_model):
    assert compiled_model.path.exists()
'''


def test_bad_specs_error_on_their_test_only(project: Project, warm_template: Path) -> None:
    project.warm(warm_template)
    project.pytester.makepyfile(test_bad=BAD_SPECS)
    result = project.run("--mlc-device=cpu")
    result.assert_outcomes(passed=1, errors=8)
    out = result.stdout.str()
    for expected in [
        "cannot import factory module 'nosuchmodule'",
        "defines no top-level name 'nosuchfunction' (it defines: Tiny, build,",
        "RuntimeError: factory failed on purpose (hidden=4)",
        "mlc_model(TVMModel('tinymodel:build', config={})) got unknown options ['opt']",
        "invalid model spec 42: expected a TVMModel, an MLCModel or the path",
        "mlc_model takes exactly one positional argument (the model spec), got 0",
        "this test uses compiled_model but names no model",
        "invalid target {'arch': 'sm_90'}: a target dict needs a 'kind' string",
    ]:
        assert expected in out, expected
    # The factory that raised: the error starts with the cause, then carries the config and
    # the log path.
    result.stdout.fnmatch_lines([
        "RuntimeError: factory failed on purpose (hidden=4) (compiling tinymodel-fail=True "
        "for llvm)",
        "compiling TVMModel('tinymodel:build', config={'fail': True}) for target "
        "*failed: the compiler exited with code 1",
        "compile log: */.mlcjit/failed/*.log",
    ])
    assert len(project.manifests()) == 1, "only the good spec's entry (from the warm cache)"
    assert [line.split()[1] for line in project.compiles()] == ["hidden=4"], \
        "one factory call, the one that raised: the good spec was a hit"


#: Spec fields the constructor checks that ``SPECS`` (below) does not: the cases the two
#: tables shared (the same kwargs, asserting the same or a shorter message) are kept there.
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"factory": "a.b:c", "config": [1]}, "invalid config [1] for a.b:c: expected a dict"),
    ({"factory": "a:b", "config": {"x": object()}}, "config of a:b must be JSON-serializable"),
    ({"factory": "a:b", "target": ""}, "invalid target '': expected a TVM target string"),
])
def test_spec_validation(kwargs: dict[str, object], message: str) -> None:
    factory = kwargs.pop("factory")
    with pytest.raises(SpecError) as info:
        TVMModel(factory, **kwargs)  # type: ignore[arg-type]
    assert message in str(info.value)


# -- the reliability suite's table of bad inputs (docs/explanation/reliability.md) -----------------
@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input: where it goes, its value, and (a distinctive part of) the error."""

    input: str
    value: str
    error: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    ini: str = ""


# -- options, environment and ini: a usage error before any test runs ----------------------
USAGE = [
    Case("--mlc-jit-policy", "SOMETIMES", "invalid --mlc-jit-policy 'SOMETIMES': expected one "
         "of ON, OFF, REDO, READONLY (case-insensitive)", args=("--mlc-jit-policy=SOMETIMES",)),
    Case("MLC_JIT_POLICY", "maybe", "invalid MLC_JIT_POLICY 'maybe': expected one of ON, OFF, "
         "REDO, READONLY (case-insensitive)", env=(("MLC_JIT_POLICY", "maybe"),)),
    Case("ini mlc_jit_policy", "never", "invalid ini mlc_jit_policy 'never': expected one of "
         "ON, OFF, REDO, READONLY (case-insensitive)", ini="mlc_jit_policy = never"),
    Case("--mlc-device", "tpu", "invalid device 'tpu': expected one of auto, cpu, cuda, rocm, "
         "metal, vulkan, opencl, webgpu, optionally with an index such as cuda:1",
         args=("--mlc-device=cpu,tpu",)),
    Case("--mlc-device", "cuda:x", "invalid device 'cuda:x': the index after ':' must be a "
         "non-negative integer", args=("--mlc-device=cuda:x",)),
    Case("--mlc-device", "cuda:-1", "invalid device 'cuda:-1': the index after ':' must be a "
         "non-negative integer", args=("--mlc-device=cuda:-1",)),
    Case("--mlc-device", "cpu,,cuda", "invalid device list 'cpu,,cuda': expected "
         "comma-separated devices such as cpu,cuda", args=("--mlc-device=cpu,,cuda",)),
    Case("--mlc-device", "(empty)", "invalid device list '': expected comma-separated devices "
         "such as cpu,cuda", args=("--mlc-device=",)),
    Case("ini mlc_device", "gpu", "invalid device 'gpu': expected one of auto, cpu, cuda",
         ini="mlc_device = gpu"),
    Case("--mlc-jit-timeout", "soon", "invalid --mlc-jit-timeout 'soon': expected a positive "
         "number of seconds", args=("--mlc-jit-timeout=soon",)),
    Case("--mlc-jit-timeout", "0", "invalid --mlc-jit-timeout '0': expected a positive number "
         "of seconds", args=("--mlc-jit-timeout=0",)),
    Case("--mlc-jit-timeout", "nan", "invalid --mlc-jit-timeout 'nan': expected a positive "
         "number of seconds", args=("--mlc-jit-timeout=nan",)),
    Case("ini mlc_jit_timeout", "soon", "invalid ini mlc_jit_timeout 'soon': expected a "
         "positive number of seconds", ini="mlc_jit_timeout = soon"),
    Case("--mlc-jit-lock-timeout", "-1", "invalid --mlc-jit-lock-timeout '-1': expected a "
         "positive number of seconds", args=("--mlc-jit-lock-timeout=-1",)),
    Case("--mlc-jit-lock-timeout", "abc", "invalid --mlc-jit-lock-timeout 'abc': expected a "
         "positive number of seconds", args=("--mlc-jit-lock-timeout=abc",)),
    Case("ini mlc_jit_lock_timeout", "0", "invalid ini mlc_jit_lock_timeout '0': expected a "
         "positive number of seconds", ini="mlc_jit_lock_timeout = 0"),
    *(Case(f"--mlc-jit-{name}", value, f"invalid --mlc-jit-{name} '{value}': expected one of "
           "auto, on, off", args=(f"--mlc-jit-{name}={value}",))
      for name in ("prefetch", "compile-workers") for value in ("sometimes", "1")),
]


@pytest.mark.parametrize("case", USAGE, ids=[f"{c.input}={c.value}" for c in USAGE])
def test_bad_option_is_a_usage_error(project: Project, monkeypatch: pytest.MonkeyPatch,
                                     case: Case) -> None:
    project.write_tests([{"hidden": 4}])
    for name, value in case.env:
        monkeypatch.setenv(name, value)
    if case.ini:
        project.pytester.makeini(f"[pytest]\n{case.ini}\n")
    result = project.run(*case.args)  # with --mlc-jit-cache-dir=project.cache
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert case.error in result.stderr.str(), result.stderr.str()
    assert not project.cache.exists(), "the cache dir is not created"


# -- a cache directory that is not a directory: each test errors, nothing is touched --------
CACHE_DIR = [
    Case("--mlc-jit-cache-dir", "a regular file", "cache directory {file} is not a directory; "
         "choose another with --mlc-jit-cache-dir", args=("--mlc-jit-cache-dir={file}",)),
    Case("--mlc-jit-cache-dir (READONLY)", "a regular file", "cache directory {file} is not a "
         "directory", args=("--mlc-jit-cache-dir={file}", "--mlc-jit-policy=READONLY")),
    Case("MLC_JIT_CACHE_DIR", "a regular file", "cache directory {file} is not a directory",
         env=(("MLC_JIT_CACHE_DIR", "{file}"),)),
    Case("ini mlc_jit_cache_dir", "a regular file", "cache directory {file} is not a "
         "directory", ini="mlc_jit_cache_dir = {file}"),
]


@pytest.mark.parametrize("case", CACHE_DIR, ids=[c.input for c in CACHE_DIR])
def test_cache_dir_that_is_a_file(project: Project, monkeypatch: pytest.MonkeyPatch,
                                  case: Case) -> None:
    project.write_tests([{"hidden": 4}])
    file = project.pytester.path / "not-a-dir"
    file.write_text("keep me\n")
    for name, value in case.env:
        monkeypatch.setenv(name, value.format(file=file))
    if case.ini:
        project.pytester.makeini(f"[pytest]\n{case.ini.format(file=file)}\n")
    args = (a.format(file=file) for a in case.args)
    result = project.run("--mlc-device=cpu", *args, cache=False)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"ConfigError: {case.error.format(file=file)}*"])
    assert file.read_text() == "keep me\n"
    assert project.compiles() == []


# -- markers and indirect parameters: the test errors, the others run ----------------------
BAD_MODEL = '''
def build(hidden=4):
    return "not a model"
'''

MARKER_TESTS = '''
import pytest
from pytest_mlcjit import TVMModel

SPEC = TVMModel("tinymodel:build")
'''

MARKERS = [
    Case("mlc_model()", "no spec", "mlc_model takes exactly one positional argument (the model "
         "spec), got 0", args=("@pytest.mark.mlc_model()",)),
    Case("mlc_model(spec, spec)", "two specs", "mlc_model takes exactly one positional "
         "argument (the model spec), got 2", args=("@pytest.mark.mlc_model(SPEC, SPEC)",)),
    Case("mlc_model(spec)", "42", "invalid model spec 42: expected a TVMModel, an MLCModel or "
         "the path of an MLC model directory", args=("@pytest.mark.mlc_model(42)",)),
    Case("mlc_model(spec, **options)", "opt='O3'", "mlc_model(TVMModel('tinymodel:build', "
         "config={})) got unknown options ['opt']; a TVMModel takes only target=",
         args=("@pytest.mark.mlc_model(SPEC, opt='O3')",)),
    Case("mlc_model(spec, target=)", "42", "invalid target 42: expected a TVM target string "
         "such as 'llvm' or a dict such as {'kind': 'cuda', 'arch': 'sm_90'}",
         args=("@pytest.mark.mlc_model(SPEC, target=42)",)),
    Case("mlc_model(spec, target=)", "''", "invalid target '': expected a TVM target string",
         args=("@pytest.mark.mlc_model(SPEC, target='')",)),
    Case("mlc_model(spec, target=)", "{'arch': 'sm_90'}", "invalid target {'arch': 'sm_90'}: a "
         "target dict needs a 'kind' string",
         args=("@pytest.mark.mlc_model(SPEC, target={'arch': 'sm_90'})",)),
    Case("mlc_model(spec, target=)", "'{not json'", "invalid target JSON '{not json'",
         args=("@pytest.mark.mlc_model(SPEC, target='{not json')",)),
    Case("mlc_model(spec, target=)", "'[1, 2]'", "invalid target '[1, 2]': TVM 0.27 no longer "
         "parses CLI-style target strings; give a dict such as {'kind': 'llvm', 'mcpu': "
         "'znver4'}", args=("@pytest.mark.mlc_model(SPEC, target='[1, 2]')",)),
    Case("mlc_model(spec, target=)", "'tpu'", "target kind 'tpu' runs on no device this plugin "
         "knows: expected llvm, c or one of cuda, rocm, metal, vulkan, opencl, webgpu",
         args=("@pytest.mark.mlc_model(SPEC, target='tpu')",)),
    Case("mlc_model(spec, target=)", "{'kind': 'tpu'}", "target kind 'tpu' runs on no device "
         "this plugin knows", args=("@pytest.mark.mlc_model(SPEC, target={'kind': 'tpu'})",)),
    Case("compiled_model", "no mlc_model marker", "this test uses compiled_model but names no "
         "model: add @pytest.mark.mlc_model(spec) or parametrize compiled_model indirectly",
         args=()),
    Case("compiled_model (indirect)", "42", "invalid model spec 42: expected a TVMModel, an "
         "MLCModel or an MLC model directory",
         args=("@pytest.mark.parametrize('compiled_model', [42], indirect=True)",)),
    Case("compiled_model (indirect)", "None", "invalid model spec None: expected a TVMModel, "
         "an MLCModel or an MLC model directory",
         args=("@pytest.mark.parametrize('compiled_model', [None], indirect=True)",)),
    Case("mlc_jit_policy()", "no policy", "mlc_jit_policy takes exactly one argument: ON, OFF, "
         "REDO or READONLY", args=("@pytest.mark.mlc_jit_policy()", "@pytest.mark.mlc_model("
                                   "SPEC)")),
    Case("mlc_jit_policy(policy)", "'ON', 'OFF'", "mlc_jit_policy takes exactly one argument: "
         "ON, OFF, REDO or READONLY", args=("@pytest.mark.mlc_jit_policy('ON', 'OFF')",
                                            "@pytest.mark.mlc_model(SPEC)")),
    Case("mlc_jit_policy(policy)", "'sometimes'", "invalid mlc_jit_policy marker 'sometimes': "
         "expected one of ON, OFF, REDO, READONLY (case-insensitive)",
         args=("@pytest.mark.mlc_jit_policy('sometimes')", "@pytest.mark.mlc_model(SPEC)")),
    Case("mlc_jit_policy(policy)", "1", "invalid mlc_jit_policy marker 1: expected one of ON, "
         "OFF, REDO, READONLY", args=("@pytest.mark.mlc_jit_policy(1)",
                                      "@pytest.mark.mlc_model(SPEC)")),
    Case("TVMModel factory", "'nosuchmodule:build'", "cannot import factory module "
         "'nosuchmodule' for TVMModel('nosuchmodule:build', config={}); is it on sys.path",
         args=("@pytest.mark.mlc_model(TVMModel('nosuchmodule:build'))",)),
    Case("TVMModel factory", "'tinymodel:nosuchfunction'", "defines no top-level name "
         "'nosuchfunction' (it defines: Tiny, build,",
         args=("@pytest.mark.mlc_model(TVMModel('tinymodel:nosuchfunction'))",)),
    Case("TVMModel factory", "a module with a syntax error", "syntaxmodel.py has a syntax "
         "error", args=("@pytest.mark.mlc_model(TVMModel('syntaxmodel:build'))",)),
]

#: Found only when compiling: the cause first, then a CompileError naming the config and
#: its log; no entry. ``args[-1]`` is the part of the cause the test requires.
COMPILE = [
    Case("TVMModel config", "{'width': 3} (unknown to the factory)", "compiling "
         "TVMModel('tinymodel:build', config={'width': 3}) for target {\"kind\": \"llvm\"} "
         "failed: the compiler exited with code 1",
         args=("@pytest.mark.mlc_model(TVMModel('tinymodel:build', config={'width': 3}))",
               "build() got an unexpected keyword argument 'width'")),
    Case("TVMModel config", "{'hidden': 'four'} (wrong type)", "compiling "
         "TVMModel('tinymodel:build', config={'hidden': 'four'}) for target {\"kind\": "
         "\"llvm\"} failed: the compiler exited with code 1",
         args=("@pytest.mark.mlc_model(TVMModel('tinymodel:build', config={'hidden': "
               "'four'}))", "TypeError: ")),
    Case("TVMModel factory", "returns a str", "compiling TVMModel('badmodel:build', config={}) "
         "for target {\"kind\": \"llvm\"} failed: the compiler exited with code 1",
         args=("@pytest.mark.mlc_model(TVMModel('badmodel:build'))",
               "error: the factory returned str; expected an IRModule or a tuple "
               "(nn.Module, export_spec)")),
]


def _marker_file(cases: list[Case], *, log_lines: bool = False) -> str:
    source = MARKER_TESTS
    for i, case in enumerate(cases):
        decorators = case.args[:-1] if log_lines else case.args
        source += "\n\n" + "\n".join(decorators) + f"\ndef test_{i}(compiled_model):\n    pass\n"
    return source


def _errors_by_test(out: str) -> dict[int, str]:
    """The error text under each ``ERROR at setup of test_<i>`` section."""
    sections = re.split(r"_+ ERROR at setup of test_(\d+)\[.*\] _+\n", out)
    found = {}
    for number, body in zip(sections[1::2], sections[2::2], strict=True):
        found[int(number)] = body.split("\n___")[0].split("\n===")[0]
    return found


def test_bad_markers_error_on_their_test_only(project: Project, warm_template: Path) -> None:
    project.warm(warm_template)
    project.pytester.makepyfile(syntaxmodel="def build(:\n    pass\n")
    project.pytester.makepyfile(test_markers=_marker_file(MARKERS) + (
        "\n\n@pytest.mark.mlc_model(TVMModel('tinymodel:build', config={'hidden': 4}))\n"
        "def test_good(compiled_model):\n    assert compiled_model.path.exists()\n"))
    result = project.run("--mlc-device=cpu")
    result.assert_outcomes(passed=1, errors=len(MARKERS))
    errors = _errors_by_test(result.stdout.str())
    for i, case in enumerate(MARKERS):
        assert case.error in errors[i], (case, errors[i])
        assert errors[i].count("Error: ") == 1, f"one error, not a traceback: {errors[i]}"
    assert len(project.manifests()) == 1, "only the good test's entry (from the warm cache)"
    assert project.compiles() == [], "no bad marker reached the compiler"
    assert not (project.cache / ".mlcjit" / "failed").exists() or \
        list((project.cache / ".mlcjit" / "failed").iterdir()) == []


def test_bad_configs_fail_at_compile_time_with_their_log(project: Project) -> None:
    project.pytester.makepyfile(badmodel=BAD_MODEL)
    project.pytester.makepyfile(test_compile=_marker_file(COMPILE, log_lines=True))
    result = project.run("--mlc-device=cpu")
    result.assert_outcomes(errors=len(COMPILE))
    errors = _errors_by_test(result.stdout.str())
    for i, case in enumerate(COMPILE):
        # The cause first (the log's last exception line), then the model and its target;
        # then the CompileError's text, naming the config, and its log.
        lines = errors[i].splitlines()
        assert case.args[-1] in lines[0], errors[i]
        assert re.search(r" \(compiling \S+ for llvm\)$", lines[0]), errors[i]
        assert case.error in lines, errors[i]
        (log,) = re.findall(r"^compile log: (\S+)$", errors[i], flags=re.MULTILINE)
        assert Path(log).is_file()
    assert project.manifests() == []
    assert project.libraries() == []
    # Counted by the factory: only the wrong type got into it (an unknown keyword fails the
    # call itself; badmodel's factory counts nothing).
    assert [line.split()[1] for line in project.compiles()] == ["hidden=four"]


DEVICE_MARKERS = [
    Case("mlc_devices()", "no device", "mlc_devices() needs at least one device",
         args=("@pytest.mark.mlc_devices()",)),
    Case("mlc_devices(*devices)", "'tpu'", "mlc_devices: invalid device 'tpu': expected one of "
         "auto, cpu, cuda, rocm, metal, vulkan, opencl, webgpu",
         args=("@pytest.mark.mlc_devices('tpu')",)),
    Case("mlc_devices(*devices)", "42", "mlc_devices: invalid device '42': expected one of "
         "auto, cpu", args=("@pytest.mark.mlc_devices(42)",)),
]


@pytest.mark.parametrize("case", DEVICE_MARKERS, ids=[c.value for c in DEVICE_MARKERS])
def test_bad_device_marker_fails_its_test_at_setup(project: Project, case: Case) -> None:
    # Not test_devices.py: this suite has a module of that name, and the run is in-process.
    project.pytester.makepyfile(test_device_markers=MARKER_TESTS + "\n\n" +
                                "\n".join(case.args) + "\n@pytest.mark.mlc_model(SPEC)\n"
                                "def test_it(compiled_model):\n    pass\n\n"
                                "def test_other():\n    pass\n")
    result = project.run("--mlc-device=cpu")
    assert result.ret == pytest.ExitCode.TESTS_FAILED, "collection goes on"
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines([f"test_device_markers.py::test_it: {case.error}*"])
    assert not project.cache.exists()


# -- spec fields, as the constructor checks them -----------------------------------------------
SPECS: list[tuple[Case, dict[str, Any]]] = [
    (Case("TVMModel factory", "42", "invalid factory 42: expected 'package.module:function', "
          "for example 'examples.models.mlp:build'"), {"factory": 42}),
    (Case("TVMModel factory", "'no-colon'", "invalid factory 'no-colon': expected "
          "'package.module:function'"), {"factory": "no-colon"}),
    (Case("TVMModel factory", "'a:b:c'", "invalid factory 'a:b:c': expected "
          "'package.module:function'"), {"factory": "a:b:c"}),
    (Case("TVMModel factory", "'../x:y'", "invalid factory '../x:y': expected "
          "'package.module:function'"), {"factory": "../x:y"}),
    (Case("TVMModel factory", "'a\\x00:b'", "invalid factory 'a\\x00:b': expected "
          "'package.module:function'"), {"factory": "a\x00:b"}),
    (Case("TVMModel config", "[1]", "invalid config [1] for a:b: expected a dict of keyword "
          "arguments"), {"config": [1]}),
    (Case("TVMModel config", "{1: 2}", "invalid config keys [1] for a:b: keys must be "
          "identifiers"), {"config": {1: 2}}),
    (Case("TVMModel config", "{'not valid': 1}", "invalid config keys ['not valid'] for a:b: "
          "keys must be identifiers"), {"config": {"not valid": 1}}),
    (Case("TVMModel config", "{'x': nan}", "config of a:b must be JSON-serializable (str keys, "
          "no NaN)"), {"config": {"x": math.nan}}),
    (Case("TVMModel config", "{'x': b'1'}", "config of a:b must be JSON-serializable (str "
          "keys, no NaN): Object of type bytes is not JSON serializable"),
     {"config": {"x": b"1"}}),
    (Case("TVMModel target", "42", "invalid target 42: expected a TVM target string such as "
          "'llvm' or a dict such as {'kind': 'cuda', 'arch': 'sm_90'} (in the spec for a:b)"),
     {"target": 42}),
    (Case("TVMModel target", "'{not json'", "invalid target JSON '{not json'"),
     {"target": "{not json"}),
    (Case("TVMModel target", "'llvm -mcpu=x'", "invalid target 'llvm -mcpu=x': TVM 0.27 no "
          "longer parses CLI-style target strings"), {"target": "llvm -mcpu=x"}),
    (Case("TVMModel target", "{'kind': ''}", "invalid target {'kind': ''}: a target dict needs "
          "a 'kind' string (in the spec for a:b)"), {"target": {"kind": ""}}),
    (Case("TVMModel opt_level", "7", "invalid opt_level 7 for a:b: expected 0, 1, 2 or 3"),
     {"opt_level": 7}),
    (Case("TVMModel opt_level", "True", "invalid opt_level True for a:b: expected 0, 1, 2 or "
          "3"), {"opt_level": True}),
    (Case("TVMModel opt_level", "'3'", "invalid opt_level '3' for a:b: expected 0, 1, 2 or 3"),
     {"opt_level": "3"}),
    (Case("TVMModel seed", "'x'", "invalid seed 'x' for a:b: expected an int"), {"seed": "x"}),
    (Case("TVMModel seed", "True", "invalid seed True for a:b: expected an int"),
     {"seed": True}),
    (Case("TVMModel seed", "1.5", "invalid seed 1.5 for a:b: expected an int"), {"seed": 1.5}),
]


@pytest.mark.parametrize(("case", "kwargs"), SPECS, ids=[f"{c.input}={c.value}" for c, _ in SPECS])
def test_bad_spec_field(case: Case, kwargs: dict[str, Any]) -> None:
    kwargs = dict(kwargs)
    factory = kwargs.pop("factory", "a:b")
    with pytest.raises(SpecError) as info:
        TVMModel(factory, **kwargs)
    assert case.error in str(info.value)


def test_bad_spec_name() -> None:
    with pytest.raises(SpecError, match="invalid name 42"):
        TVMModel("a:b", name=42).id  # type: ignore[arg-type]  # noqa: B018


API = [
    Case("JIT.compile(device=)", "'tpu'", "invalid device 'tpu': expected one of auto, cpu"),
    Case("JIT.compile(policy=)", "'never'", "invalid policy 'never': expected one of ON, OFF, "
         "REDO, READONLY (case-insensitive)"),
    Case("Settings(policy=)", "'never'", "invalid policy 'never': expected one of ON, OFF, "
         "REDO, READONLY"),
]


def test_bad_api_arguments(tmp_path: Path) -> None:
    engine = JIT(Settings(cache_dir=tmp_path / "cache"))
    spec = TVMModel("a:b")
    with pytest.raises(ConfigError) as device:
        engine.compile(spec, "tpu")
    with pytest.raises(ConfigError) as policy:
        engine.compile(spec, "cpu", policy="never")
    with pytest.raises(ConfigError) as settings:
        Settings(policy="never")  # type: ignore[arg-type]
    for case, info in zip(API, (device, policy, settings), strict=True):
        assert case.error in str(info.value), (case, info.value)
    assert Settings(policy="readonly").policy is Policy.READONLY  # type: ignore[arg-type]
    assert not (tmp_path / "cache").exists()


# -- gaps this suite found, now fixed -----------------------------------------------------
def test_bad_allow_untrusted_ini_names_the_option(project: Project) -> None:
    project.write_tests([{"hidden": 4}])
    project.pytester.makeini("[pytest]\nmlc_jit_allow_untrusted_cache = maybe\n")
    result = project.run("--mlc-device=cpu", cache=False)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "mlc_jit_allow_untrusted_cache 'maybe'" in result.stderr.str()


def test_empty_cache_dir_is_a_usage_error(project: Project) -> None:
    project.write_tests([{"hidden": 4}])
    result = project.run("--mlc-device=cpu", "--mlc-jit-cache-dir=", "--co",
                                   cache=False)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*invalid --mlc-jit-cache-dir '': expected a directory path*"])


# -- the table in docs/explanation/reliability.md ------------------------------------
def table() -> str:
    """The markdown table of every case of the reliability suite's table (``USAGE`` to
    ``API``)."""
    rows = ["| input | bad value | error (the part that names the value and what is valid) |",
            "|---|---|---|"]
    cases = [*USAGE, *CACHE_DIR, *MARKERS, *DEVICE_MARKERS, *COMPILE, *(c for c, _ in SPECS),
             *API]
    for case in cases:
        error = case.error.replace("{file}", "<path>").replace("|", "\\|")
        rows.append(f"| `{case.input}` | {case.value} | `{error}` |")
    return "\n".join(rows) + "\n"


def test_the_documented_table_is_this_one() -> None:
    text = DOC.read_text(encoding="utf-8")
    start, end = "<!-- bad-inputs-table -->\n", "<!-- /bad-inputs-table -->"
    assert start in text, f"{DOC} lacks the table markers"
    assert end in text, f"{DOC} lacks the table markers"
    documented = text.split(start, 1)[1].split(end, 1)[0]
    assert documented == table(), f"regenerate it: python {Path(__file__).name}"


if __name__ == "__main__":
    print(table(), end="")
