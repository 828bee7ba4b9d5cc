"""Each benchmark's ``--quick`` mode still runs: tiny models, one to three rounds, the
correctness checks (compile counts from the benchmark's own factory, libraries on disk,
prune results, nothing left after an interrupt) and a computed verdict for every figure.

Speed is never asserted here: a quick mode measures too little, on a shared CI machine, for
its figures to mean anything. What is asserted about the figures is that each target has a
verdict computed from its ratio (a hard-coded or stale verdict fails), parsed with this
file's own pattern rather than the benchmarks' code. The full modes turn a missed target
into exit status 3.

The quick modes take minutes of CPU, so they are marked ``bench`` and run only with
``--run-bench`` (``.ci/run`` runs them once, after the main suite:
``pytest -n 2 --run-bench -m bench``)."""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
#: Longest first, so that ``-n 2`` does not end with one long script running alone.
SCRIPTS = ["bench_coldpath.py", "bench_dedup.py", "bench_remote.py", "bench_warm.py",
           "bench_makespan.py", "bench_interrupt.py", "bench_import.py", "bench_scale.py"]

#: ``verdict: NAME = 1.2345x, target <= 1.2x: met`` / ``missed by 3.1%``, or ``no target``.
VERDICT = re.compile(r"^verdict: (?P<name>.+?) = (?P<ratio>\S+)x, (?:target (?P<op><=|<) "
                     r"(?P<target>[0-9.]+)x: (?P<verdict>.+)|no target)$", re.MULTILINE)


def check_verdicts(stdout: str) -> list[str]:
    """Every figure's verdict follows from its printed ratio and target; returns the names
    of the figures that have a target."""
    with_target = []
    for m in VERDICT.finditer(stdout):
        if m["target"] is None:
            continue
        with_target.append(m["name"])
        ratio, target = float(m["ratio"]), float(m["target"])
        assert not math.isnan(ratio), f"{m['name']}: not measured"
        met = ratio < target if m["op"] == "<" else ratio <= target
        if met:
            assert m["verdict"] == "met", m.group(0)
        else:
            missed = re.fullmatch(r"missed by (-?[0-9.]+)%", m["verdict"])
            assert missed is not None, m.group(0)
            assert abs(float(missed[1]) - (ratio / target - 1) * 100) < 0.1, m.group(0)
    return with_target


def benchlib(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``benchmarks/_benchlib.py``, loaded for this test only."""
    spec = importlib.util.spec_from_file_location("bench_lib_under_test",
                                                  BENCHMARKS / "_benchlib.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look it up there
    spec.loader.exec_module(module)
    return module


def test_every_benchmark_is_covered() -> None:
    assert sorted(p.name for p in BENCHMARKS.glob("bench_*.py")) == sorted(SCRIPTS)


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_a_missed_target_is_computed_printed_and_the_exit_status(
        quick: bool, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmarks' verdicts: computed from the ratio as printed, a missed target exits
    3 in a full run and is printed but not enforced in ``--quick``; a failed correctness
    check exits 1 either way."""
    lib = benchlib(monkeypatch)
    checks = lib.Checks(quick=quick)
    checks.figure("a / b", 1.23456, 1.2)
    checks.figure("c / d", 1.2, 1.2)
    checks.figure("e / f", 0.5, 1.0, strict=True)
    checks.figure("g / h", 7.0)

    code = checks.exit_code()

    out = capsys.readouterr().out
    assert code == (0 if quick else 3)
    assert "verdict: a / b = 1.2346x, target <= 1.2x: missed by 2.9%" in out
    assert "verdict: c / d = 1.2000x, target <= 1.2x: met" in out
    assert "verdict: e / f = 0.5000x, target < 1x: met" in out
    assert "verdict: g / h = 7.0000x, no target" in out
    assert check_verdicts(out) == ["a / b", "c / d", "e / f"]
    checks.expect(False, "a compile count")
    assert checks.exit_code() == 1


@pytest.mark.bench
@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_mode_passes(script: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", "--work-dir", str(tmp_path)],
        cwd=BENCHMARKS.parent, capture_output=True, text=True, timeout=900, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "all correctness checks passed" in proc.stdout, output[-6000:]
    assert check_verdicts(proc.stdout), f"no figure with a target:\n{output[-6000:]}"
