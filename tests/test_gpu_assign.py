"""One GPU per xdist worker on a multi-GPU host (``--mlc-jit-gpu-assign``).

There is no GPU on the machines that run this suite, so the GPUs are a stand-in: the
test-only ``MLCJIT_TEST_PRESENCE`` makes the device probe report them (a mock, only because
the GPUs cannot exist here). Everything else is real: real ``-n 2`` xdist runs (the workers'
ids and their collection check are the subject), real CUDA cross-compiles with nvcc, the
compiles counted by the factory and the libraries found on disk. A CUDA library cannot be
loaded here, so the tests only record where they run and which library they got.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import Project

#: Each test records its worker, its device, its model's device and library.
#: Under xdist the call phase holds the GPU lock of the test's GPU: a second ``flock`` on
#: that file (another open file, so the kernel counts it as another holder) must fail.
RECORDING_TESTS = '''
import fcntl
import json
import os

import pytest
from pytest_mlcjit import TVMModel
from pytest_mlcjit.device.gpu_lock import lock_path


def held(path):
    with open(path, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


@pytest.mark.mlc_model(TVMModel("tinymodel:build", config={"hidden": 4}))
def test_where(compiled_model, mlc_device, request):
    record = {"test": request.node.name,
              "worker": getattr(request.config, "workerinput", {}).get("workerid", "main"),
              "device": mlc_device.full_name, "model": compiled_model.device.full_name,
              "arch": compiled_model.target.get("arch"), "path": str(compiled_model.path),
              "lock": os.path.basename(lock_path(mlc_device)),
              "held": held(lock_path(mlc_device))}
    with open(os.environ["MLCJIT_TEST_RECORD"], "a") as f:
        f.write(json.dumps(record) + "\\n")
'''


def _gpus(*archs: str) -> str:
    return json.dumps({f"cuda:{i}": {"present": True, "arch": arch}
                       for i, arch in enumerate(archs)})


def _setup(project: Project, monkeypatch: pytest.MonkeyPatch, *archs: str) -> Path:
    record = project.pytester.path / "record.jsonl"
    monkeypatch.setenv("MLCJIT_TEST_PRESENCE", _gpus(*archs))
    monkeypatch.setenv("MLCJIT_TEST_RECORD", str(record))
    monkeypatch.setenv("TVM_TEST_LOCK_DIR", str(project.pytester.path / "locks"))
    project.pytester.makepyfile(test_spread=RECORDING_TESTS)
    return record


def _records(record: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in record.read_text().splitlines()]


def _by_worker(records: list[dict[str, Any]], test: str) -> dict[str, dict[str, Any]]:
    return {r["worker"]: r for r in records if r["test"] == test}


def test_the_assignment_rule() -> None:
    """The rule itself, on a probe's result (three GPUs of the stand-in kind: no GPU here):
    gwI gets the (I mod G)-th GPU for a GPU kind named without an index; the CPU, an explicit
    index, ``off``, a process that is no worker and ``--mlc-jit-prepare`` stay put. The
    default tier's case; the end-to-end runs are in the reliability tier."""
    import dataclasses

    from pytest_mlcjit import Settings
    from pytest_mlcjit.device import Device, Presence
    from pytest_mlcjit.plugin.plan import assigned_device

    presence = {"cpu": Presence(True), "cuda": Presence(True, arch="sm_90"),
                "cuda:1": Presence(True, arch="sm_80"), "cuda:2": Presence(True, arch="sm_90")}
    on = dataclasses.replace(Settings(), devices=("cpu", "cuda", "cuda:2"), presence=presence)
    cuda, cpu, two = Device.parse("cuda"), Device.parse("cpu"), Device.parse("cuda:2")
    assert [str(assigned_device(cuda, on, f"gw{i}")) for i in range(5)] == [
        "cuda", "cuda:1", "cuda:2", "cuda", "cuda:1"]  # cuda:0 is written cuda
    assert assigned_device(cpu, on, "gw1") == cpu
    assert assigned_device(two, on, "gw0") == two, "an explicit index is never moved"
    assert assigned_device(cuda, on, "main") == cuda
    assert assigned_device(cuda, dataclasses.replace(on, gpu_assign="off"), "gw1") == cuda
    assert assigned_device(cuda, dataclasses.replace(on, prepare=True), "gw1") == cuda
    one = dataclasses.replace(on, presence={"cuda": Presence(True, arch="sm_90")})
    assert assigned_device(cuda, one, "gw1") == cuda, "one GPU: nothing to spread"


@pytest.mark.reliability
def test_workers_spread_over_the_gpus_one_library_per_arch(
        project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three GPUs, two of one architecture (cuda:0, cuda:2) and one of another (cuda:1),
    two workers: each worker's ``cuda`` tests run on its own GPU; GPUs of one architecture
    share a library, the other architecture gets its own; an explicit index stays; with
    ``--mlc-jit-gpu-assign=off`` every worker stays on GPU 0."""
    record = _setup(project, monkeypatch, "sm_90", "sm_80", "sm_90")
    # --dist each: every worker runs every test, and xdist checks that both collected the
    # same ids (an id that named the worker's GPU would fail the run here).
    result = project.run("-n", "2", "--dist", "each", "--mlc-device=cuda,cuda:2", "-v")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines([
        "*devices=cuda (present, 3 GPUs (sm_80, sm_90): xdist worker gwI runs on "
        "cuda:(I mod 3) (--mlc-jit-gpu-assign)), cuda:2 (present)*"])
    records = _records(record)
    spread = _by_worker(records, "test_where[cuda]")
    assert {w: (r["device"], r["model"], r["arch"]) for w, r in spread.items()} == {
        "gw0": ("cuda:0", "cuda:0", "sm_90"), "gw1": ("cuda:1", "cuda:1", "sm_80")}
    explicit = _by_worker(records, "test_where[cuda:2]")
    assert {w: (r["device"], r["model"], r["arch"]) for w, r in explicit.items()} == {
        "gw0": ("cuda:2", "cuda:2", "sm_90"), "gw1": ("cuda:2", "cuda:2", "sm_90")}, \
        "an explicit index is never moved"
    assert explicit["gw0"]["path"] == explicit["gw1"]["path"] == spread["gw0"]["path"], \
        "cuda:0 and cuda:2 (both sm_90) share one library"
    assert spread["gw1"]["path"] != spread["gw0"]["path"], "sm_80 has a library of its own"
    assert {(r["device"], r["lock"], r["held"]) for r in records} == {
        ("cuda:0", "gpu.lock", True), ("cuda:1", "gpu-1.lock", True),
        ("cuda:2", "gpu-2.lock", True)}, "each test holds the lock of its own GPU"
    assert {r["path"] for r in records} == {str(p) for p in project.libraries()}
    assert sorted(m["key"]["target"]["arch"] for m in project.manifests()) == [
        "sm_80", "sm_90"]
    assert len(project.compiles()) == 2

    record.unlink()
    result = project.run("-n", "2", "--dist", "each", "--mlc-device=cuda",
                         "--mlc-jit-gpu-assign=off")
    result.assert_outcomes(passed=2)
    kept = _by_worker(_records(record), "test_where[cuda]")
    assert {w: (r["device"], r["arch"]) for w, r in kept.items()} == {
        "gw0": ("cuda:0", "sm_90"), "gw1": ("cuda:0", "sm_90")}
    assert len(project.compiles()) == 2, "GPU 0's library was there already"


def test_a_bad_gpu_assign_is_a_usage_error(project: Project) -> None:
    result = project.run("--mlc-jit-gpu-assign=maybe")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*invalid --mlc-jit-gpu-assign 'maybe': expected one of auto, off*"])


def test_a_library_served_again_for_another_device_is_that_devices(
        project: Project, warm_template: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine serves a library it already returned from memory: asked for another device
    of the same target (another GPU of the architecture; here ``cpu:1``, which needs no
    GPU), the model says that device and is not the first one's loaded module."""
    from pytest_mlcjit import JIT, Settings
    from pytest_mlcjit import TVMModel as Model
    from pytest_mlcjit.device import Device

    project.warm(warm_template)
    monkeypatch.syspath_prepend(str(project.pytester.path))
    engine = JIT(Settings(cache_dir=project.cache))
    spec = Model("tinymodel:build", config={"hidden": 4})
    first = engine.compile(spec, "cpu")
    first.load()
    again = engine.compile(spec, "cpu:1")
    assert again.path == first.path
    assert again.device == Device.parse("cpu:1")
    assert again.hit
    assert again.load() is not first.load(), "its own module, loaded on its own device"
    assert project.compiles() == []
