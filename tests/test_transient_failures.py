"""A failed compile outlives its run only when it is shown to be deterministic: the same
error from the same key and inputs in two compiles in a row (the first is recorded as seen
once, the second makes it a known failure, a success forgets it). A missing environment
variable, a file checked with ``os.path.exists``, a tool that failed once, a one-off error
are compiled again by the next run; an out-of-memory, and a failure whose recorded inputs
are incomplete (a tool it ran, which no record follows), are never remembered. A known failure
does not hide an entry that a remote holds: the stores are asked first.

Compilations are counted by the model factory itself, in the compile process.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import Project

#: A factory that fails in each of the ways a run may meet once and not again; ``flag``:
#: a file whose presence makes its tool (a shell, which the recorded inputs do not see)
#: fail.
FLAKY_MODEL = '''
import os
import subprocess

from tvm.relax.frontend import nn

HERE = os.path.dirname(os.path.abspath(__file__))


class Tiny(nn.Module):
    def __init__(self):
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return nn.relu(self.fc(x))


def build(how="ok", flag=""):
    with open(os.environ["MLCJIT_TEST_COUNT"], "a") as f:
        f.write(f"how={how}\\n")
    if how == "env":
        os.environ["FLAKY_TOKEN"]  # KeyError: the shell that ran the tests lacked it
    elif how == "exists" and not os.path.exists(os.path.join(HERE, "override.cfg")):
        raise RuntimeError("override.cfg is not there yet")
    elif how == "tool":
        subprocess.run(["sh", "-c", f"test ! -e {flag}"], check=True)
    elif how == "once":
        raise RuntimeError("a one-off failure")
    elif how == "cuda":
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    elif how == "broken":
        raise NotImplementedError("operator not supported yet")
    elif how == "machine" and os.environ.get("MLCJIT_TEST_BROKEN"):  # not recorded: MLCJIT_*
        raise NotImplementedError("this machine's TVM lacks the operator")
    return Tiny(), {"forward": {"x": nn.spec.Tensor((2, 8), "float32")}}
'''

TESTS = '''
import pytest
from pytest_mlcjit import TVMModel

SPECS = [TVMModel("flakymodel:build", config={{"how": how, "flag": {flag!r}}})
         for how in {kinds!r}]


@pytest.mark.parametrize("compiled_model", SPECS, indirect=True, ids={kinds!r})
def test_model(compiled_model):
    assert compiled_model.path.exists()
'''

TRANSIENT = ["env", "exists", "tool", "once", "cuda"]


@pytest.fixture
def flaky(project: Project) -> Project:
    project.pytester.makepyfile(flakymodel=FLAKY_MODEL)
    return project


def _write_tests(project: Project, kinds: list[str], flag: Path | str = "") -> None:
    project.pytester.makepyfile(test_flaky=TESTS.format(kinds=kinds, flag=str(flag)))


def _compiles(project: Project) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in project.compiles():
        how = line.partition("how=")[2]
        counts[how] = counts.get(how, 0) + 1
    return counts


def test_one_failure_is_not_remembered_two_identical_ones_are(flaky: Project,
                                                              tmp_path: Path) -> None:
    """Each transient kind fails once and is compiled again by the next run with nothing
    changed; after two identical failures a deterministic one is known (the third run does
    not call its factory), while an out-of-memory is compiled again every time."""
    flag = tmp_path / "tool-fails"
    flag.touch()
    _write_tests(flaky, [*TRANSIENT, "broken"], flag)
    first = flaky.run("-p", "no:xdist", "--mlc-device=cpu")
    first.assert_outcomes(errors=6)
    assert _compiles(flaky) == dict.fromkeys([*TRANSIENT, "broken"], 1)
    assert "(a known failure" not in first.stdout.str()

    second = flaky.run("-p", "no:xdist", "--mlc-device=cpu")
    second.assert_outcomes(errors=6)
    assert _compiles(flaky) == dict.fromkeys([*TRANSIENT, "broken"], 2), \
        "one failure is not remembered: every kind compiled again"
    assert "(a known failure" not in second.stdout.str()

    third = flaky.run("-p", "no:xdist", "--mlc-device=cpu")
    third.assert_outcomes(errors=6)
    counts = _compiles(flaky)
    assert counts["broken"] == 2, "failed twice the same way: known, not compiled again"
    assert counts["cuda"] == 3, "an out-of-memory is never remembered"
    assert counts["tool"] == 3, "a tool's failure (inputs incomplete) is never remembered"
    assert third.stdout.str().count("(a known failure, recorded ") >= 1
    third.stdout.fnmatch_lines(["*NotImplementedError: operator not supported yet*"])


def test_a_success_forgets_a_failure_seen_once(flaky: Project) -> None:
    """The cause goes away (the file appears): the next run compiles, and the failure
    seen once is gone; when it comes back it is seen once again, not known."""
    _write_tests(flaky, ["exists"])
    flaky.run("-p", "no:xdist", "--mlc-device=cpu").assert_outcomes(errors=1)
    override = flaky.pytester.path / "override.cfg"
    override.write_text("on\n")
    flaky.run("-p", "no:xdist", "--mlc-device=cpu").assert_outcomes(passed=1)
    assert list((flaky.cache / ".mlcjit" / "failed").iterdir()) == [], "forgotten"
    override.unlink()
    flaky.run("-p", "no:xdist", "--mlc-device=cpu").assert_outcomes(errors=1)
    again = flaky.run("-p", "no:xdist", "--mlc-device=cpu")
    again.assert_outcomes(errors=1)
    assert _compiles(flaky) == {"exists": 4}, "seen once after the success: compiled again"


def test_a_known_failure_does_not_hide_a_remote_entry(
        flaky: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Machine A's factory fails twice alike (by something no recorded input names): a
    known failure there. Machine B, where it works, compiles the same key and uploads it to
    the shared file:// remote. Under ON, A then gets the remote's entry instead of its
    known failure, and compiles nothing."""
    monkeypatch.setenv("MLCJIT_TEST_BROKEN", "1")
    _write_tests(flaky, ["machine"])
    for _ in range(2):
        flaky.run("-p", "no:xdist", "--mlc-device=cpu").assert_outcomes(errors=1)
    known = flaky.run("-p", "no:xdist", "--mlc-device=cpu")
    known.assert_outcomes(errors=1)
    assert "(a known failure, recorded " in known.stdout.str()
    before = _compiles(flaky)["machine"]  # 2 (1 where one failure made it known)

    shared = tmp_path / "remote"
    shared.mkdir()
    remote = f"--mlc-jit-remote={shared.as_uri()}"
    monkeypatch.delenv("MLCJIT_TEST_BROKEN")
    machine_b = f"--mlc-jit-cache-dir={tmp_path / 'machine-b'}"
    flaky.run("-p", "no:xdist", "--mlc-device=cpu", machine_b, remote,
              cache=False).assert_outcomes(passed=1)
    assert _compiles(flaky) == {"machine": before + 1}, "machine B compiled and uploaded it"

    monkeypatch.setenv("MLCJIT_TEST_BROKEN", "1")  # a compile on A would fail again
    fetched = flaky.run("-p", "no:xdist", "--mlc-device=cpu", remote)
    fetched.assert_outcomes(passed=1)
    assert _compiles(flaky) == {"machine": before + 1}, "the remote's entry, not a compile"
    assert len(flaky.libraries()) == 1, "downloaded into A's cache"


@pytest.mark.parametrize("message", [
    "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB",
    "CUDA_ERROR_OUT_OF_MEMORY",
    "TVMError: CUDA: cudaErrorMemoryAllocation",
    "MemoryError",
    "terminate called after throwing an instance of 'std::bad_alloc'",
    "TVMError: Failed to allocate 1073741824 bytes on device",
    "OSError: [Errno 12] Cannot allocate memory",
    "hipErrorOutOfMemory",
    "VK_ERROR_OUT_OF_DEVICE_MEMORY",
    "RESOURCE_EXHAUSTED: OOM when allocating tensor",
])
def test_out_of_memory_messages(message: str) -> None:
    from pytest_mlcjit.engine.failures import out_of_memory

    assert out_of_memory(message)


@pytest.mark.parametrize("message", [
    "NotImplementedError: operator not supported yet",
    "RuntimeError: shape mismatch in fc2 (room for 4, got 8)",
    "KeyError: 'MEMORY_LIMIT'",
    "building flakymodel:build with config {\"mode\": \"zoom\", \"name\": \"oom\"}",
])
def test_other_messages_are_not_out_of_memory(message: str) -> None:
    from pytest_mlcjit.engine.failures import out_of_memory

    assert not out_of_memory(message)
