"""A library that does not match its manifest is never loaded: ON recompiles it, READONLY
fails saying it is corrupt."""

from __future__ import annotations

import json

import pytest

from conftest import Project


def _warm(project: Project) -> None:
    project.write_tests([{"hidden": 4}], per_config=2)
    project.run("--mlc-device=cpu").assert_outcomes(passed=2)
    assert len(project.compiles()) == 1


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
def test_readonly_refuses_a_corrupt_library(project: Project, corrupt: object) -> None:
    _warm(project)
    corrupt(project)  # type: ignore[operator]
    result = project.run("--mlc-device=cpu", "--mlc-jit-policy=READONLY")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["CacheMissError: the cached library is corrupt for key *"])
    assert len(project.compiles()) == 1


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_on_quarantines_and_recompiles(project: Project, corrupt: object) -> None:
    _warm(project)
    corrupt(project)  # type: ignore[operator]
    result = project.run("--mlc-device=cpu", "-n", "2")
    result.assert_outcomes(passed=2)
    assert len(project.compiles()) == 2, "recompiled exactly once"
    result.stdout.fnmatch_lines(["*1 compiled*1 corrupt*"])
    quarantined = list((project.cache / ".mlcjit" / "quarantine").glob("*/REASON"))
    assert len(quarantined) == 1
    assert "corrupt" in quarantined[0].read_text()
    # The new entry is whole and verified: a READONLY run now passes.
    project.run("--mlc-device=cpu", "--mlc-jit-policy=READONLY").assert_outcomes(passed=2)


def test_missing_library_with_manifest(project: Project) -> None:
    _warm(project)
    project.libraries()[0].unlink()
    result = project.run("--mlc-device=cpu", "--mlc-jit-policy=READONLY")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*is missing although its manifest exists*"])
    project.run("--mlc-device=cpu").assert_outcomes(passed=2)
    assert len(project.compiles()) == 2
