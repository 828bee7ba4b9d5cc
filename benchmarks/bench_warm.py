"""Benchmark 3, warm overhead: what the plugin costs when everything is already compiled.

1. Wall time of a warm-cache ``pytest`` run with the plugin against the same tests loading
   the same library files from a JSON list of known paths, with ``-p no:mlcjit`` and a
   plain conftest fixture (no key, no lookup, no checksum), alternating, per worker
   count. Target: <= 1.05x.
2. In-process cost of a hit through ``pytest_mlcjit.JIT.compile`` on that warm cache, in
   a fresh process per repetition: the first request in the process (one-time set-up:
   toolchain fingerprint, cache root checks), the first request of each other key (key,
   manifest read, SHA-256 of the library), and later requests (memoized: one stat).
   Target: later requests < 1 ms.

    python benchmarks/bench_warm.py            # full: layers=8, K=4, N=25, W=0 and 2, 11 reps
    python benchmarks/bench_warm.py --quick    # CI: tiny model, 1 rep, checks counts only
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
    make_configs,
    manifests,
    median,
    parse_ints,
    plugin_summary,
    print_header,
    pytest_argv,
    rotate,
    run_timed,
    spread,
    table,
    work_dir,
    write_suite,
    xdist_args,
)

WALL_TARGET = 1.05
HIT_TARGET_MS = 1.0


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
        args.configs, args.tests, args.layers, args.reps = 2, 2, [1], 1
        args.workers, args.requests = [2], 50
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
    repeats = []
    for i in range(requests):
        spec = specs[i % len(specs)]
        t0 = time.perf_counter()
        engine.compile(spec, "cpu")
        repeats.append(time.perf_counter() - t0)
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
        "sha256_ms": statistics.median(sha) * 1e3,
        "library_bytes": data_path.stat().st_size,
        "compiles": engine.stats.compiles,
        "hits": engine.stats.hits,
        "all_hits": bool(first.hit),
    }


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
    checks = Checks()
    with work_dir(args, "warm") as root:
        cache, counter = root / "cache", root / "compiles.txt"
        plugin_suite = write_suite(root / "plugin", "plugin", configs, n)
        paths_suite = write_suite(root / "paths", "paths", configs, n)
        env = bench_env(MLCJIT_BENCH_COUNT=str(counter),
                        BENCH_LIB_PATHS=str(root / "paths.json"))
        warmup = run_timed(pytest_argv("-n", "2", f"--basetemp={root / 'bt0'}",
                                       "--mlc-device=cpu", f"--mlc-jit-cache-dir={cache}"),
                           cwd=plugin_suite, env=env)
        if not checks.run_ok(warmup, "warm-up run"):
            return checks.exit_code()
        checks.expect(count_lines(counter) == k, f"warm-up compiled {count_lines(counter)}, "
                                                 f"expected K={k}")
        paths = {config_id(m["key"]["config"]): {
            "path": str(cache / "tvm" / m["library"]), "params": m.get("params", [])}
            for m in manifests(cache)}
        (root / "paths.json").write_text(json.dumps(paths), encoding="utf-8")
        print(f"warm-up: {k} libraries compiled in {warmup.seconds:.1f}s", flush=True)

        wall_rows = []
        for w in args.workers:
            walls: dict[str, list[float]] = {"plugin": [], "paths": []}
            ratios, diffs, cpu_ratios = [], [], []
            for rep in range(args.reps):
                this: dict[str, float] = {}
                cpu: dict[str, float] = {}
                for variant in rotate(["plugin", "paths"], rep):
                    bt = f"--basetemp={root / f'bt-{w}-{rep}-{variant}'}"
                    if variant == "plugin":
                        run = run_timed(pytest_argv(*xdist_args(w), bt, "--mlc-device=cpu",
                                                    f"--mlc-jit-cache-dir={cache}"),
                                        cwd=plugin_suite, env=env)
                        summary = plugin_summary(run.output)
                        checks.expect(summary is not None and summary["compiles"] == 0
                                      and summary["hits"] == k * n,
                                      f"W={w} rep {rep}: plugin summary {summary}, expected "
                                      f"{k * n} hits and 0 compiles")
                    else:
                        run = run_timed(pytest_argv(*xdist_args(w), bt, "-p", "no:mlcjit"),
                                        cwd=paths_suite, env=env)
                    checks.run_ok(run, f"W={w} rep {rep} {variant}")
                    this[variant] = run.seconds
                    cpu[variant] = run.cpu_seconds
                    walls[variant].append(run.seconds)
                ratios.append(this["plugin"] / this["paths"])
                diffs.append(this["plugin"] - this["paths"])
                cpu_ratios.append(cpu["plugin"] / cpu["paths"])
                print(f"W={w} rep {rep}: plugin {this['plugin']:.2f}s  known paths "
                      f"{this['paths']:.2f}s  ratio {ratios[-1]:.3f}  (CPU {cpu['plugin']:.2f}s"
                      f" vs {cpu['paths']:.2f}s, ratio {cpu_ratios[-1]:.3f})", flush=True)
            ratio = median(ratios)
            wall_rows.append([
                str(w) if w else "0 (no xdist)", spread(walls["plugin"]),
                spread(walls["paths"]), f"{ratio:.3f}x",
                f"{median(walls['plugin']) / median(walls['paths']):.3f}x",
                f"{median(diffs) * 1e3:+.0f}", f"{median(cpu_ratios):.3f}x",
                "met" if ratio <= WALL_TARGET else f"missed by {ratio / WALL_TARGET - 1:.1%}"])
        checks.expect(count_lines(counter) == k, "a warm run compiled something")

        probes: list[dict[str, Any]] = []
        for rep in range(args.reps):
            argv_ = [sys.executable, str(Path(__file__).resolve()), "--_inprocess",
                     str(cache), str(plugin_suite), "--configs", str(k), "--layers",
                     ",".join(map(str, args.layers)), "--requests", str(args.requests)]
            proc = subprocess.run(argv_, env=env, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                checks.expect(False, f"in-process probe rep {rep} failed:\n{proc.stderr[-3000:]}")
                continue
            data = json.loads(proc.stdout.strip().splitlines()[-1])
            checks.expect(data["compiles"] == 0 and data["all_hits"],
                          f"in-process rep {rep} compiled: {data}")
            probes.append(data)

    print("\nWarm wall time, plugin vs known paths (same tests, same library files):\n")
    print(table(["workers", "plugin s", "known paths s", "ratio (median of per-rep)",
                 "ratio of medians", "difference ms (median of per-rep)",
                 "CPU-time ratio (median of per-rep)",
                 f"target <= {WALL_TARGET}x"], wall_rows))
    if probes:
        def col(name: str) -> list[float]:
            return [float(p[name]) for p in probes]

        hit_med = median(col("repeat_median_us")) / 1e3
        print(f"\nIn-process JIT.compile on the warm cache ({len(probes)} fresh processes, "
              f"library {int(probes[0]['library_bytes']) // 1024} KiB):\n")
        print(table(["request", "time", "target"], [
            ["first request in the process (one-time set-up + key + checksum)",
             spread(col("first_in_process_ms"), "{:.2f}") + " ms", ""],
            ["first request of another key (key, manifest, checksum)",
             spread(col("first_of_key_ms"), "{:.2f}") + " ms", ""],
            ["  of which: SHA-256 of the library alone",
             spread(col("sha256_ms"), "{:.3f}") + " ms", ""],
            [f"later requests, median of {args.requests}",
             spread(col("repeat_median_us"), "{:.1f}") + " us",
             f"< {HIT_TARGET_MS:g} ms: " + ("met" if hit_med < HIT_TARGET_MS else "missed")],
            ["later requests, p99", spread(col("repeat_p99_us"), "{:.1f}") + " us", ""],
            ["later requests, mean", spread(col("repeat_mean_us"), "{:.1f}") + " us", ""],
        ]))
    print("\nValues are median [min..max] over reps.")
    return checks.exit_code()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
