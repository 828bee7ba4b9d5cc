"""A library that does not match its manifest is never loaded: ON recompiles it, READONLY
fails saying it is corrupt. Beyond that (the reliability suite, docs/reliability.md): every
kind of corrupt entry and crash leftover is detected, never loaded, and handled per policy
(READONLY: an error that says what is wrong; ON: set aside and recompiled once). Orphaned
staging directories and stale lock files left by a crash are cleaned up or ignored.

Each test starts from a copy of one warm cache (:func:`conftest.warm_template`, compiled
once per test process): the warm-up run proved nothing here (tests/test_policies.py proves
that a cold ON run compiles once and passes)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Engine, Project, accounting

reliability = pytest.mark.reliability


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
    result = project.run_inprocess("--mlc-device=cpu", "--mlc-jit-policy=READONLY")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["CacheMissError: the cached library is corrupt for key *"])
    assert project.compiles() == []


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_on_quarantines_and_recompiles(project: Project, warm_template: Path,
                                      corrupt: object) -> None:
    _warm(project, warm_template)
    corrupt(project)  # type: ignore[operator]
    result = project.run("--mlc-device=cpu", "-n", "2")
    result.assert_outcomes(passed=2)
    assert len(project.compiles()) == 1, "recompiled exactly once"
    # The summary: one compile (for a request, or ahead of time under -n 2), one corrupt.
    counts = accounting(result)
    assert counts["requests"] == 2, counts
    assert "failed" not in counts, counts
    line = next(line for line in result.outlines if line.startswith("2 requests: "))
    ahead = "; 1 library compiled ahead of time, " in line
    assert counts.get("compiled", 0) + ahead == 1, line
    assert line.endswith(", 1 corrupt"), line
    quarantined = list((project.cache / ".mlcjit" / "quarantine").glob("*/REASON"))
    assert len(quarantined) == 1
    assert "corrupt" in quarantined[0].read_text()
    # The new entry is whole and verified: a READONLY run now passes.
    project.run("--mlc-device=cpu", "--mlc-jit-policy=READONLY").assert_outcomes(passed=2)


def test_missing_library_with_manifest(project: Project, warm_template: Path) -> None:
    _warm(project, warm_template)
    project.libraries()[0].unlink()
    result = project.run_inprocess("--mlc-device=cpu", "--mlc-jit-policy=READONLY")
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


@reliability
@pytest.mark.parametrize("case", CASES)
def test_corrupt_entry_per_policy(engine: Engine, project: Project, warm_template: Path,
                                  case: str) -> None:
    corrupt, says, set_aside = CASES[case]
    engine.warm(warm_template)
    library, manifest = _entry(project)
    corrupt(library, manifest)

    one = {"config": {"hidden": 4}}
    # A new engine per request: each reads the entry afresh, as a new process would.
    readonly, on, again = engine.run([{**one, "policy": "READONLY"}, {**one, "policy": "ON"},
                                      {**one, "policy": "READONLY"}], fresh=True,
                                     check=case == "manifest-missing")
    assert not readonly["ok"], readonly
    assert readonly["error"] == "CacheMissError", readonly
    assert says in readonly["message"], readonly["message"]
    if set_aside:
        assert "the cached library is corrupt" in readonly["message"]
    assert on["ok"], on
    assert not on["hit"], on
    assert on["sha256"] == on["manifest_sha256"], on
    assert len(project.compiles()) == 1, "READONLY compiled nothing; ON recompiled once"
    reasons = list((project.cache / ".mlcjit" / "quarantine").glob("*/REASON"))
    if set_aside:
        (reason,) = reasons
        assert says in reason.read_text()
    else:
        assert reasons == [], "a missing manifest is a miss, not corruption"
    assert again["hit"], again
    assert again.get("checked", False) == (case == "manifest-missing"), again


def _make(path: Path, *, age_s: float = 0.0) -> Path:
    path.mkdir(parents=True)
    (path / "lib.so").write_bytes(b"\x7fELF partial")
    if age_s:
        then = time.time() - age_s
        os.utime(path, (then, then))
    return path


@reliability
def test_crash_leftovers_are_cleaned_or_ignored(engine: Engine, project: Project) -> None:
    """Stray staging dirs and stale lock files, as a crash leaves them, then one compile."""
    host = socket.gethostname()
    control = project.cache / ".mlcjit"
    staging = control / "staging"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    zombie = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    zombie.kill()  # not reaped until the end: a zombie, which counts as dead
    old = 25 * 3600.0  # older than the 24 h limit
    try:
        d = "0" * 32
        # None has the lock file (<name>.lock, held by a live owner) that every staging
        # dir is made with: whatever its name, pid, host or age says, nothing holds it, so
        # all go (a live owner's is kept: tests/test_isolation.py).
        removed = {
            _make(staging / f"{d}.{host}.{dead.pid}.dead0001"),
            _make(staging / f"{d}.{host}.{zombie.pid}.zomb0001"),
            _make(staging / f"{d}.other-host.example.{os.getpid()}.old00001", age_s=old),
            _make(staging / "unparsable-stray", age_s=old),
            _make(staging / f"{d}.{host}.{os.getpid()}.live0001"),
            _make(staging / f"{d}.other-host.example.1.young001"),
            _make(staging / "unparsable-but-young"),
        }
        kept: set[Path] = set()
        # Stale lock files: a lock file with junk in it and an owner record naming a dead
        # process. The lock is the kernel's flock, not the file: nobody holds it.
        (locks := control / "locks").mkdir(parents=True)
        (result,) = engine.run([{"hidden": 4}], policy="READONLY")  # learn the digest
        digest = result["message"].split("for key ")[1].split()[0]
        (locks / f"{digest}.lock").write_text("pid 1 holds this forever\n")
        (locks / f"{digest}.owner").write_text(json.dumps(
            {"pid": dead.pid, "host": host, "since": time.time() - 3600}))
        (on,) = engine.run([{"hidden": 4}], lock_timeout=30)
        assert on["ok"], on
        assert not on["hit"]
        assert on["sha256"] == on["manifest_sha256"]
        assert len(project.compiles()) == 1
        left = set(staging.iterdir())
        assert left == kept, f"removed {removed - left}, kept {left}"
        assert not (locks / f"{digest}.owner").exists(), "the holder's record is gone again"
        assert engine.lock_is_free(digest)
    finally:
        zombie.wait()
