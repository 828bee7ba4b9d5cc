"""Each policy on a cache hit and on a miss, through real pytest runs and real compiles."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from conftest import Project

ONE = [{"hidden": 4}]


def test_on_miss_compiles_then_hits(project: Project) -> None:
    project.write_tests(ONE, per_config=2)
    first = project.run("--mlc-jit-policy=ON", "--mlc-device=cpu")
    first.assert_outcomes(passed=2)
    assert len(project.compiles()) == 1
    (manifest,) = project.manifests()
    assert manifest["key"]["config"] == {"hidden": 4}
    assert manifest["size"] == project.libraries()[0].stat().st_size
    first.stdout.fnmatch_lines(["2 requests: 1 hit, 1 compiled; *s compiling"])

    second = project.run("--mlc-jit-policy=on", "--mlc-device=cpu")
    second.assert_outcomes(passed=2)
    assert len(project.compiles()) == 1, "a warm run compiles nothing"
    second.stdout.fnmatch_lines(["2 requests: 2 hits"])


def test_off_errors_before_touching_the_cache(project: Project, warm_template: Path) -> None:
    project.write_tests(ONE)
    result = project.run("--mlc-jit-policy=OFF", "--mlc-device=cpu")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*JitDisabledError: JIT compilation is disabled (policy OFF)*"])
    assert not project.cache.exists(), "OFF reads and writes nothing"
    # A hit is refused too: OFF means no cache at all.
    project.warm(warm_template)
    project.run("--mlc-jit-policy=OFF", "--mlc-device=cpu").assert_outcomes(errors=1)
    assert project.compiles() == []


def test_readonly_miss_names_the_key(project: Project) -> None:
    project.write_tests(ONE)
    result = project.run("--mlc-jit-policy=READONLY", "--mlc-device=cpu")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([
        "*CacheMissError: no cached library for key * (TVMModel('tinymodel:build'*READONLY*"
    ])
    assert project.compiles() == []
    assert not project.cache.exists(), "READONLY creates nothing, not even the root"


def test_readonly_hit_on_a_read_only_directory(project: Project, warm_template: Path) -> None:
    project.write_tests(ONE, per_config=2)
    project.warm(warm_template)  # what test_on_miss_compiles_then_hits's first run leaves
    before = sorted(str(p.relative_to(project.cache)) for p in project.cache.rglob("*"))
    modes = _make_read_only(project.cache)
    try:
        result = project.run("--mlc-jit-policy=READONLY", "--mlc-device=cpu")
    finally:
        _restore(modes)
    result.assert_outcomes(passed=2)
    after = sorted(str(p.relative_to(project.cache)) for p in project.cache.rglob("*"))
    assert before == after, "READONLY wrote no lock, usage or any other file"
    assert project.compiles() == []


def test_redo_compiles_a_miss_and_recompiles_a_hit_once_per_run(project: Project) -> None:
    project.write_tests(ONE, per_config=3)
    project.run("--mlc-jit-policy=REDO", "--mlc-device=cpu").assert_outcomes(passed=3)
    assert len(project.compiles()) == 1, "REDO compiled the miss once, not once per test"
    first_created = project.manifests()[0]["created"]
    project.run("--mlc-jit-policy=REDO", "--mlc-device=cpu").assert_outcomes(passed=3)
    assert len(project.compiles()) == 2, "a new run rebuilt the hit, once"
    (manifest,) = project.manifests()
    assert manifest["created"] != first_created
    assert len(project.libraries()) == 1


def test_env_policy_and_precedence(project: Project, warm_template: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment's policy applies, and the command line's beats it. The cache holds
    the library (a hit: OFF refuses even that, ON serves it), so nothing compiles."""
    project.write_tests(ONE)
    project.warm(warm_template)
    monkeypatch.setenv("MLC_JIT_POLICY", "off")
    result = project.run("--mlc-device=cpu")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*JitDisabledError: JIT compilation is disabled (policy OFF)*"])
    project.run("--mlc-device=cpu", "--mlc-jit-policy=ON").assert_outcomes(passed=1)
    assert project.compiles() == [], "the CLI option beat the environment: a hit"


def test_ini_policy_is_below_env(project: Project, warm_template: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    project.write_tests(ONE)
    project.warm(warm_template)
    project.pytester.makeini("[pytest]\nmlc_jit_policy = OFF\n")
    result = project.run("--mlc-device=cpu")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*JitDisabledError: JIT compilation is disabled (policy OFF)*"])
    monkeypatch.setenv("MLC_JIT_POLICY", "ON")
    project.run("--mlc-device=cpu").assert_outcomes(passed=1)
    assert project.compiles() == [], "the environment beat the ini file: a hit"


def test_per_test_policy_marker(project: Project) -> None:
    project.pytester.makepyfile(test_marker='''
import pytest
from pytest_mlcjit import TVMModel

@pytest.mark.mlc_jit_policy("READONLY")
@pytest.mark.mlc_model(TVMModel("tinymodel:build", config={"hidden": 6}))
def test_readonly(compiled_model):
    pass

@pytest.mark.mlc_jit_policy("sometimes")
@pytest.mark.mlc_model(TVMModel("tinymodel:build", config={"hidden": 6}))
def test_bad(compiled_model):
    pass
''')
    result = project.run("--mlc-device=cpu")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines([
        "*ERROR at setup of test_readonly*",
        "CacheMissError: no cached library*READONLY*",
        "*ERROR at setup of test_bad*",
        "ConfigError: invalid mlc_jit_policy marker 'sometimes': expected one of ON, OFF, REDO, "
        "READONLY*",
    ])


def _make_read_only(root: Path) -> dict[Path, int]:
    modes = {}
    for path in [root, *root.rglob("*")]:
        if path.is_dir():
            modes[path] = path.stat().st_mode
    for path in sorted(modes, reverse=True):
        path.chmod(stat.S_IMODE(modes[path]) & ~0o222)
    return modes


def _restore(modes: dict[Path, int]) -> None:
    for path, mode in modes.items():
        os.chmod(path, stat.S_IMODE(mode))
