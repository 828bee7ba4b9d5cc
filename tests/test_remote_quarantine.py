"""Never share a broken library (issue 21, item 4): a library is loaded in a process of its
own, and its recorded functions looked up, before it is uploaded; one that fails is not
uploaded, and that write not made is counted, said, and fails a run with
``--mlc-jit-remote-required``. A remote entry whose library does not load, or whose bytes
are not the ones its manifest names, is refused (READONLY fails with that cause in the
test's own error), set aside on the remote (``quarantine/``) by a job that writes, and
rebuilt and published in its place under ON.

The remotes are directories (``file://``): what they hold is read from the filesystem,
never from the plugin's account. Compiles are counted by the factory. The broken
libraries are real: a factory whose toolchain step writes a truncated library (as a
linker killed mid-write, or a full disk, leaves one), a library cut in half put on the
remote by a writer that does not check (an older version, another tool), a blob changed
behind the remote's back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from test_remote_tier import machine, publish_cache, run
from test_tiered_store import FAST, Entry, compile_into, fetch

from conftest import Project
from pytest_mlcjit.cache.history import read_runs
from pytest_mlcjit.cache.store import Stores
from pytest_mlcjit.cache.store.interface import Missing
from pytest_mlcjit.cache.store.remote import open_remote
from pytest_mlcjit.compiler.launch import Builds

#: A factory whose compile exports a library cut in half: the factory wraps tvm.compile in
#: the compile process (its own process: nothing else sees the wrapper), so the harness's
#: export writes the whole library, then the cut. The model is tinymodel's.
BROKEN_MODEL = '''
import os

import tvm

from tinymodel import build as tiny


class _CutInHalf:
    def __init__(self, executable):
        self.executable = executable

    def export_library(self, path, *args, **kwargs):
        self.executable.export_library(path, *args, **kwargs)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


def build(hidden=4):
    compile_ = tvm.compile
    tvm.compile = lambda *args, **kwargs: _CutInHalf(compile_(*args, **kwargs))
    return tiny(hidden)
'''

#: A test that uses the broken library without loading it (it passes).
BROKEN_TEST = '''
import pytest
from pytest_mlcjit import TVMModel


@pytest.mark.mlc_model(TVMModel("brokenmodel:build", config={"hidden": 4}))
def test_compiled(compiled_model):
    assert compiled_model.path.stat().st_size > 0
'''


def objects(shared: Path, prefix: str) -> list[Path]:
    """What the remote holds under ``prefix`` (``entries``, ``blobs``, ``quarantine``)."""
    return sorted(p for p in (shared / prefix).rglob("*") if p.is_file()) \
        if (shared / prefix).is_dir() else []


def own_error(result: pytest.RunResult) -> str:
    """The text of the one failed test's own report (its error, not the summary)."""
    [failed] = [r for r in result.reprec.getreports("pytest_runtest_logreport")  # type: ignore[attr-defined]
                if r.failed]
    text: str = failed.longreprtext
    return text


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- before an upload -----------------------------------------------------------------------
def test_a_library_that_does_not_load_is_never_uploaded(
        project: Project, shared: Path, tmp_path: Path) -> None:
    """A factory whose library does not load (cut in half after export): the test passes
    (it does not load it), the library is not uploaded (no manifest, no blob on the
    remote), and the write not made is counted and said, in the summary and the JSON
    report, with the load check's reason; with --mlc-jit-remote-required it fails the run
    (exit status 1), the test passing. (Without it, a run with writes not made passes:
    test_remote_tier.py, the unanswering remote.)"""
    project.pytester.makepyfile(brokenmodel=BROKEN_MODEL, test_broken=BROKEN_TEST)
    report = tmp_path / "report.json"
    a = machine(project, "a")
    ret, out = run(a, "--mlc-jit-remote-required", f"--mlc-jit-report={report}")
    assert ret == 1, out
    assert "1 passed" in out, out
    assert len(project.compiles()) == 1
    assert objects(shared, "entries") == objects(shared, "blobs") == [], "it was shared"
    assert "1 write not made" in out, out
    assert "failed its load check (loading it crashed the checking process" in out, out
    assert ("error: 1 write to the remote not made, and --mlc-jit-remote-required is set: "
            "the run fails") in out, out
    data = json.loads(report.read_text())
    assert data["exitstatus"] == 1
    assert data["remote"]["uploads"] == 0
    assert data["remote"]["uploads_failed"] == 1
    [why] = data["remote"]["upload_failures"]
    assert "not uploaded: its library failed its load check" in why, why
    [history] = read_runs(a.cache)  # the run's line in the cache's history
    assert history["remote"]["uploads_failed"] == 1


def test_the_load_check_finds_a_missing_function_and_checks_what_it_can_of_cuda(
        warm_template: Path, tmp_path: Path) -> None:
    """The check itself, on real libraries: the warm template's library passes with its
    recorded functions and fails with one it lacks; cut in half, it crashes the checking
    process (not this one) and fails. A library cross-compiled for CUDA (no CUDA runtime
    here: TVM cannot load its device code) passes on its host code and functions, and
    says that its device code was not loaded. A ``.tar`` is checked as an archive."""
    from pytest_mlcjit.compiler.loadcheck import LoadChecker

    check = LoadChecker(Builds())
    [path] = (warm_template / "cache" / "tvm").glob("*.manifest.json")
    manifest: dict[str, Any] = json.loads(path.read_text())
    library = path.with_name(manifest["library"])
    assert manifest["functions"] == ["forward"]
    assert check(library, manifest).ok
    missing = check(library, {**manifest, "functions": ["forward", "decode"]})
    assert not missing.ok
    assert missing.at_fault
    assert missing.detail == "it lacks the function(s) its manifest records: decode"
    cut = tmp_path / "cut.so"
    cut.write_bytes(library.read_bytes()[:library.stat().st_size // 2])
    broken = check(cut, manifest)
    assert not broken.ok
    assert broken.at_fault, broken

    import tvm
    from tvm.relax.frontend import nn

    class Tiny(nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            self.fc = nn.Linear(8, 4)

        def forward(self, x: Any) -> Any:
            return nn.relu(self.fc(x))

    mod, _ = Tiny().export_tvm({"forward": {"x": nn.spec.Tensor((2, 8), "float32")}})
    cuda = tvm.target.Target({"kind": "cuda", "arch": "sm_80"}, host="llvm")
    tvm.compile(mod, target=cuda).export_library(str(tmp_path / "cuda.so"))
    checked = check(tmp_path / "cuda.so", {"functions": ["forward"]})
    assert checked.ok, checked
    assert "cuda device code is present but not loaded" in checked.detail

    (tmp_path / "lib.tar").write_bytes(b"not an archive")
    assert not check(tmp_path / "lib.tar", {}).ok


def test_a_load_check_that_cannot_start_is_no_fault_of_the_library(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A check that never got to the library is no fault of the library (which a
    download's check would set aside on the remote): one whose process had not started
    checking when its time was up (a limit of 0 s: stopped at once, still starting), and
    one whose process cannot be started (the interpreter is not there: the real error of
    starting it, with ``sys.executable`` pointed at a missing file). Each says it could
    not run, and raises nothing; through the storage interface, the upload it precedes is
    a write not made with that reason, and the library is published locally all the
    same."""
    from pytest_mlcjit.compiler.loadcheck import LoadChecker

    late = LoadChecker(Builds(warm=False), timeout=0)(tmp_path / "library.so", {})
    assert (late.ok, late.at_fault) == (False, False), late
    assert late.detail.startswith("the load check could not run: it had not started "), late
    check = LoadChecker(Builds(warm=False))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    result = check(tmp_path / "library.so", {"functions": ["forward"]})
    assert (result.ok, result.at_fault) == (False, False), result
    assert result.detail.startswith("the load check could not run: "), result

    remote = tmp_path / "remote"
    remote.mkdir()
    stores = Stores(remote=remote.as_uri(), remote_options=FAST, load_check=check)
    hit = compile_into(stores.get(tmp_path / "cache", writes=True), Entry("x"), b"library")
    assert hit.paths.library.read_bytes() == b"library"
    stats = stores.remote_stats
    assert stats is not None
    assert (stats.uploads, stats.uploads_failed) == (0, 1)
    [why] = stats.upload_failures
    assert "not uploaded: the load check could not run" in why, why
    assert objects(remote, "entries") == []
    stores.close()


# -- after a download -----------------------------------------------------------------------
def plant(project: Project, warm_template: Path, shared: Path, how: str) -> Path:
    """Put the warm template's entry on the remote, broken ``how``: ``load`` (its library
    cut in half, published by a writer that does not check: an older version, another
    tool; its manifest names the cut bytes), or ``digest`` (the good library published,
    then its blob's bytes changed behind the remote's back, same size). The manifest's
    path on the remote."""
    seeder = machine(project, "seeder")
    seeder.warm(warm_template)
    [path] = (seeder.cache / "tvm").glob("*.manifest.json")
    manifest = json.loads(path.read_text())
    library = path.with_name(manifest["library"])
    if how == "load":
        data = library.read_bytes()[:library.stat().st_size // 2]
        library.chmod(0o644)
        library.write_bytes(data)
        manifest.update(sha256=sha256(library), size=len(data))
        body = {k: v for k, v in manifest.items() if k not in ("log", "remote")}
        assert open_remote(shared.as_uri()).upload(manifest["key_digest"], manifest["digest"],
                                                   library, body)
    else:
        assert publish_cache(seeder.cache, shared.as_uri()) == 1
        blob = shared / "blobs" / manifest["sha256"]
        blob.chmod(0o644)
        changed = bytearray(blob.read_bytes())
        changed[len(changed) // 2] ^= 0xFF
        blob.write_bytes(bytes(changed))
    shutil.rmtree(seeder.cache)
    return shared / "entries" / str(manifest["key_digest"]) / f"{manifest['digest']}.json"


#: How the remote entry is broken (:func:`plant`), and the cause its refusal names.
BROKEN = {"load": "its library failed its load check (loading it crashed the checking process",
          "digest": "is corrupt: got"}


@pytest.mark.parametrize("how", list(BROKEN))
def test_a_remote_entry_that_does_not_load_is_refused_set_aside_and_rebuilt(
        project: Project, warm_template: Path, shared: Path, tmp_path: Path,
        how: str) -> None:
    """READONLY fails with the refusal in the test's own error (the cause and the fix, not
    "no cached library"), and writes nothing to the remote. ON refuses it too, sets the
    entry aside (the remote's quarantine/ holds its manifest and why), compiles, and
    publishes the rebuilt library in its place, load-checked. A third machine then reads
    the rebuilt entry without checking it again (its uploader's check is recorded)."""
    project.write_tests([{"hidden": 4}])
    cause = BROKEN[how]
    bad = plant(project, warm_template, shared, how)
    planted = bad.read_bytes()

    result = machine(project, "reader").run("--mlc-device=cpu", "-p", "no:randomly",
                                            "--mlc-jit-policy=READONLY")
    assert result.ret == 1, result.stdout.str()
    error = own_error(result)
    assert "was refused" in error, error
    assert cause in error, error
    assert "--mlc-jit-policy=ON" in error, error
    assert "warm the cache first" not in error, error
    assert bad.read_bytes() == planted, "a read-only job wrote to the remote"
    assert objects(shared, "quarantine") == []

    report = tmp_path / "report.json"
    builder = machine(project, "builder")
    ret, out = run(builder, f"--mlc-jit-report={report}")
    assert ret == 0, out
    assert len(project.compiles()) == 1, "ON did not rebuild it"
    [aside] = objects(shared, "quarantine")
    record = json.loads(aside.read_text())
    assert cause in record["why"], record
    rebuilt = json.loads(bad.read_text())
    [library] = builder.libraries()
    assert rebuilt["sha256"] == sha256(library) == sha256(shared / "blobs" / rebuilt["sha256"])
    assert rebuilt["load_check"].startswith("loaded, 1 recorded function(s) found")
    remote = json.loads(report.read_text())["remote"]
    assert remote["quarantined"] == 1
    assert remote["downloads_refused"] == 1
    assert remote["uploads"] == 1

    ret, out = run(machine(project, "third"), "--mlc-jit-policy=READONLY",
                   f"--mlc-jit-report={report}")
    assert ret == 0, out
    assert len(project.compiles()) == 1
    remote = json.loads(report.read_text())["remote"]
    assert remote["downloads"] == 1
    assert remote["load_checks"] == 0, "a checked upload was checked again on download"


def test_a_signing_writer_sets_aside_an_unsigned_entry_a_reader_leaves_it(
        tmp_path: Path) -> None:
    """Through the storage interface (test_tiered_store.py's requests and random-bytes
    libraries: nothing is loaded): an unsigned entry planted on a directory remote is
    refused by a job whose uploads are signed. As a read-only job (READONLY's store, or
    the ``read`` mode) it leaves the entry in place and its miss says why; as a job that
    writes it sets the entry aside (quarantine/) so that its own signed upload can take
    the entry's place, and says so."""
    remote = tmp_path / "remote"
    remote.mkdir()
    query = Entry("planted")
    compile_into(Stores(remote=remote.as_uri(), remote_options=FAST).get(
        tmp_path / "planter", writes=True), query, b"unsigned library")
    manifest = remote / "entries" / query.digest / f"{query.digest}.json"
    assert manifest.is_file()
    signed = dataclasses.replace(FAST, signing_key=b"trusted-branch-secret")

    for name, writes, mode in (("readonly", False, "readwrite"), ("reader", True, "read")):
        stores = Stores(remote=remote.as_uri(), remote_options=signed, remote_mode=mode)
        found = fetch(stores.get(tmp_path / name, writes=writes), query)
        assert isinstance(found, Missing)
        assert "is unsigned" in str(found.refused), found
        stores.close()
        assert manifest.is_file(), f"a read-only job ({name}) set it aside"
    assert objects(remote, "quarantine") == []

    stores = Stores(remote=remote.as_uri(), remote_options=signed)
    found = fetch(stores.get(tmp_path / "writer", writes=True), query)
    assert isinstance(found, Missing)
    assert not manifest.exists()
    [aside] = objects(remote, "quarantine")
    assert "is unsigned" in json.loads(aside.read_text())["why"]
    stats = stores.remote_stats
    assert stats is not None
    assert stats.quarantined == 1
    assert any(w.startswith("set aside the refused remote entry") for w in stats.warnings)
    stores.close()
