"""``benchmarks/gpu_check.py``, the GPU check of issue 20, where there is no GPU: it says it
skips, with the reason, and exits 0 (2 with ``--require-gpu``); and its figures (overlapping
holders, idle fraction) computed on hand-made intervals. The check itself needs an NVIDIA
GPU and is run by hand on one (docs/how-to/gpu.md)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check() -> Iterator[ModuleType]:
    """The script, imported from its file as a module (it is no package's)."""
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # NamedTuple looks its module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def _run(tmp_path: Path, *args: str, path: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": path, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(SCRIPT), f"--work-dir={tmp_path / 'work'}",
                           *args], capture_output=True, text=True, env=env, timeout=120,
                          check=False)


def test_without_nvidia_smi_it_skips(tmp_path: Path) -> None:
    """No ``nvidia-smi`` on PATH (an empty directory): the skip line, exit 0; with
    ``--require-gpu`` exit 2; nothing written in the work dir either way."""
    empty = tmp_path / "bin"
    empty.mkdir()
    for args, status in (((), 0), (("--require-gpu",), 2)):
        proc = _run(tmp_path, *args, path=str(empty))
        assert proc.returncode == status, proc.stdout + proc.stderr
        assert proc.stdout.splitlines()[-1] == \
            "gpu_check: SKIP no NVIDIA GPU (nvidia-smi not found)"
        assert not (tmp_path / "work").exists()


def test_a_gpu_that_tvm_does_not_see_skips(tmp_path: Path) -> None:
    """A stand-in ``nvidia-smi`` (the GPU is the point: there is none here) lists one GPU,
    and TVM's probe finds no ``cuda:0`` (no device nodes here; ``CUDA_VISIBLE_DEVICES``
    empty where there are): the skip line names the probe's reason."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0000)'\n")
    smi.chmod(0o755)
    proc = _run(tmp_path, path=str(bin_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1].startswith(
        "gpu_check: SKIP no NVIDIA GPU (TVM sees no cuda:0")


def test_overlapping_holders(gpu_check: ModuleType) -> None:
    iv = gpu_check.Interval
    intervals = [
        iv("a", "cuda:0", 0.0, 1.0), iv("b", "cuda:0", 1.0, 2.0),  # touching: no overlap
        iv("c", "cuda:0", 1.5, 2.5),                                 # overlaps b
        iv("d", "cuda:1", 0.5, 2.0),                                 # another GPU
        iv("e", "cuda:0", 3.0, 4.0), iv("f", "cuda:0", 3.1, 3.2),    # f inside e
        iv("g", "cuda:0", 3.9, 5.0),                                 # overlaps e, not f
        iv("h", "cuda:1", 10.0, 11.0), iv("h", "cuda:1", 10.5, 11.5),  # one holder
    ]
    pairs = {(a.holder, b.holder) for a, b in gpu_check.overlapping_pairs(intervals)}
    assert pairs == {("b", "c"), ("e", "f"), ("e", "g")}
    assert gpu_check.overlapping_pairs([]) == []


def test_idle_fraction_per_gpu(gpu_check: ModuleType) -> None:
    iv = gpu_check.Interval
    intervals = [
        iv("a", "cuda:0", 1.0, 3.0), iv("b", "cuda:0", 2.0, 4.0),   # union 1..4: 3s
        iv("c", "cuda:0", 6.0, 7.0),                                  # 1s more
        iv("d", "cuda:1", -5.0, 1.0),                                 # clipped to 0..1
        iv("e", "cuda:2", 20.0, 30.0),                                # outside the run
    ]
    assert gpu_check.busy_seconds(intervals[:3]) == pytest.approx(4.0)
    idle = gpu_check.idle_fractions(intervals, 0.0, 10.0)
    assert idle == pytest.approx({"cuda:0": 0.6, "cuda:1": 0.9, "cuda:2": 1.0})
    assert list(idle) == ["cuda:0", "cuda:1", "cuda:2"]


def test_records_and_summary_line(gpu_check: ModuleType, tmp_path: Path) -> None:
    """The records the tests' bodies and the recorder write, one JSON line per holder, read
    back; the summary line's form."""
    lines = [{"holder": "t[0]", "device": "cuda:0", "start": 1.0, "end": 2.0, "pid": 7,
              "worker": "gw0", "rounds": 3},
             {"holder": "t[1]", "device": "cuda:0", "start": 1.5, "end": 2.5, "pid": 8,
              "worker": "gw1"}]
    (tmp_path / "gw0.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    read = gpu_check.read_intervals(tmp_path)
    assert read == [gpu_check.Interval("t[0]", "cuda:0", 1.0, 2.0, 7, "gw0"),
                    gpu_check.Interval("t[1]", "cuda:0", 1.5, 2.5, 8, "gw1")]
    assert len(gpu_check.overlapping_pairs(read)) == 1
    line = gpu_check.summary_line("PASS", {"overlaps": 0, "idle": "0.12",
                                           "cuda_libraries": "5/5", "mlc": "skipped"})
    assert line == "gpu_check: PASS overlaps=0 idle=0.12 cuda_libraries=5/5 mlc=skipped"
