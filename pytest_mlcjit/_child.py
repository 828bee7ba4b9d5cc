"""Subprocess launcher: ``python -m pytest_mlcjit._child PARENT_PID -- argv...``.

Asks the kernel to kill this process when its parent dies (Linux ``PR_SET_PDEATHSIG``),
then replaces itself with ``argv``: a compile whose test process was killed stops too,
instead of running on as an orphan. Elsewhere it simply ``exec``s.
"""

from __future__ import annotations

import os
import signal
import sys


def main(argv: list[str]) -> int:
    parent, sep, *command = argv
    if sep != "--" or not command:
        print("usage: python -m pytest_mlcjit._child PARENT_PID -- argv...", file=sys.stderr)
        return 2
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != int(parent):  # the parent died before prctl took effect
        return 137
    sys.stdout.flush()
    os.execv(command[0], command)  # noqa: S606 - exec of an argument list, no shell
    return 127  # unreachable: execv does not return


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
