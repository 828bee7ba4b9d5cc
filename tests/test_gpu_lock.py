"""The GPU lock (``--mlc-jit-gpu-lock``): the call phase of a ``gpu`` test holds TVM's own
``flock`` (``$TVM_TEST_LOCK_DIR/gpu.lock``), setup and teardown do not; TVM's
``run_with_gpu_lock`` and the plugin serialize in either direction; the wait is shown and
counted; bad input says what is wrong.

There is no GPU here: the ``gpu`` tests' bodies run on the CPU; what is checked is the
lock, observed from the outside (a probe ``flock`` on a fresh descriptor, ``/proc/locks``,
timestamps written by the test bodies and by the holders). TVM's side is TVM's own code:
``tvm/testing/locking.py`` (``run_with_gpu_lock`` and tvm-ffi's ``FileLock``), loaded from
the installed apache-tvm by its file so that the holder process does not import the
compiler (seconds of CPU) for a lock.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import Project, wait_until
from pytest_mlcjit.device.gpu_lock import GpuLock, holder, lock_dir, lock_path
from pytest_mlcjit.errors import MlcJitError

#: TVM's side, run as its own process: ``hold WORK RELEASE NEEDLE`` holds
#: ``run_with_gpu_lock`` until the file RELEASE contains NEEDLE; ``wait WORK`` tries the
#: lock once with tvm-ffi's ``FileLock.acquire`` (recording whether it was free), then
#: waits for it with ``run_with_gpu_lock``. Timestamps go to files in WORK.
TVM_SIDE = r'''
import importlib.util, pathlib, sys, time

tvm_dir = pathlib.Path(importlib.util.find_spec("tvm").origin).parent
spec = importlib.util.spec_from_file_location("tvm_testing_locking",
                                              tvm_dir / "testing" / "locking.py")
locking = importlib.util.module_from_spec(spec)
spec.loader.exec_module(locking)
from tvm_ffi.utils import FileLock

work = pathlib.Path(sys.argv[2])


def stamp(name):
    (work / f"{name}.tmp").write_text(repr(time.time()))
    (work / f"{name}.tmp").rename(work / name)


if sys.argv[1] == "hold":
    release, needle = pathlib.Path(sys.argv[3]), sys.argv[4]

    def body():
        stamp("tvm-start")
        deadline = time.monotonic() + 120  # a safety limit
        while needle not in (release.read_text(errors="replace") if release.exists() else ""):
            assert time.monotonic() < deadline, "never released"
            time.sleep(0.01)
        stamp("tvm-end")

    locking.run_with_gpu_lock(body)
else:
    probe = FileLock(str(locking._ensure_test_lock_path("gpu.lock")))
    free = probe.acquire()
    if free:
        probe.release()
    (work / "tvm-tried").write_text(repr(free))
    locking.run_with_gpu_lock(lambda: stamp("tvm-start"))
'''

#: Whether a lock file is flocked (a probe on a fresh descriptor, closed at once), and by
#: which pids (``/proc/locks``): the kernel's word, not the plugin's.
PROBE = r'''
import fcntl, os, pathlib


def held(path):
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def holders(path):
    st = os.stat(path)
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    return [int(f[4]) for f in (line.split() for line in open("/proc/locks"))
            if len(f) > 5 and f[1] == "FLOCK" and f[5] == where]
'''


def _work(project: Project) -> Path:
    work = project.pytester.path / "work"
    work.mkdir(exist_ok=True)
    return work


def _stamp(work: Path, name: str) -> float:
    return float((work / name).read_text())


# -- the default tier ---------------------------------------------------------------------------
PHASES = PROBE + r'''
import json, pytest, pytest_mlcjit

LOCKS = pathlib.Path(os.environ["GPU_LOCK_PROBE_DIR"])
WORK = pathlib.Path(os.environ["GPU_LOCK_WORK"])


@pytest.fixture
def phases(request):
    record = {"setup": held(LOCKS / "gpu.lock")}
    yield record
    record["teardown"] = held(LOCKS / "gpu.lock")
    (WORK / f"{request.node.name}.json").write_text(json.dumps(record))


@pytest.mark.gpu
def test_gpu(phases):
    phases["call"] = held(LOCKS / "gpu.lock")
    phases["mine"] = os.getpid() in holders(LOCKS / "gpu.lock") if phases["call"] else False
    with pytest_mlcjit.gpu_lock():  # nested, in the same process: no deadlock
        phases["nested"] = held(LOCKS / "gpu.lock")


def test_plain(phases):
    phases["call"] = held(LOCKS / "gpu.lock")


@pytest.mark.gpu
@pytest.mark.mlc_gpu_lock(False)
def test_opted_out(phases):
    phases["call"] = held(LOCKS / "gpu.lock")


@pytest.mark.gpu
def test_part(phases, mlc_gpu_lock):
    phases["before"] = held(LOCKS / "gpu.lock")
    with mlc_gpu_lock():
        phases["call"] = held(LOCKS / "gpu.lock")
    phases["after"] = held(LOCKS / "gpu.lock")


@pytest.mark.parametrize("mlc_device", ["cuda:1"], indirect=True)
def test_second_gpu(phases, mlc_device):
    phases["call"] = held(LOCKS / "gpu-1.lock")
    phases["gpu0"] = held(LOCKS / "gpu.lock")
'''


def test_the_call_phase_of_a_gpu_test_holds_the_lock_setup_and_teardown_do_not(
        project: Project, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """auto with TVM_TEST_LOCK_DIR set: on; the lock is TVM's gpu.lock, flocked by the
    test's own process during the call phase only; a nested gpu_lock does not deadlock; a
    test opted out, a test not marked gpu, and a test using the fixture outside its block
    run without it; GPU 1 has gpu-1.lock. Off: nothing is held."""
    locks, work = tmp_path / "locks", _work(project)
    monkeypatch.setenv("TVM_TEST_LOCK_DIR", str(locks))
    monkeypatch.setenv("GPU_LOCK_PROBE_DIR", str(locks))
    monkeypatch.setenv("GPU_LOCK_WORK", str(work))
    project.pytester.makepyfile(test_phases=PHASES)
    report = tmp_path / "report.json"
    result = project.run("-q", f"--mlc-jit-report={report}")
    result.assert_outcomes(passed=5)

    def seen(name: str) -> dict[str, bool]:
        return dict(json.loads((work / f"{name}.json").read_text()))

    assert seen("test_gpu") == {"setup": False, "call": True, "mine": True, "nested": True,
                                "teardown": False}
    assert seen("test_plain")["call"] is False
    assert seen("test_opted_out")["call"] is False
    assert seen("test_part") == {"setup": False, "before": False, "call": True,
                                 "after": False, "teardown": False}
    assert seen("test_second_gpu[cuda:1]") == {"setup": False, "call": True, "gpu0": False,
                                                "teardown": False}
    data = json.loads(report.read_text())
    assert data["gpu_hold_seconds"] > 0
    assert data["gpu_wait_seconds"] >= 0
    assert any(line.startswith("GPU lock: ") for line in result.outlines), result.outlines

    result = project.run("-q", "--mlc-jit-gpu-lock=off", "-k", "test_gpu or test_part")
    result.assert_outcomes(passed=2)
    assert seen("test_gpu")["call"] is False
    assert seen("test_part")["call"] is False


def test_a_tvm_holder_makes_a_gpu_test_wait_and_the_wait_is_shown_and_counted(
        project: Project, tmp_path: Path) -> None:
    """A process holding TVM's run_with_gpu_lock makes a gpu test's call phase start only
    after it released the lock (its setup ran meanwhile); the plain progress lines say
    who holds it, and the JSON report counts the wait. The holder lets go once the
    progress line is out (the run's output is a file: the plain-lines display)."""
    locks, work = tmp_path / "locks", _work(project)
    out, report = tmp_path / "out.txt", tmp_path / "report.json"
    project.pytester.makepyfile(test_waits=f'''
import pathlib, time, pytest

WORK = pathlib.Path({str(work)!r})


@pytest.fixture
def after_the_holder():
    deadline = time.monotonic() + 120  # a safety limit
    while not (WORK / "tvm-start").exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    (WORK / "setup-end").write_text(repr(time.time()))


@pytest.mark.gpu
def test_on_the_gpu(after_the_holder):
    (WORK / "call-start").write_text(repr(time.time()))
''')
    env = {**os.environ, "TVM_TEST_LOCK_DIR": str(locks), "MLC_JIT_PROGRESS_DELAY": "0.05",
           "MLC_JIT_PROGRESS_INTERVAL": "0.05"}
    tvm = subprocess.Popen([sys.executable, "-c", TVM_SIDE, "hold", str(work), str(out),
                            "waiting for the GPU lock"], env=env)
    try:
        with out.open("w") as sink:
            run = subprocess.run(
                [sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                 f"--mlc-jit-cache-dir={project.cache}", f"--mlc-jit-report={report}"],
                cwd=project.pytester.path, env=env, stdout=sink, stderr=subprocess.STDOUT,
                timeout=300, check=False)
        assert tvm.wait(timeout=60) == 0
    finally:
        tvm.kill()
    text = out.read_text()
    assert run.returncode == 0, text
    assert _stamp(work, "tvm-start") < _stamp(work, "setup-end") < _stamp(work, "tvm-end") \
        < _stamp(work, "call-start")
    assert f"mlcjit: [main] waiting for the GPU lock (held by pid {tvm.pid}, " in text, text
    assert "s for the GPU lock\n" in text.split("mlcjit: [main] waited ", 1)[-1], text
    data = json.loads(report.read_text())
    assert data["gpu_wait_seconds"] > 0, data
    assert data["gpu_hold_seconds"] > 0, data


def test_the_plugins_lock_makes_tvms_run_with_gpu_lock_wait(
        project: Project, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A gpu test's call phase holds the lock: TVM's FileLock finds it taken, and
    run_with_gpu_lock in another process runs only after the test's body ended."""
    locks, work = tmp_path / "locks", _work(project)
    monkeypatch.setenv("TVM_TEST_LOCK_DIR", str(locks))
    project.pytester.makepyfile(test_holds=f'''
import os, pathlib, subprocess, sys, time, pytest

WORK = pathlib.Path({str(work)!r})


@pytest.mark.gpu
def test_holding():
    subprocess.Popen([sys.executable, "-c", {TVM_SIDE!r}, "wait", str(WORK)])
    deadline = time.monotonic() + 120  # a safety limit
    while not (WORK / "tvm-tried").exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    (WORK / "body-end").write_text(repr(time.time()))
''')
    project.run("-q").assert_outcomes(passed=1)
    wait_until((work / "tvm-start").exists, "TVM's run_with_gpu_lock")
    assert (work / "tvm-tried").read_text() == "False", "TVM found the lock free"
    assert _stamp(work, "body-end") < _stamp(work, "tvm-start")


TVM_STYLE = """
import pytest
import tvm.testing.locking as locking


@pytest.mark.gpu
def test_takes_tvms_lock_itself():
    assert locking.run_with_gpu_lock(lambda: 42) == 42
"""


def test_a_gpu_test_that_takes_tvms_lock_itself_does_not_wait_for_itself(
        project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TVM's own GPU tests call ``run_with_gpu_lock`` in their body. With the plugin's lock
    on, that call runs at once: tvm-ffi's FileLock opens the file again, and a second
    ``flock`` through another open file would wait for this very process forever
    (pytest-timeout's limit is a safety net against that hang, not a timing assertion)."""
    monkeypatch.setenv("TVM_TEST_LOCK_DIR", str(tmp_path / "locks"))
    project.pytester.makepyfile(test_tvmstyle=TVM_STYLE)
    result = project.run("-q", "--mlc-jit-gpu-lock=on", "-p", "timeout", "--timeout=30")
    result.assert_outcomes(passed=1)


def test_a_dead_holders_lock_is_free_at_once(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 of a holder: the kernel released its flock, so the next taker gets it at
    once (a non-blocking try), and the owner record it left names no one."""
    monkeypatch.setenv("TVM_TEST_LOCK_DIR", str(tmp_path / "locks"))
    ready = tmp_path / "held"
    code = ("import pathlib, sys, time\nfrom pytest_mlcjit import gpu_lock\n"
            "with gpu_lock(owner={'worker': 'gw3'}):\n"
            f"    pathlib.Path({str(ready)!r}).touch()\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        wait_until(ready.exists, "the holder")
        path = lock_path()
        assert (holder(path) or {}).get("pid") == proc.pid
        assert stat.S_IMODE(path.stat().st_mode) == 0o666, "any user may take it"
        lock = GpuLock(path)
        assert not lock.try_acquire(), "held by the holder"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (path.parent / "gpu.lock.owner").exists(), "the dead holder's record is left"
    assert holder(path) is None
    assert lock.try_acquire(), "a dead holder's lock is free at once"
    lock.release()


def test_bad_gpu_lock_values_name_the_value_and_the_valid_ones(
        project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    result = project.run("--mlc-jit-gpu-lock=maybe")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "invalid --mlc-jit-gpu-lock 'maybe': expected one of auto, on, off" in \
        result.stderr.str()
    monkeypatch.setenv("MLC_JIT_GPU_LOCK", "sometimes")
    result = project.run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "invalid MLC_JIT_GPU_LOCK 'sometimes': expected one of auto, on, off" in \
        result.stderr.str()


def test_an_unusable_lock_dir_is_named_and_the_shared_one_falls_back(
        project: Project, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """TVM_TEST_LOCK_DIR under a regular file (no one, root included, can make it): a
    clear error naming the variable, the path and why, and the gpu test fails with it.
    Without the variable the shared default is made mode 01777; where it cannot be used
    (a file in its place: root may write anywhere) the per-user directory replaces it."""
    (tmp_path / "file").write_text("")
    bad = tmp_path / "file" / "locks"
    monkeypatch.setenv("TVM_TEST_LOCK_DIR", str(bad))
    with pytest.raises(MlcJitError) as raised:
        lock_dir()
    assert f"TVM_TEST_LOCK_DIR={bad}: cannot use {bad} as the GPU lock directory: " \
        "Not a directory" in str(raised.value)
    project.pytester.makepyfile(test_baddir='''
import pytest

@pytest.mark.gpu
def test_gpu():
    pass
''')
    result = project.run("-q", "--mlc-jit-gpu-lock=on")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*GPU lock: TVM_TEST_LOCK_DIR={bad}: cannot use*"])

    monkeypatch.delenv("TVM_TEST_LOCK_DIR")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert lock_dir() == tmp_path / "tvm-testing-locks"
    assert stat.S_IMODE((tmp_path / "tvm-testing-locks").stat().st_mode) == 0o1777
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(other))
    (other / "tvm-testing-locks").write_text("not a directory")
    assert lock_dir() == other / f"tvm-testing-locks-{os.getuid()}"
    assert lock_path().name == "gpu.lock"


# -- the reliability tier -----------------------------------------------------------------------
TURNS = r'''
import os, pathlib, time, pytest

WORK = pathlib.Path(os.environ["GPU_LOCK_WORK"])
LIMIT = float(os.environ["GPU_LOCK_LIMIT"])


def wait_for(names, limit):
    deadline = time.monotonic() + limit  # a safety limit, not an assertion
    while sum((WORK / n).exists() for n in names) < len(names) and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.fixture
def all_set_up(request):
    (WORK / f"{request.node.name}.ready").touch()
    wait_for([f"test_turn[{i}].ready" for i in range(3)], 120)


@pytest.mark.gpu
@pytest.mark.parametrize("i", range(3))
def test_turn(all_set_up, i, worker_id):
    (WORK / f"{i}.start").write_text(f"{time.time()!r} {worker_id}")
    wait_for([f"{j}.start" for j in range(3) if j != i], LIMIT)
    (WORK / f"{i}.end").write_text(repr(time.time()))
'''


@pytest.mark.reliability
@pytest.mark.parametrize("mode", ["auto", "off"])
def test_three_workers_take_the_gpu_in_turn_with_the_lock_and_together_without(
        project: Project, tmp_path: Path, mode: str) -> None:
    """-n 3, three gpu tests set up together: with the lock (auto: 3 workers; the shared
    default directory under this run's TMPDIR) their call phases never overlap; off, each
    stays until the two others started, so all three overlap."""
    work = _work(project)
    project.pytester.makepyfile(test_turns=TURNS)
    (tmp_path / "tmp").mkdir()
    env = {"GPU_LOCK_WORK": str(work), "GPU_LOCK_LIMIT": "2" if mode == "auto" else "120",
           "TMPDIR": str(tmp_path / "tmp"), "MLC_JIT_PROGRESS_DELAY": "0.2"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        patch.delenv("TVM_TEST_LOCK_DIR", raising=False)
        result = project.run("-n", "3", f"--mlc-jit-gpu-lock={mode}")
    result.assert_outcomes(passed=3)
    spans = []
    for i in range(3):
        start, worker = (work / f"{i}.start").read_text().split()
        spans.append((float(start), _stamp(work, f"{i}.end"), worker))
    assert len({w for _, _, w in spans}) == 3, spans
    pairs = [(a, b) for a in spans for b in spans if a < b]
    overlapping = [(a, b) for a, b in pairs if a[0] < b[1] and b[0] < a[1]]
    if mode == "auto":
        assert overlapping == [], spans
        assert (tmp_path / "tmp" / "tvm-testing-locks" / "gpu.lock").exists()
        # two waited, each while another worker held the lock (plain lines: no terminal)
        result.stdout.fnmatch_lines(["mlcjit: [[]gw?[]] waiting for the GPU lock (held by gw?, *s)",
                                     "GPU lock: *s waiting for it, *s holding it"])
    else:
        assert len(overlapping) == 3, spans


COMPILES = r'''
import os, pathlib, time
from tvm.relax.frontend import nn

WORK = pathlib.Path(os.environ["GPU_LOCK_WORK"])


class Tiny(nn.Module):
    def __init__(self, hidden):
        self.fc = nn.Linear(8, hidden)

    def forward(self, x):
        return nn.relu(self.fc(x))


def build(hidden):
    (WORK / f"compile-{hidden}.start").write_text(repr(time.time()))
    other = WORK / f"compile-{12 - hidden}.start"
    deadline = time.monotonic() + 120  # a safety limit, not an assertion
    while not other.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    (WORK / f"compile-{hidden}.end").write_text(repr(time.time()))
    return Tiny(hidden), {"forward": {"x": nn.spec.Tensor((2, 8), "float32")}}
'''


@pytest.mark.reliability
def test_compiles_overlap_with_the_lock_on(project: Project, tmp_path: Path,
                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    """Two gpu tests of two libraries under -n 2 with the lock on: their compiles (setup,
    outside the lock) overlap, each factory staying until the other has started; their
    call phases do not. (The factories' files are outside the project: files the factory
    reads there would be recorded as its inputs.)"""
    work = tmp_path_factory.mktemp("gpu-work")
    project.pytester.makepyfile(gpufactory=COMPILES, test_compiles=f'''
import pathlib, time, pytest
from pytest_mlcjit import TVMModel

WORK = pathlib.Path({str(work)!r})


@pytest.mark.gpu
@pytest.mark.mlc_devices("cpu")
@pytest.mark.parametrize("compiled_model", [TVMModel("gpufactory:build", config={{"hidden": h}})
                                            for h in (4, 8)], indirect=True)
def test_model(compiled_model, request):
    h = 4 if "hidden=4" in request.node.name else 8
    (WORK / f"call-{{h}}.start").write_text(repr(time.time()))
    (WORK / f"call-{{h}}.end").write_text(repr(time.time()))
''')
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GPU_LOCK_WORK", str(work))
        patch.setenv("TVM_TEST_LOCK_DIR", str(tmp_path / "locks"))
        project.run("-n", "2", "--mlc-device=cpu").assert_outcomes(passed=2)
    a, b = ((_stamp(work, f"{k}-{h}.start"), _stamp(work, f"{k}-{h}.end"))
            for k in ("compile",) for h in (4, 8))
    assert a[0] < b[1], "the compiles overlap"
    assert b[0] < a[1], "the compiles overlap"
    c, d = ((_stamp(work, f"call-{h}.start"), _stamp(work, f"call-{h}.end")) for h in (4, 8))
    assert c[1] < d[0] or d[1] < c[0], "the call phases do not"


@pytest.mark.reliability
def test_a_terminal_shows_the_wait_for_the_gpu_lock_live(project: Project,
                                                          tmp_path: Path) -> None:
    """On a pseudo-terminal, while TVM's run_with_gpu_lock holds the lock, the status line
    says that the gpu test waits for it and who holds it; the holder lets go once that is
    on the screen, and nothing of the status is left at the end."""
    from test_progress import run_in_pty

    locks, work = tmp_path / "locks", _work(project)
    release = tmp_path / "release"
    project.pytester.makepyfile(test_waits_tty=f'''
import pathlib, time, pytest

WORK = pathlib.Path({str(work)!r})


@pytest.fixture
def after_the_holder():
    deadline = time.monotonic() + 120  # a safety limit
    while not (WORK / "tvm-start").exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.mark.gpu
def test_on_the_gpu(after_the_holder):
    pass
''')
    env = {**os.environ, "TERM": "xterm", "TVM_TEST_LOCK_DIR": str(locks),
           "MLC_JIT_PROGRESS_DELAY": "0.2", "MLC_JIT_PROGRESS_INTERVAL": "0.05"}
    for name in ("COLUMNS", "LINES", "CI", "BUILD_NUMBER"):  # pytest reads these
        env.pop(name, None)
    tvm = subprocess.Popen([sys.executable, "-c", TVM_SIDE, "hold", str(work), str(release),
                            "go"], env=env)
    wanted = f"mlcjit: [main] waiting for the GPU lock (held by pid {tvm.pid}, "
    shown: list[str] = []

    def look(lines: list[str]) -> None:
        shown.extend(line for line in lines if wanted in line)
        if shown:
            release.write_text("go")

    try:
        _, final, raw = run_in_pty(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-q",
             f"--mlc-jit-cache-dir={project.cache}"], project.pytester.path, env, look)
        assert tvm.wait(timeout=60) == 0
    finally:
        release.write_text("go")
        tvm.kill()
    assert shown, raw.decode(errors="replace")
    text = "\n".join(final)
    assert "mlcjit: [" not in text, text
    assert "1 passed" in text, text
