"""Corruption and crash leftovers beyond tests/test_corruption.py: each is detected, never
loaded, and handled per policy (READONLY: an error that says what is wrong; ON: set aside
and recompiled once). Orphaned staging directories and stale lock files left by a crash
are cleaned up or ignored."""

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

from conftest import Engine, Project

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
        removed = {
            _make(staging / f"{d}.{host}.{dead.pid}.dead0001"),
            _make(staging / f"{d}.{host}.{zombie.pid}.zomb0001"),
            _make(staging / f"{d}.other-host.example.{os.getpid()}.old00001", age_s=old),
            _make(staging / "unparsable-stray", age_s=old),
        }
        kept = {
            _make(staging / f"{d}.{host}.{os.getpid()}.live0001"),  # this process: alive
            _make(staging / f"{d}.other-host.example.1.young001"),  # cannot tell: too young
            _make(staging / "unparsable-but-young"),
        }
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
