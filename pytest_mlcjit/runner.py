"""Running a build in an isolated process: its own process group (killed whole on timeout
or interrupt), dying with the test process (:mod:`._child`), every byte it prints appended
to the entry's compile log."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path


def child_env() -> dict[str, str]:
    """The environment of a compile subprocess: ours, with our ``sys.path`` as PYTHONPATH,
    so the child imports factories (and ``mlc_llm``) exactly as the test process can."""
    paths = [p or os.getcwd() for p in sys.path]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_logged(argv: list[str], log_path: Path, *, timeout: float,
               env: Mapping[str, str] | None = None) -> int | None:
    """Run ``argv`` with all output appended to ``log_path``; None if it timed out.

    The child runs in its own process group (killed whole on timeout or interrupt) and dies
    with this process (see :mod:`pytest_mlcjit._child`).
    """
    launcher = [sys.executable, "-m", "pytest_mlcjit._child", str(os.getpid()), "--", *argv]
    with open(log_path, "ab") as log:
        log.write(f"$ {shlex.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(launcher, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=dict(env or child_env()),
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            return None
        except BaseException:
            kill_group(proc)
            raise


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group ``proc`` leads, and reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
