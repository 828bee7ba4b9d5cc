"""Compiles that share a cache but not a PID namespace, a clock or a user.

A staging directory is removed only when it is provably abandoned: its owner holds the
``flock`` of ``<name>.lock`` beside it from before the directory exists until it is gone,
and the kernel releases that lock when the owner dies. So a compile in another PID
namespace (another container on the same volume, with the same hostname), or one whose
directory looks days old, is never disturbed; a lock file another user left (a ``sudo``
run) is locked read-only, or refused with an error that names the file and the fix.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from faultmodels import (
    HOLD_MODEL,
    add_hold_model,
    cli_as,
    drive_as,
    hold_request,
    probe_user,
    staging_dirs,
    user_dir,
)

from conftest import DRIVER, Engine, Project, outcomes, wait_until
from pytest_mlcjit.cache import locks
from pytest_mlcjit.cache.layout import staging_lock
from pytest_mlcjit.cache.locks import try_flock
from pytest_mlcjit.cache.manage import clear, prune
from pytest_mlcjit.cache.store.local import LocalStore

SAFETY_S = 300.0


def _compiling(project: Project, hidden: int) -> bool:
    """Whether the factory of ``hidden`` has started (it appends to the counter)."""
    return any(line.endswith(f"hidden={hidden}") for line in project.compiles())


def _beside_a_live_compile(project: Project, release: Path, first: subprocess.Popen[str],
                           during: Callable[[Path], None]) -> dict[str, Any]:
    """Once ``first`` (a held compile of hidden=5, released by ``release``) is compiling,
    call ``during`` with its staging directory (which must survive it); then release
    ``first`` and return its outcome, which must be a success."""
    try:
        wait_until(lambda: _compiling(project, 5) or first.poll() is not None,
                   "the first compile to start")
        (live,) = staging_dirs(project.cache)
        during(live)
        assert live.is_dir(), "the live compile's staging directory was removed"
        release.touch()
        out, err = first.communicate(timeout=SAFETY_S)
    finally:
        release.touch()
        if first.poll() is None:
            first.kill()
            first.wait()
    (result,) = outcomes(out)
    assert result["ok"], (result, err)
    return result


# -- 1. two PID namespaces ------------------------------------------------------------------
def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], check=True,
                       capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


#: Runs ``argv`` as a child, after starting and reaping N short-lived processes: the
#: driver's pid in its namespace is then about N + 2, a pid the other namespace never uses.
BURN = ("import subprocess, sys\n"
        "for _ in range(int(sys.argv[1])):\n"
        "    subprocess.run(['true'])\n"
        "sys.exit(subprocess.run(sys.argv[2:]).returncode)\n")


def _in_pid_namespace(engine: Engine, requests: list[dict[str, Any]], burn: int
                      ) -> subprocess.Popen[str]:
    job = json.dumps({"cache": str(engine.project.cache), "requests": requests})
    return subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", BURN, str(burn),
         sys.executable, str(engine.script), job],
        cwd=engine.script.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL)


@pytest.mark.skipif(not _can_unshare(), reason="unshare --pid --fork --mount-proc is not "
                    "permitted here (it needs root, or unprivileged user namespaces)")
def test_two_pid_namespaces_compile_different_keys_at_once(
        engine: Engine, project: Project, tmp_path: Path) -> None:
    """Two containers on one cache volume, with the same hostname: the second compile's
    clean-up finds the first one's staging directory named after a pid it cannot see.
    Before, it removed it (the first compile then failed: "the compiler exited with code
    1 … (no log)", remembered for the rest of its run)."""
    add_hold_model(project)
    release = tmp_path / "release"
    first = _in_pid_namespace(engine, [hold_request(5, hold=str(release))], burn=300)

    def compile_in_another_namespace(live: Path) -> None:
        second = _in_pid_namespace(engine, [hold_request(6)], burn=0)
        out, err = second.communicate(timeout=SAFETY_S)
        (result,) = outcomes(out)
        assert result["ok"], (result, err)

    result1 = _beside_a_live_compile(project, release, first, compile_in_another_namespace)
    assert result1["sha256"] == result1["manifest_sha256"]
    assert len(project.compiles()) == 2, "each key compiled once, neither again"
    assert staging_dirs(project.cache) == []


# -- 2. clock skew ---------------------------------------------------------------------------
def test_a_staging_dir_aged_two_days_survives_while_its_compile_lives(
        engine: Engine, project: Project, tmp_path: Path) -> None:
    """A compile's staging directory whose mtime says two days (a clock that jumped, a
    host whose clock is behind): another compile's clean-up keeps it. Before, anything
    older than 24 h was removed, live or not."""
    add_hold_model(project)
    release = tmp_path / "release"
    first = engine.popen([hold_request(5, hold=str(release))])

    def age_it_then_compile(live: Path) -> None:
        then = time.time() - 2 * 86400
        for path in (live, *live.iterdir(), staging_lock(live)):
            os.utime(path, (then, then))
        (second,) = engine.run([hold_request(6)])
        assert second["ok"], second

    _beside_a_live_compile(project, release, first, age_it_then_compile)
    assert len(project.compiles()) == 2
    assert staging_dirs(project.cache) == []


# -- the staging protocol itself --------------------------------------------------------------
HOLD_STAGING = """
import sys, time
from pytest_mlcjit.cache.store.local import LocalStore
store = LocalStore(sys.argv[1]).open_for_writing()
print(store.new_staging_dir("ab" * 32), flush=True)
time.sleep(600)
"""


def test_staging_is_removed_only_once_its_owner_has_died(tmp_path: Path) -> None:
    """Whatever a staging directory is named or dated, it goes exactly when its lock is
    free: kept while its owner lives, removed once it is killed (the kernel releases the
    lock). Strays with no lock (an earlier version's, a crash before the lock existed) and
    lock files without their directory go too; in a shared ``MLC_TEMP_DIR`` only names
    of this cache's kind are touched."""
    root = tmp_path / "cache"
    store = LocalStore(root).open_for_writing()
    with subprocess.Popen([sys.executable, "-c", HOLD_STAGING, str(root)],
                          stdout=subprocess.PIPE, text=True) as owner:
        assert owner.stdout is not None
        live = Path(owner.stdout.readline().strip())
        staging = live.parent
        legacy = staging / f"{'0' * 32}.{os.uname().nodename}.{os.getpid()}.abcd0123"
        legacy.mkdir()
        orphan_lock = staging / f"{'1' * 32}.{'2' * 16}.lock"
        orphan_lock.touch()
        assert store.clean_staging() == [legacy]
        assert live.is_dir()
        assert staging_lock(live).exists()
        assert not orphan_lock.exists()
        owner.kill()
    assert store.clean_staging() == [live]
    assert list(staging.iterdir()) == [], "the directory and its lock file are gone"

    shared = tmp_path / "mlc-temp"
    shared.mkdir()
    foreign = [shared / "someone-elses", shared / "x.lock"]
    foreign[0].mkdir()
    foreign[1].touch()
    ours = store.new_staging_dir("cd" * 32, parent=shared)
    assert store.clean_staging(where=shared) == [], "our own, live: kept"
    store.remove_staging(ours)
    assert sorted(shared.iterdir()) == sorted(foreign)


# -- 3. another user's lock file --------------------------------------------------------------
@pytest.fixture(scope="module")
def other_user() -> Iterator[pwd.struct_passwd]:
    """An unprivileged user made for the purpose (:func:`faultmodels.probe_user`); the test
    runs as root and acts as the ``sudo`` run that leaves a root-owned lock file."""
    with probe_user() as user:
        yield user


@pytest.fixture
def user_home(other_user: pwd.struct_passwd) -> Iterator[Path]:
    """A directory the other user owns, with the model and the driver."""
    with user_dir(other_user, {"holdmodel.py": HOLD_MODEL.strip() + "\n",
                               "mlcjit_driver.py": DRIVER}) as home:
        yield home


def _plant_root_lock(user: pwd.struct_passwd, home: Path, mode: int) -> Path:
    """The key's lock file, owned by root with ``mode``, in a cache the user owns."""
    (miss,) = drive_as(user, home, home / "cache", [hold_request(4)], "READONLY")
    digest = miss["message"].split("for key ")[1].split()[0]
    locks = home / "cache" / ".mlcjit" / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    for path in (home / "cache", home / "cache" / ".mlcjit", locks):
        os.chown(path, user.pw_uid, user.pw_gid)
    lock = locks / f"{digest}.lock"
    lock.touch()
    os.chmod(lock, mode)  # owned by root, as a run under sudo leaves it
    return lock


def _cache_args(home: Path, *args: str) -> list[str]:
    return [*args, "--cache-dir", str(home / "cache")]


def test_a_root_owned_lock_file_is_locked_read_only(
        other_user: pwd.struct_passwd, user_home: Path) -> None:
    """A 0644 lock file root left (a run under sudo): the unprivileged user's compile takes
    the lock through a read-only descriptor and compiles; prune and clear work and remove
    it once it is free. Before, every compile failed with a bare PermissionError, and
    prune and clear crashed with a traceback."""
    lock = _plant_root_lock(other_user, user_home, 0o644)
    result, again = drive_as(other_user, user_home, user_home / "cache", [
        hold_request(4), {**hold_request(4), "policy": "READONLY"}])
    assert result["ok"], result
    assert not result["hit"], result
    assert again["ok"], again
    assert again["hit"], again
    pruned, cleared = cli_as(other_user, user_home,
                             _cache_args(user_home, "prune", "--max-size", "0"),
                             _cache_args(user_home, "clear"))
    assert pruned["status"] == 0, pruned
    assert "Traceback" not in pruned["out"] + pruned["err"], pruned
    assert not lock.exists(), "a lock file nobody holds goes with its entry"
    assert cleared["status"] == 0, cleared


def test_an_unreadable_lock_file_is_a_clear_error(
        other_user: pwd.struct_passwd, user_home: Path) -> None:
    """A 0600 root-owned lock file cannot even be opened: the compile fails with an error
    that names the file, its owner and mode, and the fix; the CLI shows no traceback."""
    lock = _plant_root_lock(other_user, user_home, 0o600)
    (result,) = drive_as(other_user, user_home, user_home / "cache", [hold_request(4)])
    assert not result["ok"], result
    assert result["error"] == "MlcJitError", result
    message = result["message"]
    assert f"cannot use the lock file {lock}" in message, message
    assert "owned by uid 0 with mode 0600" in message, message
    assert f"rm {lock}" in message, message
    assert "sudo chown" in message, message
    commands = [("prune", "--max-size", "0"), ("clear",), ("verify",), ("info",), ("list",)]
    runs = cli_as(other_user, user_home, *(_cache_args(user_home, *c) for c in commands))
    assert len(runs) == len(commands)
    for run in runs:
        assert "Traceback" not in run["out"] + run["err"], run
        assert run["status"] in (0, 2), run


# -- lock files are removed once free -----------------------------------------------------------
HOLD_KEY_LOCK = """
import sys
from pytest_mlcjit.cache.store.local import LocalStore
with LocalStore(sys.argv[1]).open_for_writing().lock(sys.argv[2], timeout=10):
    print("locked", flush=True)
    sys.stdin.read()
"""


@contextlib.contextmanager
def _holding(root: Path, digest: str) -> Iterator[None]:
    with subprocess.Popen([sys.executable, "-c", HOLD_KEY_LOCK, str(root), digest],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as holder:
        assert holder.stdin is not None
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        yield
        holder.stdin.close()


def test_clear_and_prune_remove_free_lock_files(tmp_path: Path) -> None:
    """31 keys' lock files (as 31 compiles leave them) and a stale owner record: clear
    removes every one nobody holds, and keeps the one a live process holds; prune does
    the same for keys without entries. Before, lock files were never removed."""
    root = tmp_path / "cache"
    LocalStore(root).open_for_writing()
    locks = root / ".mlcjit" / "locks"
    digests = [f"{i:064x}" for i in range(31)]
    for digest in digests:
        try_flock_close(locks / f"{digest}.lock")
    (locks / f"{digests[0]}.owner").write_text('{"pid": 1, "host": "gone", "since": 0}')
    busy = "f" * 64
    with _holding(root, busy):
        clear(root)
        assert sorted(p.name for p in locks.iterdir()) == [f"{busy}.lock", f"{busy}.owner"]
    for digest in digests:
        try_flock_close(locks / f"{digest}.lock")
    result = prune(root, max_size=10**9)
    assert result.locks_removed == 32
    assert list(locks.iterdir()) == []


def try_flock_close(path: Path) -> None:
    """Make a lock file the way a compile does (take its lock, then let it go)."""
    fd = try_flock(path)
    assert fd is not None
    os.close(fd)


def test_a_lock_file_removed_between_open_and_flock_is_not_trusted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """clear and prune remove lock files nobody holds. A taker that opened the file just
    before it was removed, and locks it just after, holds a lock on a file that no longer
    guards anything: it must notice (the path names another file now, or none) and lock
    the path again, so that two processes never both believe they hold a key. The race
    window is made certain by removing the file from inside the taker's open (mocked:
    a real interleaving cannot be scheduled); the lock it ends up with is checked from
    another process."""
    root = tmp_path / "cache"
    store = LocalStore(root).open_for_writing()
    digest = "e" * 64
    path = Path(store.lock_path(digest))
    try_flock_close(path)
    real_open = locks.open_lock_file
    removed: list[str] = []

    def open_then_lose_it(where: str | os.PathLike[str], *, create: bool = True) -> int | None:
        fd = real_open(where, create=create)
        if not removed:
            removed.append(os.fspath(where))
            assert locks.remove_if_free(where), "nobody held it: clear removes it"
        return fd

    monkeypatch.setattr(locks, "open_lock_file", open_then_lose_it)
    with store.lock(digest, timeout=10):
        assert removed == [os.fspath(path)]
        assert path.exists(), "the lock is on a file the path names"
        code = ("import sys\nfrom pytest_mlcjit.cache.locks import try_key_lock\n"
                "with try_key_lock(sys.argv[1], sys.argv[2]) as held:\n"
                "    sys.exit(3 if held else 0)\n")
        other = subprocess.run([sys.executable, "-c", code, str(root), digest], timeout=60,
                               check=False)
        assert other.returncode == 0, "another process could take a held key lock"


def test_a_killed_compile_leaves_staging_the_next_compile_removes(
        engine: Engine, project: Project, tmp_path: Path) -> None:
    """SIGKILL of a compile (its lock is released by the kernel): its staging directory is
    abandoned, and the next compile of any key removes it and its lock file."""
    add_hold_model(project)
    victim = engine.popen([hold_request(5, hold=str(tmp_path / "never"))])
    try:
        wait_until(lambda: _compiling(project, 5) or victim.poll() is not None,
                   "the compile to start")
        (left,) = staging_dirs(project.cache)
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.communicate(timeout=SAFETY_S)
    (other,) = engine.run([hold_request(6)])
    assert other["ok"], other
    assert not left.exists()
    assert not staging_lock(left).exists()
    assert staging_dirs(project.cache) == []
