"""Recorded inputs (pytest_mlcjit.inputs): what a factory really used, and cheap checks.

The recorder is exercised where it runs for real, in a child process that imports a small
package (two local helpers, numpy, a .npy read by numpy.load, a text file read by open()).
The checker, the explicit-file globbing, the static import closure and the digest run
in-process on real files.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import wait_until
from pytest_mlcjit.errors import SpecError
from pytest_mlcjit.inputs import paths as input_paths
from pytest_mlcjit.inputs import record as recording
from pytest_mlcjit.inputs.check import Change, InputChecker, inputs_digest
from pytest_mlcjit.inputs.closure import import_root, local_import_closure
from pytest_mlcjit.inputs.explicit import expand_files, explicit_inputs_digest
from pytest_mlcjit.inputs.paths import file_entry, is_local_path
from pytest_mlcjit.inputs.record import InputRecorder
from pytest_mlcjit.key import file_sha256


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture
def isolated_modules(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Modules a test imports from its tmp dirs are dropped from sys.modules afterwards."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        monkeypatch.delitem(sys.modules, name, raising=False)


# --------------------------------------------------------------------------------------------
# The recorder, in a real child process

CHILD = r"""
import importlib, json, sys
from pytest_mlcjit.inputs.record import InputRecorder
root, module, exclude, exclude_temp = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
sys.path.insert(0, root)
recorder = InputRecorder.for_module(module, exclude=[exclude], exclude_temp=exclude_temp)
with recorder:
    factory = importlib.import_module(module)
    print("built", factory.build(size=3), file=sys.stderr)
print(json.dumps(recorder.result()))
"""


@pytest.fixture
def factory_project(tmp_path: Path) -> Path:
    """recpkg.factory -> helper_a (numpy, np.load, scratch file, excluded dir, a file outside
    the import root) -> helper_b (open() of a text file)."""
    proj = tmp_path / "proj"
    write(proj / "recpkg" / "__init__.py", "")
    write(proj / "recpkg" / "factory.py", """
        from . import helper_a

        def build(size):
            return helper_a.load(size)
        """)
    write(proj / "recpkg" / "helper_a.py", """
        import os

        import numpy as np

        from recpkg import helper_b

        HERE = os.path.dirname(os.path.abspath(__file__))

        def load(size):
            arr = np.load(os.path.join(HERE, "..", "data", "w.npy"))
            scratch = os.path.join(HERE, "..", "scratch.txt")
            with open(scratch, "w") as f:  # the factory's own output: not an input
                f.write("scratch")
            with open(scratch) as f:
                f.read()
            with open(os.path.join(HERE, "..", "cache", "ignored.txt")) as f:  # excluded
                f.read()
            with open(os.path.join(HERE, "..", "..", "outside", "o.txt")) as f:
                f.read()
            os.listdir(HERE)
            return float(arr.sum()) + len(helper_b.notes()) + size
        """)
    write(proj / "recpkg" / "helper_b.py", """
        import json
        import os

        def notes():
            path = os.path.join(os.path.dirname(__file__), "..", "data", "notes.txt")
            with open(path) as f:
                return json.dumps(f.read())
        """)
    (proj / "data").mkdir()
    np.save(proj / "data" / "w.npy", np.arange(4, dtype="float32"))
    write(proj / "data" / "notes.txt", "some notes\n")
    write(proj / "cache" / "ignored.txt", "cache content\n")
    write(tmp_path / "outside" / "o.txt", "outside the import root\n")
    return proj


def run_child(proj: Path, *, exclude_temp: bool = False) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(proj), "recpkg.factory", str(proj / "cache"),
         "1" if exclude_temp else "0"],
        capture_output=True, text=True, timeout=120, check=False, cwd=proj,
    )
    assert proc.returncode == 0, proc.stderr
    assert "built 23.0" in proc.stderr  # 0+1+2+3 + len('"some notes\\n"') + 3
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_recorder_in_a_child_records_helpers_data_files_and_dists(factory_project: Path) -> None:
    proj = factory_project
    recorded = run_child(proj)
    assert recorded["roots"] == ["recpkg.factory"]
    modules = {m["path"]: m for m in recorded["modules"]}
    assert sorted(modules) == ["recpkg/__init__.py", "recpkg/factory.py",
                               "recpkg/helper_a.py", "recpkg/helper_b.py"]
    outside = (proj.parent / "outside" / "o.txt").as_posix()
    files = {f["path"]: f for f in recorded["files"]}
    assert sorted(files) == sorted(["data/notes.txt", "data/w.npy", outside])
    for entry in [*modules.values(), *files.values()]:
        path = Path(input_paths.resolve(entry["path"], str(proj)))
        assert entry["sha256"] == file_sha256(path)
        assert entry["size"] == path.stat().st_size
    assert recorded["dists"]["numpy"] == np.__version__
    # Nothing from the stdlib, site-packages or pycache; not the scratch or excluded files.
    every_path = [e["path"] for e in recorded["modules"] + recorded["files"]]
    assert not [p for p in every_path
                if "site-packages" in p or "__pycache__" in p or p.startswith(sys.base_prefix)]
    assert not [p for p in every_path if "scratch" in p or "ignored" in p]
    # Checked in this (another) process: nothing changed.
    assert InputChecker().changes(recorded, proj) == []


def test_recorder_exclude_temp_ignores_data_files_under_the_temp_dir(
    factory_project: Path,
) -> None:
    if not input_paths.under(str(factory_project), os.path.realpath(tempfile.gettempdir())):
        pytest.skip("tmp_path is not under tempfile.gettempdir() here")
    recorded = run_child(factory_project, exclude_temp=True)
    assert recorded["files"] == []
    assert len(recorded["modules"]) == 4  # modules are code: always recorded
    assert "numpy" in recorded["dists"]


# --------------------------------------------------------------------------------------------
# The recorder, in-process (cheap details)


def test_recorder_in_process_then_checker_sees_an_edit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_modules: None,
) -> None:
    root = tmp_path / "root"
    write(root / "inproc_factory.py", """
        import inproc_helper

        def build():
            return inproc_helper.VALUE
        """)
    helper = write(root / "inproc_helper.py", "VALUE = 1\n")
    data = write(root / "d.txt", "data\n")
    monkeypatch.syspath_prepend(str(root))
    recorder = InputRecorder.for_module("inproc_factory")
    assert recorder.base == root
    with recorder:
        assert importlib.import_module("inproc_factory").build() == 1
        with open(data, encoding="utf-8") as f:
            f.read()
        reads = len(recorder._reads)
        during = recorder.result()  # hashing inside the window records nothing new
        assert len(recorder._reads) == reads
    with open(data, encoding="utf-8") as f:  # after the window: not recorded
        f.read()
    recorded = recorder.result()
    assert recorded == during
    assert [m["path"] for m in recorded["modules"]] == ["inproc_factory.py", "inproc_helper.py"]
    assert [f["path"] for f in recorded["files"]] == ["d.txt"]
    checker = InputChecker()
    assert checker.changes(recorded, root) == []
    old = file_sha256(helper)
    helper.write_text("VALUE = 2\n", encoding="utf-8")  # same size
    changes = checker.changes(recorded, root)
    assert changes == [Change("module", "inproc_helper.py", old, file_sha256(helper))]
    assert str(changes[0]) == f"inproc_helper.py: sha256 {old[:8]}… → {file_sha256(helper)[:8]}…"


def test_recorder_open_modes_and_non_regular_files(tmp_path: Path) -> None:
    base = tmp_path
    read_only = write(base / "ro.txt", "r\n")
    read_write = write(base / "rw.txt", "rw\n")
    write_only = write(base / "wo.txt", "w\n")
    created = base / "created.bin"
    gone = write(base / "gone.txt", "soon gone\n")
    directory = base / "adir"
    directory.mkdir()
    recorder = InputRecorder(base)
    with recorder:
        os.close(os.open(read_only, os.O_RDONLY))
        os.close(os.open(read_write, os.O_RDWR))
        os.close(os.open(write_only, os.O_WRONLY))
        fd = os.open(created, os.O_RDWR | os.O_CREAT)  # made here: an output
        os.write(fd, b"x")
        os.close(fd)
        with open(created, "rb") as f:
            f.read()
        gone.read_text(encoding="utf-8")
        gone.unlink()  # gone before result(): a scratch file
        os.close(os.open(directory, os.O_RDONLY))
        state = write(base / "state.json", "{}")  # written, then read: an output
        state.read_text(encoding="utf-8")
        read_only.write_text("r\n", encoding="utf-8")  # read, then rewritten: still an input
        with open("/dev/null", "rb") as f:
            f.read()
        Path(os.path.relpath(read_only)).read_text(encoding="utf-8")  # a relative path
    assert [f["path"] for f in recorder.result()["files"]] == ["ro.txt", "rw.txt"]


def test_recorder_exclude_and_outside_paths(tmp_path: Path) -> None:
    base, other, cache = tmp_path / "base", tmp_path / "other", tmp_path / "cache"
    inside = write(base / "in.txt", "in\n")
    outside = write(other / "out.txt", "out\n")
    cached = write(cache / "lib.so", "binary\n")
    recorder = InputRecorder(base, exclude=[cache])
    with recorder:
        for p in (inside, outside, cached):
            p.read_bytes()
    paths = [f["path"] for f in recorder.result()["files"]]
    assert paths == sorted(["in.txt", outside.as_posix()])
    assert outside.as_posix().startswith("/")


def test_audit_hook_never_raises_and_is_inert_when_idle(tmp_path: Path) -> None:
    recorder = InputRecorder(tmp_path)
    with recorder:
        for args in [(), (object(),), (3, "r", 0), (b"/x/y", "rb", 0), (tmp_path, None, 1),
                     ("rel", 12, "weird"), (None, None, None)]:
            recording._audit_hook("open", args)
        recording._audit_hook("exec", (object(),))
    assert recorder.result()["files"] == []
    recording._audit_hook("open", (object(),))  # no recorder active


def test_recorder_sees_other_threads_and_records_once(tmp_path: Path) -> None:
    data = write(tmp_path / "t.txt", "thread\n")
    recorder = InputRecorder(tmp_path)
    with recorder:
        thread = threading.Thread(target=data.read_text)
        thread.start()
        thread.join()
    assert [f["path"] for f in recorder.result()["files"]] == ["t.txt"]
    with pytest.raises(RuntimeError, match="records once"), recorder:
        pass


def test_intent_of_modes_and_flags() -> None:
    assert recording._intent("r", 0) == (True, False)
    assert recording._intent("rb", 0) == (True, False)
    assert recording._intent("r+b", 0) == (True, False)
    assert recording._intent("w", 0) == (False, True)
    assert recording._intent("a+", 0) == (True, True)
    assert recording._intent("x", 0) == (False, True)
    assert recording._intent(None, os.O_RDONLY) == (True, False)
    assert recording._intent(None, os.O_RDWR) == (True, False)
    assert recording._intent(None, os.O_WRONLY) == (False, True)
    assert recording._intent(None, os.O_RDWR | os.O_TRUNC) == (True, True)


# --------------------------------------------------------------------------------------------
# import_root and locality


def test_import_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "irpkg" / "__init__.py", "")
    write(tmp_path / "irpkg" / "sub" / "__init__.py", "")
    mod = write(tmp_path / "irpkg" / "sub" / "mod.py", "")
    assert import_root("irpkg.sub.mod", mod) == tmp_path
    assert import_root("irpkg.sub", tmp_path / "irpkg" / "sub" / "__init__.py") == tmp_path
    assert import_root("irpkg.sub.mod", tmp_path / "irpkg" / "sub" / "mod.cpython-311.so") \
        == tmp_path
    with pytest.raises(SpecError, match=re.escape("not <sys.path dir>/irpkg/other/mod.py")):
        import_root("irpkg.other.mod", mod)
    with pytest.raises(SpecError, match=re.escape("cannot find module 'irpkg.sub.mod'")):
        import_root("irpkg.sub.mod")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_root("irpkg.sub.mod") == tmp_path
    assert "irpkg" not in sys.modules  # found without importing anything


def test_locality() -> None:
    assert not is_local_path(os.__file__)
    assert not is_local_path(np.__file__)
    assert is_local_path(input_paths.__file__)  # an editable install is local
    assert is_local_path(__file__)


def test_locality_of_prefixes_around_the_project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    proj = tmp_path / "usr" / "src" / "app"
    venv_file = write(proj / ".venv" / "pyvenv.cfg", "home = /usr\n")
    own = write(proj / "model.py", "")
    beside = write(tmp_path / "usr" / "share" / "x.txt", "")
    # A virtual environment inside the project is not local; the project is.
    monkeypatch.setattr(input_paths, "system_dirs", lambda: ((), (), (str(proj / ".venv"),)))
    assert not is_local_path(venv_file, proj)
    assert is_local_path(own, proj)
    # A project inside the interpreter's prefix (Python in /usr, project in /usr/src/app).
    monkeypatch.setattr(input_paths, "system_dirs", lambda: ((), (), (str(tmp_path / "usr"),)))
    assert is_local_path(own, proj)
    assert not is_local_path(own)
    assert not is_local_path(beside, proj)


# --------------------------------------------------------------------------------------------
# The checker


def record(base: Path, modules: list[Path], files: list[Path],
           dists: dict[str, str] | None = None) -> dict[str, Any]:
    return {"roots": [], "modules": [file_entry(p, base) for p in modules],
            "files": [file_entry(p, base) for p in files], "dists": dists or {}}


def test_checker_touch_edit_delete_revert(tmp_path: Path) -> None:
    weights = tmp_path / "weights" / "w.npy"
    weights.parent.mkdir()
    np.save(weights, np.zeros(3, dtype="float32"))
    helper = write(tmp_path / "helper.py", "X = 1\n")
    recorded = record(tmp_path, [helper], [weights])
    old_helper, old_weights = file_sha256(helper), file_sha256(weights)
    checker = InputChecker()
    assert checker.changes(recorded, tmp_path) == []
    os.utime(helper)  # touch: stat differs, content does not
    hashed = checker.files_hashed
    assert checker.changes(recorded, tmp_path) == []
    assert checker.files_hashed > hashed  # compared by content, not by stat
    helper.write_text("X = 2\n", encoding="utf-8")
    edited = checker.changes(recorded, tmp_path)
    assert edited == [Change("module", "helper.py", old_helper, file_sha256(helper))]
    assert str(edited[0]).startswith(f"helper.py: sha256 {old_helper[:8]}… → ")
    helper.write_text("X = 200\n", encoding="utf-8")  # size differs: not even hashed
    hashed = checker.files_hashed
    resized = checker.changes(recorded, tmp_path)
    assert resized == [Change("module", "helper.py", old_helper, None, 6, 8)]
    assert str(resized[0]) == "helper.py: size 6 → 8 bytes"
    assert checker.files_hashed == hashed + 1  # weights only
    weights.unlink()
    gone = checker.changes(recorded, tmp_path)
    assert gone[1] == Change("file", "weights/w.npy", old_weights, None)
    assert str(gone[1]) == "file weights/w.npy no longer exists"
    helper.write_text("X = 1\n", encoding="utf-8")
    np.save(weights, np.zeros(3, dtype="float32"))
    assert checker.changes(recorded, tmp_path) == []  # reverted
    weights.unlink()
    weights.mkdir()  # a directory where the file was
    assert [str(c) for c in checker.changes(recorded, tmp_path)] == [
        "file weights/w.npy no longer exists"]


def test_checker_relocated_base_and_absolute_paths(tmp_path: Path) -> None:
    base, outside = tmp_path / "a", write(tmp_path / "elsewhere" / "o.txt", "o\n")
    write(base / "m.py", "M = 1\n")
    recorded = record(base, [base / "m.py"], [outside])
    assert recorded["files"][0]["path"] == outside.as_posix()
    moved = tmp_path / "b"
    base.rename(moved)
    assert InputChecker().changes(recorded, moved) == []
    assert [c.kind for c in InputChecker().changes(recorded, base)] == ["module"]


def test_checker_memo_makes_the_second_check_stat_only(tmp_path: Path) -> None:
    files = [write(tmp_path / f"f{i}.txt", f"content {i}\n") for i in range(20)]
    recorded = record(tmp_path, [], files)
    checker = InputChecker(racy_window_ns=0)  # fresh files: trust their stat at once
    assert checker.changes(recorded, tmp_path) == []
    assert checker.files_hashed == 20
    assert checker.changes(recorded, tmp_path) == []
    assert checker.files_hashed == 20
    racy = InputChecker()  # files changed just now are not remembered: hashed every time
    racy.changes(recorded, tmp_path)
    racy.changes(recorded, tmp_path)
    assert racy.files_hashed == 40


def test_stat_hints_skip_hashing_in_a_new_process_until_the_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = write(tmp_path / "data.txt", "hinted\n")
    assert "mtime_ns" not in file_entry(data, tmp_path)  # too recent to trust
    monkeypatch.setattr(input_paths, "RACY_WINDOW_NS", -1)
    entry = file_entry(data, tmp_path)
    assert {"mtime_ns", "ctime_ns"} <= set(entry)
    recorded = {"modules": [], "files": [entry], "dists": {}}
    checker = InputChecker()
    assert checker.changes(recorded, tmp_path) == []
    assert checker.files_hashed == 0
    st = data.stat()

    def rewrite() -> bool:
        """Same size, mtime restored; ctime cannot be: whether it moved on (a rewrite
        within the file system's timestamp granularity does not, which is what the racy
        window is for)."""
        data.write_text("HINTED\n", encoding="utf-8")
        os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
        return data.stat().st_ctime_ns != st.st_ctime_ns

    wait_until(rewrite, "a rewrite with a new ctime")
    assert data.stat().st_mtime_ns == st.st_mtime_ns
    assert [c.kind for c in checker.changes(recorded, tmp_path)] == ["file"]


def write_dist(site_dir: Path, name: str, version: str) -> None:
    for old in site_dir.glob(f"{name}-*.dist-info"):
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    write(site_dir / f"{name}-{version}.dist-info" / "METADATA",
          f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_checker_distribution_versions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site_dir = tmp_path / "site"
    write_dist(site_dir, "mlcjit_fake_dist", "1.0")
    monkeypatch.syspath_prepend(str(site_dir))
    recorded = {"modules": [], "files": [], "dists": {"mlcjit_fake_dist": "1.0",
                                                        "numpy": np.__version__}}
    checker = InputChecker()
    assert checker.changes(recorded, tmp_path) == []
    write_dist(site_dir, "mlcjit_fake_dist", "1.1")
    assert checker.changes(recorded, tmp_path) == []  # versions are read once per process
    checker.forget()
    changed = checker.changes(recorded, tmp_path)
    assert changed == [Change("dist", "mlcjit_fake_dist", "1.0", "1.1")]
    assert str(changed[0]) == "distribution mlcjit_fake_dist 1.0 → 1.1"
    gone = {"modules": [], "files": [], "dists": {"mlcjit-surely-not-installed": "0.1"}}
    assert [str(c) for c in InputChecker().changes(gone, tmp_path)] == [
        "distribution mlcjit-surely-not-installed 0.1 is no longer installed"]


@pytest.mark.parametrize("bad", [
    [], {"modules": [], "files": []}, {"modules": [{"path": "x"}], "files": [], "dists": {}},
    {"modules": [], "files": [], "dists": {"a": 1}},
])
def test_malformed_recordings_are_value_errors(bad: Any) -> None:
    with pytest.raises(ValueError, match="recorded inputs"):
        InputChecker().changes(bad, Path())
    with pytest.raises(ValueError, match="recorded inputs"):
        inputs_digest(bad)


# --------------------------------------------------------------------------------------------
# Explicit inputs


def test_expand_files(tmp_path: Path) -> None:
    a = write(tmp_path / "weights" / "a.npy", "a")
    b = write(tmp_path / "weights" / "sub" / "b.npy", "b")
    write(tmp_path / "weights" / "c.txt", "c")
    (tmp_path / "weights" / "dir.npy").mkdir()
    assert expand_files(["weights/*.npy"], tmp_path) == [a]
    assert expand_files(["weights/**/*.npy", "weights/a.npy"], tmp_path) == [a, b]
    with pytest.raises(SpecError, match=r"'weights/\*\.bin' matches nothing in .*weights"):
        expand_files(["weights/*.bin"], tmp_path / "weights")
    with pytest.raises(SpecError, match="matches only directories"):
        expand_files(["weights/dir.*"], tmp_path)
    with pytest.raises(SpecError, match="is absolute"):
        expand_files([str(a)], tmp_path)
    with pytest.raises(SpecError, match="expected a list"):
        expand_files("weights/*.npy", tmp_path)
    with pytest.raises(SpecError, match="invalid file pattern"):
        expand_files([""], tmp_path)


def test_explicit_inputs_digest(tmp_path: Path) -> None:
    a = write(tmp_path / "m" / "w" / "a.npy", "a")
    out = write(tmp_path / "o.bin", "o")
    digest = explicit_inputs_digest([out, a], tmp_path / "m", checker=InputChecker())
    assert digest == [{"path": out.as_posix(), "sha256": file_sha256(out)},
                      {"path": "w/a.npy", "sha256": file_sha256(a)}]
    with pytest.raises(SpecError, match="cannot read input file"):
        explicit_inputs_digest([tmp_path / "nope"], tmp_path)


# --------------------------------------------------------------------------------------------
# Static import closure


def test_local_import_closure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_modules: None,
) -> None:
    write(tmp_path / "clpkg" / "__init__.py", "")
    write(tmp_path / "clpkg" / "a.py", """
        import os

        import numpy

        from . import b
        from .sub import c

        def later():
            from clpkg import lazy
        """)
    write(tmp_path / "clpkg" / "b.py", """
        raise RuntimeError("read, never run")
        from clpkg import a  # a cycle
        import clpkg.sub.c
        """)
    write(tmp_path / "clpkg" / "sub" / "__init__.py", "")
    write(tmp_path / "clpkg" / "sub" / "c.py", """
        import does_not_exist_anywhere
        import toplocal
        from .. import b
        from ..nothere import x
        from ... import too_far
        from . import *
        """)
    write(tmp_path / "clpkg" / "lazy.py", "")
    write(tmp_path / "clpkg" / "unused.py", "")
    write(tmp_path / "clpkg" / "broken.py", "def (:\n")
    write(tmp_path / "toplocal.py", "from clpkg import broken\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    closure = local_import_closure("clpkg.a")
    assert [p.relative_to(tmp_path).as_posix() for p in closure] == [
        "clpkg/__init__.py", "clpkg/a.py", "clpkg/b.py", "clpkg/broken.py", "clpkg/lazy.py",
        "clpkg/sub/__init__.py", "clpkg/sub/c.py", "toplocal.py"]
    assert "clpkg.b" not in sys.modules
    assert "clpkg.a" not in sys.modules
    with pytest.raises(SpecError, match=re.escape("cannot find module 'clpkg.nope'")):
        local_import_closure("clpkg.nope")


# --------------------------------------------------------------------------------------------
# The digest naming a recorded state

HEX = "0123456789abcdef"
entries = st.dictionaries(st.text("abc/._", min_size=1, max_size=8),
                          st.text(HEX, min_size=64, max_size=64), max_size=5)


@settings(database=None, max_examples=60, deadline=None)
@given(modules=entries, files=entries,
       dists=st.dictionaries(st.text("abcxyz-", min_size=1, max_size=6),
                             st.text("0123456789.", min_size=1, max_size=5), max_size=4),
       data=st.data())
def test_inputs_digest_ignores_order_sizes_and_hints(
    modules: dict[str, str], files: dict[str, str], dists: dict[str, str], data: st.DataObject,
) -> None:
    def as_entries(d: dict[str, str]) -> list[dict[str, Any]]:
        return [{"path": p, "sha256": h, "size": len(p)} for p, h in d.items()]

    recorded = {"roots": ["x"], "modules": as_entries(modules), "files": as_entries(files),
                "dists": dists}
    shuffled = {
        "roots": [],
        "modules": [{**e, "mtime_ns": 1, "size": 0}
                    for e in data.draw(st.permutations(as_entries(modules)))],
        "files": data.draw(st.permutations(as_entries(files))),
        "dists": dict(reversed(list(dists.items()))),
    }
    assert inputs_digest(recorded) == inputs_digest(shuffled)
    if files:
        path = next(iter(files))
        changed = {**recorded, "files": as_entries({**files, path: "f" * 64
                                                    if files[path] != "f" * 64 else "e" * 64})}
        assert inputs_digest(changed) != inputs_digest(recorded)
    if files or modules:  # a file is not a module
        swapped = {**recorded, "modules": recorded["files"], "files": recorded["modules"]}
        if modules != files:
            assert inputs_digest(swapped) != inputs_digest(recorded)
