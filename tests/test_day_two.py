"""Day two, as a new user would meet it (issue 19): the JSON report's target stays what it
is, a terminal without a size, progress lines that never split pytest's own lines, names
and counts that agree (a model's default name, one vocabulary for outcomes, a bad spec is
no request, a failed compile is never "compiled"), parameters checked like inputs, and two
messages' wording.

Every case is deterministic and in the default tier; each run starts from
:func:`conftest.warm_template`'s cache where a compile would prove nothing.
"""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from faultmodels import HELD_MODEL

from conftest import Project, accounting, run_cli, wait_until
from pytest_mlcjit import TVMModel

#: Progress shows every job almost at once, and looks often (a compile is seen while it
#: runs).
NOW = ("-o", "mlc_jit_progress_delay=0.01", "-o", "mlc_jit_progress_interval=0.01")

ONE_TEST = '''
import pytest
from pytest_mlcjit import TVMModel


@pytest.mark.mlc_model(TVMModel("tinymodel:build", config={"hidden": 4}))
def test_one(compiled_model):
    assert compiled_model.path.exists()
'''


# -- item 7: --mlc-jit-report PATH --------------------------------------------------------
def test_the_report_goes_through_a_symlink_and_into_a_fifo_and_says_when_it_cannot(
        project: Project, warm_template: Path, tmp_path: Path) -> None:
    """A symlink stays a link (its target holds the report), a FIFO stays a FIFO (its
    reader gets the report); a path that cannot be written makes the exit status
    non-zero, and the summary names the path and the reason."""
    project.warm(warm_template)
    project.pytester.makepyfile(test_one=ONE_TEST)

    target = tmp_path / "reports" / "real.json"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "report.json"
    link.symlink_to(target)
    result = project.run("--mlc-device=cpu", f"--mlc-jit-report={link}")
    assert result.ret == 0, result.stdout.str()
    assert link.is_symlink()
    assert link.readlink() == target
    assert json.loads(target.read_text())["requests"] == 1
    assert [p.name for p in target.parent.iterdir()] == ["real.json"], "no temp file left"

    fifo = tmp_path / "report.fifo"
    os.mkfifo(fifo)
    got: list[str] = []

    def read() -> None:
        with open(fifo, encoding="utf-8") as f:  # waits for the writer
            got.append(f.read())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        result = project.run("--mlc-device=cpu", f"--mlc-jit-report={fifo}")
    finally:
        if reader.is_alive() and not got:  # the run never opened it: let the reader go
            with open(fifo, "w", encoding="utf-8"):
                pass
        reader.join(timeout=60)
    assert result.ret == 0, result.stdout.str()
    assert stat.S_ISFIFO(fifo.lstat().st_mode), "still a FIFO"
    assert json.loads(got[0])["requests"] == 1

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad = blocker / "report.json"  # its parent is a file: root cannot write it either
    result = project.run("--mlc-device=cpu", f"--mlc-jit-report={bad}")
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stdout.fnmatch_lines([f"--mlc-jit-report: could not write {bad}: Not a directory"])


# -- item 10: a terminal that reports no width ---------------------------------------------
def test_a_terminal_without_a_size_gets_80_columns_or_COLUMNS(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A pseudo-terminal made without a size (as ``script`` makes one) reports 0 columns:
    the status line is drawn at 80 columns (``COLUMNS`` when set), not cut to "…"."""
    from _pytest._io import TerminalWriter

    from pytest_mlcjit.plugin.progress import Screen

    master, slave = os.openpty()
    term = os.fdopen(slave, "w", encoding="utf-8")
    try:
        assert os.get_terminal_size(slave).columns == 0, "a pty made without a size"
        monkeypatch.delenv("COLUMNS", raising=False)
        screen = Screen(TerminalWriter(term), live=True)
        text = "mlcjit: [main] compiling tinymodel-hidden=4 (llvm) 12s"
        try:
            assert screen.width() == 80
            screen.draw(text)
            monkeypatch.setenv("COLUMNS", "31")
            assert screen.width() == 31
            screen.draw(text + " ")
        finally:
            screen.close()
        got = b""

        def read_both() -> bool:  # the pty hands the bytes over in its own time
            nonlocal got
            if select.select([master], [], [], 0.05)[0]:
                got += os.read(master, 65536)
            return "…\x1b[K".encode() in got  # the second line's end

        wait_until(read_both, "both status lines on the pty", timeout=60)
        shown = got.decode()
    finally:
        term.close()
        os.close(master)
    assert f"\r{text}\x1b[K" in shown, repr(shown)
    assert f"\r{text[:29]}…\x1b[K" in shown, repr(shown)




@pytest.mark.reliability
def test_under_script_the_status_line_is_whole(project: Project, tmp_path: Path) -> None:
    """``script -qfec`` (stdin not a terminal) runs pytest on a pseudo-terminal without a
    size: the status line shows the compile whole (80 columns), not "…"; the compile is
    held until it has been seen."""
    script = shutil.which("script")
    if script is None:
        pytest.skip("no `script` here (util-linux)")
    project.pytester.makepyfile(heldmodel=HELD_MODEL, test_held=ONE_TEST.replace(
        "tinymodel:build", "heldmodel:build"))
    hold = tmp_path / "hold"
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env.update(TERM="xterm", MLCJIT_TEST_HOLD=str(hold))
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist",
            "--mlc-device=cpu", f"--mlc-jit-cache-dir={project.cache}", *NOW]
    proc = subprocess.Popen([script, "-qfec", shlex.join(argv), "/dev/null"],
                            cwd=project.pytester.path, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    out = b""
    try:
        assert proc.stdout is not None
        while chunk := os.read(proc.stdout.fileno(), 65536):
            out += chunk
            if re.search(rb"mlcjit: \[main\] compiling heldmodel-hidden=4 \(llvm\) \d+s", out):
                hold.touch()
        proc.wait()
    finally:
        watchdog.cancel()
        hold.touch()
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    assert hold.exists(), "the whole status line was seen"
    assert "\r…\x1b[K" not in text, text


# -- item 11 and 13 (b): progress lines under -v; info in the summary's words --------------
THREE_TESTS = '''
import pytest
from pytest_mlcjit import TVMModel

WARM = TVMModel("tinymodel:build", config={"hidden": 4})


@pytest.mark.mlc_model(WARM)
def test_hits(compiled_model):
    assert compiled_model.path.exists()


@pytest.mark.mlc_model(TVMModel("tinymodel:build", config={"hidden": 5}))
def test_compiles(compiled_model):
    assert compiled_model.path.exists()


@pytest.mark.mlc_model(WARM)
def test_hits_again(compiled_model):
    assert compiled_model.path.exists()
'''


def test_progress_lines_never_split_a_verbose_test_line_and_info_uses_the_summarys_words(
        project: Project, warm_template: Path) -> None:
    """``-v`` without xdist, every job shown at once (delay 0.01s), a real compile: every
    ``PASSED`` is on the line of its test id, the progress lines are lines of their own,
    and the compile's end line comes under the test it ended in, before the next test's.
    ``pytest-mlcjit info`` then shows the run in the summary's own words."""
    project.warm(warm_template)
    project.pytester.makepyfile(test_verbose=THREE_TESTS)
    result = project.run("--mlc-device=cpu", "-v", "-p", "no:xdist", *NOW)
    result.assert_outcomes(passed=3)
    lines = result.outlines
    passed = [i for i, line in enumerate(lines) if "PASSED" in line]
    assert len(passed) == 3, lines
    for i in passed:
        assert re.fullmatch(r"test_verbose\.py::test_\w+\[cpu\] PASSED +\[ *\d+%\]",
                            lines[i]), lines
    for i, line in enumerate(lines):  # a test id a long wait interrupted: written again
        if "test_verbose.py::" in line and i not in passed:
            assert re.fullmatch(r"test_verbose\.py::test_\w+\[cpu\] ", line), lines
            assert lines[i + 1].startswith("mlcjit: ["), lines
    mine = [i for i, line in enumerate(lines) if "mlcjit: [" in line]
    assert mine, "the compile was shown"
    assert all(lines[i].startswith("mlcjit: [main] ") for i in mine), lines
    start = next(i for i in mine if "compiling tinymodel-hidden=5 (llvm): running for" in
                 lines[i])
    end = next(i for i in mine if " compiled tinymodel-hidden=5 (llvm) in " in lines[i])
    next_test = next(i for i, line in enumerate(lines)
                     if line.startswith("test_verbose.py::test_hits_again"))
    assert passed[0] < start < end < next_test, lines
    assert [line.split()[1] for line in project.compiles()].count("hidden=5") == 1

    summary = next(line for line in lines if line.startswith("3 requests: "))
    assert re.match(r"3 requests: (2 hits, 1 compiled|1 hit, 2 compiled); ", summary), summary
    info = run_cli("info", "--cache-dir", str(project.cache))
    assert info.returncode == 0, info.stderr
    (run,) = [line for line in info.stdout.splitlines() if ": 3 requests" in line]
    assert run.endswith(f"ON: {summary}"), (run, summary)
    assert "misses" not in info.stdout


def test_a_plain_line_waits_for_pytests_line_or_writes_the_test_id_again() -> None:
    """pytest's own terminal writer, written as ``-v`` writes: a plain line printed while
    a test id waits for its outcome comes after the outcome's line; one that waited too
    long goes under the unfinished id, which is written again for the outcome."""
    import io

    from _pytest._io import TerminalWriter

    from pytest_mlcjit.plugin.progress import Screen

    out = io.StringIO()
    tw = TerminalWriter(out)
    screen = Screen(tw, live=False, keep_line=lambda: True)
    try:
        tw.write("test_v.py::test_one[cpu] ")
        screen.line("mlcjit: [main] compiling m (llvm): running for 2s")
        screen.overdue(3600)  # has not waited that long: still waiting
        tw.write("PASSED")
        tw.write(" [ 50%]")
        tw.line()
        tw.write("test_v.py::test_two[cpu] ")
        screen.line("mlcjit: [main] compiled m (llvm) in 5.9s")
        screen.overdue(0)
        tw.write("PASSED")
        tw.line()
    finally:
        screen.close()
    assert out.getvalue().splitlines() == [
        "test_v.py::test_one[cpu] PASSED [ 50%]",
        "mlcjit: [main] compiling m (llvm): running for 2s",
        "test_v.py::test_two[cpu] ",
        "mlcjit: [main] compiled m (llvm) in 5.9s",
        "test_v.py::test_two[cpu] PASSED",
    ]


# -- item 13: names and counts -------------------------------------------------------------
TWO_FACTORIES = '''
from tinymodel import build


def small():
    return build(hidden=4)


def large():
    return build(hidden=8)
'''

FACTORY_TESTS = '''
import pytest
from pytest_mlcjit import TVMModel


@pytest.mark.parametrize("compiled_model", [TVMModel("factories:small"),
                                            TVMModel("factories:large"),
                                            TVMModel("tinymodel:build")], indirect=True)
def test_model(compiled_model):
    pass
'''


def test_two_factories_of_one_module_get_different_names(project: Project) -> None:
    """The default name tells factories apart (``module.function``); a factory named
    ``build`` keeps its module's name, so existing ids do not change."""
    project.pytester.makepyfile(factories=TWO_FACTORIES, test_factories=FACTORY_TESTS)
    result = project.run("--mlc-device=cpu", "--co", "-q")
    result.stdout.fnmatch_lines([
        "test_factories.py::test_model[cpu-factories.small]",
        "test_factories.py::test_model[cpu-factories.large]",
        "test_factories.py::test_model[cpu-tinymodel]",
    ])
    assert TVMModel("tinymodel:build", config={"hidden": 4}).id == "tinymodel-hidden=4"
    assert TVMModel("a.b:c", name="mine").id == "mine"


BAD_AND_FAILING = '''
import pytest
from pytest_mlcjit import TVMModel


@pytest.mark.mlc_model(TVMModel("tinymodel:build", config={"hidden": 4}))
def test_good(compiled_model):
    pass


@pytest.mark.mlc_model(TVMModel("tinymodel:nosuchfunction"))
def test_no_function(compiled_model):
    pass


@pytest.mark.mlc_model(TVMModel("nosuchmodule:build"))
def test_no_module(compiled_model):
    pass


@pytest.mark.mlc_model(TVMModel("tinymodel:build", config={"fail": True}))
def test_factory_raises(compiled_model):
    pass
'''


def test_a_bad_spec_is_no_request_and_a_failed_compile_is_never_compiled(
        project: Project, warm_template: Path) -> None:
    """Two tests whose spec is bad error without being counted as requests; a factory
    that raises is a request that failed, and its progress line says the compile failed,
    never "compiled ... in"."""
    project.warm(warm_template)
    project.pytester.makepyfile(test_bad=BAD_AND_FAILING)
    result = project.run("--mlc-device=cpu", "-p", "no:xdist", *NOW)
    result.assert_outcomes(passed=1, errors=3)
    counts = accounting(result)
    assert (counts["requests"], counts["failed"]) == (2, 1), counts
    out = result.stdout.str()
    assert "defines no top-level name 'nosuchfunction'" in out
    assert "cannot import factory module 'nosuchmodule'" in out
    assert re.search(r"^mlcjit: \[main\] compile of tinymodel-fail=True \(llvm\) failed "
                     r"after \d+\.\ds$", out, re.MULTILINE), out
    assert "compiled tinymodel-fail=True" not in out
    assert len(project.compiles()) == 1 + counts.get("compiled", 0), \
        "the factory was called by the requests that compiled or failed, not the bad specs"


# -- item 14: parameters are checked like inputs -------------------------------------------
PARAM_TESTS = '''
import numpy as np
import pytest
from pytest_mlcjit import InputError, TVMModel

X = np.ones((2, 8), "float32")


@pytest.mark.mlc_model(TVMModel("tinymodel:build", config={"hidden": 4}))
def test_params(compiled_model):
    good = {k: v.copy() for k, v in compiled_model.params.items()}
    with pytest.raises(InputError) as shape:
        compiled_model.run("forward", X, params={**good, "fc.weight": np.zeros((3, 8), "float32")})
    assert str(shape.value) == ("parameter 'fc.weight' of forward must be float32[4, 8], "
                                "got float32[3, 8]")
    with pytest.raises(InputError) as dtype:
        compiled_model.run("forward", X, params={**good, "fc.bias": np.zeros(4)})
    assert str(dtype.value) == ("parameter 'fc.bias' of forward must be float32[4], got "
                                "float64[4] (numpy's default for floats)")
    out = compiled_model.run("forward", X, params={**good, "fc.bias": [0.0] * 4})
    assert out.shape == (2, 4)  # a list takes the parameter's dtype
'''


def test_run_checks_the_parameters_shape_and_dtype(project: Project,
                                                   warm_template: Path) -> None:
    project.warm(warm_template)
    project.pytester.makepyfile(test_params=PARAM_TESTS)
    result = project.run("--mlc-device=cpu")
    result.assert_outcomes(passed=1)


# -- cosmetic: the interrupted download, one shard's library -------------------------------
def test_an_interrupted_download_says_downloading() -> None:
    from pytest_mlcjit.plugin.report import interruption

    info = {"kind": "download", "model": "tinymodel-hidden=4", "target": "llvm",
            "seconds": 3.0}
    text = interruption(KeyboardInterrupt(), info, board=None)  # type: ignore[arg-type]
    assert text.startswith("interrupted while downloading tinymodel-hidden=4 (llvm) after "
                           "3.0s; nothing was cached"), text
    assert "compil" not in text.splitlines()[0]


def test_one_library_of_a_shard_is_singular(project: Project, warm_template: Path) -> None:
    project.warm(warm_template)
    project.pytester.makepyfile(test_one=ONE_TEST)
    result = project.run("--mlc-device=cpu", "--mlc-jit-prepare", "--mlc-jit-shard=1/1")
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(["shard 1/1 (--mlc-jit-shard): 1 library of 1 is this "
                                 "shard's; the others are left to the other shards"])


def test_default_names_and_an_empty_accounting_line() -> None:
    """The default name of each form of factory (a string that is no factory keeps its
    text: the spec's validation names it); a run whose every spec was bad has no
    requests, and its summary line says so."""
    from pytest_mlcjit.engine.stats import Stats
    from pytest_mlcjit.spec import default_name

    assert default_name("models.mlp:build") == "mlp"
    assert default_name("models.mlp:tiny") == "mlp.tiny"
    assert default_name("tinymodel") == "tinymodel"
    assert Stats().accounting_line() == "no requests"


def test_a_spec_the_engine_cannot_key_is_no_request(tmp_path: Path) -> None:
    """Called from code too (not only through the fixture): a factory that is not there
    fails the call and is counted as no request; OFF is still a missed request."""
    from pytest_mlcjit import JIT, JitDisabledError, MlcJitError, Settings

    engine = JIT(Settings(cache_dir=tmp_path / "cache"))
    with pytest.raises(MlcJitError):
        engine.compile(TVMModel("nosuchmodule_of_this_test:build"), "cpu")
    assert engine.stats.requests == 0
    with pytest.raises(JitDisabledError):
        engine.compile(TVMModel("nosuchmodule_of_this_test:build"), "cpu", policy="OFF")
    assert (engine.stats.requests, engine.stats.outcomes.get("missed")) == (1, 1)
