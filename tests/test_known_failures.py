"""Known failures: a compile that failed deterministically (the factory or the compiler
raised the same error in two compiles in a row, see tests/test_transient_failures.py) is
remembered for its exact key and recorded inputs, with its log, and later runs report it
at once without compiling; REDO, --mlc-jit-retry-failed, or any change of what
it depends on compiles it again. A crash, a kill or a timeout is not remembered past its
run. ``pytest-mlcjit list --failed`` shows them; prune and clear remove them.

Compilations are counted by the model factory itself, in the compile process.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import Project, wait_until
from pytest_mlcjit import cli

#: A factory that fails until its helper module says it is ready, or until its data
#: file exists, or in a way no later run may trust (os._exit, a missing module).
FAIL_MODEL = '''
import os

from tvm.relax.frontend import nn

import failhelper

HERE = os.path.dirname(os.path.abspath(__file__))


class Tiny(nn.Module):
    def __init__(self, hidden):
        self.fc = nn.Linear(8, hidden)

    def forward(self, x):
        return nn.relu(self.fc(x))


def build(hidden=4, how="helper"):
    with open(os.environ["MLCJIT_TEST_COUNT"], "a") as f:
        f.write(f"{os.getpid()} hidden={hidden} how={how}\\n")
    print(f"building hidden={hidden}", flush=True)
    if how == "helper" and not failhelper.READY:
        raise NotImplementedError(f"operator not supported yet (hidden={hidden})")
    if how == "data":
        try:
            with open(os.path.join(HERE, "weights.txt")) as f:
                f.read()
        except FileNotFoundError:
            raise RuntimeError("no weights yet") from None
    if how == "exit":
        os._exit(3)
    if how == "import":
        import not_written_yet  # noqa: F401
    return Tiny(hidden), {"forward": {"x": nn.spec.Tensor((2, 8), "float32")}}
'''

TESTS = '''
import pytest
from pytest_mlcjit import TVMModel

SPECS = [TVMModel("failmodel:build", config={{"hidden": 4, "how": {how!r}}}),
         TVMModel("failmodel:build", config={{"hidden": 5, "how": "ok"}})]


@pytest.mark.parametrize("i", range(2))
@pytest.mark.parametrize("compiled_model", SPECS, indirect=True, ids=["broken", "good"])
def test_model(compiled_model, i):
    assert compiled_model.path.exists()
'''


@pytest.fixture
def failing(project: Project) -> Project:
    project.pytester.makepyfile(failmodel=FAIL_MODEL, failhelper="READY = False\n")
    return project


def _write_tests(project: Project, how: str) -> None:
    project.pytester.makepyfile(test_fail=TESTS.format(how=how))


def _broken_compiles(project: Project) -> int:
    return sum("hidden=4" in line for line in project.compiles())


def _make_known(project: Project) -> None:
    """Two runs that fail the same way: the second makes the failure known."""
    for _ in range(2):
        project.run("-p", "no:xdist", "--mlc-device=cpu").assert_outcomes(passed=2, errors=2)


def _list_failed(project: Project, capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    capsys.readouterr()
    assert cli.main(["list", "--failed", "--json", "--cache-dir", str(project.cache)]) == 0
    found: list[dict[str, Any]] = json.loads(capsys.readouterr().out)["failed"]
    return found


def test_a_known_failure_is_reported_from_memory(failing: Project,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    _write_tests(failing, "helper")
    first = failing.run("-p", "no:xdist", "--mlc-device=cpu")
    first.assert_outcomes(passed=2, errors=2)
    assert _broken_compiles(failing) == 1
    (once,) = _list_failed(failing, capsys)
    assert (once["known"], once["seen"]) == (False, 1), "seen once: not yet known"
    failing.run("-p", "no:xdist", "--mlc-device=cpu").assert_outcomes(passed=2, errors=2)
    assert _broken_compiles(failing) == 2
    (record,) = _list_failed(failing, capsys)
    assert (record["known"], record["seen"]) == (True, 2)
    assert record["error"] == "NotImplementedError: operator not supported yet (hidden=4)"
    assert "failmodel" in record["model"]
    assert Path(record["log"]).is_file()
    recorded = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["time"]))

    second = failing.run("-p", "no:xdist", "--mlc-device=cpu")
    second.assert_outcomes(passed=2, errors=2)
    assert _broken_compiles(failing) == 2, "the known failure was not compiled again"
    out = second.stdout.str()
    assert out.count(f"(a known failure, recorded {recorded}, ") == 2, "both tests say it"
    second.stdout.fnmatch_lines([
        "NotImplementedError: operator not supported yet (hidden=4) (compiling "
        "failmodel-hidden=4-how=helper for llvm)",
        "*failed: the compiler exited with code 1",
        f"compile log: {record['log']}",
        f"(a known failure, recorded {recorded}, * ago: not compiled again, since its key and "
        "its recorded inputs are unchanged; --mlc-jit-retry-failed or --mlc-jit-policy=REDO "
        "compiles it again)",
    ])
    assert "building hidden=4" in out, "the original log's tail is shown"

    listing = cli.main(["list", "--failed", "--cache-dir", str(failing.cache)])
    assert listing == 0
    text = capsys.readouterr().out
    assert "1 remembered failure (1 known" in text
    assert "NotImplementedError: operator not supported yet (hidden=4)" in text


def test_redo_and_retry_failed_compile_it_again(failing: Project) -> None:
    _write_tests(failing, "helper")
    failing.run("-p", "no:xdist", "--mlc-device=cpu").assert_outcomes(passed=2, errors=2)
    assert _broken_compiles(failing) == 1
    redo = failing.run("-p", "no:xdist", "--mlc-device=cpu", "--mlc-jit-policy=REDO")
    redo.assert_outcomes(passed=2, errors=2)
    assert _broken_compiles(failing) == 2, "REDO compiles it again, once in its run"
    retry = failing.run("-p", "no:xdist", "--mlc-device=cpu", "--mlc-jit-retry-failed")
    retry.assert_outcomes(passed=2, errors=2)
    assert _broken_compiles(failing) == 3, "--mlc-jit-retry-failed compiles it again, once"
    assert "(a known failure" not in retry.stdout.str()
    plain = failing.run("-p", "no:xdist", "--mlc-device=cpu")
    plain.assert_outcomes(passed=2, errors=2)
    assert _broken_compiles(failing) == 3, "still known"


def test_an_edited_input_or_factory_retries_it(failing: Project) -> None:
    _write_tests(failing, "helper")
    _make_known(failing)
    failing.run("-p", "no:xdist", "--mlc-device=cpu").assert_outcomes(passed=2, errors=2)
    assert _broken_compiles(failing) == 2
    # The factory module itself: a new key.
    model = failing.pytester.path / "failmodel.py"
    source = model.read_text()
    model.write_text(source.replace("operator not supported yet",
                                    "operator still not supported"))
    edited = failing.run("-p", "no:xdist", "--mlc-device=cpu")
    edited.assert_outcomes(passed=2, errors=2)
    assert _broken_compiles(failing) == 3
    assert "operator still not supported" in edited.stdout.str()
    model.write_text(source)  # back to the first key, still known
    failing.run("-p", "no:xdist", "--mlc-device=cpu").assert_outcomes(passed=2, errors=2)
    assert _broken_compiles(failing) == 3
    # A module the factory imports (a recorded input of the failure): the same key.
    (failing.pytester.path / "failhelper.py").write_text("READY = True  # fixed\n")
    fixed = failing.run("-p", "no:xdist", "--mlc-device=cpu")
    fixed.assert_outcomes(passed=4)
    assert _broken_compiles(failing) == 4


def test_a_file_that_was_missing_retries_it(failing: Project) -> None:
    _write_tests(failing, "data")
    _make_known(failing)
    known = failing.run("-p", "no:xdist", "--mlc-device=cpu")
    known.assert_outcomes(passed=2, errors=2)
    assert "RuntimeError: no weights yet" in known.stdout.str()
    assert "(a known failure" in known.stdout.str()
    assert _broken_compiles(failing) == 2
    (failing.pytester.path / "weights.txt").write_text("1 2 3\n")
    failing.run("-p", "no:xdist", "--mlc-device=cpu").assert_outcomes(passed=4)
    assert _broken_compiles(failing) == 3


@pytest.mark.parametrize("how", ["exit", "import"])
def test_a_crash_or_a_missing_module_is_not_remembered_past_its_run(
        failing: Project, how: str, capsys: pytest.CaptureFixture[str]) -> None:
    _write_tests(failing, how)
    for run in (1, 2):
        result = failing.run("-p", "no:xdist", "--mlc-device=cpu")
        result.assert_outcomes(passed=2, errors=2)
        assert "(a known failure" not in result.stdout.str()
        assert _broken_compiles(failing) == run, "compiled again by the next run"
    (record,) = _list_failed(failing, capsys)
    assert record["known"] is False
    assert "failmodel" in record["model"], "a run's failure names its model too"


def test_known_failures_under_xdist_compile_nothing(failing: Project) -> None:
    """Recorded by two runs in this process; then under -n 2 (each worker prefetches and
    runs tests of the broken model) nothing compiles, and both of its tests say why."""
    _write_tests(failing, "helper")
    _make_known(failing)
    assert _broken_compiles(failing) == 2
    assert len(failing.compiles()) == 3
    second = failing.run("-n", "2", "--mlc-device=cpu")
    second.assert_outcomes(passed=2, errors=2)
    assert len(failing.compiles()) == 3, "the good one hits, the broken one is known"
    assert second.stdout.str().count("(a known failure, recorded ") == 2


@pytest.mark.parametrize("command", [["prune", "--failed"], ["prune", "--older-than", "0s"],
                                     ["clear"]])
def test_prune_and_clear_remove_them(failing: Project, command: list[str],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    _write_tests(failing, "helper")
    failing.run("-p", "no:xdist", "--mlc-device=cpu").assert_outcomes(passed=2, errors=2)
    (record,) = _list_failed(failing, capsys)
    # --older-than 0s: older than now, so that the clock has moved past its time
    wait_until(lambda: time.time() > record["time"], "the clock to pass the record's time")
    assert cli.main([*command, "--cache-dir", str(failing.cache)]) == 0
    assert _list_failed(failing, capsys) == []
    assert list((failing.cache / ".mlcjit" / "failed").iterdir()) == []
    failing.run("-p", "no:xdist", "--mlc-device=cpu").assert_outcomes(
        passed=2, errors=2)
    assert _broken_compiles(failing) == 2, "forgotten: compiled again"


def test_prune_keeps_failures_it_is_not_asked_to_remove(failing: Project,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    _write_tests(failing, "helper")
    _make_known(failing)
    (record,) = _list_failed(failing, capsys)
    assert cli.main(["prune", "--older-than", "30d", "--cache-dir", str(failing.cache)]) == 0
    assert _list_failed(failing, capsys) == [record]
    failing.run("-p", "no:xdist", "--mlc-device=cpu").assert_outcomes(passed=2, errors=2)
    assert _broken_compiles(failing) == 2, "still known"
