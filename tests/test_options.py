"""Options, markers, header and help; the plugin disabled; and its import cost.

Help, markers and the header run in-process (:meth:`conftest.Project.run`); in a
subprocess only what needs a fresh process: what it imports, pytest's per-process memory
of markers, and the disabled plugin under ``-n 2`` (its xdist hooks are the subject)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Project, inprocess


def test_help_lists_every_option(pytester: pytest.Pytester) -> None:
    result = inprocess(pytester, "--help")
    result.stdout.fnmatch_lines([
        "*pytest-mlcjit*",
        "*--mlc-jit-policy={ON,OFF,REDO,READONLY}*",
        "*--mlc-device=LIST*",
        "*--mlc-jit-cache-dir=PATH*",
        "*--mlc-jit-timeout=SECONDS*",
        "*--mlc-jit-lock-timeout=SECONDS*",
        "*--mlc-jit-allow-untrusted-cache*",
    ])
    for ini in ("mlc_jit_policy", "mlc_device", "mlc_jit_cache_dir", "mlc_jit_timeout",
                "mlc_jit_lock_timeout", "mlc_jit_allow_untrusted_cache"):
        assert f"  {ini} " in result.stdout.str(), ini


def test_markers_are_registered(pytester: pytest.Pytester) -> None:
    result = inprocess(pytester, "--markers")
    result.stdout.fnmatch_lines([
        "@pytest.mark.mlc_model(spec, *, target=None, **options)*",
        "@pytest.mark.mlc_devices(*devices)*",
        "@pytest.mark.mlc_jit_policy(policy)*",
    ])


def test_markers_pass_strict_markers(project: Project, warm_template: Path) -> None:
    project.warm(warm_template)
    project.pytester.makepyfile(test_strict='''
import pytest
from pytest_mlcjit import TVMModel

@pytest.mark.mlc_devices("cpu")
@pytest.mark.mlc_jit_policy("ON")
@pytest.mark.mlc_model(TVMModel("tinymodel:build", config={"hidden": 4}))
def test_it(compiled_model):
    pass
''')
    project.run("--strict-markers", "--mlc-device=cpu").assert_outcomes(passed=1)
    assert project.compiles() == [], "a hit in the warm cache: the markers were read"


def test_header_line(project: Project) -> None:
    result = project.run("--mlc-device=cpu", "--mlc-jit-policy=readonly", "--co")
    result.stdout.fnmatch_lines([f"mlcjit: policy=READONLY, devices=cpu (present), "
                                 f"cache={project.cache}"])


def test_disabled_plugin(pytester: pytest.Pytester) -> None:
    """``-p no:mlcjit`` under ``-n 2`` (the plugin's xdist hooks are not registered then):
    plain tests run, nothing of the plugin shows, and its markers are unknown. A subprocess:
    pytest remembers the markers it has seen for the whole process (pytest.mark's cache), so
    an in-process run would know mlc_devices from earlier runs."""
    pytester.makepyfile(test_plain="def test_plain():\n    pass\n", test_m='''
import pytest

@pytest.mark.mlc_devices("cpu")
def test_marked():
    pass
''')
    result = pytester.runpytest_subprocess("-p", "no:mlcjit", "-n", "2", "--strict-markers",
                                           "--continue-on-collection-errors")
    result.assert_outcomes(passed=1, errors=2)  # each of the 2 workers collects test_m.py
    result.stdout.fnmatch_lines(["*'mlc_devices' not found in `markers`*"])
    assert "mlcjit:" not in result.stdout.str()
    help_text = inprocess(pytester, "-p", "no:mlcjit", "--help").stdout.str()
    assert "--mlc-jit-policy" not in help_text
    assert "--mlc-jit-policy" in inprocess(pytester, "--help").stdout.str(), "only disabled"


def test_loading_the_plugin_imports_neither_tvm_nor_numpy() -> None:
    code = ("import sys, pytest_mlcjit, pytest_mlcjit.plugin;"
            "heavy = [m for m in ('tvm', 'numpy') if m in sys.modules];"
            "print(heavy); sys.exit(1 if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stdout


def test_a_plugin_run_without_models_imports_no_tvm(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_plain='''
import sys

def test_plain():
    assert "tvm" not in sys.modules and "numpy" not in sys.modules
''')
    pytester.runpytest_subprocess("--mlc-device=auto").assert_outcomes(passed=1)
