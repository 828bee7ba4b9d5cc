"""A real Relax model whose factory can misbehave on request, for the isolation, interrupt,
log and publish tests: it can wait for a file before returning (a compile that stays in
flight as long as a test needs), start a child process that leaves its process group (a
grandchild of the compile that only a kill of the whole tree reaches), print megabytes,
or fail while a flag file exists (the same key fails, then compiles).

And another user: an unprivileged user made for the purpose (:func:`probe_user`), a
directory it owns (:func:`user_dir`), and a way to run a command as that user
(:func:`as_user`), so that the tests whose subject is another user's view run in a CI run
as root."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from conftest import Project, outcomes
from pytest_mlcjit.key import file_sha256

#: ``holdmodel.py``: ``build(hidden, hold, child, noise_mb, fail_if)``; each call appends a
#: line to ``$MLCJIT_TEST_COUNT`` (one line = one compilation, counted in the compiler).
HOLD_MODEL = '''
import os
import subprocess
import sys
import time

from tvm.relax.frontend import nn


class Tiny(nn.Module):
    def __init__(self, hidden):
        self.fc = nn.Linear(8, hidden)

    def forward(self, x):
        return nn.relu(self.fc(x))


def build(hidden=4, hold="", child="", noise_mb=0, fail_if=""):
    counter = os.environ.get("MLCJIT_TEST_COUNT")
    if counter:
        with open(counter, "a") as f:
            f.write(f"{os.getpid()} hidden={hidden}\\n")
    if child:  # a grandchild of the compile, in a session of its own
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                start_new_session=True)
        with open(child + ".tmp", "w") as f:
            f.write(str(proc.pid))
        os.replace(child + ".tmp", child)
    if noise_mb:
        block = (b"noise " * 16)[:99] + b"\\n"
        chunk = block * 10240  # about 1 MB
        for _ in range(int(noise_mb)):
            sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.write(b"end of the noise\\n")
        sys.stdout.flush()
    if hold:
        deadline = time.monotonic() + 600
        while not os.path.exists(hold) and time.monotonic() < deadline:
            time.sleep(0.01)
    if fail_if and os.path.exists(fail_if):
        raise RuntimeError(f"failed on purpose (hidden={hidden})")
    return Tiny(hidden), {"forward": {"x": nn.spec.Tensor((2, 8), "float32")}}
'''


def add_hold_model(project: Project) -> None:
    """Write ``holdmodel.py`` into the project (beside the driver)."""
    project.pytester.makepyfile(holdmodel=HOLD_MODEL)


def hold_request(hidden: int, **config: object) -> dict[str, object]:
    """A driver request for ``holdmodel:build`` (see :data:`conftest.DRIVER`)."""
    return {"factory": "holdmodel:build", "config": {"hidden": hidden, **config}}


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed but not yet reaped, counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[:1]
    except OSError:
        return False
    return state not in ([b"Z"], [b"X"])


def read_pid(path: Path) -> int:
    return int(path.read_text())


def staging_dirs(cache: Path) -> list[Path]:
    """The staging directories (not their lock files) under a cache."""
    staging = cache / ".mlcjit" / "staging"
    if not staging.is_dir():
        return []
    return sorted(p for p in staging.iterdir() if not p.name.endswith(".lock"))


def files_under(root: Path) -> int:
    """Bytes of the regular files under ``root``, as ``du --apparent-size`` would count."""
    total = 0
    for top, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(top, name)
            if os.path.isfile(path) and not os.path.islink(path):
                total += os.path.getsize(path)
    return total


# -- another user ------------------------------------------------------------------------------
#: The prefix of the users :func:`probe_user` makes.
USER = "mlcjit-probe"
SAFETY_S = 300.0


@contextlib.contextmanager
def probe_user() -> Iterator[pwd.struct_passwd]:
    """An unprivileged user made with ``useradd`` for the purpose and removed afterwards,
    named after this process (``mlcjit-probe-<pid>``), so that test processes running at
    the same time never share one or remove another's. Skips the test unless this process
    is root (only root can make a user and act as one) and ``useradd`` is permitted."""
    if os.geteuid() != 0:
        pytest.skip("needs root: to make another user's files and run as another user")
    name = f"{USER}-{os.getpid()}"
    try:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", name], check=True, capture_output=True,
                       timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"useradd is not permitted here: {exc}")
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True, timeout=60)


#: Runs argv as another user. The interpreter may live under root's private home (a
#: pyenv in /root, mode 0700): in a mount namespace of its own, a tmpfs is mounted over
#: /root with the interpreter's directory bound back into it, so the user can exec it.
AS_USER = r"""
import os, subprocess, sys, tempfile
uid, gid, *argv = sys.argv[1:]
exe = os.path.realpath(sys.executable)
if exe.startswith("/root/"):
    top = "/root/" + exe.split("/")[2]
    keep = tempfile.mkdtemp()
    subprocess.run(["mount", "--bind", top, keep], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/root"], check=True)
    os.mkdir(top)
    subprocess.run(["mount", "--move", keep, top], check=True)
    os.rmdir(keep)
os.setgroups([])
os.setgid(int(gid))
os.setuid(int(uid))
os.execv(argv[0], argv)
"""


def as_user(user: pwd.struct_passwd, home: Path, argv: Sequence[str]
            ) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as ``user`` in ``home`` (its own directory), with a plain environment."""
    env = {"HOME": str(home), "TMPDIR": str(home), "PATH": os.environ.get("PATH", ""),
           "USER": user.pw_name, "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", AS_USER,
         str(user.pw_uid), str(user.pw_gid), *argv],
        cwd=home, env=env, capture_output=True, text=True, timeout=SAFETY_S, check=False)


@contextlib.contextmanager
def user_dir(user: pwd.struct_passwd, files: Mapping[str, str]) -> Iterator[Path]:
    """A new directory ``user`` owns (this test's temporary directories are private to
    root) holding ``files`` (name → text); removed afterwards. Skips the test if this
    interpreter cannot run as ``user``."""
    home = Path(tempfile.mkdtemp(prefix="mlcjit-user-"))
    try:
        for name, text in files.items():
            (home / name).write_text(text)
        os.chmod(home, 0o755)
        for path in (home, *home.iterdir()):
            os.chown(path, user.pw_uid, user.pw_gid)
        probe = as_user(user, home, [sys.executable, "-c",
                                     "import os, pytest_mlcjit; print(os.getuid())"])
        if probe.returncode != 0 or probe.stdout.strip() != str(user.pw_uid):
            pytest.skip(f"cannot run this interpreter as {user.pw_name}: "
                        f"{probe.stderr.strip()[-300:]}")
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def drive_as(user: pwd.struct_passwd, home: Path, cache: Path,
             requests: list[dict[str, Any]], policy: str = "ON") -> list[dict[str, Any]]:
    """Run the conftest driver (``home/mlcjit_driver.py``) as ``user`` on ``cache``: its
    outcomes, one per request."""
    job = json.dumps({"cache": str(cache), "policy": policy, "requests": requests})
    proc = as_user(user, home, [sys.executable, str(home / "mlcjit_driver.py"), job])
    assert proc.returncode == 0, proc.stderr  # before: a bare PermissionError traceback
    return outcomes(proc.stdout)


#: Runs ``pytest_mlcjit.cli.main`` once per argument list (JSON, argv[1]) in one process,
#: and prints, as JSON, each one's exit status, output, and traceback if it raised.
CLI_RUNS = r"""
import contextlib, io, json, sys, traceback
from pytest_mlcjit.cli import main

results = []
for args in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(args)
        except SystemExit as exc:
            status = exc.code
        except BaseException:
            status = None
            err.write(traceback.format_exc())
    results.append({"args": args, "status": status, "out": out.getvalue(),
                    "err": err.getvalue()})
print(json.dumps(results))
"""


def cli_as(user: pwd.struct_passwd, home: Path, *commands: Sequence[str]
           ) -> list[dict[str, Any]]:
    """Run each of ``commands`` (``pytest_mlcjit.cli`` arguments) as ``user``, in one
    process: for each, ``{"args", "status", "out", "err"}``."""
    proc = as_user(user, home, [sys.executable, "-c", CLI_RUNS,
                                json.dumps([list(c) for c in commands])])
    assert proc.returncode == 0, proc.stderr
    results: list[dict[str, Any]] = json.loads(proc.stdout.splitlines()[-1])
    return results


def distinct_old_entry(project: Project) -> str:
    """Make the warm entry's library differ from what a compile writes now (compiles are
    byte-for-byte reproducible): zeros appended (an ELF file ignores bytes after its
    sections), its manifest updated to match. A whole, loadable entry; its sha256."""
    (manifest,) = (project.cache / "tvm").glob("*.manifest.json")
    data = json.loads(manifest.read_text())
    library = manifest.with_name(data["library"])
    with open(library, "ab") as f:
        f.write(b"\0" * 4096)
    data["sha256"], data["size"] = file_sha256(library), library.stat().st_size
    manifest.write_text(json.dumps(data))
    return str(data["sha256"])


#: ``heldmodel:build(hidden)``: the tiny model (its call counted), returned only once the
#: file named by ``$MLCJIT_TEST_HOLD`` exists: a compile that lasts as long as a test needs.
#: (Its name in messages stays short: a terminal's status line is cut at its width.)
HELD_MODEL = '''
import os
import time

from tinymodel import build as tiny


def build(hidden=4):
    built = tiny(hidden)
    deadline = time.monotonic() + 600
    while not os.path.exists(os.environ["MLCJIT_TEST_HOLD"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return built
'''
