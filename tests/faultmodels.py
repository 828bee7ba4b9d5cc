"""A real Relax model whose factory can misbehave on request, for the isolation, interrupt,
log and publish tests: it can wait for a file before returning (a compile that stays in
flight as long as a test needs), start a child process that leaves its process group (a
grandchild of the compile that only a kill of the whole tree reaches), print megabytes,
or fail while a flag file exists (the same key fails, then compiles)."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import Project

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
