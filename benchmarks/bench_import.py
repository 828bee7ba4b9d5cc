"""Benchmark 4, plugin import cost: ``pytest --co -q`` on tests that do not use the plugin.

The same generated test directory is collected with the plugin (installed, auto-loaded),
with the plugin and ``--mlc-device=cpu`` (which skips the start-up device probe) and with
``-p no:mlcjit``, alternating, in fresh processes; the figure is the median of the
per-round ratios to ``-p no:mlcjit`` (both plugin variants have the target <= 1.03x).

Then where the difference goes (diagnostic, no target; timed by this script):

* ``python -X importtime``, with and without the plugin: the modules only the plugin's
  run imports, with their own import time (median over runs), heaviest first;
* ``import pytest_mlcjit.plugin`` alone, timed in a fresh interpreter that already
  imported pytest;
* what ``pytest_configure`` does at start-up for the default ``--mlc-device=auto``:
  the device probe (:func:`pytest_mlcjit.device.probe`), timed alone.

    python benchmarks/bench_import.py            # full: 31 rounds
    python benchmarks/bench_import.py --quick    # CI: 2 rounds, checks all collect the same
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from _benchlib import (
    Checks,
    bench_env,
    common_args,
    median,
    print_header,
    pytest_argv,
    rotate,
    run_timed,
    spread,
    table,
    work_dir,
)

TARGET = 1.03
_COLLECTED_RE = re.compile(r"(\d+) tests? collected")
_IMPORTTIME_RE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)\s*$")

PLUGIN_IMPORT_PY = '''\
import time
import pytest, xdist.plugin  # what any pytest run with xdist imports anyway
t0 = time.perf_counter()
import pytest_mlcjit.plugin
print(time.perf_counter() - t0)
'''

PROBE_PY = '''\
import time
from pytest_mlcjit.device import devices_to_probe, parse_device_list, probe
t0 = time.perf_counter()
result = probe(devices_to_probe(parse_device_list("auto")))
print(time.perf_counter() - t0)
'''


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(parser)
    parser.add_argument("--reps", type=int, default=31,
                        help="rounds of alternating runs (default 31; at least 15)")
    parser.add_argument("--files", type=int, default=20, help="test files (default 20)")
    parser.add_argument("--tests-per-file", type=int, default=10,
                        help="tests per file (default 10)")
    parser.add_argument("--importtime-reps", type=int, default=5,
                        help="runs of -X importtime per variant (default 5)")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.files, args.tests_per_file, args.importtime_reps = 2, 3, 3, 1
    return args


def write_tests(root: Path, files: int, per_file: int) -> Path:
    suite = root / "plain"
    suite.mkdir()
    (suite / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    for f in range(files):
        body = ["import pytest", ""]
        for t in range(per_file):
            body += [f"def test_{t}():", f"    assert {t} + 1 == {t + 1}", ""]
        body += ['@pytest.mark.parametrize("x", [1, 2, 3])', "def test_param(x):",
                 "    assert x", ""]
        (suite / f"test_plain_{f}.py").write_text("\n".join(body), encoding="utf-8")
    return suite


def importtime(suite: Path, extra: list[str], env: dict[str, str]) -> dict[str, int]:
    """``{module: self import time in us}`` of one ``pytest --co`` under -X importtime."""
    argv = [sys.executable, "-X", "importtime", "-m", "pytest", "--co", "-q",
            "-p", "no:cacheprovider", *extra]
    proc = subprocess.run(argv, cwd=suite, env=env, capture_output=True, text=True,
                          check=False)
    out: dict[str, int] = {}
    for line in proc.stderr.splitlines():
        if (m := _IMPORTTIME_RE.match(line)) is not None:
            out[m.group(4)] = int(m.group(1))
    return out


def time_snippet(code: str, env: dict[str, str], reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, check=False)
        if proc.returncode == 0:
            times.append(float(proc.stdout.strip().splitlines()[-1]))
    return times


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    print_header("bench_import: plugin import cost on a test dir that does not use it",
                 f"{args.files} files x {args.tests_per_file + 3} tests, pytest --co -q, "
                 f"{args.reps} round(s) of the variants, alternating")
    checks = Checks(quick=args.quick)
    env = bench_env()
    base = "-p no:mlcjit"
    variants = {"with plugin": [], "with plugin, --mlc-device=cpu": ["--mlc-device=cpu"],
                base: ["-p", "no:mlcjit"]}
    with work_dir(args, "import") as root:
        suite = write_tests(root, args.files, args.tests_per_file)
        expected = args.files * (args.tests_per_file + 3)
        for extra in variants.values():  # warm the page cache and __pycache__ once
            run_timed(pytest_argv("--co", *extra), cwd=suite, env=env)
        walls: dict[str, list[float]] = {v: [] for v in variants}
        ratios: dict[str, list[float]] = {v: [] for v in variants}
        cpu_ratios: dict[str, list[float]] = {v: [] for v in variants}
        for rep in range(args.reps):
            this, cpu = {}, {}
            for variant in rotate(list(variants), rep):
                run = run_timed(pytest_argv("--co", *variants[variant]), cwd=suite, env=env)
                checks.run_ok(run, f"rep {rep} {variant}")
                m = _COLLECTED_RE.search(run.output)
                checks.expect(m is not None and int(m.group(1)) == expected,
                              f"rep {rep} {variant}: expected {expected} tests collected:\n"
                              f"{run.tail(5)}")
                this[variant], cpu[variant] = run.seconds, run.cpu_seconds
                walls[variant].append(run.seconds)
            for variant in variants:
                ratios[variant].append(this[variant] / this[base])
                cpu_ratios[variant].append(cpu[variant] / cpu[base])

        rows = []
        for variant in variants:
            ratio = median(ratios[variant])
            verdict = ""
            if variant != base:
                fig = checks.figure(f"pytest --co, {variant} / {base}", ratio, TARGET)
                checks.figure(f"pytest --co CPU time, {variant} / {base}",
                              median(cpu_ratios[variant]))
                verdict = fig.verdict()
            rows.append([variant, spread(walls[variant], "{:.3f}"), f"{ratio:.3f}x",
                         f"{min(walls[variant]) / min(walls[base]):.3f}x",
                         f"{median(cpu_ratios[variant]):.3f}x", verdict])
        print(table(["variant", "pytest --co wall s", "ratio (median of per-round)",
                     "ratio of minimums", "CPU-time ratio (median of per-round)",
                     f"target <= {TARGET}x"], rows))
        diff = median(walls["with plugin"]) - median(walls[base])
        low = min(walls["with plugin"]) - min(walls[base])
        print(f"\ndifference per pytest start: {diff * 1e3:+.0f} ms (medians), "
              f"{low * 1e3:+.0f} ms (minimums)")

        # -- where it goes (diagnostic) ----------------------------------------------------
        per_module: dict[str, list[int]] = defaultdict(list)
        baseline_modules: set[str] = set()
        totals: dict[str, list[int]] = {"with": [], "without": []}
        for _ in range(args.importtime_reps):
            with_ = importtime(suite, [], env)
            without = importtime(suite, ["-p", "no:mlcjit"], env)
            baseline_modules |= set(without)
            for mod, us in with_.items():
                per_module[mod].append(us)
            totals["with"].append(sum(with_.values()))
            totals["without"].append(sum(without.values()))
        only = {mod: median([float(x) for x in us]) for mod, us in per_module.items()
                if mod not in baseline_modules}
        total_only = sum(only.values())
        print(f"\n-X importtime: {len(only)} modules are imported only with the plugin, "
              f"{total_only / 1e3:.1f} ms of their own import time in all (sum of self times, "
              f"median over {args.importtime_reps} run(s)); all imports: "
              f"{median([float(t) for t in totals['with']]) / 1e3:.0f} ms with vs "
              f"{median([float(t) for t in totals['without']]) / 1e3:.0f} ms without.\n")
        top = sorted(only.items(), key=lambda kv: -kv[1])[:15]
        print(table(["module imported only with the plugin", "self ms", "share"],
                    [[mod, f"{us / 1e3:.2f}", f"{us / total_only:.0%}" if total_only else ""]
                     for mod, us in top]))
        stdlib = sorted(m for m in only if not m.startswith(("pytest_mlcjit", "filelock")))
        print(f"\nnon-plugin modules pulled in by the plugin: {', '.join(stdlib) or 'none'}")

        n = max(3, min(args.reps, 9))
        plugin_import = time_snippet(PLUGIN_IMPORT_PY, env, n)
        probe = time_snippet(PROBE_PY, env, n)
        print("\n" + table(["start-up step (fresh interpreter; diagnostic, no target)", "ms"], [
            ["import pytest_mlcjit.plugin (pytest and xdist already imported)",
             spread([t * 1e3 for t in plugin_import], "{:.1f}")],
            ["pytest_configure device probe for --mlc-device=auto",
             spread([t * 1e3 for t in probe], "{:.1f}")],
        ]))
        checks.expect(bool(plugin_import), "timing 'import pytest_mlcjit.plugin' failed")
        checks.expect(bool(probe), "timing the device probe failed")
    print("\nValues are median [min..max] over reps.")
    return checks.exit_code()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
