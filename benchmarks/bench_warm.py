"""Benchmark 3, warm overhead: what the plugin costs when everything is already compiled.

1. Wall time of a warm-cache ``pytest`` run with the plugin against the same tests loading
   the same library files from a JSON list of known paths, with ``-p no:mlcjit`` and a
   plain conftest fixture (no key, no lookup, no checksum), alternating, per worker
   count. Target: <= 1.05x (median of the per-repetition ratios). Every hit of every test
   is inside this figure. Checked from the outside: the warm runs compile nothing (the
   benchmark's factory counts compiles) and add no library to the cache.
2. Where the time goes (diagnostic, no target): the in-process cost of a hit through
   ``pytest_mlcjit.JIT.compile`` on that warm cache, in a fresh process per repetition:
   the first request in the process (one-time set-up: toolchain fingerprint, cache root
   checks), the first request of each other key (key, manifest read, SHA-256 of the
   library), and later requests (memoized), each later request alternating with what
   every test does with its library anyway (``tvm.runtime.load_module`` and a Relax VM),
   whose ratio is printed.

    python benchmarks/bench_warm.py            # full: layers=8, K=4, N=25, W=0 and 2, 11 reps
    python benchmarks/bench_warm.py --quick    # CI: tiny model, no xdist, 2 rounds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _benchlib import (
    Checks,
    bench_env,
    common_args,
    config_id,
    count_lines,
    libraries,
    make_configs,
    manifests,
    median,
    parse_ints,
    print_header,
    pytest_argv,
    ratio_of,
    rotate,
    run_timed,
    spread,
    table,
    work_dir,
    write_suite,
    xdist_args,
)

WALL_TARGET = 1.05


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(parser)
    parser.add_argument("--workers", type=parse_ints, default=[0, 2],
                        help="worker counts to measure, 0 = no xdist (default 0,2)")
    parser.add_argument("--configs", type=int, default=4, help="distinct configs K (default 4)")
    parser.add_argument("--tests", type=int, default=25, help="tests per config N (default 25)")
    parser.add_argument("--layers", type=parse_ints, default=[8],
                        help="transformer layers, cycled over the configs (default 8)")
    parser.add_argument("--reps", type=int, default=11, help="repetitions (default 11)")
    parser.add_argument("--requests", type=int, default=1000,
                        help="in-process repeated requests per repetition (default 1000)")
    parser.add_argument("--_inprocess", nargs=2, metavar=("CACHE", "SUITE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.configs, args.tests, args.layers, args.reps = 2, 2, [1], 2
        args.workers, args.requests = [0], 50
    return args


# -- the in-process probe (runs in a fresh interpreter) -------------------------------------
def inprocess_probe(cache: Path, suite: Path, configs: list[dict[str, int]],
                    requests: int) -> dict[str, Any]:
    """Time ``JIT.compile`` hits in this (fresh) process; returns the figures as JSON."""
    sys.path.insert(0, str(suite))
    from pytest_mlcjit import JIT, Settings, TVMModel

    specs = [TVMModel("benchmodel:build", config=c) for c in configs]
    t0 = time.perf_counter()
    engine = JIT(Settings(cache_dir=cache))
    first = engine.compile(specs[0], "cpu")
    first_s = time.perf_counter() - t0
    others = []
    for spec in specs[1:]:
        t0 = time.perf_counter()
        engine.compile(spec, "cpu")
        others.append(time.perf_counter() - t0)
    import tvm
    from tvm import relax

    dev = tvm.cpu()
    relax.VirtualMachine(tvm.runtime.load_module(str(first.path)), dev)  # once, untimed
    repeats, loads = [], []
    for i in range(requests):  # a later request, then a load of its library: alternating
        spec = specs[i % len(specs)]
        t0 = time.perf_counter()
        done = engine.compile(spec, "cpu")
        t1 = time.perf_counter()
        relax.VirtualMachine(tvm.runtime.load_module(str(done.path)), dev)
        t2 = time.perf_counter()
        repeats.append(t1 - t0)
        loads.append(t2 - t1)
    sha = []
    data_path = first.path
    for _ in range(5):
        t0 = time.perf_counter()
        hashlib.sha256(data_path.read_bytes()).hexdigest()
        sha.append(time.perf_counter() - t0)
    repeats.sort()
    return {
        "first_in_process_ms": first_s * 1e3,
        "first_of_key_ms": statistics.median(others) * 1e3 if others else float("nan"),
        "repeat_median_us": statistics.median(repeats) * 1e6,
        "repeat_p99_us": repeats[int(0.99 * (len(repeats) - 1))] * 1e6,
        "repeat_mean_us": statistics.fmean(repeats) * 1e6,
        "load_median_us": statistics.median(loads) * 1e6,
        "repeat_per_load": statistics.median(repeats) / statistics.median(loads),
        "sha256_ms": statistics.median(sha) * 1e3,
        "library_bytes": data_path.stat().st_size,
    }


def measure_walls(args: argparse.Namespace, w: int, root: Path, suites: tuple[Path, Path],
                  cache: Path, *, env: dict[str, str], checks: Checks) -> list[object]:
    """Warm runs with W=``w``, plugin and known paths alternating; the table row."""
    k, n = args.configs, args.tests
    plugin_suite, paths_suite = suites
    walls: dict[str, list[float]] = {"plugin": [], "paths": []}
    cpus: dict[str, list[float]] = {"plugin": [], "paths": []}
    for rep in range(args.reps):
        this: dict[str, float] = {}
        cpu: dict[str, float] = {}
        for variant in rotate(["plugin", "paths"], rep):
            bt = f"--basetemp={root / f'bt-{w}-{rep}-{variant}'}"
            if variant == "plugin":
                run = run_timed(pytest_argv(*xdist_args(w), bt, "--mlc-device=cpu",
                                            f"--mlc-jit-cache-dir={cache}"),
                                cwd=plugin_suite, env=env)
                checks.expect(f"{k * n} passed" in run.output,
                              f"W={w} rep {rep}: expected {k * n} passed:\n"
                              f"{run.tail(5)}")
            else:
                run = run_timed(pytest_argv(*xdist_args(w), bt, "-p", "no:mlcjit"),
                                cwd=paths_suite, env=env)
            if checks.run_ok(run, f"W={w} rep {rep} {variant}"):
                this[variant] = run.seconds
                cpu[variant] = run.cpu_seconds
        if len(this) != 2:
            continue
        for variant, seconds in this.items():
            walls[variant].append(seconds)
            cpus[variant].append(cpu[variant])
        print(f"W={w} rep {rep}: plugin {this['plugin']:.2f}s  known paths "
              f"{this['paths']:.2f}s  ratio {this['plugin'] / this['paths']:.3f}  "
              f"(CPU {cpu['plugin']:.2f}s vs {cpu['paths']:.2f}s, ratio "
              f"{cpu['plugin'] / cpu['paths']:.3f})", flush=True)
    fig = checks.figure(f"{'W=' + str(w) if w else 'no xdist'}: warm run, plugin / "
                        "known paths", ratio_of(walls["plugin"], walls["paths"]),
                        WALL_TARGET)
    diffs = [a - b for a, b in zip(walls["plugin"], walls["paths"], strict=True)]
    return [
        str(w) if w else "0 (no xdist)", spread(walls["plugin"]),
        spread(walls["paths"]), f"{fig.ratio:.3f}x", f"{median(diffs) * 1e3:+.0f}",
        f"{ratio_of(cpus['plugin'], cpus['paths']):.3f}x", fig.verdict()]


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    configs = make_configs(args.configs, args.layers)
    if args._inprocess:
        cache, suite = map(Path, args._inprocess)
        print(json.dumps(inprocess_probe(cache, suite, configs, args.requests)))
        return 0
    k, n = args.configs, args.tests
    print_header(
        "bench_warm: warm-cache overhead",
        f"K={k} configs (layers {args.layers}), N={n} tests per config, workers "
        f"{args.workers}, {args.reps} rep(s), {args.requests} in-process requests per rep")
    checks = Checks(quick=args.quick)
    with work_dir(args, "warm") as root:
        cache, counter = root / "cache", root / "compiles.txt"
        plugin_suite = write_suite(root / "plugin", "plugin", configs, n)
        paths_suite = write_suite(root / "paths", "paths", configs, n)
        env = bench_env(MLCJIT_BENCH_COUNT=str(counter),
                        BENCH_LIB_PATHS=str(root / "paths.json"))
        warmup = run_timed(pytest_argv(*xdist_args(2 if max(args.workers) else 0),
                                       f"--basetemp={root / 'bt0'}",
                                       "--mlc-device=cpu", f"--mlc-jit-cache-dir={cache}"),
                           cwd=plugin_suite, env=env)
        if not checks.run_ok(warmup, "warm-up run"):
            return checks.exit_code()
        checks.expect(count_lines(counter) == k, f"warm-up compiled {count_lines(counter)}, "
                                                 f"expected K={k}")
        # The known-paths list: the library of each config (identified by its manifest's
        # key) and its parameter list, exactly what the plugin hands the test.
        paths = {config_id(m["key"]["config"]): {
            "path": str(cache / "tvm" / m["library"]), "params": m.get("params", [])}
            for m in manifests(cache)}
        (root / "paths.json").write_text(json.dumps(paths), encoding="utf-8")
        print(f"warm-up: {k} libraries compiled in {warmup.seconds:.1f}s", flush=True)

        wall_rows = [measure_walls(args, w, root, (plugin_suite, paths_suite), cache,
                                   env=env, checks=checks) for w in args.workers]
        checks.expect(count_lines(counter) == k, "a warm run compiled something")
        checks.expect(libraries(cache) == k,
                      "the warm runs changed the number of libraries in the cache")

        probes: list[dict[str, Any]] = []
        for rep in range(1 if args.quick else args.reps):
            argv_ = [sys.executable, str(Path(__file__).resolve()), "--_inprocess",
                     str(cache), str(plugin_suite), "--configs", str(k), "--layers",
                     ",".join(map(str, args.layers)), "--requests", str(args.requests)]
            proc = subprocess.run(argv_, env=env, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                checks.expect(False, f"in-process probe rep {rep} failed:\n{proc.stderr[-3000:]}")
                continue
            probes.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        checks.expect(count_lines(counter) == k, "an in-process probe compiled something")

    print("\nWarm wall time, plugin vs known paths (same tests, same library files):\n")
    print(table(["workers", "plugin s", "known paths s", "ratio (median of per-rep)",
                 "difference ms (median of per-rep)", "CPU-time ratio (median of per-rep)",
                 f"target <= {WALL_TARGET}x"], wall_rows))
    if probes:
        def col(name: str) -> list[float]:
            return [float(p[name]) for p in probes]

        fig = checks.figure("later JIT.compile hit / loading its library into a VM "
                            "(in-process, alternating)", median(col("repeat_per_load")))
        print(f"\nWhere the time goes (diagnostic): in-process JIT.compile on the warm cache "
              f"({len(probes)} fresh processes, library "
              f"{int(probes[0]['library_bytes']) // 1024} KiB):\n")
        print(table(["request", "time", "per load of the library"], [
            ["first request in the process (one-time set-up + key + checksum)",
             spread(col("first_in_process_ms"), "{:.2f}") + " ms", ""],
            ["first request of another key (key, manifest, checksum)",
             spread(col("first_of_key_ms"), "{:.2f}") + " ms", ""],
            ["  of which: SHA-256 of the library alone",
             spread(col("sha256_ms"), "{:.3f}") + " ms", ""],
            [f"later requests, median of {args.requests}",
             spread(col("repeat_median_us"), "{:.1f}") + " us", f"{fig.ratio:.3f}x"],
            ["loading the library into a Relax VM (what each test does), median",
             spread(col("load_median_us"), "{:.1f}") + " us", "1x"],
            ["later requests, p99", spread(col("repeat_p99_us"), "{:.1f}") + " us", ""],
            ["later requests, mean", spread(col("repeat_mean_us"), "{:.1f}") + " us", ""],
        ]))
    print("\nValues are median [min..max] over reps.")
    return checks.exit_code()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
