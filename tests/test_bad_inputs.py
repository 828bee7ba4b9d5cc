"""Bad options, devices, specs and factories: one clear error naming the bad value and the
valid ones, on the offending test only, and nothing written to the cache."""

from __future__ import annotations

import pytest

from conftest import Project
from pytest_mlcjit import SpecError, TVMModel


@pytest.mark.parametrize(("args", "message"), [
    (["--mlc-jit-policy=SOMETIMES"],
     "*invalid --mlc-jit-policy 'SOMETIMES': expected one of ON, OFF, REDO, READONLY*"),
    (["--mlc-device=cpu,tpu"], "*invalid device 'tpu': expected one of auto, cpu, cuda, rocm, "
                               "metal, vulkan, opencl, webgpu*"),
    (["--mlc-device=cuda:x"], "*invalid device 'cuda:x': the index after ':' must be*"),
    (["--mlc-device=cpu,,cuda"], "*invalid device list 'cpu,,cuda'*"),
    (["--mlc-jit-timeout=soon"], "*invalid --mlc-jit-timeout 'soon': expected a positive*"),
    (["--mlc-jit-lock-timeout=-1"], "*invalid --mlc-jit-lock-timeout '-1': expected a positive*"),
])
def test_bad_options_are_usage_errors(project: Project, args: list[str], message: str) -> None:
    project.write_tests([{"hidden": 4}])
    result = project.run(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert not project.cache.exists()


def test_bad_env_and_ini_values(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    project.write_tests([{"hidden": 4}])
    monkeypatch.setenv("MLC_JIT_POLICY", "maybe")
    result = project.run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*invalid MLC_JIT_POLICY 'maybe': expected one of ON, OFF*"])
    monkeypatch.delenv("MLC_JIT_POLICY")
    project.pytester.makeini("[pytest]\nmlc_device = gpu\nmlc_jit_timeout = 0\n")
    result = project.run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*invalid device 'gpu'*"])


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


def test_bad_specs_error_on_their_test_only(project: Project) -> None:
    project.pytester.makepyfile(test_bad=BAD_SPECS)
    result = project.run("--mlc-device=cpu", "-n", "2")
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
    # The factory that raised: the error carries the config and the log path.
    result.stdout.fnmatch_lines([
        "*CompileError: compiling TVMModel('tinymodel:build', config={'fail': True}) for target "
        "*failed: the compiler exited with code 1*",
        "compile log: */.mlcjit/failed/*.log",
    ])
    assert len(project.manifests()) == 1, "only the good spec produced an entry"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"factory": "no-colon"}, "invalid factory 'no-colon': expected 'package.module:function'"),
    ({"factory": "a.b:c", "config": [1]}, "invalid config [1] for a.b:c: expected a dict"),
    ({"factory": "a:b", "config": {"x": float("nan")}}, "config of a:b must be JSON-serializable"),
    ({"factory": "a:b", "config": {"x": object()}}, "config of a:b must be JSON-serializable"),
    ({"factory": "a:b", "config": {"not valid": 1}}, "invalid config keys ['not valid']"),
    ({"factory": "a:b", "opt_level": 7}, "invalid opt_level 7 for a:b: expected 0, 1, 2 or 3"),
    ({"factory": "a:b", "seed": "x"}, "invalid seed 'x' for a:b: expected an int"),
    ({"factory": "a:b", "target": ""}, "invalid target '': expected a TVM target string"),
    ({"factory": "a:b", "target": "{not json"}, "invalid target JSON '{not json'"),
])
def test_spec_validation(kwargs: dict[str, object], message: str) -> None:
    factory = kwargs.pop("factory")
    with pytest.raises(SpecError) as info:
        TVMModel(factory, **kwargs)  # type: ignore[arg-type]
    assert message in str(info.value)
