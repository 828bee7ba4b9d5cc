"""A full disk and an unwritable cache: a clear error, no partial entry, nothing lost
(the reliability suite, docs/reliability.md).

The full disk is real where this process may mount a small tmpfs (root, with mount
rights); the same checks also run everywhere with ENOSPC injected by the engine's
test-only fault points (``MLCJIT_TEST_ENOSPC``, see pytest_mlcjit/fsutil.py)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Engine, Project

pytestmark = pytest.mark.reliability


def _can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount") is not None


@contextlib.contextmanager
def _mounted(target: Path, *args: str) -> Iterator[None]:
    """``mount ARGS TARGET`` for the block, or skip the test where mounting is not allowed."""
    if not _can_mount():
        pytest.skip("needs root and mount(8) to create a small filesystem")
    target.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount here: {proc.stderr.strip()}")
    try:
        yield
    finally:
        if subprocess.run(["umount", str(target)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


def _fill(root: Path, leave: int) -> None:
    """Fill ``root``'s filesystem, then free ``leave`` bytes again."""
    ballast = root / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    os.truncate(ballast, max(0, ballast.stat().st_size - leave))


def _assert_nothing_published(project: Project) -> None:
    assert project.manifests() == []
    assert project.libraries() == []
    assert list((project.cache / ".mlcjit" / "staging").iterdir()) == []
    assert list((project.cache / ".mlcjit" / "failed").iterdir()) == [], \
        "a full disk is not remembered as the model's failure"


def test_full_tmpfs(engine: Engine, project: Project, tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    with _mounted(mnt, "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs"):
        project.cache = mnt / "cache"
        (project.cache / ".mlcjit" / "locks").mkdir(parents=True)  # the lock fits
        _fill(mnt, leave=16 * 1024)  # the ~40 KiB library does not
        (result,) = engine.run([{"hidden": 4}])
        assert not result["ok"], result
        assert result["error"] == "CompileError", result
        message = result["message"]
        assert "ran out of disk space" in message, message
        assert f"the cache's filesystem ({project.cache}) is full (" in message, message
        assert "nothing was published" in message
        _assert_nothing_published(project)
        assert engine.lock_is_free(_digest(project))
        # Free the space: the same request now compiles, once.
        (mnt / "ballast").unlink()
        (again,) = engine.run([{"hidden": 4}], check=True)
        assert again["ok"], again
        assert again["checked"]
        assert len(project.libraries()) == 1


@pytest.mark.parametrize("point", ["staging", "compiled", "publish:staged", "publish:library"])
def test_injected_enospc_on_a_miss(engine: Engine, project: Project, point: str) -> None:
    (result,) = engine.run([{"hidden": 4}], env={"MLCJIT_TEST_ENOSPC": point})
    assert not result["ok"], result
    assert result["error"] == "CompileError", result
    assert "ran out of disk space" in result["message"], result
    assert "nothing was published" in result["message"]
    _assert_nothing_published(project)
    assert engine.lock_is_free(_digest(project))


@pytest.mark.parametrize("point", ["staging", "publish:staged"])
def test_injected_enospc_keeps_the_old_entry(engine: Engine, project: Project,
                                             warm_template: Path, point: str) -> None:
    """REDO rebuilds a good entry on a full disk: the rebuild fails, the old entry stays."""
    engine.warm(warm_template)
    before = {p.name: p.read_bytes() for p in (project.cache / "tvm").rglob("*") if p.is_file()}
    (result,) = engine.run([{"hidden": 4}], policy="REDO",
                           env={"MLCJIT_TEST_ENOSPC": point})
    assert not result["ok"], result
    assert "ran out of disk space" in result["message"], result
    after = {p.name: p.read_bytes() for p in (project.cache / "tvm").rglob("*") if p.is_file()}
    assert after == before, "the old entry is untouched"
    (hit,) = engine.run([{"hidden": 4}], policy="READONLY", check=True)
    assert hit["checked"], hit


def _digest(project: Project) -> str:
    (lock,) = (project.cache / ".mlcjit" / "locks").glob("*.lock")
    return lock.stem


@contextlib.contextmanager
def _read_only_copy(template: Path, cache: Path, tmp_path: Path) -> Iterator[None]:
    """A read-only copy of the ``template`` cache at ``cache``: a read-only bind mount as
    root (root ignores permissions), else a copy without write permissions."""
    if _is_root():
        src = tmp_path / "src"
        shutil.copytree(template, src)
        with _mounted(cache, "--bind", "-o", "ro", str(src)):
            yield
    else:
        shutil.copytree(template, cache)
        with _chmod_read_only(cache):
            yield


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


@contextlib.contextmanager
def _chmod_read_only(root: Path) -> Iterator[None]:
    dirs = [root, *(p for p in root.rglob("*") if p.is_dir())]
    modes = {d: stat.S_IMODE(d.stat().st_mode) for d in dirs}
    for d in sorted(dirs, reverse=True):
        d.chmod(modes[d] & ~0o222)
    try:
        yield
    finally:
        for d, mode in modes.items():
            d.chmod(mode)


def test_unwritable_cache(project: Project, warm_template: Path, tmp_path: Path) -> None:
    assert (warm_template / "tinymodel.py").read_bytes() == \
        (project.pytester.path / "tinymodel.py").read_bytes()
    project.write_tests([{"hidden": 4}], per_config=2)
    with _read_only_copy(warm_template / "cache", project.cache, tmp_path):
        on = project.run_inprocess("--mlc-device=cpu")
        on.assert_outcomes(errors=2)
        on.stdout.fnmatch_lines([f"MlcJitError: cache directory {project.cache} is not "
                                 "writable*--mlc-jit-policy=READONLY*"])
        readonly = project.run("--mlc-device=cpu", "--mlc-jit-policy=READONLY")
        readonly.assert_outcomes(passed=2)
    assert project.compiles() == []


def test_unwritable_parent_of_a_cold_cache(project: Project, tmp_path: Path) -> None:
    project.write_tests([{"hidden": 4}])
    parent = tmp_path / "ro"
    parent.mkdir()
    project.cache = parent / "cache"
    root = _is_root()
    ctx = (_mounted(parent, "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs") if root
           else _chmod_read_only(parent))
    with ctx:
        result = project.run_inprocess("--mlc-device=cpu")
    result.assert_outcomes(errors=1)
    why = "Read-only file system" if root else "Permission denied"
    result.stdout.fnmatch_lines([f"MlcJitError: cache directory {project.cache} is not "
                                 f"writable ({why})*"])
