"""A library that does not match its manifest is never loaded: ON recompiles it, READONLY
fails saying it is corrupt. Every kind of corrupt entry and crash leftover is detected,
never loaded, and handled per policy (READONLY: an error that says what is wrong; ON: set
aside and recompiled once), docs/explanation/reliability.md. Orphaned staging directories and stale
lock files left by a crash are cleaned up or ignored.

Each test starts from a copy of one warm cache (:func:`conftest.warm_template`, compiled
once per test session): the warm-up run proved nothing here (tests/test_policies.py proves
that a cold ON run compiles once and passes). The plugin runs in this process, and so does
the engine where a test drives it directly (a new engine per request: a new run that reads
the entry afresh); compiles run in processes of their own."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from conftest import Engine, Project, accounting
from pytest_mlcjit import JIT, CompiledModel, Policy, Settings, TVMModel
from pytest_mlcjit.errors import CacheMissError
from pytest_mlcjit.key import file_sha256

SPEC = TVMModel("tinymodel:build", config={"hidden": 4})


def _jit(project: Project, policy: str = "ON", *, lock_timeout: float | None = None) -> JIT:
    """A new engine (a new run) in this process; the project dir must be on sys.path."""
    return JIT(Settings(cache_dir=project.cache, policy=Policy.parse(policy),
                        lock_timeout=lock_timeout))


def _check_numerics(model: CompiledModel) -> None:
    """Load and run the library: proof that it is whole."""
    x = np.full((2, 8), 0.25, dtype="float32")
    w, b = model.params["fc.weight"], model.params["fc.bias"]
    np.testing.assert_allclose(model.run("forward", x), np.maximum(x @ w.T + b, 0),
                               rtol=1e-5, atol=1e-5)


def _warm(project: Project, template: Path) -> None:
    project.write_tests([{"hidden": 4}], per_config=2)
    project.warm(template)
    assert len(project.libraries()) == 1


def _flip_byte(project: Project) -> None:
    (lib,) = project.libraries()
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))


def _truncate(project: Project) -> None:
    (lib,) = project.libraries()
    lib.write_bytes(lib.read_bytes()[:100])


def _garbage_manifest(project: Project) -> None:
    (manifest,) = (project.cache / "tvm").glob("*.manifest.json")
    manifest.write_text("{not json")


def _other_checksum(project: Project) -> None:
    (path,) = (project.cache / "tvm").glob("*.manifest.json")
    data = json.loads(path.read_text())
    data["sha256"] = "0" * 64
    path.write_text(json.dumps(data))


CORRUPTIONS = {"flipped-byte": _flip_byte, "truncated": _truncate,
               "garbage-manifest": _garbage_manifest, "other-checksum": _other_checksum}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_readonly_refuses_a_corrupt_library(project: Project, warm_template: Path,
                                            corrupt: object) -> None:
    _warm(project, warm_template)
    corrupt(project)  # type: ignore[operator]
    result = project.run("--mlc-device=cpu", "--mlc-jit-policy=READONLY")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["CacheMissError: the cached library is corrupt for key *"])
    assert project.compiles() == []


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_on_quarantines_and_recompiles(project: Project, warm_template: Path,
                                      corrupt: object) -> None:
    _warm(project, warm_template)
    corrupt(project)  # type: ignore[operator]
    result = project.run("--mlc-device=cpu")
    result.assert_outcomes(passed=2)
    assert len(project.compiles()) == 1, "recompiled exactly once"
    # The summary: the first request compiled, the second hit; one entry was corrupt.
    assert accounting(result) == {"requests": 2, "compiled": 1, "hit": 1}
    result.stdout.fnmatch_lines(["2 requests: 1 hit, 1 compiled; *, 1 corrupt"])
    quarantined = list((project.cache / ".mlcjit" / "quarantine").glob("*/REASON"))
    assert len(quarantined) == 1
    assert "corrupt" in quarantined[0].read_text()
    assert len(project.libraries()) == 1
    # The new entry is whole and verified: a READONLY run now passes.
    project.run("--mlc-device=cpu", "--mlc-jit-policy=READONLY").assert_outcomes(passed=2)
    assert len(project.compiles()) == 1


def test_missing_library_with_manifest(project: Project, warm_template: Path) -> None:
    _warm(project, warm_template)
    project.libraries()[0].unlink()
    result = project.run("--mlc-device=cpu", "--mlc-jit-policy=READONLY")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*is missing although its manifest exists*"])
    assert project.compiles() == []
    project.run("--mlc-device=cpu").assert_outcomes(passed=2)
    assert len(project.compiles()) == 1


# -- every kind of corrupt entry, per policy (reliability suite) -------------------------
Corrupt = Callable[[Path, Path], None]


def _no_manifest(library: Path, manifest: Path) -> None:
    manifest.unlink()  # a crash between the library's and the manifest's rename


def _binary_manifest(library: Path, manifest: Path) -> None:
    manifest.write_bytes(b"\xff\xfe\x00\x80 not text")


def _empty_manifest(library: Path, manifest: Path) -> None:
    manifest.write_bytes(b"")


def _list_manifest(library: Path, manifest: Path) -> None:
    manifest.write_text("[1, 2, 3]")


def _mistyped_manifest(library: Path, manifest: Path) -> None:
    data = json.loads(manifest.read_text())
    data["size"] = str(data["size"])
    manifest.write_text(json.dumps(data))


def _manifest_of_another_key(library: Path, manifest: Path) -> None:
    data = json.loads(manifest.read_text())
    data["digest"] = "f" * 64
    manifest.write_text(json.dumps(data))


def _manifest_is_a_directory(library: Path, manifest: Path) -> None:
    manifest.unlink()
    manifest.mkdir()


def _library_is_a_directory(library: Path, manifest: Path) -> None:
    library.unlink()
    library.mkdir()


def _library_emptied(library: Path, manifest: Path) -> None:
    library.write_bytes(b"")


#: name: (how to corrupt, what READONLY says, whether ON sets the entry aside)
CASES: dict[str, tuple[Corrupt, str, bool]] = {
    "manifest-missing": (_no_manifest, "no cached library for key", False),
    "manifest-not-utf8": (_binary_manifest, "is not valid JSON", True),
    "manifest-empty": (_empty_manifest, "is not valid JSON", True),
    "manifest-json-list": (_list_manifest, "lacks sha256/size/digest", True),
    "manifest-size-a-string": (_mistyped_manifest, "has an invalid sha256", True),
    "manifest-of-another-key": (_manifest_of_another_key, f"is for key {'f' * 64}, not", True),
    "manifest-a-directory": (_manifest_is_a_directory, "cannot be read (Is a directory)", True),
    "library-a-directory": (_library_is_a_directory, "is not a regular file", True),
    "library-emptied": (_library_emptied, "is corrupt: 0 bytes, manifest says", True),
}


def _entry(project: Project) -> tuple[Path, Path]:
    (library,) = (project.cache / "tvm").glob("*.so")
    return library, library.with_name(library.name[:-3] + ".manifest.json")


@pytest.mark.parametrize("case", CASES)
def test_corrupt_entry_per_policy(project: Project, warm_template: Path,
                                  monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    corrupt, says, set_aside = CASES[case]
    project.warm(warm_template)
    monkeypatch.syspath_prepend(str(project.pytester.path))
    library, manifest = _entry(project)
    corrupt(library, manifest)

    # A new engine per request: each reads the entry afresh, as a new run would.
    with pytest.raises(CacheMissError) as readonly:
        _jit(project, "READONLY").compile(SPEC, "cpu")
    message = str(readonly.value)
    assert says in message, message
    if set_aside:
        assert "the cached library is corrupt" in message, message
    assert project.compiles() == [], "READONLY compiles nothing"
    on = _jit(project, "ON").compile(SPEC, "cpu")
    assert not on.hit
    assert on.manifest["sha256"] == file_sha256(on.path)
    assert len(project.compiles()) == 1, "ON recompiled once"
    reasons = list((project.cache / ".mlcjit" / "quarantine").glob("*/REASON"))
    if set_aside:
        (reason,) = reasons
        assert says in reason.read_text()
    else:
        assert reasons == [], "a missing manifest is a miss, not corruption"
    again = _jit(project, "READONLY").compile(SPEC, "cpu")
    assert again.hit
    assert again.path == on.path
    _check_numerics(again)
    assert len(project.compiles()) == 1
    assert [p.name for p in project.libraries()] == [on.path.name]


def _make(path: Path, *, age_s: float = 0.0) -> Path:
    path.mkdir(parents=True)
    (path / "lib.so").write_bytes(b"\x7fELF partial")
    if age_s:
        then = time.time() - age_s
        os.utime(path, (then, then))
    return path


def test_crash_leftovers_are_cleaned_or_ignored(engine: Engine, project: Project,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Stray staging dirs and stale lock files, as a crash leaves them, then one compile."""
    monkeypatch.syspath_prepend(str(project.pytester.path))
    host = socket.gethostname()
    control = project.cache / ".mlcjit"
    staging = control / "staging"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    zombie = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    zombie.kill()  # not reaped until the end: a zombie, which counts as dead
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    old = 25 * 3600.0  # older than the 24 h limit
    try:
        d = "0" * 32
        # None has the lock file (<name>.lock, held by a live owner) that every staging
        # dir is made with: whatever its name, pid, host or age says, nothing holds it, so
        # all go (a live owner's is kept: tests/test_isolation.py).
        made = {
            _make(staging / f"{d}.{host}.{dead.pid}.dead0001"),
            _make(staging / f"{d}.{host}.{zombie.pid}.zomb0001"),
            _make(staging / f"{d}.other-host.example.{os.getpid()}.old00001", age_s=old),
            _make(staging / "unparsable-stray", age_s=old),
            _make(staging / f"{d}.{host}.{live.pid}.live0001"),  # another live process
            _make(staging / f"{d}.{host}.{os.getpid()}.self0001"),  # the engine's own pid
            _make(staging / f"{d}.other-host.example.1.young001"),
            _make(staging / "unparsable-but-young"),
        }
        assert set(staging.iterdir()) == made
        # Stale lock files: a lock file with junk in it and an owner record naming a dead
        # process. The lock is the kernel's flock, not the file: nobody holds it.
        (locks := control / "locks").mkdir(parents=True)
        digest = _jit(project).request(SPEC, "cpu").digest
        (locks / f"{digest}.lock").write_text("pid 1 holds this forever\n")
        (locks / f"{digest}.owner").write_text(json.dumps(
            {"pid": dead.pid, "host": host, "since": time.time() - 3600}))
        on = _jit(project, lock_timeout=30).compile(SPEC, "cpu")
        assert not on.hit
        assert on.manifest["sha256"] == file_sha256(on.path)
        assert len(project.compiles()) == 1
        left = set(staging.iterdir())
        assert left == set(), f"removed {made - left}, kept {left}"
        assert list(locks.glob("*.lock")) == [locks / f"{digest}.lock"], \
            "the compile took the lock whose file held junk"
        assert not (locks / f"{digest}.owner").exists(), "the holder's record is gone again"
        assert engine.lock_is_free(digest)
        assert len(engine.check_cache(staging=False).manifests) == 1
    finally:
        live.kill()
        live.wait()
        zombie.wait()
