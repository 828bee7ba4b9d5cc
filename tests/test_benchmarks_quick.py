"""Each benchmark's ``--quick`` mode still runs: tiny models, one repetition, and only
correctness checked (compile counts, cache hits, prune results), never speed.

They take minutes of CPU, so they are marked ``bench`` and run only with ``--run-bench``
(``.ci/run`` runs them once, after the main suite: ``pytest -n 2 --run-bench -m bench``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = ["bench_dedup.py", "bench_makespan.py", "bench_warm.py", "bench_import.py",
           "bench_scale.py", "bench_coldpath.py", "bench_remote.py"]


def test_every_benchmark_is_covered() -> None:
    assert sorted(p.name for p in BENCHMARKS.glob("bench_*.py")) == sorted(SCRIPTS)


@pytest.mark.bench
@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_mode_passes(script: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", "--work-dir", str(tmp_path)],
        cwd=BENCHMARKS.parent, capture_output=True, text=True, timeout=900, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "all correctness checks passed" in proc.stdout, output[-6000:]
