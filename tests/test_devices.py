"""Devices: one test per device, absent ones skipped at collection with nothing compiled,
and cross-compiling for a GPU this machine lacks.

These tests assume there is no CUDA GPU here (true on CI); where one is present they are
skipped, since an absent device cannot be shown.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import Project
from pytest_mlcjit.device import Device, probe

NO_CUDA = pytest.mark.skipif(probe([Device("cuda")])["cuda"].present,
                             reason="this machine has a CUDA GPU")

DEVICE_TESTS = '''
import pytest
from pytest_mlcjit import TVMModel

@pytest.mark.mlc_model(TVMModel("tinymodel:build", config={"hidden": 4}))
def test_model(compiled_model, mlc_device):
    assert compiled_model.device == mlc_device
    assert compiled_model.path.exists()

@pytest.mark.mlc_devices("cuda")
@pytest.mark.mlc_model(TVMModel("tinymodel:build", config={"hidden": 4}))
def test_cuda_only(compiled_model):
    pass
'''


@NO_CUDA
def test_absent_device_is_skipped_before_compiling(project: Project,
                                                   warm_template: Path) -> None:
    project.pytester.makepyfile(test_devs=DEVICE_TESTS)
    project.warm(warm_template)  # the cpu library: a hit, so any compile is cuda's
    result = project.run("--mlc-device=cpu,cuda", "-rs", "--mlc-jit-prefetch=on")
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines([
        "*mlcjit: policy=ON, devices=cpu (present), cuda (absent: *",
        "SKIPPED*device cuda is not present: *(--mlc-device=cpu,cuda)*",
    ])
    assert project.compiles() == [], "nothing compiled for the absent cuda, nor prefetched"
    assert [m["key"]["target"] for m in project.manifests()] == [{"kind": "llvm"}]
    assert len(project.libraries()) == 1


@NO_CUDA
def test_only_absent_devices_compile_nothing(project: Project) -> None:
    """Prefetch on (as -n 2 has it by default): it compiles nothing for them either."""
    project.pytester.makepyfile(test_devs=DEVICE_TESTS)
    result = project.run("--mlc-device=cuda:1", "-rs", "--mlc-jit-prefetch=on")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["*device cuda:1 is not present*"])
    assert project.compiles() == []
    assert not project.libraries()


def test_device_restriction_marker(project: Project, warm_template: Path) -> None:
    project.pytester.makepyfile(test_devs=DEVICE_TESTS)
    project.warm(warm_template)  # the cpu library: compiling it proves nothing here
    result = project.run("--mlc-device=cpu", "-rs", "-v")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines([
        "*test_model?cpu? PASSED*",
        "*none of the devices this test allows (cuda) is selected by --mlc-device=cpu*",
    ])


def test_auto_resolves_to_a_present_device(project: Project) -> None:
    project.pytester.makepyfile(test_auto=DEVICE_TESTS)  # in-process: not this module's name
    result = project.run("--co")  # default: auto; the header says what it chose
    result.assert_outcomes()  # collected, nothing run, no collection error
    present = "cuda" if probe([Device("cuda")])["cuda"].present else "cpu"
    result.stdout.fnmatch_lines([f"*mlcjit: policy=ON, devices={present} (present)*"])


@NO_CUDA
def test_cross_compile_for_cuda_without_a_gpu(project: Project) -> None:
    project.pytester.makepyfile(test_cross='''
import pytest
from pytest_mlcjit import MlcJitError, TVMModel

SM90 = {"kind": "cuda", "arch": "sm_90"}

@pytest.mark.mlc_model(TVMModel("tinymodel:build", config={"hidden": 4}), target=SM90)
def test_compile_only(compiled_model, mlc_device):
    assert str(mlc_device) == "cuda"
    assert compiled_model.target == SM90
    assert "nvcc" in compiled_model.key["toolchain"], "CUDA keys include the nvcc version"
    assert compiled_model.path.stat().st_size > 0
    assert not compiled_model.loadable
    with pytest.raises(MlcJitError, match="cross-compiled.*not present"):
        compiled_model.load()

@pytest.mark.mlc_model(TVMModel("tinymodel:build", config={"hidden": 4},
                                target={"kind": "opencl"}))
def test_opencl_in_spec(compiled_model):
    assert compiled_model.target == {"kind": "opencl"}
''')
    result = project.run("--mlc-device=cpu", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_compile_only?target-cuda? PASSED*"])
    assert len(project.compiles()) == len(project.libraries()) == 2
    targets = sorted(m["target_str"] for m in project.manifests())
    assert any('"arch":"sm_90"' in t for t in targets), targets
    assert any('"kind":"opencl"' in t for t in targets), targets


OWN_DEVICE_PARAMS = '''
import pytest


@pytest.mark.parametrize("mlc_device, expected", [("cuda:1", "cuda:1"), ("cpu", "cpu"),
                                                  ("tpu", None)], indirect=["mlc_device"])
def test_own_params(mlc_device, expected):
    assert str(mlc_device) == expected
'''


def test_a_test_that_parametrizes_mlc_device_itself_gets_that_device(project: Project) -> None:
    """Indirect parameters of ``mlc_device`` are the device the test runs on (the same
    reading prepare mode makes), not the first ``--mlc-device``; a bad one is an error."""
    project.pytester.makepyfile(test_own=OWN_DEVICE_PARAMS)
    result = project.run("--mlc-device=cpu")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*mlc_device: invalid device 'tpu': expected one of auto, *"])
    assert project.compiles() == []
