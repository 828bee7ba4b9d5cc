"""``pytest --mlc-jit-prepare``: compile every distinct library the collected tests request,
once, in parallel under ``-n``, and run no test; exit 0 only if all compiled.

Compilations are counted by the model factory itself (one line per compile, in the compile
process); test bodies record that they ran in a file that must stay absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import Project, inprocess

SUITE_A = '''
import os
import pytest
from pytest_mlcjit import TVMModel

def ran(name):
    with open(os.environ["RAN_FILE"], "a") as f:
        f.write(name + "\\n")

@pytest.mark.parametrize("i", range(3))
@pytest.mark.mlc_model(TVMModel("tinymodel:build", config={"hidden": 4}))
def test_marker(compiled_model, i):
    ran("test_marker")

@pytest.mark.parametrize("compiled_model", [TVMModel("tinymodel:build", config={"hidden": 4}),
                                            TVMModel("tinymodel:build", config={"hidden": 6})],
                         indirect=True)
@pytest.mark.parametrize("i", range(2))
def test_indirect(compiled_model, i):
    ran("test_indirect")
'''

SUITE_B = '''
import os
import pytest
from pytest_mlcjit import TVMModel

from test_a import ran

TINY6 = TVMModel("tinymodel:build", config={"hidden": 6})

@pytest.mark.mlc_model(TINY6)
def test_same_as_an_indirect_one(compiled_model):
    ran("test_same")

@pytest.mark.mlc_model(TVMModel("tinymodel:build", config={"hidden": 4}),
                       target={"kind": "cuda", "arch": "sm_80"})
def test_cross_compiled(compiled_model):
    ran("test_cross")
    assert not compiled_model.loadable or compiled_model.device.kind == "cuda"

@pytest.mark.mlc_devices("cuda")
@pytest.mark.mlc_model(TVMModel("tinymodel:build", config={"hidden": 10}))
def test_absent_device_without_target(compiled_model):
    ran("test_absent")

@pytest.mark.mlc_jit_policy("OFF")
@pytest.mark.mlc_model(TVMModel("tinymodel:build", config={"hidden": 12}))
def test_policy_off(compiled_model):
    ran("test_off")

@pytest.mark.skip(reason="not today")
@pytest.mark.mlc_model(TVMModel("tinymodel:build", config={"hidden": 14}))
def test_skipped(compiled_model):
    ran("test_skipped")

def test_plain():
    ran("test_plain")

def test_direct(mlc_jit):
    ran("test_direct")
'''


@pytest.fixture
def suite(project: Project, monkeypatch: pytest.MonkeyPatch) -> Project:
    project.pytester.makepyfile(test_a=SUITE_A, test_b=SUITE_B)
    monkeypatch.setenv("RAN_FILE", str(project.pytester.path / "ran.txt"))
    return project


def _ran(project: Project) -> list[str]:
    path = project.pytester.path / "ran.txt"
    return path.read_text().splitlines() if path.exists() else []


def test_prepare_compiles_each_distinct_library_once_and_runs_no_test(
        suite: Project, warm_template: Path) -> None:
    """(hidden=4, cpu), (hidden=6, cpu), (hidden=4, cuda sm_80): what 9 of 14 tests
    request; the first is already in the cache (compiled by an earlier run)."""
    suite.warm(warm_template)
    result = suite.run("--mlc-jit-prepare", "-n", "2", "--mlc-device=cpu", "-v")
    assert result.ret == 0, result.stdout.str()
    assert _ran(suite) == [], "no test body ran"
    # The factory's own count: once each for the two not cached, none for the cached one.
    assert sorted(line.split()[1] for line in suite.compiles()) == ["hidden=4", "hidden=6"]
    targets = sorted(json.dumps(m["key"]["target"], sort_keys=True)
                     for m in suite.manifests())
    assert targets == ['{"arch": "sm_80", "kind": "cuda"}', '{"kind": "llvm"}',
                       '{"kind": "llvm"}']
    assert len(suite.libraries()) == 3
    assert result.parseoutcomes() == {"compiled": 2, "cached": 1}
    result.stdout.fnmatch_lines([
        "*pytest-mlcjit prepare*",
        "9 tests request 3 distinct libraries: 2 compiled, 1 already cached, 0 failed",
        "5 tests request no library:",
        "  1 with mlc_jit.compile in the test body: what it compiles is not known before the "
        "test runs, so prepare cannot warm it",
        "  1 with policy OFF (mlc_jit_policy marker)",
        "  1 without compiled_model",
        "  2 skipped at collection (*",
    ])
    # The distinct libraries went to both workers, each taking its share.
    out = result.stdout.str()
    assert "[gw0]" in out
    assert "[gw1]" in out
    assert out.count(" COMPILED ") == 2

    # The point of it: a READONLY run of the real tests now finds everything.
    readonly = suite.run("--mlc-device=cpu", "--mlc-jit-policy=READONLY")
    # (The test whose own policy is OFF errors, as it would in any run.)
    readonly.assert_outcomes(passed=11, skipped=2, errors=1)
    assert len(suite.compiles()) == 2
    assert "test_marker" in _ran(suite)

    again = suite.run("--mlc-jit-prepare", "--mlc-device=cpu")
    assert again.ret == 0
    assert again.parseoutcomes() == {"cached": 3, "deselected": 11}
    again.stdout.fnmatch_lines(["*3 distinct libraries: 0 compiled, 3 already cached, 0 failed"])
    assert len(suite.compiles()) == 2


def test_prepare_fails_unless_every_library_compiles(project: Project) -> None:
    project.pytester.makepyfile(test_bad='''
import pytest
from pytest_mlcjit import TVMModel

@pytest.mark.parametrize("compiled_model", [
    TVMModel("tinymodel:build", config={"hidden": 4}),
    TVMModel("tinymodel:build", config={"hidden": 5, "fail": True}),
    TVMModel("nosuchmodule:build"),
], indirect=True)
def test_it(compiled_model):
    raise AssertionError("a test body ran")
''')
    result = project.run("--mlc-jit-prepare", "-p", "no:xdist", "--mlc-device=cpu")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert result.parseoutcomes() == {"compiled": 1, "failed": 2}
    result.stdout.fnmatch_lines([
        "*CompileError: compiling TVMModel('tinymodel:build', config={'fail': True, "
        "'hidden': 5})* failed*",
        "*SpecError: cannot import factory module 'nosuchmodule'*",
        "2 tests request 2 distinct libraries: 1 compiled, 0 already cached, 1 failed",
        "1 test with an invalid model spec (failed)",
    ])
    assert "a test body ran" not in result.stdout.str()
    assert sorted(line.split()[1] for line in project.compiles()) == ["hidden=4", "hidden=5"]


def test_prepare_under_readonly_only_checks(project: Project) -> None:
    project.write_tests([{"hidden": 4}], per_config=2)
    cold = project.run("--mlc-jit-prepare", "--mlc-jit-policy=READONLY",
                                 "--mlc-device=cpu")
    assert cold.ret == pytest.ExitCode.TESTS_FAILED
    cold.stdout.fnmatch_lines(["*CacheMissError: no cached library for key *"])
    assert project.compiles() == []
    assert not project.cache.exists(), "READONLY writes nothing"


def test_nothing_to_prepare_and_policy_off(project: Project) -> None:
    project.pytester.makepyfile(test_plain="def test_plain():\n    raise AssertionError\n")
    result = project.run("--mlc-jit-prepare")
    assert result.ret == 0
    result.stdout.fnmatch_lines([
        "0 tests request 0 distinct libraries: 0 compiled, 0 already cached, 0 failed"])
    off = project.run("--mlc-jit-prepare", "--mlc-jit-policy=OFF")
    assert off.ret == pytest.ExitCode.USAGE_ERROR
    off.stderr.fnmatch_lines(["*--mlc-jit-prepare compiles libraries, but the policy is OFF*"])


def test_prepare_in_help(pytester: pytest.Pytester) -> None:
    result = inprocess(pytester, "--help")
    result.stdout.fnmatch_lines(["*--mlc-jit-prepare*", "*--mlc-jit-max-size=SIZE*"])
    assert "  mlc_jit_max_size " in result.stdout.str()
