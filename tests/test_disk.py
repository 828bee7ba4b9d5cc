"""A full disk and an unwritable cache: a clear error, no partial entry, nothing lost
(docs/explanation/reliability.md).

The default tier injects ENOSPC once at each named fault point of a compile and its
publish (``MLCJIT_TEST_ENOSPC=<point>``, the engine's test-only fault points, see
pytest_mlcjit/_util/fs.py), with the engine in this process (compiles still run in
processes of their own). The reliability tier fills a real filesystem: a small tmpfs,
where this process may mount one (root, with mount rights)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from faultmodels import distinct_old_entry

from conftest import Engine, Project
from pytest_mlcjit import JIT, CompiledModel, Policy, Settings, TVMModel
from pytest_mlcjit.errors import CompileError
from pytest_mlcjit.key import file_sha256

reliability = pytest.mark.reliability

SPEC = TVMModel("tinymodel:build", config={"hidden": 4})

#: The fault points of a compile and its publish, in the order a compile passes them.
COMPILE_POINTS = ["staging", "compile", "compiled", "publish:staged", "publish:library"]

Jit = Callable[..., JIT]


@pytest.fixture
def jit(project: Project, monkeypatch: pytest.MonkeyPatch) -> Jit:
    """A new engine (a new run) in this process over the project's cache, per call."""
    monkeypatch.syspath_prepend(str(project.pytester.path))

    def make(policy: str = "ON") -> JIT:
        return JIT(Settings(cache_dir=project.cache, policy=Policy.parse(policy)))

    return make


def check_numerics(model: CompiledModel) -> None:
    """Load and run the library: proof that it is whole."""
    x = np.full((2, 8), 0.25, dtype="float32")
    w, b = model.params["fc.weight"], model.params["fc.bias"]
    np.testing.assert_allclose(model.run("forward", x), np.maximum(x @ w.T + b, 0),
                               rtol=1e-5, atol=1e-5)



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
    assert list((project.cache / "tvm").glob(".*.manifest.pending.json")) == []
    assert list((project.cache / ".mlcjit" / "staging").iterdir()) == []
    assert list((project.cache / ".mlcjit" / "failed").iterdir()) == [], \
        "a full disk is not remembered as the model's failure"


@reliability
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
        assert len(project.compiles()) == 1
        # Free the space: the same request now compiles, once.
        (mnt / "ballast").unlink()
        (again,) = engine.run([{"hidden": 4}], check=True)
        assert again["ok"], again
        assert again["checked"]
        assert len(project.libraries()) == 1
        assert len(project.compiles()) == 2


@pytest.mark.parametrize("point", COMPILE_POINTS)
def test_injected_enospc_on_a_miss(engine: Engine, project: Project, jit: Jit,
                                   monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    """ENOSPC at each point of a first compile: a clear error, nothing published, the
    lock free, nothing remembered; with space again, the same request compiles once."""
    monkeypatch.setenv("MLCJIT_TEST_ENOSPC", point)
    with pytest.raises(CompileError) as failed:
        jit().compile(SPEC, "cpu")
    message = str(failed.value)
    assert "ran out of disk space" in message, message
    assert "nothing was published" in message, message
    _assert_nothing_published(project)
    assert engine.lock_is_free(_digest(project))
    if point != "publish:library":  # there a log is left: see the test below
        engine.check_cache(staging=False)
    ran = 0 if point in ("staging", "compile") else 1  # the factory ran from "compiled" on
    assert len(project.compiles()) == ran
    monkeypatch.delenv("MLCJIT_TEST_ENOSPC")
    model = jit().compile(SPEC, "cpu")
    assert not model.hit
    check_numerics(model)
    assert len(project.compiles()) == ran + 1
    assert project.libraries() == [model.path]


def test_enospc_at_the_last_rename_of_a_first_publish_leaves_no_file_behind(
        engine: Engine, jit: Jit, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLCJIT_TEST_ENOSPC", "publish:library")
    with pytest.raises(CompileError, match="ran out of disk space"):
        jit().compile(SPEC, "cpu")
    engine.check_cache(staging=False)


@pytest.mark.parametrize("point", ["staging", "publish:staged"])
def test_injected_enospc_keeps_the_old_entry(engine: Engine, jit: Jit, warm_template: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             point: str) -> None:
    """REDO rebuilds a good entry on a full disk: the rebuild fails, the old entry stays
    (an old library that differs from the rebuild's, so that a replaced one would show)."""
    project = engine.project
    project.warm(warm_template)
    old = distinct_old_entry(project)
    before = {p.name: p.read_bytes() for p in (project.cache / "tvm").rglob("*") if p.is_file()}
    monkeypatch.setenv("MLCJIT_TEST_ENOSPC", point)
    with pytest.raises(CompileError, match="ran out of disk space"):
        jit("REDO").compile(SPEC, "cpu")
    monkeypatch.delenv("MLCJIT_TEST_ENOSPC")
    assert len(project.compiles()) == (point != "staging"), "the rebuild ran"
    after = {p.name: p.read_bytes() for p in (project.cache / "tvm").rglob("*") if p.is_file()}
    assert after == before, "the old entry is untouched"
    assert len(engine.check_cache(staging=False).manifests) == 1
    hit = jit("READONLY").compile(SPEC, "cpu")
    assert hit.hit
    assert hit.manifest["sha256"] == old == file_sha256(hit.path)
    check_numerics(hit)


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


def test_unwritable_parent_of_a_cold_cache(project: Project, tmp_path: Path) -> None:
    project.write_tests([{"hidden": 4}])
    parent = tmp_path / "ro"
    parent.mkdir()
    project.cache = parent / "cache"
    root = _is_root()
    ctx = (_mounted(parent, "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs") if root
           else _chmod_read_only(parent))
    with ctx:
        result = project.run("--mlc-device=cpu")
    result.assert_outcomes(errors=1)
    why = "Read-only file system" if root else "Permission denied"
    result.stdout.fnmatch_lines([f"MlcJitError: cache directory {project.cache} is not "
                                 f"writable ({why})*"])
