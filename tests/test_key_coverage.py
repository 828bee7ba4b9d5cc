"""What the key sees (issue 19, items 1, 4 and 5): an input edited while the factory runs,
inputs learnt without opening a file (directory listings, existence probes, failed opens,
environment variables), what cannot be recorded (a subprocess), and a stale ``.pyc``.

Real compiles of real factories, counted by the factories themselves; entries counted on
the filesystem. The recorder's own rules are checked in this process, without a compile.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import py_compile
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import Project, run_cli, wait_until
from pytest_mlcjit.inputs.check import InputChecker, inputs_digest
from pytest_mlcjit.inputs.record import InputRecorder

#: A tiny Relax model whose output width the factory learns from somewhere: the test
#: checks the library's output shape against what it was built from.
MODEL = '''
import os
import pathlib
import subprocess
import time

from tvm.relax.frontend import nn

HERE = pathlib.Path(__file__).parent


class Tiny(nn.Module):
    def __init__(self, hidden):
        self.fc = nn.Linear(8, hidden)

    def forward(self, x):
        return self.fc(x)


def _model(hidden):
    with open(os.environ["MLCJIT_TEST_COUNT"], "a") as f:
        f.write(f"{{os.getpid()}} hidden={{hidden}}\\n")
    return Tiny(hidden), {{"forward": {{"x": nn.spec.Tensor((2, 8), "float32")}}}}


{body}
'''

#: Reads hidden.txt, then (when MLCJIT_TEST_HOLD names a hold file: MLCJIT_* variables are
#: not recorded) says so and waits while the hold file exists (os.access: no probe).
FROM_FILE = '''
def build():
    hidden = int((HERE / "hidden.txt").read_text())
    hold = os.environ.get("MLCJIT_TEST_HOLD")
    if hold:
        open(hold + ".reading", "w").close()
        while os.access(hold, os.F_OK):
            time.sleep(0.01)
    return _model(hidden)
'''

#: Learns its width from an environment variable, and runs a tool it cannot be followed into.
FROM_ENV = '''
def build():
    subprocess.run(["true"], check=True)
    return _model(int(os.environ.get("KEYCOV_HIDDEN", "4")))
'''

#: Learns its width from a local helper module.
FROM_HELPER = '''
import keycov_helper


def build():
    return _model(keycov_helper.HIDDEN)
'''

TEST = '''
import os

import numpy as np
import pytest
from pytest_mlcjit import TVMModel


@pytest.mark.parametrize("compiled_model", [TVMModel("{module}:build")], indirect=True)
def test_width(compiled_model):
    out = compiled_model.run("forward", np.ones((2, 8), dtype="float32"))
    assert out.shape == (2, int(os.environ["MLCJIT_TEST_WIDTH"]))
'''


def _write(project: Project, module: str, body: str) -> None:
    project.pytester.makepyfile(**{module: MODEL.format(body=body),
                                   f"test_{module}": TEST.format(module=module)})


def _run(project: Project, monkeypatch: pytest.MonkeyPatch, width: int) -> pytest.RunResult:
    monkeypatch.setenv("MLCJIT_TEST_WIDTH", str(width))
    return project.run("-q")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- item 1: an input edited while the factory runs ---------------------------------------------
def test_an_input_edited_during_the_compile_is_not_cached(
        project: Project, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The factory reads hidden.txt (4), then the file is edited (6) before it returns: the
    test gets the library it asked for (width 4), but nothing is published under the new
    content's hash (nor at all), the output says why, and the next run compiles again.
    A declared input (``files=``, hashed into the key before the compile) edited meanwhile
    is said too. The kept library's staging directory, its lock and its descriptor go when
    the run ends."""
    _write(project, "keycov_file", FROM_FILE)
    project.pytester.makepyfile(test_keycov_file=TEST.format(module="keycov_file").replace(
        '"keycov_file:build")', '"keycov_file:build", files=["declared.txt"])'))
    data = project.pytester.path / "hidden.txt"
    data.write_text("4")
    declared = project.pytester.path / "declared.txt"
    declared.write_text("v1")
    hold = tmp_path / "hold"
    hold.touch()
    monkeypatch.setenv("MLCJIT_TEST_HOLD", str(hold))

    def edit_while_compiling() -> None:
        try:
            wait_until(lambda: Path(f"{hold}.reading").exists(), "the factory to read")
            data.write_text("6")
            declared.write_text("v2")
        finally:
            hold.unlink()

    editor = threading.Thread(target=edit_while_compiling)
    editor.start()
    try:
        first = _run(project, monkeypatch, width=4)
    finally:
        editor.join()
    assert first.ret == 0, first.stdout.str()  # the test got the library it asked for (4)
    assert len(project.compiles()) == 1
    assert project.manifests() == []  # nothing published, under either content's hash
    assert project.libraries() == []
    assert "hidden.txt changed during the compile" in first.stdout.str()
    assert "declared.txt changed during the compile (declared in files=)" in first.stdout.str()
    assert [p for d in project.cache.rglob("staging") for p in d.iterdir()] == []
    fds = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
           if os.path.islink(f"/proc/self/fd/{fd}")]
    assert [f for f in fds if f.startswith(str(project.cache))] == []

    monkeypatch.delenv("MLCJIT_TEST_HOLD")
    second = _run(project, monkeypatch, width=6)
    assert second.ret == 0, second.stdout.str()
    assert len(project.compiles()) == 2  # compiled again, now from a stable state
    (manifest,) = project.manifests()
    files = {f["path"]: f["sha256"] for f in manifest["inputs"]["files"]}
    assert files == {"hidden.txt": _sha(b"6")}


# -- item 5: a stale .pyc -----------------------------------------------------------------------
def test_a_local_module_is_compiled_from_its_source_not_a_stale_pyc(
        project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    """keycov_helper.py v1 is byte-compiled, then replaced by v2 of the same size with v1's
    mtime: Python would believe the .pyc; the library must be built from v2 and recorded
    under v2's hash."""
    _write(project, "keycov_pyc", FROM_HELPER)
    helper = project.pytester.path / "keycov_helper.py"
    helper.write_text("HIDDEN = 4\n")
    cached = importlib.util.cache_from_source(str(helper))
    py_compile.compile(str(helper), cfile=cached, doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    before = helper.stat()
    helper.write_text("HIDDEN = 6\n")
    os.utime(helper, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert helper.stat().st_size == before.st_size
    assert Path(cached).is_file()

    result = _run(project, monkeypatch, width=6)
    assert result.ret == 0, result.stdout.str()
    assert len(project.compiles()) == 1
    (manifest,) = project.manifests()
    modules = {m["path"]: m["sha256"] for m in manifest["inputs"]["modules"]}
    assert modules["keycov_helper.py"] == _sha(b"HIDDEN = 6\n")


# -- item 4: inputs learnt without opening a file -----------------------------------------------
def test_listings_probes_failed_opens_and_environment_reads_are_inputs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recorded in this process (no compile): each of them, changed alone, is a change; the
    variables of pytest are not recorded; a record without the new fields keeps its digest."""
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.npy").write_bytes(b"1")
    (tmp_path / "extra").mkdir()
    monkeypatch.setenv("KEYCOV_MODE", "fast")
    monkeypatch.delenv("KEYCOV_UNSET", raising=False)
    (tmp_path / "keycov_unit_mod.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "keycov_unit_mod", raising=False)
    real_stat = os.stat
    recorder = InputRecorder(tmp_path)
    with recorder:
        # The import system lists tmp_path to find the module: not the factory's listing.
        assert importlib.import_module("keycov_unit_mod").VALUE == 1
        assert len(glob.glob(str(shards / "*.npy"))) == 1
        assert list((tmp_path / "extra").iterdir()) == []
        assert not os.path.exists(tmp_path / "override.json")
        with pytest.raises(FileNotFoundError):
            open(tmp_path / "optional.txt")  # noqa: SIM115 - a failed open, on purpose
        assert os.environ.get("KEYCOV_MODE") == "fast"
        assert "KEYCOV_UNSET" not in os.environ
        assert os.environ.get("PYTEST_CURRENT_TEST")
    assert os.stat is real_stat  # nothing of the recording is left in this process
    assert type(os.environ) is os._Environ
    monkeypatch.delitem(sys.modules, "keycov_unit_mod")
    recorded = recorder.result()
    assert {d["path"]: d["count"] for d in recorded["listings"]} == {"shards": 1, "extra": 0}
    probes = {p["path"]: p["state"] for p in recorded["probes"]}
    assert probes["override.json"] == probes["optional.txt"] == "absent"
    assert set(recorded["env"]) == {"KEYCOV_MODE", "KEYCOV_UNSET"}
    assert "fast" not in json.dumps(recorded)  # a digest of the value, never the value
    assert recorder.unstable == []
    checker = InputChecker()
    assert checker.changes(recorded, tmp_path) == []

    def change(kind: str, name: str) -> None:
        found = [(c.kind, c.name) for c in checker.changes(recorded, tmp_path)]
        assert found == [(kind, name)]

    (shards / "b.npy").write_bytes(b"2")
    change("listing", "shards")
    (shards / "b.npy").unlink()
    (tmp_path / "override.json").write_text("{}")
    change("probe", "override.json")
    (tmp_path / "override.json").unlink()
    (tmp_path / "optional.txt").write_text("x")
    change("probe", "optional.txt")
    (tmp_path / "optional.txt").unlink()
    monkeypatch.setenv("KEYCOV_MODE", "slow")
    change("env", "KEYCOV_MODE")
    monkeypatch.setenv("KEYCOV_MODE", "fast")
    monkeypatch.setenv("KEYCOV_UNSET", "1")
    change("env", "KEYCOV_UNSET")
    monkeypatch.delenv("KEYCOV_UNSET")
    assert checker.changes(recorded, tmp_path) == []

    old = {"roots": [], "modules": [], "files": [], "dists": {"numpy": "2"}}
    assert inputs_digest(old) == inputs_digest({**old, "listings": [], "env": {}})


def test_an_environment_variable_is_an_input_and_a_subprocess_is_said(
        project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    """The factory reads KEYCOV_HIDDEN and runs a tool: changing the variable compiles
    again (one entry per value); each entry is kept but marked incomplete, and the run,
    ``list --inputs`` (and ``--json``) and ``explain`` say what ran."""
    _write(project, "keycov_env", FROM_ENV)
    monkeypatch.setenv("KEYCOV_HIDDEN", "4")
    first = _run(project, monkeypatch, width=4)
    assert first.ret == 0, first.stdout.str()
    monkeypatch.setenv("KEYCOV_HIDDEN", "6")
    second = _run(project, monkeypatch, width=6)
    assert second.ret == 0, second.stdout.str()
    assert len(project.compiles()) == 2
    assert len(project.manifests()) == 2  # one entry per input state

    assert "incomplete: the factory ran subprocess: true" in first.stdout.str()
    assert [m["inputs"]["incomplete"] for m in project.manifests()] == [
        ["subprocess: true"]] * 2
    listed = run_cli("list", "--inputs", "--cache-dir", str(project.cache))
    assert listed.stdout.count("incomplete: subprocess: true") == 2
    assert listed.stdout.count("env    KEYCOV_HIDDEN  sha256") == 2
    as_json = json.loads(run_cli("list", "--inputs", "--json", "--cache-dir",
                                 str(project.cache)).stdout)
    assert [e["inputs"]["incomplete"] for e in as_json["entries"]] == [
        ["subprocess: true"]] * 2
    explained = run_cli("explain", "--factory", "keycov_env:build", "--cache-dir",
                        str(project.cache), cwd=project.pytester.path)
    assert explained.returncode == 0, explained.stderr
    assert "recorded inputs incomplete: subprocess: true" in explained.stdout


# -- follow-up of the review: what the recorder sees, in this process (no compile) --------------
def _record(base: Path, body: Callable[[], object]) -> tuple[InputRecorder, dict[str, Any]]:
    recorder = InputRecorder(base)
    with recorder:
        body()
    return recorder, dict(recorder.result())


def test_module_level_reads_of_an_imported_module_are_inputs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Module-level code runs under the import system: its listings, probes and
    environment reads are the module's own, recorded; the import system's own listing of
    the ``sys.path`` directory is not."""
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "a.npy").write_bytes(b"1")
    (tmp_path / "keycov_toplevel.py").write_text(
        "import glob, os, pathlib\n"
        "HERE = pathlib.Path(__file__).parent\n"
        "SHARDS = sorted(glob.glob(str(HERE / 'weights' / '*.npy')))\n"
        "OVERRIDE = os.path.exists(HERE / 'override.json')\n"
        "MODE = os.environ.get('KEYCOV_TOP_MODE')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "keycov_toplevel", raising=False)
    _, recorded = _record(tmp_path, lambda: importlib.import_module("keycov_toplevel"))
    monkeypatch.delitem(sys.modules, "keycov_toplevel")
    assert {d["path"]: d["count"] for d in recorded.get("listings", [])} == {"weights": 1}
    assert {p["path"]: p["state"] for p in recorded.get("probes", [])} == {
        "override.json": "absent"}
    assert set(recorded.get("env", {})) == {"KEYCOV_TOP_MODE"}


def test_a_forked_or_spawned_process_makes_the_record_incomplete(tmp_path: Path) -> None:
    """A fork (multiprocessing's fork start method, ProcessPoolExecutor) and a process
    started as multiprocessing's spawn and forkserver methods start one (no audit event)
    mark the record incomplete; a subprocess is said once, as a subprocess."""
    import multiprocessing.util
    import subprocess

    def fork() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12)
            pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)

    def spawn() -> None:
        pid = multiprocessing.util.spawnv_passfds(  # as popen_spawn_posix does
            os.fsencode(sys.executable), [sys.executable, "-c", "pass"], [])
        os.waitpid(pid, 0)

    assert _record(tmp_path, fork)[1]["incomplete"] == ["a forked process (multiprocessing?)"]
    assert _record(tmp_path, spawn)[1]["incomplete"] == [
        "a process started by multiprocessing"]
    ran = _record(tmp_path, lambda: subprocess.run(["true"], check=True))[1]
    assert ran["incomplete"] == ["subprocess: true"]


def test_paths_outside_the_project_cost_no_state(tmp_path: Path) -> None:
    """Walking a tree outside the project while recording keeps nothing of it (the
    project's prefix is tested first, before any stack walk or stat), and records nothing."""
    project, outside = tmp_path / "project", tmp_path / "outside"
    project.mkdir()
    for i in range(3):
        (outside / f"d{i}").mkdir(parents=True)
        (outside / f"d{i}" / "f").write_bytes(b"x")

    def walk() -> None:
        sizes = [os.path.getsize(os.path.join(d, f))
                 for d, _, names in os.walk(outside) for f in names]
        assert sizes == [1, 1, 1]

    recorder, recorded = _record(project, walk)
    assert recorder._probes == {}
    assert recorder._listings == {}
    assert "probes" not in recorded
    assert "listings" not in recorded


def test_reading_the_whole_environment_records_no_variable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``dict(os.environ, X=...)``, ``{**os.environ}``, ``items()``, ``values()``,
    iteration and ``len`` read no variable by name (else ``_``, ``OLDPWD``, ``SHLVL``, a CI
    job id would be in the key); a read by name still counts."""
    monkeypatch.setenv("KEYCOV_SHELL_NOISE", "1")
    monkeypatch.setenv("KEYCOV_NAMED", "x")

    def read() -> None:
        child = dict(os.environ, KEYCOV_CHILD="1")
        assert {**os.environ}["KEYCOV_SHELL_NOISE"] == child["KEYCOV_SHELL_NOISE"]
        assert len(list(os.environ.items())) == len(os.environ) == len(list(os.environ.values()))
        assert sorted(os.environ) == sorted(os.environ.keys())
        assert os.environ["KEYCOV_NAMED"] == "x"

    assert set(_record(tmp_path, read)[1].get("env", {})) == {"KEYCOV_NAMED"}


def test_a_file_the_factory_makes_after_failing_to_open_it_is_its_output(
        tmp_path: Path) -> None:
    """Try to open, else convert and save: the file is the factory's own output, neither
    an input nor an input that appeared during the compile."""
    converted = tmp_path / "converted.bin"

    def open_or_convert() -> None:
        try:
            converted.read_bytes()
        except FileNotFoundError:
            converted.write_bytes(b"converted")
        assert converted.read_bytes() == b"converted"

    recorder, recorded = _record(tmp_path, open_or_convert)
    assert recorder.unstable == []
    assert recorded["files"] == []
    assert "probes" not in recorded


def test_an_old_input_edited_while_recording_is_unstable_by_its_stat(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An input older than the racy window is trusted by its stat signature, not hashed
    when first read: an edit (mtime set back) is still noticed. A file's ctime cannot be
    set back, so the window is narrowed to make the just-written file old."""
    from pytest_mlcjit.inputs import hooks

    monkeypatch.setattr(hooks, "RACY_WINDOW_NS", -10**18)
    data = tmp_path / "old.txt"
    data.write_text("4")
    hour_ago = data.stat().st_mtime_ns - 3600 * 10**9
    os.utime(data, ns=(hour_ago, hour_ago))

    def read_then_edit() -> None:
        assert data.read_text() == "4"
        data.write_text("16")
        os.utime(data, ns=(hour_ago, hour_ago))

    recorder, _ = _record(tmp_path, read_then_edit)
    first = recorder._first[str(data)]
    assert first is not None
    assert first[1] is None  # judged by its stat, not a hash
    assert recorder.unstable == ["old.txt changed during the compile"]


def test_local_sources_only_while_the_factory_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The finder that compiles local modules from source is first on ``sys.meta_path``
    inside the block only (``tvm.compile`` runs after it)."""
    from pytest_mlcjit.inputs.sources import SourceLoader, fresh_local_sources

    (tmp_path / "keycov_srcmod.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "keycov_srcmod", raising=False)
    with fresh_local_sources(tmp_path) as finder:
        assert sys.meta_path[0] is finder
        module = importlib.import_module("keycov_srcmod")
    monkeypatch.delitem(sys.modules, "keycov_srcmod")
    assert module.__spec__ is not None
    assert isinstance(module.__spec__.loader, SourceLoader)
    assert finder not in sys.meta_path
